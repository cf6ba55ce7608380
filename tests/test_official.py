"""Loading the official VideoFlexTok release (official.py, official.load_tokenizer, the VidTok VAE in the same
file): official-format files with random weights are made here, with the official tensor names and shapes and the
configuration in `__metadata__` in the official layout (str() of each argument of videoflextok.wrappers.VideoFlexTok).
Every tensor must land where its name says; unrepresentable configurations, non-plain metadata and damaged files
must be refused with a message saying what was found. The same files, run through the official inference code,
give the same ids and velocities (checked once outside the test suite; see the README)."""
import json
import math
import re
import struct

import pytest
import torch
import torch.nn.functional as F

import official
import sample
import train_ar
from synthetic import make_synthetic
from video import write_video
from vae import VidTokVAE

PKG = "videoflextok."
TARGET = {
    "PerSampleOp": "model.utils.dict_ops.PerSampleOp", "PatchEmbedder": "model.preprocessors.patching.PatchEmbedder",
    "Pos": "model.utils.posembs.PositionalEmbeddingAdder", "Registers": "model.preprocessors.registers.RegistersTemporal2D",
    "Packer": "model.preprocessors.flex_seq_packing.BlockWiseSequenceInterleavePacker",
    "Transformer": "model.trunks.transformers.FlexTransformer",
    "Unpacker": "model.postprocessors.seq_unpacking.SequenceInterleavedUnpacker",
    "LinearHead": "model.postprocessors.heads.LinearHead", "PatchesHead": "model.postprocessors.heads.ToPatchesLinearHead",
    "RepaHead": "model.postprocessors.heads.TransformerHead", "Linear": "model.preprocessors.linear.LinearLayer",
    "Nested": "model.preprocessors.token_dropout.MaskedNestedDropout",
    "Prefix": "model.preprocessors.token_dropout.MaskedPrefixDropout",
    "Null": "model.preprocessors.nullcond.LearnedNullCond", "Time": "model.preprocessors.time_embedding.TimestepEmbedder",
}


def module(kind, **kwargs):
    return {"_target_": PKG + TARGET[kind], **kwargs}


def per_sample(op, read, write):
    return module("PerSampleOp", read_key=read, write_key=write,
                  per_sample_op={"_target_": PKG + f"model.utils.dict_ops.{op}", "_partial_": True})


