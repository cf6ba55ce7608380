"""Tests for vae.py: the VidTok causal VAE (both versions) and the identity PixelVAE.

Parity oracle: diffusers' AutoencoderVidTok (test-only dependency), an independent implementation of VidTok v1.1.
Switched by hooks to v1.0's semantics (zero temporal padding, frame-repeat upsampling) it is the v1.0 oracle too.
All weights are randomised, including those upstream initialises to zero, which would hide bugs. Models use tiny
widths except the meta-device key test, which builds the full-size one for free.
"""

import hashlib

import pytest
import torch

from vae import PixelVAE, VidTokVAE

TINY = dict(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)

# The key layout of the official 16-channel checkpoint vidtok_kl_causal_488_16chn.ckpt (416 keys): sha256 of the sorted lines
# "<key> [<shape>]", and the parameter counts of the encoder and decoder.
OFFICIAL_KEYS_SHA256 = "28347ed91cdca23c78b32a7423d51c39f7239a0680058d2c399145d3e76be319"
OFFICIAL_PARAMS = {"encoder": 69_589_922, "decoder": 88_359_429}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or name.endswith("mix_factor"):
                p.copy_(0.2 * noise)
            else:  # conv weights, scaled to keep activations O(1)
                p.copy_(noise / p[0].numel() ** 0.5)
    return model.eval()


def tiny_vae(version: str, **kwargs) -> VidTokVAE:
    return randomized(VidTokVAE(version, **TINY, **kwargs))


