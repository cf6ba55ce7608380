"""Load the official VideoFlexTok release into this repository's modules: `official.load_tokenizer(path)`.

The release (code apple/ml-videoflextok; weights EPFL-VILAB/videoflextok_d18_d18_k600, 17x128x128, and
EPFL-VILAB/videoflextok_d18_d28, 256x256) is one `model.safetensors` per model. Its `__metadata__` holds
the Hydra configuration of the whole model, `videoflextok.wrappers.VideoFlexTok`: one entry per
argument (vae, encoder, decoder, regularizer, flow_matching_noise_module, pipeline), each the text of
a nested dict whose `_target_`s name the official classes. The Hugging Face layout may keep it instead
as `config.json` beside the file, under "video_flex_tok", with every tensor under "video_tokenizer.".
Both layouts are read. The file also holds the VidTok VAE (`vae.vidtok.*`), which
`vae.VidTokVAE.from_checkpoint` loads from the same path.

Safety. The configuration is data, never code: each entry is parsed as JSON, else as Python literals
(`ast.literal_eval` evaluates no names or calls), else kept as a bare string (the official reader is
YAML, where `videoflextok.wrappers.VideoFlexTok` is a string). Only dicts, lists, strings, numbers,
booleans and None may come out; every `_target_` must be one of the official classes reproduced here;
Hydra's other directives and `${...}` interpolations are refused. Nothing is imported or instantiated.

How a configuration becomes a `TokenizerConfig`. The official encoder and decoder are
`SequentialModuleDictWrapper`s: ordered dicts of modules that read and write named entries of a data
dict. We walk them in order on symbolic values, each module turning the labels of what it reads into
the label of what it writes ("patches(last(latents))"), and require the encoder's and decoder's final
labels to be what our `Encoder` and `Decoder` compute. So a configuration is accepted when it computes
what ours computes, whatever its module names, and refused, with what was found, when it does not.
While walking, each module's settings fill config fields and its tensors get their names in our
modules. Settings that change no number (initialisation, compilation, padding, activation
checkpointing) are accepted as they are; training settings our trainer does differently are listed in
the load report.

Scripts load a tokenizer with `load_tokenizer(path)`, which takes an official file (or the directory
holding it) or a train_tok.py checkpoint; `convert(path)` gives the TokenizerConfig and our state dict
of an official file. The model modules know nothing of this format. This module is one piece, longer
than the others, because it is one file format's mapping (official class -> checks, config fields,
tensor names).

Of the options the official modules offer, ours keep those a release file is known to need: the
settings the released configurations use, as far as they are known, and the official code's defaults,
which a configuration that leaves a setting out gets. Patch positions are learned tables summed over
their axes ("learnable_sum"), every axis as long as the longest (the official sincos table is 2-D, so
a video's (t, y, x) patches cannot use it); the decoder's register positions are "learnable_sum" or
"sincos", the official default (TokenizerConfig.register_pos_embedding); the timestep sinusoid is of
1000 / max_timestep * t for any positive finite max_timestep, the official default 1000 included
(TokenizerConfig.time_scale); the register replacements run in the module order nested dropout,
clean-prefix masking, null condition. A file that sets anything else is refused with `Unsupported`,
naming the setting and the value found.

Facts taken from the official code at commit 4fd72ec (no code taken): attention is bias-free with
per-head non-affine LayerNorm on q and k and scale 8/head_dim (1/8 = SDPA's default at head_dim 64);
GatedMlp is fc2(silu(fc1 x) * fc3 x) with hidden int(2 * 4D / 3); adaLN is Sequential(SiLU,
Linear(D, groups*6D)) split group-major, then gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp,
scale_mlp; learned position tables are one (axes, 1, D, M) tensor with every axis M long; the
`time_block_causal_last` mask is our "causal_registers"; TimestepEmbedder multiplies its frequencies
by 1000 / max_timestep; FSQ ids are the mixed-radix digits, first level least significant.
"""
import ast
import json
import math
import re
from pathlib import Path

from checkpoint import build_checked, load_safetensors, read_safetensors_header
from tokenizer import TokenizerConfig, VideoFlexTok