def official_config(enc=(64, 1), dec=(128, 2), registers=8, t_max=3, grid=8, patch=1, repa=(32, 1), max_timestep=1.0,
                    dec_mask="time_block_causal"):
    """A small videoflextok.wrappers.VideoFlexTok configuration laid out like the released ones."""
    (De, de), (Dd, dd), C, shape = enc, dec, 16, [1, patch, patch]
    packer = dict(inner_packed_shapes_write_key="ps_inner", outer_packed_shapes_write_key="ps_outer",
                  pad_to_multiple=128)
    unpacker = dict(inner_packed_shapes_read_key="ps_inner", outer_packed_shapes_read_key="ps_outer")
    encoder = {
        "enc_channels_to_last": per_sample("channels_first_to_last", "vae_latents", "enc_latents_cl"),
        "enc_patch_emb": module("PatchEmbedder", input_tensor_list_read_key="enc_latents_cl",
                                patches_list_write_key="enc_patches", n_patches_write_key="enc_n_patches",
                                patch_sizes=shape, channels_in=C, dim=De, flatten_patches=False),
        "enc_posemb_module": module("Pos", read_key="enc_patches", write_key="enc_patches", dim=De,
                                    max_sizes=[grid] * 3, posemb_type="learnable_sum", posemb_scaling="absolute"),
        "enc_register_module": module("Registers", input_tensor_list_read_key="enc_patches",
                                      register_sizes_read_write_key="enc_register_sizes",
                                      registers_write_key="enc_registers", dim=De, t_max=t_max, n_min=registers,
                                      n_max=registers),
        "enc_seq_packer": module("Packer", input_list_read_keys=["enc_patches", "enc_registers"],
                                 packed_seq_write_key="enc_seq", block_mask_write_key="enc_block_mask",
                                 mask_mode="time_block_causal_last", **packer),
        "enc_transformer": module("Transformer", input_seq_read_key="enc_seq", output_seq_write_key="enc_seq",
                                  dim=De, depth=de, block_mask_read_key="enc_block_mask"),
        "enc_unpacker": module("Unpacker", packed_seq_read_key="enc_seq",
                               inner_seq_write_keys=["enc_patches", "enc_registers"], **unpacker),
        "enc_to_latents": module("LinearHead", read_key="enc_registers", write_key="enc_fsq_latents", dim=De,
                                 dim_out=6, use_mup_readout=False, weight_init_style="zero"),
    }
    decoder = {
        "dec_from_latents": module("Linear", read_key="quants", write_key="dec_quants", dim_in=6, dim=Dd),
        "dec_registers_posemb_module": module("Pos", read_key="dec_quants", write_key="dec_quants", dim=Dd,
                                              max_sizes=[registers] * 2, posemb_type="learnable_sum"),
        "dec_nested_dropout": module("Nested", read_write_key="dec_quants", dim=Dd, size_sampling_mode="pow2"),
        "dec_prefix_masking": module("Prefix", read_write_key="dec_quants", dim=Dd),
        "dec_latent_dropout": module("Null", read_write_key="dec_quants", dim=Dd, dropout_prob=0.1),
        "dec_noise_channels_to_last": per_sample("channels_first_to_last", "vae_latents_noised", "dec_noised_cl"),
        "dec_noise_patch_emb": module("PatchEmbedder", input_tensor_list_read_key="dec_noised_cl",
                                      patches_list_write_key="dec_patches", n_patches_write_key="dec_n_patches",
                                      patch_sizes=shape, channels_in=C, dim=Dd, flatten_patches=False),
        "dec_patches_posemb_module": module("Pos", read_key="dec_patches", write_key="dec_patches", dim=Dd,
                                            max_sizes=[grid] * 3, posemb_type="learnable_sum"),
        "dec_seq_packer": module("Packer", input_list_read_keys=["dec_patches", "dec_quants"],
                                 packed_seq_write_key="dec_seq", block_mask_write_key="dec_block_mask",
                                 mask_mode=dec_mask, emb_packing_fn_write_key="dec_emb_packing_fn",
                                 per_subseq_embs=True, repa_block_mask_write_key="dec_repa_block_mask",
                                 repa_mask_mode="time_block_causal", **packer),
        "dec_time_embedder": module("Time", timesteps_read_key="timesteps", time_embedding_write_key="dec_temb",
                                    dim=Dd, max_timestep=max_timestep),
        "dec_transformer": module("Transformer", input_seq_read_key="dec_seq", output_seq_write_key="dec_seq",
                                  dim=Dd, depth=dd, block_mask_read_key="dec_block_mask",
                                  adaLN_emb_read_key="dec_temb", adaLN_packing_fn_read_key="dec_emb_packing_fn",
                                  adaLN_expansion=2, intermediate_layer_write_key="dec_repa_layer",
                                  intermediate_layers=[0]),
        "dec_unpacker": module("Unpacker", packed_seq_read_key="dec_seq",
                               inner_seq_write_keys=["dec_patches", "dec_quants"], **unpacker),
        "dec_to_patches": module("PatchesHead", read_key="dec_patches", write_key="vae_latents_reconst_cl", dim=Dd,
                                 channels_out=C, patch_sizes=shape, use_mup_readout=False,
                                 adaLN_emb_read_key="dec_temb"),
        "dec_channels_to_first": per_sample("channels_last_to_first", "vae_latents_reconst_cl", "vae_latents_reconst"),
        "dec_repa_unpacker": module("Unpacker", packed_seq_read_key="dec_repa_layer",
                                    inner_seq_write_keys=["dec_repa_patches", "dec_repa_registers"], **unpacker),
        "dec_repa_head": module("RepaHead", read_key="dec_repa_patches", write_key="dec_repa_pred", dim=Dd,
                                dim_out=repa[0], depth=repa[1], block_mask_read_key="dec_repa_block_mask"),
    }
    wrapper = PKG + "model.utils.wrappers.SequentialModuleDictWrapper"
    return {
        "_target_": PKG + "wrappers.VideoFlexTok",
        "vae": {"_target_": PKG + "compressors.vidtok.VidTokVAE", "images_read_key": "rgb",
                "vae_latents_read_key": "vae_latents_reconst", "vae_latents_write_key": "vae_latents",
                "images_reconst_write_key": "rgb_reconst", "tokenizer_id": "vidtok_kl_causal_488_16chn"},
        "encoder": {"_target_": wrapper, "module_dict": encoder},
        "decoder": {"_target_": wrapper, "module_dict": decoder},
        "regularizer": {"_target_": PKG + "regularizers.quantize_fsq.FSQ", "latents_read_key": "enc_fsq_latents",
                        "quants_write_key": "quants", "tokens_write_key": "tokens", "levels": [8, 8, 8, 5, 5, 5]},
        "flow_matching_noise_module": {
            "_target_": PKG + "flow_matching.noise_modules.PrefixMinRFNoiseModule", "clean_images_read_key": "vae_latents",
            "noised_images_write_key": "vae_latents_noised", "timesteps_write_key": "timesteps",
            "sigmas_write_key": "sigmas", "prefix_len": 1, "keep_prefix_prob": 0.5},
        "pipeline": {"_target_": PKG + "flow_matching.pipelines.VideoMinRFPipeline", "_partial_": True,
                     "noised_videos_read_key": "vae_latents_noised", "timesteps_read_key": "timesteps",
                     "reconst_write_key": "vae_latents_reconst", "out_channels": C,
                     "cond_vae_latents_key": "cond_vae_latents"},
    }