def video(t: int, h: int = 16, w: int = 24, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the official layout ---------------------------------------------------------------------------------------------


def test_default_model_has_the_official_416_keys():
    with torch.device("meta"):
        vae = VidTokVAE()
    shapes = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert len(shapes) == 416
    assert sum(k.startswith("encoder.") for k in shapes) == 176 and sum(k.startswith("decoder.") for k in shapes) == 240
    digest = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(shapes.items())).encode()).hexdigest()
    assert digest == OFFICIAL_KEYS_SHA256
    for part, count in OFFICIAL_PARAMS.items():
        assert sum(p.numel() for p in getattr(vae, part).parameters()) == count
    # A few spelled out, so that a failure says where to look.
    assert shapes["encoder.down_temporal.2.downsample.conv.conv.weight"] == [512, 512, 3, 3, 3]
    assert shapes["encoder.mid.attn_1.q.conv.weight"] == [512, 512, 1, 1, 1]
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == [256, 512, 1, 1]
    assert shapes["decoder.up_temporal.1.block.2.conv2.conv.weight"] == [256, 256, 3]
    assert (vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (16, 4, 8)


# --- parity with diffusers -------------------------------------------------------------------------------------------


def diffusers_twin(vae: VidTokVAE, v10: bool = False) -> torch.nn.Module:
    """diffusers' AutoencoderVidTok with `vae`'s weights; with `v10`, hooked to run VidTok v1.0's semantics."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.autoencoders import autoencoder_vidtok as dv

    ref = diffusers.AutoencoderVidTok(**{**TINY, "ch_mult": list(TINY["ch_mult"])}).eval()
    ref.load_state_dict(vae.state_dict(), strict=True)
    if v10:
        def zero_history(module, args):
            # Present zeros as "frames from a previous chunk": v1.0 pads causal convs and the pooling with zeros.
            pad = getattr(module, "time_pad", 1)
            module.is_first_chunk, module.cache_offset = False, 0
            x = args[0]
            module.causal_cache = x.new_zeros(*x.shape[:2], pad, *x.shape[3:])

        for m in ref.modules():
            if isinstance(m, (dv.VidTokCausalConv1d, dv.VidTokCausalConv3d, dv.VidTokDownsample3D)):
                m.register_forward_pre_hook(zero_history)
            if isinstance(m, dv.VidTokUpsample3D):
                m.enable_cached, m.interpolation_mode = False, "nearest"
    return ref


def reference_encode_decode(ref, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        # diffusers' encode expects the three front copies of frame 0; its decode drops the matching 3 frames.
        z = ref.encode(torch.cat([x[:, :, :1].expand(-1, -1, 3, -1, -1), x], dim=2)).latent_dist.mode()
        return z, ref.decode(z)


@pytest.mark.parametrize("t", [1, 5, 9, 17])
def test_v11_matches_diffusers(t):
    vae = tiny_vae("v1.1")
    x = video(t, 24, 40, batch=2)
    z_ref, y_ref = reference_encode_decode(diffusers_twin(vae), x)
    z = vae.encode(x)
    assert z.shape == (2, 16, (t - 1) // 4 + 1, 3, 5)
    assert (z - z_ref).abs().max() < 1e-4
    y = vae.decode(z_ref)
    assert y.shape == x.shape
    assert (y - y_ref).abs().max() < 1e-4


@pytest.mark.parametrize("t", [1, 9])
def test_v10_matches_diffusers_switched_to_v10(t):
    vae = tiny_vae("v1.0")
    x = video(t, 24, 40)
    z_ref, y_ref = reference_encode_decode(diffusers_twin(vae, v10=True), x)
    assert (vae.encode(x) - z_ref).abs().max() < 1e-4
    assert (vae.decode(z_ref) - y_ref).abs().max() < 1e-4
    # ...and the two versions really differ, so this is not the v1.1 test again.
    assert (tiny_vae("v1.1").decode(z_ref) - y_ref).abs().max() > 1e-2


# --- v1.0 properties, chunking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 5, 9])
def test_frame_rule(t):
    vae = tiny_vae("v1.0")
    z = vae.encode(video(t, 16, 32))
    assert z.shape == (1, 16, (t - 1) // 4 + 1, 2, 4)
    assert vae.decode(z).shape == (1, 3, t, 16, 32)


def test_v10_is_strictly_causal():
    vae = tiny_vae("v1.0")
    x = video(13)
    z = vae.encode(x)
    for j in range(3):
        changed = x.clone()
        changed[:, :, 4 * j + 1 :] = video(12 - 4 * j, seed=7 + j)
        z2 = vae.encode(changed)
        assert torch.equal(z2[:, :, : j + 1], z[:, :, : j + 1]), f"frames after {4 * j} changed latents <= {j}"
        assert (z2[:, :, j + 1] - z[:, :, j + 1]).abs().max() > 1e-3
    # The decoder too: latent j only reaches output frames >= 4j - 3.
    y = vae.decode(z)
    for j in range(1, 4):
        changed = z.clone()
        changed[:, :, j] += 1
        y2 = vae.decode(changed)
        assert torch.equal(y2[:, :, : 4 * j - 3], y[:, :, : 4 * j - 3])
        assert (y2[:, :, 4 * j - 3] - y[:, :, 4 * j - 3]).abs().max() > 1e-3


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_chunked_equals_unchunked(version):
    whole = tiny_vae(version, chunk_latents=None)
    x = video(21)
    z, y = whole.encode(x), whole.decode(whole.encode(x))
    for chunk in (1, 3):
        chunked = tiny_vae(version, chunk_latents=chunk)
        # Equal up to float rounding (convs over chunks of other lengths sum in another order).
        assert (chunked.encode(x) - z).abs().max() < 5e-5
        assert (chunked.decode(z) - y).abs().max() < 5e-5


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_streamed_decoding_equals_decoding_the_whole(version):
    vae = tiny_vae(version, chunk_latents=None)
    z = vae.encode(video(21))                                   # 6 latent frames
    pieces = [z[:, :, :1], z[:, :, 1:3], z[:, :, 3:4], z[:, :, 4:]]
    out = list(vae.decode_stream(iter(pieces), total=6))
    # v1.0: frame 0, then 4 frames per latent; v1.1 looks ahead, so some frames come one piece later.
    assert [f.shape[2] for f in out] == ([1, 8, 4, 8] if version == "v1.0" else [1, 5, 4, 11])
    assert (torch.cat(out, 2) - vae.decode(z)).abs().max() < 5e-5


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_streamed_encoding_equals_encoding_the_whole(version):
    vae, x = tiny_vae(version), video(21)
    for cuts in ([1] * 21, [3, 1, 7, 10], [21]):               # frames one at a time, uneven groups, all at once
        edges = [0, *torch.tensor(cuts).cumsum(0).tolist()]
        latents = list(vae.encode_stream(x[:, :, a:b] for a, b in zip(edges[:-1], edges[1:])))
        assert len(latents) == 6 and all(z.shape[2] == 1 for z in latents)
        assert (torch.cat(latents, 2) - vae.encode(x)).abs().max() < 5e-5


def test_bad_frame_streams_are_named():
    vae, x = tiny_vae("v1.0"), video(9)
    stream = vae.encode_stream([x[:, :, :5], x[:, :, 5:7]])
    assert len([next(stream), next(stream)]) == 2               # frames 0 and 1-4: two latents, kept
    with pytest.raises(ValueError, match="ended 2 frames into a latent frame"):
        next(stream)
    with pytest.raises(ValueError, match="held no frames"):
        list(vae.encode_stream([]))
    with pytest.raises(ValueError, match="changed from batch x height x width"):
        list(vae.encode_stream([x[:, :, :1], x[:, :, 1:5, :8, :8]]))
    assert torch.equal(torch.cat(list(PixelVAE().encode_stream([x[:, :, :2], x[:, :, 2:]])), 2), x)


def test_a_latent_stream_that_does_not_match_its_total_is_named():
    vae, z = tiny_vae("v1.0"), torch.randn(1, 16, 3, 2, 2)
    stream = vae.decode_stream([z[:, :, :1], z[:, :, 1:2]], total=3)
    assert next(stream).shape[2] == 1 and next(stream).shape[2] == 4   # what came is decoded and kept
    with pytest.raises(ValueError, match="ended after 2 of the 3"):
        next(stream)
    with pytest.raises(ValueError, match="more than the 2 latent frames"):
        list(vae.decode_stream([z], total=2))
    assert torch.equal(torch.cat(list(PixelVAE().decode_stream([z[:, :3, :1], z[:, :3, 1:]], 3)), 2), z[:, :3])


def test_sampling_draws_around_the_mean():
    vae = tiny_vae("v1.0")
    x = video(5)
    mean = vae.encode(x)
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, mean)


# --- checkpoints -----------------------------------------------------------------------------------------------------


def lightning_checkpoint(vae: VidTokVAE, **extra) -> dict:
    """What the official Lightning .ckpt holds: weights under `state_dict`, with the training losses' `loss.*`."""
    state = dict(vae.state_dict())
    state["loss.logvar"] = torch.zeros(())
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    state["loss.discriminator.main.3.running_mean"] = torch.zeros(128)
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.4", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}], **extra}


def test_loads_official_lightning_checkpoint_weights_only_first(tmp_path, monkeypatch):
    vae = tiny_vae("v1.0")
    path = tmp_path / "vidtok_kl_causal_488_16chn.ckpt"
    torch.save(lightning_checkpoint(vae), path)
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    loaded = VidTokVAE.from_checkpoint(path, version="v1.0", **TINY)
    assert calls == [True]
    assert not loaded.training and loaded.version == "v1.0"
    x = video(5)
    assert torch.equal(loaded.encode(x), vae.encode(x))


class NotAWeight:
    """Stands for a pickled object outside torch's weights_only allow-list (e.g. a config object)."""


def test_checkpoint_with_other_pickled_objects_needs_trusted(tmp_path):
    vae = tiny_vae("v1.1")
    path = tmp_path / "vidtok_kl_causal_488_16chn_v1_1.ckpt"
    torch.save(lightning_checkpoint(vae, hyper_parameters=NotAWeight()), path)
    with pytest.raises(ValueError, match="pickled objects besides tensors.*trusted=True"):
        VidTokVAE.from_checkpoint(path, version="v1.1", **TINY)
    loaded = VidTokVAE.from_checkpoint(path, version="v1.1", trusted=True, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))