# The official classes a released configuration uses (the release's own allow-list), by short name.
TARGETS = {path.rsplit(".", 1)[1]: path for path in (
    "videoflextok.wrappers.VideoFlexTok",
    "videoflextok.resamplers.video_wrappers.VideoFlowMatchingResampler",
    "videoflextok.flow_matching.pipelines.VideoMinRFPipeline",
    "videoflextok.flow_matching.noise_modules.PrefixMinRFNoiseModule",
    "videoflextok.flow_matching.noise_modules.MinRFNoiseModule",
    "videoflextok.compressors.vidtok.VidTokVAE",
    "videoflextok.model.utils.wrappers.SequentialModuleDictWrapper",
    "videoflextok.model.utils.posembs.PositionalEmbeddingAdder",
    "videoflextok.model.utils.dict_ops.PerSampleOp",
    "videoflextok.model.utils.dict_ops.channels_first_to_last",
    "videoflextok.model.utils.dict_ops.channels_last_to_first",
    "videoflextok.model.trunks.transformers.FlexTransformer",
    "videoflextok.model.preprocessors.token_dropout.MaskedNestedDropout",
    "videoflextok.model.preprocessors.token_dropout.MaskedPrefixDropout",
    "videoflextok.model.preprocessors.time_embedding.TimestepEmbedder",
    "videoflextok.model.preprocessors.registers.RegistersTemporal2D",
    "videoflextok.model.preprocessors.patching.PatchEmbedder",
    "videoflextok.model.preprocessors.nullcond.LearnedNullCond",
    "videoflextok.model.preprocessors.linear.LinearLayer",
    "videoflextok.model.preprocessors.flex_seq_packing.BlockWiseSequenceInterleavePacker",
    "videoflextok.model.postprocessors.seq_unpacking.SequenceInterleavedUnpacker",
    "videoflextok.model.postprocessors.heads.LinearHead",
    "videoflextok.model.postprocessors.heads.TransformerHead",
    "videoflextok.model.postprocessors.heads.ToPatchesLinearHead",
    "videoflextok.regularizers.quantize_fsq.FSQ",
)}
MASK_MODES = {"time_block_causal_last": "causal_registers", "time_block_causal": "time_causal", "full": "full"}
# Settings that change no number: initialisation, compilation, padding, activation checkpointing.
NO_NUMBERS = {"weight_init_style", "zero_init_query_proj", "compile_block_mask", "pad_to_multiple", "max_seq_len",
              "use_act_checkpoint", "compile", "chunk_size", "force_vae_encode"}
# The official wrapper finds these register-masking modules by name, to pass them k and the prefix length.
WRAPPER_NAMES = {"nested": "dec_nested_dropout", "prefix": "dec_prefix_masking"}
# The learned token each register-masking step writes, by our name: nested dropout, clean prefix frames, CFG.
MASK_TOKENS = {"nested": "mask_token", "prefix": "prefix_token", "null": "null_token"}
# What our decoder computes, with its register path: the three replacements in this order.
DECODER = ("first(head(unpack0(transformer(pack(pos(patches(last(noised))),"
           "null(prefix(nested(pos(from_codes(codes))))))))))")
MAX_ENTRY_CHARS = 1_000_000
# The classes that may appear in the encoder's or the decoder's module_dict (a Reader method each), and where.
BOTH, ENC, DEC = ("encoder", "decoder"), ("encoder",), ("decoder",)
MODULES = {"PerSampleOp": BOTH, "PatchEmbedder": BOTH, "PositionalEmbeddingAdder": BOTH,
           "BlockWiseSequenceInterleavePacker": BOTH, "FlexTransformer": BOTH, "SequenceInterleavedUnpacker": BOTH,
           "RegistersTemporal2D": ENC, "LinearHead": ENC, "ToPatchesLinearHead": DEC, "LinearLayer": DEC,
           "MaskedNestedDropout": DEC, "MaskedPrefixDropout": DEC, "LearnedNullCond": DEC, "TimestepEmbedder": DEC,
           "TransformerHead": DEC}


class Unsupported(ValueError):
    """A file that is a valid official checkpoint but configures something our modules do not compute."""


################################################################################
# Reading the configuration as data

def parse_entry(text, key):
    """One `__metadata__` entry -> plain data: JSON, else Python literals, else the bare string."""
    if len(text) > MAX_ENTRY_CHARS:
        raise ValueError(f"metadata entry {key!r} is {len(text)} characters long; a configuration is far shorter")
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def check_plain(value, where):
    """Refuse anything but plain configuration values, known `_target_`s and `_partial_`."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string; the metadata must hold plain configuration")
            if k == "_target_":
                if v not in TARGETS.values():
                    raise ValueError(f"{where}: _target_ {v!r} is not one of the official VideoFlexTok classes; "
                                     "this loader instantiates nothing and reads only the released classes")
            elif k.startswith("_") and k != "_partial_":
                raise ValueError(f"{where}: Hydra directive {k!r} is not plain configuration; refused")
            check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    elif isinstance(value, str):
        if "${" in value:
            raise ValueError(f"{where}: {value!r} is an interpolation, not a plain configuration value; refused")
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise ValueError(f"{where}: {type(value).__name__} {value!r} is not a plain configuration value; refused")


def read_config(metadata, config_json=None):
    """The `videoflextok.wrappers.VideoFlexTok` configuration of a file's metadata or its config.json."""
    entries = {k: v for k, v in metadata.items() if k != "format"}  # "format": "pt" is safetensors' own marker
    config = {k: parse_entry(v, k) for k, v in entries.items()}
    if not config and config_json is not None:
        config = json.loads(config_json.read_text())
    check_plain(config, "config")
    if isinstance(config.get("video_flex_tok"), dict):  # the Hugging Face hub layout wraps it
        config = config["video_flex_tok"]
    if config.get("_target_") not in (TARGETS["VideoFlexTok"], TARGETS["VideoFlowMatchingResampler"]):
        found = sorted(config) if config else "no configuration"
        raise ValueError(f"no VideoFlexTok configuration found (metadata keys: {found}); the official files keep "
                         "the videoflextok.wrappers.VideoFlexTok config in __metadata__ or in config.json beside them")
    return config