def block_shapes(prefix, D, depth, adaln):
    hidden = int(2 * 4 * D / 3)
    shapes = {}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        shapes.update({b + f"attn.{w}.weight": (D, D) for w in ("wq", "wk", "wv", "proj")})
        shapes.update({b + "mlp.fc1.weight": (hidden, D), b + "mlp.fc3.weight": (hidden, D), b + "mlp.fc2.weight": (D, hidden)})
        if adaln:
            shapes.update({b + "adaLN_modulation.1.weight": (2 * 6 * D, D), b + "adaLN_modulation.1.bias": (2 * 6 * D,)})
    return shapes


def official_shapes(config):
    """Tensor name -> shape of the official modules' state dict for a configuration made by official_config."""
    e, d = config["encoder"]["module_dict"], config["decoder"]["module_dict"]
    De, Dd, C = e["enc_transformer"]["dim"], d["dec_transformer"]["dim"], e["enc_patch_emb"]["channels_in"]
    p, K = e["enc_patch_emb"]["patch_sizes"][1], e["enc_register_module"]["n_max"]
    E, Dc, registers = "encoder.module_dict.", "decoder.module_dict.", d["dec_registers_posemb_module"]
    shapes = {
        E + "enc_patch_emb.patch_proj.weight": (De, C * p * p), E + "enc_patch_emb.patch_proj.bias": (De,),
        E + "enc_posemb_module.posembs": (3, 1, De, e["enc_posemb_module"]["max_sizes"][0]),
        E + "enc_register_module.registers": (e["enc_register_module"]["t_max"], K, De),
        E + "enc_to_latents.proj.weight": (6, De), E + "enc_to_latents.proj.bias": (6,),
        Dc + "dec_from_latents.proj.weight": (Dd, 6), Dc + "dec_from_latents.proj.bias": (Dd,),
        Dc + "dec_registers_posemb_module.posembs": (1, Dd, *registers["max_sizes"])
        if registers.get("posemb_type", "sincos") == "sincos"
        else (2, 1, Dd, registers["max_sizes"][0]),
        Dc + "dec_nested_dropout.dropout_mask_token": (Dd,), Dc + "dec_prefix_masking.dropout_mask_token": (Dd,),
        Dc + "dec_latent_dropout.nullcond": (Dd,),
        Dc + "dec_noise_patch_emb.patch_proj.weight": (Dd, C * p * p), Dc + "dec_noise_patch_emb.patch_proj.bias": (Dd,),
        Dc + "dec_patches_posemb_module.posembs": (3, 1, Dd, d["dec_patches_posemb_module"]["max_sizes"][0]),
        Dc + "dec_time_embedder.mlp.0.weight": (Dd, 256), Dc + "dec_time_embedder.mlp.0.bias": (Dd,),
        Dc + "dec_time_embedder.mlp.2.weight": (Dd, Dd), Dc + "dec_time_embedder.mlp.2.bias": (Dd,),
        Dc + "dec_to_patches.adaLN_modulation.1.weight": (2 * Dd, Dd), Dc + "dec_to_patches.adaLN_modulation.1.bias": (2 * Dd,),
        Dc + "dec_to_patches.proj.weight": (C * p * p, Dd), Dc + "dec_to_patches.proj.bias": (C * p * p,),
        Dc + "dec_repa_head.out_proj.weight": (d["dec_repa_head"]["dim_out"], Dd),
    }
    shapes.update(block_shapes(E + "enc_transformer.", De, e["enc_transformer"]["depth"], False))
    shapes.update(block_shapes(Dc + "dec_transformer.", Dd, d["dec_transformer"]["depth"], True))
    shapes.update(block_shapes(Dc + "dec_repa_head.transformer.", Dd, d["dec_repa_head"]["depth"], False))
    return shapes