def edited(state: dict, drop=(), add=None, reshape=()) -> dict:
    state = {k: v for k, v in state.items() if k not in drop} | (add or {})
    return state | {k: torch.zeros(3) for k in reshape}


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("a.ckpt", dict(drop=["decoder.conv_out.conv.bias"]), "missing keys.*decoder.conv_out.conv.bias"),
        ("a.ckpt", dict(reshape=["encoder.conv_in.conv.bias"]), "shape mismatches.*encoder.conv_in.conv.bias"),
        ("a.ckpt", dict(add={"regularization.codebook": torch.zeros(2)}), "unexpected keys.*regularization"),
        ("vidtok_kl_causal_488_16chn_v1_1.ckpt", {}, "v1.1 checkpoint but version='v1.0'.*pass version='v1.1'"),
    ],
)
def test_bad_checkpoints_are_named(tmp_path, name, change, message):
    ckpt = lightning_checkpoint(tiny_vae("v1.0"))
    ckpt["state_dict"] = edited(ckpt["state_dict"], **change)
    torch.save(ckpt, tmp_path / name)
    with pytest.raises(ValueError, match=message):
        VidTokVAE.from_checkpoint(tmp_path / name, version="v1.0", **TINY)


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(1, 3, 4, 16, 16), "T=4 frames.*4k\\+1"),
        (torch.zeros(1, 3, 5, 12, 16), "multiples of 8, got 12x16"),
        (torch.zeros(1, 4, 5, 16, 16), "3 \\(RGB\\) channels.*got 4"),
        (torch.full((1, 3, 5, 16, 16), 255.0), "\\[-1, 1\\].*max 255"),
        (torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8), "float tensor.*x / 127.5 - 1"),
        (torch.zeros(3, 5, 16, 16), "\\(B, 3, T, H, W\\) tensor"),
    ],
)
def test_bad_video_is_named(x, message):
    with pytest.raises(ValueError, match=message):
        tiny_vae("v1.0").encode(x)


def test_decoded_frames_outside_the_range_are_taken_when_asked():
    """chunks.decode_long re-encodes the decoder's overshooting overlap frame as it is (check_range=False)."""
    x = torch.full((1, 3, 5, 16, 16), 2.37)
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        tiny_vae("v1.0").encode(x)
    assert torch.isfinite(tiny_vae("v1.0").encode(x, check_range=False)).all()
    assert torch.equal(PixelVAE().encode(x, check_range=False), x)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="version must be one of"):
        VidTokVAE("v2")
    with pytest.raises(ValueError, match="ch_mult must have 4 entries"):
        VidTokVAE(**{**TINY, "ch_mult": (1, 2, 4)})
    with pytest.raises(ValueError, match="16 channels in dim 1, got 3"):
        tiny_vae("v1.0").decode(torch.zeros(1, 3, 2, 2, 2))


# --- PixelVAE --------------------------------------------------------------------------------------------------------


def test_pixel_vae_is_the_identity_with_the_same_api():
    vae = PixelVAE()
    x = video(6, 10, 14)  # no frame or size rule: factors are 1
    z = vae.encode(x, sample=True)
    assert torch.equal(z, x) and z is not x
    assert torch.equal(vae.decode(z), x)
    assert (vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (3, 1, 1)
    with pytest.raises(ValueError, match="3 channels in dim 1, got 4"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        vae.encode(x * 100)