################################################################################
# Walking the official modules

def short(c, where):
    if not isinstance(c, dict) or "_target_" not in c:
        raise ValueError(f"{where}: expected an official module configuration with a _target_, found {c!r}")
    return c["_target_"].rsplit(".", 1)[1]


class Reader:
    """Walks the official configuration: fills TokenizerConfig fields, names tensors, notes training settings."""

    def __init__(self):
        self.fields, self.notes, self.tables = {}, [], {}
        self.rename = {}     # official module prefix -> (our prefix, function(rest, tensor) -> {name: tensor} or None)
        self.masks = {}      # data key of a block mask -> (mask mode, label of the sequence it was built for)
        self.repa = None     # official module prefix of the REPA head, if any
        self.repa_problem = None

    # -- helpers ---------------------------------------------------------------------------------

    def set(self, field, value, where):
        if field in self.fields and self.fields[field] != value:
            raise Unsupported(f"{where}: {field} = {value!r}, but another module set {self.fields[field]!r}")
        self.fields[field] = value

    def need(self, c, key, value, where, why=""):
        """A setting that must have the value our modules compute with (the official default)."""
        found = c.pop(key, value)
        if found != value:
            raise Unsupported(f"{where}: {key} = {found!r} is not supported (only {value!r}){why}")
        return found

    def training(self, c, key, default, where, ours):
        """A training-only setting: noted when it differs from what our trainer does."""
        found = c.pop(key, default)
        if found != default:
            self.notes.append(f"{where}: training setting {key} = {found!r}; our trainer uses {ours}")
        return found

    def done(self, c, where):
        for key in NO_NUMBERS & set(c):
            c.pop(key)
        unknown = sorted(set(c) - {"_target_", "_partial_"})
        if unknown:
            raise Unsupported(f"{where}: unknown settings {unknown}")

    def absent(self, c, keys, where):
        """Settings whose official default (a callable) is what ours computes; any value given replaces it."""
        given = sorted(set(keys) & set(c))
        if given:
            raise Unsupported(f"{where}: {given} replace the official defaults, which ours reproduce")

    def read(self, data, key, where):
        if key not in data:
            raise Unsupported(f"{where}: reads {key!r}, which no earlier module writes")
        return data[key]

    # -- the whole model -------------------------------------------------------------------------

    def model(self, config):
        top = dict(config)
        for key in ("vae", "encoder", "decoder", "regularizer"):
            if key not in top:
                raise ValueError(f"the VideoFlexTok configuration has no {key!r}; found {sorted(top)}")
        vae = dict(top.pop("vae"))
        if short(vae, "vae") != "VidTokVAE" or vae.pop("tokenizer_id", None) != "vidtok_kl_causal_488_16chn":
            raise Unsupported(f"vae: only the VidTok vidtok_kl_causal_488_16chn VAE is supported; found {vae}")
        latents = vae.pop("vae_latents_write_key")
        for key in ("images_read_key", "vae_latents_read_key", "images_reconst_write_key"):
            vae.pop(key, None)
        self.done(vae, "vae")
        fsq = dict(top.pop("regularizer"))
        if short(fsq, "regularizer") != "FSQ":
            raise Unsupported(f"regularizer: only FSQ is supported; found {fsq['_target_']}")
        codes_in, codes_out = fsq.pop("latents_read_key"), fsq.pop("quants_write_key")
        pipeline = dict(top.pop("pipeline", None) or {})
        if pipeline.get("_target_") != TARGETS["VideoMinRFPipeline"] or pipeline.get("_partial_") is not True:
            raise Unsupported(f"pipeline: expected a partial VideoMinRFPipeline; found {pipeline}")
        noised, t, out = (pipeline.pop(k) for k in ("noised_videos_read_key", "timesteps_read_key", "reconst_write_key"))
        noise = dict(top.pop("flow_matching_noise_module", None) or {})
        encoder, decoder = top.pop("encoder"), top.pop("decoder")
        top.pop("_target_")
        if top:
            raise Unsupported(f"unknown VideoFlexTok arguments {sorted(top)}")

        data = {latents: "latents"}
        self.walk("encoder", encoder, data)
        expected = "head(unpack1(transformer(pack(pos(patches(last(latents))),registers))))"
        if self.read(data, codes_in, "regularizer") != expected:
            raise Unsupported(f"the encoder computes {data[codes_in]}; ours computes {expected}")
        self.fsq(fsq)
        self.pipeline(pipeline)
        data = {codes_out: "codes", noised: "noised", t: "t"}
        self.walk("decoder", decoder, data)
        self.noise(noise)

        found = self.read(data, out, "pipeline")
        if found != DECODER:
            steps = re.search(r",((?:\w+\()*)pos\(from_codes\(codes\)\)", found)
            order = f" (it replaces the register tokens by {', '.join(reversed(steps.group(1)[:-1].split('(')))})" \
                if steps and steps.group(1) else ""
            raise Unsupported(f"the decoder computes {found}{order}; ours computes {DECODER}: nested dropout, "
                              "clean-prefix masking and the null condition, each once, in that order")

    def walk(self, side, config, data):
        c = dict(config)
        if short(c, side) != "SequentialModuleDictWrapper" or set(c) - {"_target_", "module_dict"}:
            raise Unsupported(f"{side}: expected a SequentialModuleDictWrapper with a module_dict; found {sorted(c)}")
        for name, module in c["module_dict"].items():
            where = f"{side}.{name}"
            m = dict(module)
            kind = short(m, where)
            if side not in MODULES.get(kind, ()):
                raise Unsupported(f"{where}: {kind} is not supported inside the {side}")
            getattr(self, kind)(m, data, where, side, f"{side}.module_dict.{name}.")
            self.done(m, where)

    # -- one method per official module class ------------------------------------------------------

    def PerSampleOp(self, c, data, where, side, prefix):
        op = c.pop("per_sample_op")
        kind = {"channels_first_to_last": "last", "channels_last_to_first": "first"}.get(short(op, where))
        if kind is None or set(op) != {"_target_", "_partial_"} or op["_partial_"] is not True:
            raise Unsupported(f"{where}: unsupported per_sample_op {op}")
        data[c.pop("write_key")] = f"{kind}({self.read(data, c.pop('read_key'), where)})"

    def PatchEmbedder(self, c, data, where, side, prefix):
        x = self.read(data, c.pop("input_tensor_list_read_key"), where)
        sizes = c.pop("patch_sizes")
        if c.get("dim") is None:
            raise Unsupported(f"{where}: a patch embedding without projection (dim None) is not supported")
        if len(sizes) != 3 or sizes[0] != 1 or sizes[1] != sizes[2]:
            raise Unsupported(f"{where}: patch_sizes {sizes}; only (1, p, p), one latent frame by p x p, is supported")
        self.need(c, "flatten_patches", False, where, ": the patch grid must stay (T, h, w)")
        self.set("patch_size", sizes[1], where)
        self.set("latent_channels", c.pop("channels_in"), where)
        self.set(f"{side[:3]}_dim", c.pop("dim"), where)
        c.pop("n_patches_write_key")
        data[c.pop("patches_list_write_key")] = f"patches({x})"
        self.rename[prefix] = (f"{side}.patch_embed.", named({"patch_proj.weight": "weight", "patch_proj.bias": "bias"}))

    def PositionalEmbeddingAdder(self, c, data, where, side, prefix):
        x = self.read(data, c.pop("read_key"), where)
        kind, sizes = c.pop("posemb_type", "sincos"), tuple(c.pop("max_sizes"))   # sincos: the official default
        self.need(c, "posemb_scaling", "absolute", where, ": interpolated tables change with the input size")
        self.need(c, "posemb_write_key", None, where)
        self.set(f"{side[:3]}_dim", c.pop("dim"), where)
        if x.startswith("patches(") and len(sizes) == 3:
            if kind != "learnable_sum":
                why = "the official sincos table is 2-D and video patch positions have 3 axes (t, y, x)" \
                    if kind == "sincos" else "a learned vector per index of every axis, summed"
                raise Unsupported(f"{where}: posemb_type = {kind!r} is not supported on the patches (only "
                                  f"'learnable_sum': {why})")
            table, ours = f"{side} patches", f"{side}.pos."
        elif x == "from_codes(codes)" and len(sizes) == 2:
            if kind not in ("learnable_sum", "sincos"):
                raise Unsupported(f"{where}: posemb_type = {kind!r} is not supported on the registers (only "
                                  "'learnable_sum' or 'sincos', the official default)")
            self.set("register_pos_embedding", kind, where)
            table, ours = "registers", "decoder.register_pos."
        else:
            raise Unsupported(f"{where}: a position embedding of sizes {sizes} on {x} is not supported")
        self.tables[table] = sizes
        data[c.pop("write_key")] = f"pos({x})"
        self.rename[prefix] = (ours, positions(kind))

    def RegistersTemporal2D(self, c, data, where, side, prefix):
        self.read(data, c.pop("input_tensor_list_read_key"), where)
        n = c.pop("n_max")
        self.need(c, "n_min", n, where, ": the encoder always writes all K registers")
        if c.pop("n_eval", None) not in (None, n):
            raise Unsupported(f"{where}: n_eval differs from n_max; the encoder must write all {n} registers")
        self.need(c, "ordering_mode", "nested", where)
        self.need(c, "extra_registers_write_key", None, where)
        for key in ("size_sampling_mode", "extra_registers_dim", "register_sizes_read_write_key"):
            c.pop(key, None)
        self.set("registers", n, where)
        self.set("max_frames", c.pop("t_max"), where)
        self.set("enc_dim", c.pop("dim"), where)
        data[c.pop("registers_write_key")] = "registers"
        self.rename[prefix] = ("encoder.", named({"registers": "registers"}))

    def BlockWiseSequenceInterleavePacker(self, c, data, where, side, prefix):
        seq = f"pack({','.join(self.read(data, k, where) for k in c.pop('input_list_read_keys'))})"
        mode = c.pop("mask_mode", "full")
        if mode not in MASK_MODES:
            raise Unsupported(f"{where}: mask_mode {mode!r}; supported: {sorted(MASK_MODES)}")
        self.set(f"{side[:3]}_mask", MASK_MODES[mode], where)
        self.need(c, "cross_timestep_attention_config", None, where)
        data[c.pop("packed_seq_write_key")] = seq
        self.masks[c.pop("block_mask_write_key")] = (mode, seq)
        packing = c.pop("emb_packing_fn_write_key", None)
        if packing is not None:
            self.need(c, "per_subseq_embs", True, where, ": patches and registers are modulated separately")
            data[packing] = f"adaln({seq})"
        repa = c.pop("repa_block_mask_write_key", None)
        repa_mode = c.pop("repa_mask_mode", "time_block_causal")
        self.need(c, "repa_patch_index", 0, where)
        if repa is not None:
            self.masks[repa] = (repa_mode, "repa")
        c.pop("per_subseq_embs", None)
        c.pop("inner_packed_shapes_write_key"), c.pop("outer_packed_shapes_write_key")

    def FlexTransformer(self, c, data, where, side, prefix):
        self.transformer_settings(c, where)
        seq = self.read(data, c.pop("input_seq_read_key"), where)
        mask = self.masks.get(c.pop("block_mask_read_key", None))
        if mask is None or mask[1] != seq:
            raise Unsupported(f"{where}: attends without the block mask its packer built for {seq}")
        self.set(f"{side[:3]}_dim", c.pop("dim"), where)
        self.set(f"{side[:3]}_depth", c.pop("depth"), where)
        adaln = c.pop("adaLN_emb_read_key", None)
        groups = c.pop("adaLN_expansion", 1)
        if side == "encoder" and adaln is not None or side == "decoder" and (
                adaln is None or self.read(data, adaln, where) != "temb(t)" or groups != 2
                or self.read(data, c.pop("adaLN_packing_fn_read_key", None), where) != f"adaln({seq})"):
            raise Unsupported(f"{where}: adaLN must be off in the encoder and, in the decoder, read the timestep "
                              "embedding with expansion 2 (patches and registers) through its packer's function")
        c.pop("adaLN_packing_fn_read_key", None)
        layers = c.pop("intermediate_layers", [])
        key = c.pop("intermediate_layer_write_key", None)
        if key is not None and len(layers) == 1 and side == "decoder":
            data[key] = f"layer{layers[0]}({seq})"
            self.fields["repa_layer"] = layers[0]
        elif key is not None or layers:
            raise Unsupported(f"{where}: intermediate_layers {layers}; only one, in the decoder (REPA), is supported")
        data[c.pop("output_seq_write_key")] = f"transformer({seq})"
        self.rename[prefix] = (f"{side}.transformer.", blocks)

    def transformer_settings(self, c, where):
        """The block settings shared by FlexTransformer and TransformerHead (ours: transformer.Block)."""
        for key, value in {"head_dim": 64, "mlp_ratio": 4.0, "qkv_bias": False, "proj_bias": False,
                           "mlp_bias": False, "gated_mlp": True, "qk_norm": True, "score_mod_read_key": None,
                           "rope_forward_read_key": None}.items():
            self.need(c, key, value, where)
        self.absent(c, ("act_layer", "norm_layer"), where)
        self.training(c, "drop", 0.0, where, "no dropout")
        self.training(c, "drop_path_rate", 0.0, where, "no stochastic depth")

    def SequenceInterleavedUnpacker(self, c, data, where, side, prefix):
        seq = self.read(data, c.pop("packed_seq_read_key"), where)
        for i, key in enumerate(c.pop("inner_seq_write_keys")):
            data[key] = f"unpack{i}({seq})"
        c.pop("inner_packed_shapes_read_key"), c.pop("outer_packed_shapes_read_key")

    def head_settings(self, c, where):
        self.need(c, "use_mup_readout", False, where, ": a muP readout needs base shapes the file does not hold")
        self.absent(c, ("norm_layer",), where)
        self.need(c, "proj_bias", True, where)
        if c.pop("dtype_override", None) is not None:
            self.notes.append(f"{where}: dtype_override (autocast precision) is not reproduced; fp32 is unaffected")

    def LinearHead(self, c, data, where, side, prefix):
        self.head_settings(c, where)
        self.need(c, "adaLN_emb_read_key", None, where)
        c.pop("adaLN_packing_fn_read_key", None), c.pop("adaLN_bias", None)
        self.set("enc_dim", c.pop("dim"), where)
        self.set("code_dim", c.pop("dim_out"), where)
        data[c.pop("write_key")] = f"head({self.read(data, c.pop('read_key'), where)})"
        self.rename[prefix] = ("encoder.to_codes.", named({"proj.weight": "weight", "proj.bias": "bias"}))

    def ToPatchesLinearHead(self, c, data, where, side, prefix):
        self.head_settings(c, where)
        self.need(c, "adaLN_bias", True, where)
        self.need(c, "adaLN_packing_fn_read_key", None, where, ": the head's shift and scale are per clip")
        if self.read(data, c.pop("adaLN_emb_read_key", None), where) != "temb(t)":
            raise Unsupported(f"{where}: the output head must be modulated by the timestep embedding")
        sizes = c.pop("patch_sizes")
        if list(sizes) != [1, self.fields.get("patch_size"), self.fields.get("patch_size")]:
            raise Unsupported(f"{where}: patch_sizes {sizes} differ from the decoder's patch embedding")
        self.set("latent_channels", c.pop("channels_out"), where)
        self.set("dec_dim", c.pop("dim"), where)
        data[c.pop("write_key")] = f"head({self.read(data, c.pop('read_key'), where)})"
        self.rename[prefix] = ("decoder.", named({"proj.weight": "head.weight", "proj.bias": "head.bias",
                                                  "adaLN_modulation.1.weight": "head_adaLN.weight",
                                                  "adaLN_modulation.1.bias": "head_adaLN.bias"}))

    def LinearLayer(self, c, data, where, side, prefix):
        x = self.read(data, c.pop("read_key"), where)
        if x != "codes":
            raise Unsupported(f"{where}: a linear layer on {x} is not supported (only on the FSQ codes)")
        self.need(c, "proj_bias", True, where)
        self.need(c, "dtype_override", None, where)
        self.set("code_dim", c.pop("dim_in"), where)
        self.set("dec_dim", c.pop("dim"), where)
        data[c.pop("write_key")] = f"from_codes({x})"
        self.rename[prefix] = ("decoder.from_codes.", named({"proj.weight": "weight", "proj.bias": "bias"}))

    def mask_step(self, c, data, where, prefix, step, token):
        key = c.pop("read_write_key")
        data[key] = f"{step}({self.read(data, key, where)})"
        self.set("dec_dim", c.pop("dim"), where)
        self.rename[prefix] = ("decoder.", named({token: MASK_TOKENS[step]}))
        name = WRAPPER_NAMES.get(step)
        if name is not None and not prefix.endswith(f".{name}."):
            raise Unsupported(f"{where}: the official wrapper finds this module by the name {name!r} at inference")

    def MaskedNestedDropout(self, c, data, where, side, prefix):
        mode = c.pop("size_sampling_mode", "uniform")
        if mode in ("uniform", "pow2"):
            self.fields["nested_dropout"] = mode
        else:
            self.notes.append(f"{where}: training setting size_sampling_mode = {mode!r}; our trainer keeps "
                              "nested_dropout = 'pow2'")
        for key in ("eval_keep_k_read_key", "train_keep_k_write_key", "zipf_a"):
            c.pop(key, None)
        self.mask_step(c, data, where, prefix, "nested", "dropout_mask_token")

    def MaskedPrefixDropout(self, c, data, where, side, prefix):
        c.pop("prefix_len_read_key", None), c.pop("eval_prefix_len_read_key", None)
        self.mask_step(c, data, where, prefix, "prefix", "dropout_mask_token")

    def LearnedNullCond(self, c, data, where, side, prefix):
        self.need(c, "eval_drop_flag_read_key", "eval_dropout_mask", where, ": the official sampler sets that key")
        self.need(c, "replace_with_single_token", False, where)
        self.fields["null_cond_prob"] = c.pop("dropout_prob", 0.0)
        self.mask_step(c, data, where, prefix, "null", "nullcond")

    def TimestepEmbedder(self, c, data, where, side, prefix):
        self.need(c, "frequency_embedding_size", 256, where)
        self.need(c, "temb_as_tokens", False, where)
        found = c.pop("max_timestep", 1000.0)   # the official default, for timesteps in [0, 1000]
        if isinstance(found, bool) or not isinstance(found, (int, float)) or not 0 < found < math.inf:
            raise Unsupported(f"{where}: max_timestep = {found!r} is not supported (only a positive finite number)")
        self.set("time_scale", 1000.0 / found, where)
        self.set("dec_dim", c.pop("dim"), where)
        data[c.pop("time_embedding_write_key")] = f"temb({self.read(data, c.pop('timesteps_read_key'), where)})"
        self.rename[prefix] = ("decoder.time.", named({f"mlp.{i}.{p}": f"mlp.{i}.{p}"
                                                       for i in (0, 2) for p in ("weight", "bias")}))

    def TransformerHead(self, c, data, where, side, prefix):
        """The REPA head: training only, so a head we cannot represent is dropped unless keep_repa asks for it."""
        self.repa = prefix
        try:
            self.repa_settings(c, data, where)
        except Unsupported as err:
            self.repa_problem = str(err)
            c.clear()

    def repa_settings(self, c, data, where):
        self.transformer_settings(c, where)
        self.need(c, "use_mup_readout", False, where, ": a muP readout needs base shapes the file does not hold")
        self.need(c, "dtype_override", None, where)
        x = self.read(data, c.pop("read_key"), where)
        mode, _ = self.masks.get(c.pop("block_mask_read_key", None), ("full", "repa"))
        if not re.fullmatch(r"unpack0\(layer\d+\(.*\)\)", x) or MASK_MODES.get(mode) != self.fields.get("dec_mask"):
            raise Unsupported(f"{where}: a REPA head on {x} with mask {mode!r}; ours reads one decoder layer's patch "
                              "features under the decoder's own mask")
        self.set("dec_dim", c.pop("dim"), where)
        self.fields.update(repa_dim=c.pop("dim_out"), repa_depth=c.pop("depth"))
        data[c.pop("write_key")] = f"repa({x})"
        self.rename[self.repa] = ("decoder.repa_head.", repa_head)

    def fsq(self, c):
        self.need(c, "packed_call", False, "regularizer")
        self.training(c, "drop_quant_p", 0.0, "regularizer", "no unquantized passes")
        self.training(c, "corrupt_tokens_p", 0.0, "regularizer", "no token corruption")
        c.pop("min_corrupt_tokens_p", None), c.pop("apply_corrupt_tokens_p", None), c.pop("tokens_write_key", None)
        levels = tuple(c.pop("levels"))
        if self.fields.get("code_dim") != len(levels):
            raise Unsupported(f"regularizer: {len(levels)} FSQ levels but the encoder head writes "
                              f"{self.fields.get('code_dim')} numbers")
        self.fields["fsq_levels"] = levels
        self.done(c, "regularizer")

    def pipeline(self, c):
        self.need(c, "zero_noise", False, "pipeline", ": the flow decoder starts from noise")
        self.need(c, "noise_read_key", None, "pipeline")
        c.pop("cond_vae_latents_key", None), c.pop("target_sizes_read_key", None), c.pop("latents_read_key", None)
        if c.get("out_channels") is not None:
            self.set("latent_channels", c.pop("out_channels"), "pipeline")
        c.pop("out_channels", None)
        self.done(c, "pipeline")

    def noise(self, c):
        """The training noise module: its t distribution and clean-prefix noise map onto config fields."""
        if not c:
            return
        where = "flow_matching_noise_module"
        for key in ("clean_images_read_key", "noised_images_write_key", "timesteps_write_key", "sigmas_write_key",
                    "noise_write_key", "noise_read_key", "loss_mask_write_key", "prefix_len_write_key"):
            c.pop(key, None)
        if not c.pop("ln", True):
            self.fields["time_sampling"] = "uniform"
        self.training(c, "stratisfied", False, where, "unstratified t")
        self.training(c, "mode_scale", 0.0, where, "unscaled t")
        low, high = c.pop("cond_sigma_range", (0.0, 0.02))
        self.fields["prefix_noise"] = high
        if low != 0.0:
            self.notes.append(f"{where}: clean-prefix noise from {low}; our trainer draws it from 0")
        self.training(c, "cond_noise_prob", 0.5, where, "noise on half the prefixes")
        self.training(c, "prefix_len", None, where, "train_tok.py --stage 2's one clean frame for half the clips")
        c.pop("keep_prefix_prob", None)
        self.done(c, where)