def write_safetensors(path, tensors, metadata):
    """A safetensors file written by hand (the format is simple), so the tests need no safetensors package."""
    header, data, offset = {"__metadata__": metadata}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(data))
    return path


def write_official(path, config, seed=0, vae=None, prefix=""):
    """An official-format file: random tensors named as the official state dict, config as str() per argument."""
    g = torch.Generator().manual_seed(seed)
    tensors = {prefix + k: torch.randn(s, generator=g) * 0.1 for k, s in official_shapes(config).items()}
    if vae is not None:
        tensors.update({f"{prefix}vae.vidtok.{k}": v for k, v in vae.state_dict().items()})
    return write_safetensors(path, tensors, {k: str(v) for k, v in config.items()}), tensors


def ours_for(name):
    """Where an official tensor must land in our state dict, written out independently of official.py."""
    name = name.replace("encoder.module_dict.", "E.").replace("decoder.module_dict.", "D.")
    rules = [(r"E\.enc_patch_emb\.patch_proj\.", "encoder.patch_embed."), (r"E\.enc_register_module\.", "encoder."),
             (r"E\.enc_to_latents\.proj\.", "encoder.to_codes."), (r"E\.enc_transformer\.", "encoder.transformer."),
             (r"D\.dec_from_latents\.proj\.", "decoder.from_codes."),
             (r"D\.dec_nested_dropout\.dropout_mask_token", "decoder.mask_token"),
             (r"D\.dec_prefix_masking\.dropout_mask_token", "decoder.prefix_token"),
             (r"D\.dec_latent_dropout\.nullcond", "decoder.null_token"),
             (r"D\.dec_noise_patch_emb\.patch_proj\.", "decoder.patch_embed."),
             (r"D\.dec_time_embedder\.", "decoder.time."), (r"D\.dec_to_patches\.proj\.", "decoder.head."),
             (r"D\.dec_to_patches\.adaLN_modulation\.1\.", "decoder.head_adaLN."),
             (r"D\.dec_transformer\.", "decoder.transformer."), (r"D\.dec_repa_head\.out_proj\.", "decoder.repa_head.out."),
             (r"D\.dec_repa_head\.", "decoder.repa_head."), (r"mlp\.fc1", "mlp.w1"), (r"mlp\.fc3", "mlp.w3"),
             (r"mlp\.fc2", "mlp.w2"), (r"adaLN_modulation\.1\.", "adaLN.")]
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


