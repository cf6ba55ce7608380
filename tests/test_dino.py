"""DINOv2: key layout of the presets, parity with Hugging Face transformers (random weights, tiny
configs), official-layout loading, position-embedding rules, REPA targets and input errors."""

import json

import pytest
import torch
import torch.nn.functional as F

import dino

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# 64-dimensional heads like every released DINOv2 (the .pth loader infers heads = dim // 64).
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)


def _hf_model(registers):
    torch.manual_seed(1 + registers)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **TINY)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    with torch.no_grad():  # layer scales, norms, mask and register tokens start constant: perturb all
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save_hf_bin(model, directory):
    """HF layout with `pytorch_model.bin` (older Hub uploads); transformers 5 only writes safetensors."""
    model.save_pretrained(directory)
    state = safetensors_torch.load_file(directory / "model.safetensors")
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "registers"])
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    ours = dino.load_dinov2(_save_hf_bin(hf, tmp_path_factory.mktemp("hf")))
    return hf, ours


def _max_diff(hf, ours, x, model=None):
    with torch.no_grad():
        return (hf(pixel_values=x).last_hidden_state - (model or ours)(x)).abs().max().item()


def test_presets_have_the_official_keys_and_sizes():
    with torch.device("meta"):
        small, base = dino.DinoV2(dino.PRESETS["vits14"]), dino.DinoV2(dino.PRESETS["vitb14"])
        base_reg, giant = dino.DinoV2(dino.PRESETS["vitb14_reg4"]), dino.DinoV2(dino.PRESETS["vitg14"])
    sd, sd_reg = base.state_dict(), base_reg.state_dict()
    assert len(sd) == 175 and len(sd_reg) == 176
    assert list(sd)[:4] == ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight"]
    assert list(sd_reg)[:4] == ["cls_token", "pos_embed", "register_tokens", "mask_token"]
    shapes = {"pos_embed": (1, 1370, 768), "mask_token": (1, 768), "patch_embed.proj.weight": (768, 3, 14, 14),
              "blocks.11.attn.qkv.weight": (2304, 768), "blocks.11.ls1.gamma": (768,),
              "blocks.11.mlp.fc1.weight": (3072, 768), "norm.bias": (768,)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert tuple(sd_reg["register_tokens"].shape) == (1, 4, 768)
    assert sum(p.numel() for p in small.parameters()) == 22_056_576
    assert sum(p.numel() for p in base.parameters()) == 86_580_480
    gsd = giant.state_dict()
    assert tuple(gsd["blocks.39.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(gsd["blocks.39.mlp.w3.weight"].shape) == (1536, 4096)


def test_matches_transformers_at_the_native_grid(pair):
    hf, ours = pair
    x = torch.randn(2, 3, 56, 56)
    assert _max_diff(hf, ours, x) < 1e-4
    feats = ours.forward_features(x)
    r = 4 if hf.config.model_type == "dinov2_with_registers" else 0
    assert feats["x_norm_clstoken"].shape == (2, 128)
    assert feats["x_norm_regtokens"].shape == (2, r, 128)
    assert feats["x_norm_patchtokens"].shape == (2, 16, 128)


def test_position_embedding_rules(pair):
    hf, ours = pair
    x = torch.randn(1, 3, 42, 70)  # 3x5 grid: non-square, resampled from the stored 4x4
    if hf.config.model_type == "dinov2_with_registers":
        # Official `_reg` rule (size + antialias) is also HF's: exact match by default.
        assert (ours.interpolate_offset, ours.interpolate_antialias) == (0.0, True)
        assert _max_diff(hf, ours, x) < 1e-4
    else:
        # Official default is the +0.1 scale-factor rule, which differs from HF's size rule;
        # the flag switches to HF's rule.
        assert (ours.interpolate_offset, ours.interpolate_antialias) == (0.1, False)
        assert _max_diff(hf, ours, x) > 1e-3
        ours.interpolate_offset = 0.0
        try:
            assert _max_diff(hf, ours, x) < 1e-4
        finally:
            ours.interpolate_offset = 0.1


# Official hub names from the HF on-disk names (reference table), for one layer.
_OFFICIAL_FROM_HF_LAYER = {
    "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def test_official_layout_pth_loads_strictly(tmp_path):
    hf = _hf_model(registers=True)
    hf.save_pretrained(tmp_path / "hf")
    src = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    off = {"cls_token": src["embeddings.cls_token"], "pos_embed": src["embeddings.position_embeddings"],
           "register_tokens": src["embeddings.register_tokens"], "mask_token": src["embeddings.mask_token"],
           "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": src["layernorm.weight"], "norm.bias": src["layernorm.bias"]}
    for i in range(TINY["num_hidden_layers"]):
        hp, op = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            off[f"{op}attn.qkv.{kind}"] = torch.cat(
                [src[f"{hp}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            for h, o in _OFFICIAL_FROM_HF_LAYER.items():
                off[f"{op}{o}.{kind}"] = src[f"{hp}{h}.{kind}"]
        off[f"{op}ls1.gamma"] = src[f"{hp}layer_scale1.lambda1"]
        off[f"{op}ls2.gamma"] = src[f"{hp}layer_scale2.lambda1"]
    torch.save(off, tmp_path / "dinov2_tiny_reg4_pretrain.pth")

    ours = dino.load_dinov2(tmp_path / "dinov2_tiny_reg4_pretrain.pth")
    assert (ours.cfg.num_registers, ours.cfg.heads, ours.cfg.depth) == (4, 2, 2)
    assert set(ours.state_dict()) == set(off)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in off.items())
    assert _max_diff(hf, ours, torch.randn(1, 3, 56, 56)) < 1e-4

    off["blocks.0.extra"] = torch.zeros(1)
    torch.save(off, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected"):
        dino.load_dinov2(tmp_path / "extra.pth")
    del off["blocks.0.extra"], off["blocks.1.ls2.gamma"]
    torch.save(off, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing"):
        dino.load_dinov2(tmp_path / "missing.pth")


def test_loads_hf_safetensors_with_our_reader(tmp_path):
    hf = _hf_model(registers=False)
    hf.save_pretrained(tmp_path)
    ours = dino.load_dinov2(tmp_path)
    assert _max_diff(hf, ours, torch.randn(1, 3, 56, 56)) < 1e-4


def _per_frame_targets(model, frames, size):
    """Spelled-out preprocessing for frames (T, C, H, W) in [-1, 1]: DINOv2 patch tokens per frame."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = ((frames + 1) / 2 - mean) / std
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        return model.forward_features(x)["x_norm_patchtokens"]


def test_repa_targets_alignment_and_layout(pair):
    _, model = pair
    torch.manual_seed(0)
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    video[:, :, 5:9] = video[:, :, 5:6]  # latent frame 2 <- four copies of one frame
    out = dino.repa_targets(video, model, grid=(2, 3))
    assert out.shape == (2, 3, 6, 128)  # (B, T_latent, h*w, D) at resolution (28, 42)
    assert torch.allclose(out, dino.repa_targets(video, model, grid=(2, 3), chunk=1), atol=1e-5)
    b = 1
    per_frame = _per_frame_targets(model, video[b].transpose(0, 1), (28, 42))
    assert torch.allclose(out[b, 0], per_frame[0], atol=1e-4)  # latent 0 <- frame 0 alone
    assert torch.allclose(out[b, 1], per_frame[1:5].mean(0), atol=1e-4)  # latent 1 <- frames 1..4
    assert torch.allclose(out[b, 2], per_frame[5], atol=1e-4)
    last = dino.repa_targets(video, model, grid=(2, 3), align="last")
    assert torch.allclose(last[b], per_frame[[0, 4, 8]], atol=1e-4)  # latent j <- frame 4j

    # DINOv2 at another resolution (4x4 patches) is resized onto the 2x3 token grid.
    resized = dino.repa_targets(video, model, grid=(2, 3), resolution=56)
    assert resized.shape == (2, 3, 6, 128) and torch.isfinite(resized).all()


def test_bad_inputs(tmp_path, pair):
    _, model = pair
    with pytest.raises(FileNotFoundError):
        dino.load_dinov2(tmp_path / "dinov2_vitb14_pretrain.pth")
    torch.save({"Conv3d_1a_7x7.conv3d.weight": torch.zeros(64, 3, 7, 7, 7)}, tmp_path / "i3d.pt")
    with pytest.raises(ValueError, match="not a DINOv2 checkpoint"):
        dino.load_dinov2(tmp_path / "i3d.pt")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type"):
        dino.load_dinov2(tmp_path / "vit")
    with pytest.raises(ValueError, match="cannot be patched"):
        model(torch.zeros(1, 3, 50, 56))
    video = torch.zeros(1, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        dino.repa_targets(torch.zeros(1, 3, 8, 32, 32), model, grid=(2, 2))
    with pytest.raises(ValueError, match="resolution"):
        dino.repa_targets(video, model, grid=(2, 2), resolution=30)
    with pytest.raises(ValueError, match="align"):
        dino.repa_targets(video, model, grid=(2, 2), align="first")
    with pytest.raises(ValueError, match="grid"):
        dino.repa_targets(video, model, grid=(2, 0))