################################################################################
# Tensor names: official -> ours

def named(table):
    """Renaming by a fixed table of names."""
    return lambda rest, t: {table[rest]: t} if rest in table else None


def positions(kind):
    """An official position table: (axes, 1, D, M) learned vectors or a (1, D, H, W) sincos table."""
    def rename(rest, t):
        if rest != "posembs":
            return None
        if kind == "sincos":
            return {"table": t[0].permute(1, 2, 0)} if t.dim() == 4 and t.shape[0] == 1 else {"table": t}
        if t.dim() != 4 or t.shape[1] != 1:
            return {"axes": t}  # a shape our model cannot have: reported as a mismatch
        return {f"axes.{i}": t[i, 0].T for i in range(t.shape[0])}
    return rename


BLOCK = re.compile(r"blocks\.(\d+)\.(attn\.(?:wq|wk|wv|proj)\.weight|mlp\.fc[123]\.weight|adaLN_modulation\.1\.(?:weight|bias))")
BLOCK_NAMES = {"mlp.fc1.": "mlp.w1.", "mlp.fc3.": "mlp.w3.", "mlp.fc2.": "mlp.w2.", "adaLN_modulation.1.": "adaLN."}


def blocks(rest, t):
    """FlexTransformer blocks -> transformer.Block: same layout, other names for the MLP and adaLN."""
    m = BLOCK.fullmatch(rest)
    if m is None:
        return None
    name = m.group(2)
    for official, ours in BLOCK_NAMES.items():
        name = name.replace(official, ours)
    return {f"blocks.{m.group(1)}.{name}": t}