POSITIONS = {"encoder.module_dict.enc_posemb_module.posembs": "encoder.pos.axes",
             "decoder.module_dict.dec_registers_posemb_module.posembs": "decoder.register_pos.axes",
             "decoder.module_dict.dec_patches_posemb_module.posembs": "decoder.pos.axes"}


def test_every_official_tensor_lands_where_its_name_says(tmp_path, capsys):
    config = official_config()
    path, tensors = write_official(tmp_path / "model.safetensors", config)
    tok = official.load_tokenizer(path, keep_repa=True)
    ours, landed = tok.state_dict(), set()
    for name, t in tensors.items():
        if name in POSITIONS:  # one (axes, 1, D, M) table -> one (M, D) vector table per axis
            for i in range(t.shape[0]):
                assert torch.equal(ours[f"{POSITIONS[name]}.{i}"], t[i, 0].T), name
                landed.add(f"{POSITIONS[name]}.{i}")
        else:
            assert torch.equal(ours[ours_for(name)], t), name
            landed.add(ours_for(name))
    assert landed == set(ours)  # and nothing of ours was left out
    cfg = tok.cfg
    assert (cfg.enc_width, cfg.dec_width, cfg.enc_depth, cfg.dec_depth, cfg.registers, cfg.max_frames) == (64, 128, 1, 2, 8, 3)
    assert (cfg.latent_size, cfg.patch_size, cfg.enc_mask, cfg.dec_mask, cfg.time_scale) == (8, 1, "causal_registers",
                                                                                           "time_causal", 1000.0)
    assert (cfg.nested_dropout, cfg.null_cond_prob, cfg.square_positions, cfg.register_pos_embedding) == (
        "pow2", 0.1, True, "learnable_sum")
    assert (cfg.repa_dim, cfg.repa_depth, cfg.repa_layer) == (32, 1, 0)
    report = capsys.readouterr().out
    assert f"loaded {len(tensors)} official tensors" in report and "prefix_len = 1" in report  # training: noted

    # For inference the REPA head is dropped, and said so; the hub layout (prefix, config.json) loads the same.
    assert tok.encode(torch.randn(1, 16, 2, 8, 8)).shape == (1, 2, 8)
    hub = tmp_path / "hub"
    hub.mkdir()
    hub_tensors = {"video_tokenizer." + k: v for k, v in tensors.items()}
    write_safetensors(hub / "model.safetensors", hub_tensors, {"format": "pt"})
    (hub / "config.json").write_text(json.dumps({"video_flex_tok": config, "chunk_size": 17}))
    inference = official.load_tokenizer(hub)
    assert inference.decoder.repa_head is None and "dropped 8 REPA head tensors" in capsys.readouterr().out
    assert all(torch.equal(v, ours[k]) for k, v in inference.state_dict().items())


def test_config_choices_become_config_fields(tmp_path):
    config = official_config(max_timestep=1000.0, dec_mask="full", repa=(16, 1))
    config["flow_matching_noise_module"]["ln"] = False   # uniform training t
    path, _ = write_official(tmp_path / "m.safetensors", config)
    cfg = official.config_from_file(path)[0]
    assert cfg.time_scale == 1.0
    assert cfg.time_sampling == "uniform" and official.config_from_file(write_official(
        tmp_path / "ln.safetensors", official_config())[0])[0].time_sampling == "logit_normal"
    assert cfg.dec_mask == "full" and cfg.repa_dim == 0
    # The REPA head reads the decoder under another mask than ours would: dropping it is fine, keeping it is not.
    with pytest.raises(official.Unsupported, match="keep_repa=False"):
        official.config_from_file(path, keep_repa=True)


