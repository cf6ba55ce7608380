"""T5 v1.1 / FLAN-T5 text encoder: the network, its config and loading Hugging Face checkpoints.

VideoFlexTok (arXiv 2604.12887, §4.1 "AR model training") conditions its text-to-video AR model
on "T5 (Raffel et al., 2020)" through cross-attention, following LlamaGen (Sun et al., 2024), which
uses FLAN-T5-XL features (at most 120 tokens, bf16). The paper does not name the T5 size; any
T5 v1.1 / FLAN-T5 / mT5 checkpoint in the Hugging Face layout loads here, google/flan-t5-xl being
the default.

What is here
- `load_sharded`: Hugging Face sharded safetensors (`*.safetensors.index.json`); each shard is
  read with `load_safetensors` / `read_safetensors_header` from checkpoint.py.
- `T5Config`, `T5Encoder`: the encoder stack (RMSNorm without mean or bias, bucketed relative
  position bias computed once and shared by all layers, gated-GELU feed-forward, attention logits
  without 1/sqrt(d) scaling) loading `config.json` + `model.safetensors` or sharded safetensors with
  `model.safetensors.index.json`; fp32 or bf16. bf16 rounds where transformers' T5EncoderModel
  does (bf16 throughout, SDPA with the bias as mask, tanh-GELU term by term); on CPU the output
  was identical to transformers 5.23's in both bf16 and fp32.
- `T5Encoder.encode_text` tokenises prompts with `t5_tokenizer.T5Tokenizer` (the SentencePiece
  unigram tokenizer re-implemented from `tokenizer.json`), which `from_pretrained` loads from the
  checkpoint directory.

References (facts, not code): Raffel et al. 2020 (T5); Shazeer 2020 (GLU variants);
huggingface/transformers `models/t5` (checkpoint names, numerics); the safetensors format and its
sharded index (huggingface/safetensors, huggingface/transformers).
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import load_safetensors, read_safetensors_header
from t5_tokenizer import T5Tokenizer
from transformer import RMSNorm


################################################################################
# Sharded safetensors checkpoints

def _sharded_weight_map(index_path):
    """name -> shard file, from a Hugging Face `*.safetensors.index.json`."""
    if not index_path.is_file():
        raise FileNotFoundError(f"safetensors index not found: {index_path}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: expected JSON with a 'weight_map' object ({e!r})"
                         ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    return {name: index_path.parent / shard for name, shard in weight_map.items()}


def _load_grouped(files, names, device):
    """Load `names` from the files given by name -> file, opening each file once."""
    by_file = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        tensors.update(load_safetensors(file, device, file_names))
    return tensors


def load_sharded(index_path, device="cpu", names=None):
    """Read tensors (all, or only `names`) of a checkpoint split into shards by an index json."""
    files = _sharded_weight_map(Path(index_path))
    names = list(files) if names is None else list(names)
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(f"{index_path}: no tensors named {missing[:5]} ({len(missing)} missing)")
    return _load_grouped(files, names, device)


################################################################################
# The T5 encoder

def _gelu_tanh(x):
    # The tanh-approximated GELU written out term by term rather than F.gelu(approximate="tanh"),
    # so that bf16 rounds after each operation exactly as the reference implementation does.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": _gelu_tanh, "silu": F.silu}


@dataclass
class T5Config:
    """Encoder hyper-parameters, named as in Hugging Face `config.json` (defaults: FLAN-T5-XL)."""
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.activation_name not in _ACTIVATIONS:
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: use "
                             f"'<act>' or 'gated-<act>' with <act> in {sorted(_ACTIVATIONS)}")

    @property
    def gated(self):
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation_name(self):
        act = self.feed_forward_proj.removeprefix("gated-")
        # Hugging Face maps "gated-gelu" (T5 v1.1, FLAN-T5) to the tanh approximation.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def tiny(cls):
        """A small configuration for tests and smoke runs."""
        return cls(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)

    @classmethod
    def from_json(cls, path):
        """Read a Hugging Face T5 / mT5 `config.json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"T5 config not found: {path}")
        raw = json.loads(path.read_text())
        if raw.get("model_type") not in ("t5", "mt5"):
            raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}; expected a T5 "
                             "checkpoint ('t5' or 'mt5', e.g. google/flan-t5-xl)")
        known = set(cls.__dataclass_fields__)
        # Hugging Face's default when the key is absent is the original T5's plain ReLU.
        return cls(**{"feed_forward_proj": "relu", **{k: v for k, v in raw.items() if k in known}})


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of (key position - query position).

    Half of the buckets are for keys after the query. Within a half, distances below a quarter of
    the buckets get their own bucket; larger ones are spaced logarithmically up to max_distance,
    beyond which everything shares the last bucket.
    """
    half = num_buckets // 2
    exact = half // 2
    distance = relative_position.abs()
    # clamp(min=1) only keeps the log finite for distances that take the exact branch anyway
    log_bucket = exact + (torch.log(distance.clamp(min=1).float() / exact)
                          / math.log(max_distance / exact) * (half - exact)).long()
    bucket = torch.where(distance < exact, distance, log_bucket.clamp(max=half - 1))
    return bucket + (relative_position > 0).long() * half


class T5Block(nn.Module):
    """Pre-norm self-attention and feed-forward with residuals; no biases anywhere."""

    def __init__(self, cfg):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv  # may differ from d_model (flan-t5-small: 384 vs 512)
        self.num_heads = cfg.num_heads
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # activated branch
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # linear branch
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = _ACTIVATIONS[cfg.activation_name]

    def forward(self, x, bias):
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        # T5 folds the 1/sqrt(d_kv) factor into its initialisation: logits are plain q.k + bias.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        h = self.ffn_norm(x)
        h = self.act(self.wi_0(h)) * self.wi_1(h) if self.gated else self.act(self.wi(h))
        return x + self.wo(h)


# Our parameter names -> Hugging Face checkpoint names (T5EncoderModel, T5ForConditionalGeneration).
_HF_NAMES = [
    (r"^embed\.", "shared."),
    (r"^relative_bias\.", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.(q|k|v|o)\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.ffn_norm\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.(wi_0|wi_1|wi|wo)\.", r"encoder.block.\1.layer.1.DenseReluDense.\2."),
    (r"^final_norm\.", "encoder.final_layer_norm."),
]


def _hf_name(name):
    for pattern, replacement in _HF_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


class T5Encoder(nn.Module):
    """The T5 encoder: token ids (B, L) + mask (B, L) -> features (B, L, d_model).

    Padded positions still get features (they attend to the valid tokens), exactly as in the
    reference implementation; consumers should use the mask. `tokenizer` (a T5Tokenizer, or None)
    is what `encode_text` uses; `from_pretrained` supplies it.
    """

    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(config.vocab_size, config.d_model)  # no sqrt(d_model) scaling
        # one bias table in the first block, reused by every layer
        self.relative_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(self, length):
        """(1, heads, length, length) additive attention bias from relative positions."""
        position = torch.arange(length, device=self.relative_bias.weight.device)
        bucket = relative_position_bucket(position[None, :] - position[:, None],
                                          self.config.relative_attention_num_buckets,
                                          self.config.relative_attention_max_distance)
        return self.relative_bias(bucket).permute(2, 0, 1)[None]

    def forward(self, ids, mask=None):
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a (batch, length) int64 tensor, got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        if mask is not None and (mask.shape != ids.shape or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor shaped like ids {tuple(ids.shape)}, got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        x = self.embed(ids)
        bias = self.position_bias(ids.shape[1])
        if mask is not None:  # padded keys get the most negative finite logit, as in the reference
            bias = torch.where(mask[:, None, None, :], bias, torch.finfo(bias.dtype).min)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)

    @torch.no_grad()  # not inference_mode: the features may feed a model that is being trained
    def encode_text(self, prompts, max_length=120, padding="max_length"):
        """Tokenise and encode prompts -> (features (B, L, d_model), mask (B, L) bool).

        Prompts longer than max_length are truncated (keeping room for the final </s>).
        padding="max_length" gives L = max_length; "longest" pads to the longest prompt.
        """
        if self.tokenizer is None:
            raise ValueError("this T5Encoder has no tokenizer: load it with "
                             "T5Encoder.from_pretrained(dir, tokenizer='path/to/tokenizer.json')")
        ids, mask = self.tokenizer(prompts, max_length=max_length, padding=padding)
        device = self.embed.weight.device
        mask = mask.to(device)
        return self(ids.to(device), mask), mask

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", tokenizer=None):
        """Load a Hugging Face T5 directory: config.json + model.safetensors (or sharded
        model-*.safetensors with model.safetensors.index.json). Decoder weights are skipped.

        `dtype` is torch.float32 or torch.bfloat16 (T5 v1.1 / FLAN-T5 overflow in float16).
        `tokenizer` is the path of a tokenizer.json, by default <path>/tokenizer.json when present.
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype} "
                             "(T5 v1.1 / FLAN-T5 activations overflow in float16)")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"T5 checkpoint directory not found: {path}")
        config = T5Config.from_json(path / "config.json")
        if tokenizer is None and (path / "tokenizer.json").is_file():
            tokenizer = path / "tokenizer.json"
        if tokenizer is not None:
            tokenizer = T5Tokenizer.from_file(tokenizer)
            if tokenizer.vocab_size > config.vocab_size:
                raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model embeds "
                                 f"only {config.vocab_size}; wrong tokenizer.json for {path}")

        single, index = path / "model.safetensors", path / "model.safetensors.index.json"
        if single.is_file():
            files = dict.fromkeys(read_safetensors_header(single)[0], single)
        elif index.is_file():
            files = _sharded_weight_map(index)
        else:
            raise FileNotFoundError(f"{path} has neither model.safetensors nor "
                                    "model.safetensors.index.json (download the safetensors files)")

        with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
            model = cls(config, tokenizer)
        expected = {name: p.shape for name, p in model.state_dict().items()}
        names = {name: _hf_name(name) for name in expected}
        # files keep one copy of the embedding tied between shared and encoder.embed_tokens
        if names["embed.weight"] not in files:
            names["embed.weight"] = "encoder.embed_tokens.weight"
        missing = [hf for hf in names.values() if hf not in files]
        if missing:
            raise ValueError(f"{path} is not a T5 encoder checkpoint matching its config.json: "
                             f"{len(missing)} tensors missing, e.g. {missing[:3]}")
        loaded = _load_grouped(files, names.values(), device)
        state = {}
        for name, hf in names.items():
            if loaded[hf].shape != expected[name]:
                raise ValueError(f"{path}: {hf} has shape {tuple(loaded[hf].shape)}, but "
                                 f"config.json implies {tuple(expected[name])}")
            state[name] = loaded.pop(hf).to(dtype)
        model.load_state_dict(state, assign=True)
        return model.eval()