def repa_head(rest, t):
    if rest == "out_proj.weight":
        return {"out.weight": t}
    inner = blocks(rest[len("transformer."):], t) if rest.startswith("transformer.") else None
    return None if inner is None else {f"transformer.{k}": v for k, v in inner.items()}


################################################################################
# Loading

def find_file(path):
    """A safetensors file, or a directory holding one (model.safetensors, or the only one), and its config.json."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        chosen = path / "model.safetensors" if (path / "model.safetensors").is_file() else None
        if chosen is None and len(files) != 1:
            raise ValueError(f"{path} holds {len(files)} .safetensors files ({[f.name for f in files]}); "
                             "pass the official model.safetensors itself")
        path = chosen or files[0]
    if not path.is_file():
        raise FileNotFoundError(f"official VideoFlexTok file not found: {path}")
    config_json = path.parent / "config.json"
    return path, config_json if config_json.is_file() else None


def is_official(path):
    """Whether `path` is a safetensors file or a directory with one (our own checkpoints are .pt)."""
    path = Path(path)
    return path.suffix == ".safetensors" or path.is_dir()


def config_from_file(path, keep_repa=False):
    """(TokenizerConfig, Reader, the header's tensor table) from an official file's header alone."""
    file, config_json = find_file(path)
    tensors, metadata, _ = read_safetensors_header(file)
    reader = Reader()
    try:
        reader.model(read_config(metadata, config_json))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{file}: the configuration is malformed ({type(err).__name__}: {err})") from None
    except Unsupported as err:
        raise Unsupported(f"{file}: {err}. This configuration cannot be represented by our modules.") from None
    if keep_repa and reader.repa_problem:
        raise Unsupported(f"{file}: {reader.repa_problem}; load with keep_repa=False to drop the REPA head")
    fields = dict(reader.fields)
    fields.pop("code_dim", None)
    if not keep_repa or reader.repa is None:
        fields.update(repa_dim=0)
    candidates = [TokenizerConfig(**fields, latent_size=reader.tables.get("encoder patches", (0, 0))[1]
                                  * fields["patch_size"], square_positions=square) for square in (False, True)]
    for cfg in candidates:
        ours = {"encoder patches": cfg.patch_pos_sizes, "decoder patches": cfg.patch_pos_sizes,
                "registers": cfg.register_pos_sizes}
        if all(reader.tables.get(k) == v for k, v in ours.items()):
            return cfg, reader, tensors
    raise Unsupported(f"{file}: position tables {reader.tables} do not fit {fields['max_frames']} latent frames, "
                      f"{fields['registers']} registers and one latent grid for encoder and decoder")


def convert(path, keep_repa=False):
    """An official file (or the directory holding it) -> (its TokenizerConfig, its tensors as our state dict,
    a report: what was loaded, left for the VAE, dropped, and the training settings ours does differently)."""
    file, _ = find_file(path)
    cfg, reader, header = config_from_file(file, keep_repa)
    strip = "video_tokenizer." if header and all(k.startswith("video_tokenizer.") for k in header) else ""
    wanted, unknown, vae, repa = {}, [], [], []
    for name in header:
        official = name[len(strip):]
        prefix = next((p for p in reader.rename if official.startswith(p)), None)
        if official.startswith("vae.vidtok."):
            vae.append(name)
        elif reader.repa is not None and official.startswith(reader.repa) and not keep_repa:
            repa.append(name)
        elif prefix is None:
            unknown.append(name)
        else:
            wanted[name] = prefix
    state = {}
    for name, t in load_safetensors(file, names=list(wanted)).items():
        ours, rename = reader.rename[wanted[name]]
        renamed = rename(name[len(strip) + len(wanted[name]):], t)
        if renamed is None:
            unknown.append(name)
        else:
            state.update({ours + k: v for k, v in renamed.items()})
    if unknown:
        raise ValueError(f"{file}: {len(unknown)} tensors have no place in our modules: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    report = [f"loaded {len(wanted)} official tensors into {len(state)} of ours"]
    if vae:
        report.append(f"{len(vae)} VidTok VAE tensors (vae.vidtok.*) left for vae.VidTokVAE.from_checkpoint(path)")
    if repa:
        report.append(f"dropped {len(repa)} REPA head tensors (training only; keep_repa=True loads them)")
    return cfg, state, report + reader.notes


def load_tokenizer(path, keep_repa=False):
    """A tokenizer in eval mode, frozen, from `path`: an official release file (model.safetensors or the
    directory holding it), or else a train_tok.py checkpoint (`VideoFlexTok.from_checkpoint`).

    For an official file the load report is printed; the REPA head is dropped unless keep_repa."""
    if not is_official(path):
        return VideoFlexTok.from_checkpoint(path)
    cfg, state, report = convert(path, keep_repa)
    fix = "The file is not a complete official VideoFlexTok checkpoint for the configuration it stores."
    model = build_checked(lambda: VideoFlexTok(cfg), state, str(find_file(path)[0]), fix)
    model.load_state_dict(state)
    for line in report:
        print(f"official VideoFlexTok: {line}")
    return model.eval().requires_grad_(False)