@pytest.mark.parametrize("max_timestep", [1.0, 250.0, None])   # None: absent, the official default 1000
def test_timestep_embedding_scales_t_by_1000_over_max_timestep(tmp_path, max_timestep):
    """The official TimestepEmbedder, written out: MLP(cos, sin of t * 1000 / max_timestep * 256^(-i/128))."""
    config = official_config(max_timestep=max_timestep)
    if max_timestep is None:
        config["decoder"]["module_dict"]["dec_time_embedder"].pop("max_timestep")
    path, tensors = write_official(tmp_path / "m.safetensors", config)
    tok = official.load_tokenizer(path)
    assert tok.cfg.time_scale == 1000.0 / (max_timestep or 1000.0)
    t = torch.tensor([0.0, 0.3, 1.0])
    freqs = 1000.0 / (max_timestep or 1000.0) * torch.exp(-math.log(256) * torch.arange(128) / 128)
    args = t[:, None] * freqs
    w = {k.rsplit("dec_time_embedder.", 1)[1]: v for k, v in tensors.items() if "dec_time_embedder." in k}
    hidden = F.silu(F.linear(torch.cat([args.cos(), args.sin()], dim=-1), w["mlp.0.weight"], w["mlp.0.bias"]))
    with torch.no_grad():
        torch.testing.assert_close(tok.decoder.time(t), F.linear(hidden, w["mlp.2.weight"], w["mlp.2.bias"]))


def test_sincos_register_positions_the_official_default_load_from_the_file(tmp_path):
    """A register posemb without posemb_type gets the official default, a fixed (1, D, t_max, K) sincos table:
    it is loaded from the file (not squared like the learned tables) and added to the register tokens."""
    config = official_config()
    registers = config["decoder"]["module_dict"]["dec_registers_posemb_module"]
    registers.pop("posemb_type")
    registers["max_sizes"] = [3, 8]
    path, tensors = write_official(tmp_path / "m.safetensors", config)
    tok = official.load_tokenizer(path)
    assert tok.cfg.register_pos_embedding == "sincos" and tok.cfg.square_positions  # the patch tables stay square
    table = tensors["decoder.module_dict.dec_registers_posemb_module.posembs"][0].permute(1, 2, 0)
    assert torch.equal(tok.state_dict()["decoder.register_pos.table"], table)
    assert not any(k.startswith("decoder.register_pos.axes") for k in tok.state_dict())
    codes = tok.encoder.fsq.ids_to_codes(torch.randint(0, 64000, (1, 2, 8)))
    with torch.no_grad():
        assert torch.equal(tok.decoder.embed_registers(codes), tok.decoder.from_codes(codes) + table[:2])


def moved_after(modules, name, after):
    """The module dict with `name` moved to just after `after`."""
    order = [k for k in modules if k != name]
    order.insert(order.index(after) + 1, name)
    return {k: modules[k] for k in order}


@pytest.mark.parametrize("change, message", [
    # Settings the official modules offer but no known release file uses: refused, naming the setting and value.
    (lambda c: c["encoder"]["module_dict"]["enc_posemb_module"].update(posemb_type="learnable_prod"),
     "enc_posemb_module: posemb_type = 'learnable_prod' is not supported"),
    (lambda c: c["decoder"]["module_dict"]["dec_registers_posemb_module"].update(posemb_type="learnable_prod"),
     "dec_registers_posemb_module: posemb_type = 'learnable_prod' is not supported on the registers"),
    # The official default, sincos, is a 2-D table: a video's (t, y, x) patch positions cannot use it.
    (lambda c: c["decoder"]["module_dict"]["dec_patches_posemb_module"].pop("posemb_type"),
     r"dec_patches_posemb_module: posemb_type = 'sincos' is not supported on the patches .*2-D .*3 axes"),
    (lambda c: c["decoder"]["module_dict"]["dec_time_embedder"].update(max_timestep=0.0),
     r"dec_time_embedder: max_timestep = 0.0 is not supported \(only a positive finite number\)"),
    (lambda c: c["decoder"].update(module_dict=moved_after(c["decoder"]["module_dict"], "dec_nested_dropout",
                                                           "dec_latent_dropout")),
     r"replaces the register tokens by prefix, null, nested\); ours .*: nested dropout, clean-prefix masking and the "
     "null condition, each once, in that order"),
    (lambda c: c["decoder"]["module_dict"].pop("dec_prefix_masking"), r"replaces the register tokens by nested, null\)"),
])
def test_settings_no_release_file_uses_are_refused_by_name(tmp_path, change, message):
    config = official_config()
    change(config)
    path, _ = write_official(tmp_path / "m.safetensors", config)
    with pytest.raises(official.Unsupported, match=message):
        official.load_tokenizer(path)


def test_decoder_replaces_register_tokens_in_the_official_module_order(tmp_path):
    """Nested dropout, then the clean prefix frames, then the null condition: on a clean prefix frame the dropped
    slots hold the prefix token too, and the null condition replaces everything."""
    path, _ = write_official(tmp_path / "m.safetensors", official_config())
    tok = official.load_tokenizer(path)
    codes = tok.encoder.fsq.ids_to_codes(torch.randint(0, 64000, (1, 2, 8)))
    keep, prefix = torch.tensor([2]), torch.tensor([1])
    r = tok.decoder.embed_registers(codes, keep, prefix)
    assert torch.equal(r[0, 0], tok.decoder.prefix_token.expand(8, -1))
    assert torch.equal(r[0, 1, 2:], tok.decoder.mask_token.expand(6, -1))
    assert not torch.equal(r[0, 1, :2], tok.decoder.mask_token.expand(2, -1))
    r = tok.decoder.embed_registers(codes, keep, prefix, null=torch.tensor([True]))
    assert torch.equal(r[0], tok.decoder.null_token.expand(2, 8, -1))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["encoder"]["module_dict"]["enc_transformer"].update(head_dim=32), "head_dim = 32"),
    (lambda c: c["encoder"]["module_dict"]["enc_seq_packer"].update(mask_mode="causal"), "mask_mode 'causal'"),
    (lambda c: c["encoder"]["module_dict"]["enc_patch_emb"].update(patch_sizes=[2, 1, 1]), "patch_sizes"),
    (lambda c: c["encoder"]["module_dict"].pop("enc_posemb_module"), "the encoder computes"),
    (lambda c: c["decoder"]["module_dict"].pop("dec_latent_dropout"), "the decoder computes"),
    (lambda c: c["decoder"]["module_dict"]["dec_to_patches"].update(use_mup_readout=True), "muP"),
    (lambda c: c["decoder"]["module_dict"]["dec_transformer"].update(rope="yes"), r"unknown settings \['rope'\]"),
    (lambda c: c["decoder"]["module_dict"]["dec_registers_posemb_module"].update(posemb_scaling="interpolate"),
     "posemb_scaling"),
    (lambda c: c["decoder"]["module_dict"]["dec_patches_posemb_module"].update(max_sizes=[9, 9, 9]),
     "position tables"),
])
def test_configurations_we_cannot_represent_are_refused(tmp_path, change, message):
    config = official_config()
    change(config)
    path = write_safetensors(tmp_path / "m.safetensors", {}, {k: str(v) for k, v in config.items()})
    with pytest.raises(official.Unsupported, match=message):
        official.load_tokenizer(path)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(vae=str({"_target_": "os.system", "command": "echo hi"})), "_target_ 'os.system'"),
    (lambda m: m.update(extra="__import__('os').system('echo hi')"), "unknown VideoFlexTok arguments"),
    (lambda m: m.update(vae=m["vae"].replace("'rgb'", "'${oc.env:HOME}'")), "interpolation"),
    (lambda m: m.update(encoder=m["encoder"].replace("'module_dict'", "'_args_': [1], 'module_dict'", 1)),
     "Hydra directive '_args_'"),
    (lambda m: m.update(regularizer=m["regularizer"].replace("[8, 8, 8, 5, 5, 5]", "{8, 5}")), "set"),
    (lambda m: m.clear(), "no VideoFlexTok configuration"),
])
def test_metadata_other_than_plain_configuration_is_refused(tmp_path, change, message):
    metadata = {k: str(v) for k, v in official_config().items()}
    change(metadata)
    path = write_safetensors(tmp_path / "m.safetensors", {}, metadata)
    with pytest.raises(ValueError, match=message):
        official.load_tokenizer(path)


def test_missing_unknown_and_mis_shaped_tensors_are_listed(tmp_path):
    config = official_config()
    _, tensors = write_official(tmp_path / "full.safetensors", config)
    metadata = {k: str(v) for k, v in config.items()}
    name = "decoder.module_dict.dec_transformer.blocks.1.mlp.fc2.weight"
    cases = [({k: v for k, v in tensors.items() if k != name}, "missing keys.*blocks.1.mlp.w2.weight"),
             ({**tensors, "decoder.module_dict.dec_transformer.blocks.0.attn.wq.bias": torch.zeros(128)},
              "no place in our modules.*attn.wq.bias"),
             ({**tensors, "encoder.module_dict.enc_mystery.weight": torch.zeros(1)}, "enc_mystery"),
             ({**tensors, name: torch.zeros(3, 3)}, "shape mismatches.*blocks.1.mlp.w2.weight")]
    for i, (case, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            official.load_tokenizer(write_safetensors(tmp_path / f"{i}.safetensors", case, metadata))


def test_damaged_files_are_refused(tmp_path):
    path, _ = write_official(tmp_path / "model.safetensors", official_config())
    raw = path.read_bytes()
    (tmp_path / "text.safetensors").write_text("this is not a safetensors file at all" * 3)
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [10 ** 9, 10 ** 9 + header[first]["data_offsets"][1] - header[first]["data_offsets"][0]]
    text = json.dumps(header).encode()
    (tmp_path / "outside.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    for name, message in [("text", "header length"), ("cut", "truncated"), ("outside", "starts at data byte")]:
        with pytest.raises(ValueError, match=message):
            official.load_tokenizer(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError):
        official.load_tokenizer(tmp_path / "absent.safetensors")


def test_vae_loads_from_the_official_file_and_sample_reconstructs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = VidTokVAE("v1.0", ch=8).eval()
    path, tensors = write_official(tmp_path / "model.safetensors", official_config(t_max=5), vae=vae)
    loaded = VidTokVAE.from_checkpoint(path, ch=8)
    assert all(torch.equal(v, tensors[f"vae.vidtok.{k}"]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="v1.0"):
        VidTokVAE.from_checkpoint(path, version="v1.1", ch=8)
    # sample.py --reconstruct with the official file as tokenizer and VAE (narrowed VAE: random weights, fast).
    video = (torch.rand(1, 3, 17, 64, 64) * 255).to(torch.uint8)
    write_video(tmp_path / "clip.mp4", video[0].permute(1, 2, 3, 0).numpy(), fps=4)
    monkeypatch.setattr(sample, "load_vae", lambda kind, ckpt, version, device: VidTokVAE.from_checkpoint(ckpt, ch=8))
    written = sample.main(["--tok-ckpt", str(path), "--reconstruct", str(tmp_path / "clip.mp4"), "--vae", "vidtok",
                           "--vae-ckpt", str(path), "--steps", "2", "--guidance", "1", "--frames", "17", "--size", "64",
                           "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "psnr.json").read_text()).keys() == {"1", "2", "4", "8"}
    assert any(p.suffix == ".mp4" for p in written)


def test_train_ar_tokenizes_with_the_official_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path, _ = write_official(tmp_path / "model.safetensors", official_config(), vae=VidTokVAE("v1.0", ch=8))
    make_synthetic(tmp_path / "videos", num=2, seed=0, size=64, frames=16)
    monkeypatch.setattr(train_ar, "load_vae", lambda kind, ckpt, version, device: VidTokVAE.from_checkpoint(ckpt, ch=8))
    train_ar.main(["--tokenize", "--tok-ckpt", str(path), "--vae", "vidtok", "--vae-ckpt", str(path), "--data",
                   str(tmp_path / "videos"), "--frames", "5", "--size", "64", "--cache", str(tmp_path / "cache"),
                   "--num-workers", "0"])
    shard = torch.load(next((tmp_path / "cache").glob("shard-*.pt")), weights_only=True)
    assert shard["ids"].shape == (2, 2, 8)  # 5 frames -> 2 latent frames of 8 tokens
