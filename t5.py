"""T5 v1.1 / FLAN-T5 text encoder, its SentencePiece-unigram tokenizer and a safetensors reader.

VideoFlexTok (arXiv 2604.12887, §4.1 "AR model training") conditions its text-to-video AR model
on "T5 (Raffel et al., 2020)" through cross-attention, following LlamaGen (Sun et al., 2024), which
uses FLAN-T5-XL features (at most 120 tokens, bf16). The paper does not name the T5 size; any
T5 v1.1 / FLAN-T5 / mT5 checkpoint in the Hugging Face layout loads here, google/flan-t5-xl being
the default.

What is here
- `load_sharded`: Hugging Face sharded safetensors (`*.safetensors.index.json`), read with the
  project's safetensors reader in checkpoint.py.
- `T5Config`, `T5Encoder`: the encoder stack (RMSNorm without mean or bias, bucketed relative
  position bias computed once and shared by all layers, gated-GELU feed-forward, attention logits
  without 1/sqrt(d) scaling) loading `config.json` + `model.safetensors` or sharded safetensors with
  `model.safetensors.index.json`; fp32 or bf16. bf16 rounds where transformers' T5EncoderModel
  does (bf16 throughout, SDPA with the bias as mask, tanh-GELU term by term); on CPU the output
  was identical to transformers 5.23's in both bf16 and fp32.
- `T5Tokenizer`: the unigram tokenizer re-implemented from a Hugging Face `tokenizer.json`, in both
  of its layouts: legacy (normalizer `Precompiled`, pre-tokenizer `WhitespaceSplit` + `Metaspace`
  with `add_prefix_space`) and current (normalizer `Precompiled` + `Strip` + `Replace`, pre-tokenizer
  `Metaspace` with `prepend_scheme`). It follows the Hugging Face `tokenizers` library (what
  transformers' fast T5 tokenizer runs), not the `sentencepiece` C++ library, where the two differ:
  literal special-token text such as "</s>" in a prompt becomes that special token.

Known approximation (tokenizer): the `Precompiled` normaliser (SentencePiece's compiled `nmt_nfkc`
rules) is decoded exactly, but `tokenizers` first tries each Unicode extended grapheme cluster
shorter than 6 UTF-8 bytes as a whole, and Python has no grapheme segmentation. We implement the
subset of UAX #29 that can form such short clusters (CR LF; marks, joiners and spacing marks attach
to the previous character, prepend characters to the next). With a real `nmt_nfkc` charsmap this
agreed with `tokenizers` on every code point and on 400k random 2-4 character strings of assigned
characters; characters that Python's Unicode database (14.0 on Python 3.11) does not know yet can
still differ, as can NFKC results between Python's and Rust's Unicode versions.

References (facts, not code): Raffel et al. 2020 (T5); Shazeer 2020 (GLU variants); Kudo 2018
(unigram language-model tokenisation); huggingface/transformers `models/t5` (checkpoint names,
numerics); huggingface/tokenizers (unigram Viterbi, Metaspace, added tokens, Precompiled),
huggingface/spm_precompiled and google/sentencepiece (charsmap layout); the safetensors format
specification (huggingface/safetensors).
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import unicodedata
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import load_safetensors, read_safetensors_header

def _sharded_weight_map(index_path: Path) -> dict[str, Path]:
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


def _load_grouped(files: dict[str, Path], names, device) -> dict[str, torch.Tensor]:
    """Load `names` from the files given by name -> file, opening each file once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        tensors.update(load_safetensors(file, device, file_names))
    return tensors


def load_sharded(index_path, device="cpu", names=None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or only `names`) of a checkpoint split into shards by an index json."""
    files = _sharded_weight_map(Path(index_path))
    names = list(files) if names is None else list(names)
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(f"{index_path}: no tensors named {missing[:5]} ({len(missing)} missing)")
    return _load_grouped(files, names, device)


# ------------------------------------------------------------------------------------------------
# T5 encoder


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
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation_name(self) -> str:
        act = self.feed_forward_proj.removeprefix("gated-")
        # Hugging Face maps "gated-gelu" (T5 v1.1, FLAN-T5) to the tanh approximation.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def tiny(cls) -> T5Config:
        """A small configuration for tests and smoke runs."""
        return cls(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)

    @classmethod
    def from_json(cls, path) -> T5Config:
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


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
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


class RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square (computed in fp32), no centring, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


class T5Block(nn.Module):
    """Pre-norm self-attention and feed-forward with residuals; no biases anywhere."""

    def __init__(self, cfg: T5Config):
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


def _hf_name(name: str) -> str:
    for pattern, replacement in _HF_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


class T5Encoder(nn.Module):
    """The T5 encoder: token ids (B, L) + mask (B, L) -> features (B, L, d_model).

    Padded positions still get features (they attend to the valid tokens), exactly as in the
    reference implementation; consumers should use the mask.
    """

    def __init__(self, config: T5Config, tokenizer: T5Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(config.vocab_size, config.d_model)  # no sqrt(d_model) scaling
        # one bias table in the first block, reused by every layer
        self.relative_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(self, length: int) -> torch.Tensor:
        """(1, heads, length, length) additive attention bias from relative positions."""
        position = torch.arange(length, device=self.relative_bias.weight.device)
        bucket = relative_position_bucket(position[None, :] - position[:, None],
                                          self.config.relative_attention_num_buckets,
                                          self.config.relative_attention_max_distance)
        return self.relative_bias(bucket).permute(2, 0, 1)[None]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
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
    def encode_text(self, prompts: list[str], max_length: int = 120,
                    padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
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
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu",
                        tokenizer=None) -> T5Encoder:
        """Load a Hugging Face T5 directory: config.json + model.safetensors (or sharded
        model-*.safetensors with model.safetensors.index.json). Decoder weights are skipped.

        dtype: torch.float32 or torch.bfloat16 (T5 v1.1 / FLAN-T5 overflow in float16).
        tokenizer: path of a tokenizer.json; defaults to <path>/tokenizer.json when present.
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


# ------------------------------------------------------------------------------------------------
# Tokenizer

# Unicode White_Space (what Rust's char::is_whitespace, and so `tokenizers`, splits on). Python's
# str.split() differs: it also splits on U+001C..U+001F.
_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD = re.compile(f"[^{_WHITESPACE}]+")
_LEADING_SPACE = re.compile(rf"\A[{_WHITESPACE}]*")
_TRAILING_SPACE = re.compile(rf"[{_WHITESPACE}]*\Z")
_K_UNK_PENALTY = 10.0  # unknown characters score (lowest piece score - 10), as in SentencePiece


class _Charsmap:
    """SentencePiece's compiled normalisation rules (`precompiled_charsmap`).

    Layout: u32 trie size in bytes, a darts-clone double-array trie over UTF-8 keys (u32 units),
    then NUL-terminated replacement strings that the trie's leaf values index into.
    """

    def __init__(self, blob: bytes):
        if len(blob) < 4:
            raise ValueError("tokenizer.json: precompiled_charsmap is shorter than 4 bytes")
        size = int.from_bytes(blob[:4], "little")
        if size % 4 or size < 4 or 4 + size > len(blob):
            raise ValueError(f"tokenizer.json: precompiled_charsmap declares a {size}-byte trie in "
                             f"a {len(blob)}-byte blob")
        self.units = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.replacements = blob[4 + size:]

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def lookup(self, key: bytes) -> str | None:
        """Replacement of the SHORTEST rule that is a prefix of key (what Hugging Face uses)."""
        units = self.units
        position = self._offset(units[0])
        for byte in key:
            if byte == 0:
                return None
            position ^= byte
            if position >= len(units) or units[position] & 0x800000FF != byte:
                return None
            unit = units[position]
            position ^= self._offset(unit)
            if unit >> 8 & 1 and position < len(units):
                start = units[position] & 0x7FFFFFFF
                end = self.replacements.find(b"\0", start)
                return self.replacements[start:end if end >= 0 else None].decode("utf-8")
        return None

    def __call__(self, text: str) -> str:
        out = []
        for cluster in _grapheme_clusters(text):
            encoded = cluster.encode("utf-8")
            if len(encoded) < 6 and (whole := self.lookup(encoded)) is not None:
                out.append(whole)
                continue
            for ch in cluster:
                replacement = self.lookup(ch.encode("utf-8"))
                out.append(ch if replacement is None else replacement)
        return "".join(out)


# The UAX #29 rules that can produce a cluster shorter than 6 UTF-8 bytes (all others cannot).
# Characters that join the preceding one (Extend, ZWJ, SpacingMark) besides combining marks:
_EXTEND_EXTRA = re.compile("[\u200c\u200d\u0e33\u0eb3\uff9e\uff9f\U0001f3fb-\U0001f3ff"
                           "\U000e0020-\U000e007f]")
# ... spacing marks (Mc) that UAX #29 nevertheless lets break:
_MC_BREAKS = re.compile("[\u102b\u102c\u1038\u1062-\u1064\u1067-\u106d\u1083\u1087-\u108c"
                        "\u108f\u109a-\u109c\u1a61\u1a63\u1a64\uaa7b\uaa7d\U00011720\U00011721]")
# Prepend characters join the following one.
_PREPEND = re.compile("[\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2\u0d4e\U000110bd\U000110cd"
                      "\U000111c2\U000111c3\U0001193f\U00011941\U00011a3a\U00011a84-\U00011a89"
                      "\U00011d46\U00011f02]")


def _joins_previous(ch: str) -> bool:
    category = unicodedata.category(ch)
    return (category in ("Mn", "Me") or category == "Mc" and not _MC_BREAKS.match(ch)
            or bool(_EXTEND_EXTRA.match(ch)))


def _is_control(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category in ("Cc", "Zl", "Zp") or (
        category == "Cf" and not _joins_previous(ch) and not _PREPEND.match(ch))


def _grapheme_clusters(text: str) -> list[str]:
    """Approximate extended grapheme clusters (see the module docstring): CR LF stays together;
    controls stand alone; marks and joiners attach to the preceding character, prepend characters
    to the following one."""
    clusters: list[str] = []
    for ch in text:
        if clusters:
            last = clusters[-1][-1]
            if (last == "\r" and ch == "\n") or (
                    not _is_control(last) and not _is_control(ch)
                    and (_joins_previous(ch) or _PREPEND.match(last))):
                clusters[-1] += ch
                continue
        clusters.append(ch)
    return clusters


def _build_normalizer(spec):
    """tokenizer.json "normalizer" -> str -> str function."""
    if spec is None:
        return lambda s: s
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [_build_normalizer(s) for s in spec["normalizers"]]

        def sequence(s):
            for step in steps:
                s = step(s)
            return s
        return sequence
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return partial(unicodedata.normalize, kind)
    if kind == "Precompiled":
        charsmap = spec.get("precompiled_charsmap")
        return _Charsmap(base64.b64decode(charsmap)) if charsmap else (lambda s: s)
    if kind == "Strip":
        left, right = spec.get("strip_left", False), spec.get("strip_right", False)

        def strip(s):
            if left:
                s = _LEADING_SPACE.sub("", s)
            return _TRAILING_SPACE.sub("", s) if right else s
        return strip
    if kind == "Replace":
        pattern = spec["pattern"]
        regex = re.compile(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
        content = spec["content"]
        return lambda s: regex.sub(lambda _: content, s)  # a function: no backslash escapes
    raise ValueError(f"tokenizer.json normalizer type {kind!r} is not supported; supported: "
                     "Sequence, NFC, NFD, NFKC, NFKD, Precompiled, Strip, Replace")


def _build_pre_tokenizer(spec):
    """tokenizer.json "pre_tokenizer" -> function on [(text, starts_the_input)] lists."""
    if spec is None:
        return lambda words: words
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [_build_pre_tokenizer(s) for s in spec["pretokenizers"]]

        def sequence(words):
            for step in steps:
                words = step(words)
            return words
        return sequence
    if kind == "WhitespaceSplit":
        return lambda words: [(m.group(), first and m.start() == 0)
                              for text, first in words for m in _WORD.finditer(text)]
    if kind == "Metaspace":
        return partial(_metaspace, spec["replacement"], _prepend_scheme(spec),
                       spec.get("split", True))
    raise ValueError(f"tokenizer.json pre_tokenizer type {kind!r} is not supported; supported: "
                     "Sequence, WhitespaceSplit, Metaspace")


def _prepend_scheme(spec) -> str:
    # Legacy files carry add_prefix_space (true = "always"); newer ones carry prepend_scheme.
    scheme = spec.get("prepend_scheme", "always")
    if spec.get("add_prefix_space") is False:
        scheme = "never"
    if scheme not in ("always", "first", "never"):
        raise ValueError(f"tokenizer.json Metaspace prepend_scheme {scheme!r}; allowed: always, "
                         "first, never")
    return scheme


def _metaspace(replacement, scheme, split, words):
    """Spaces become the meta symbol, which is prepended to (every | the first | no) word and
    starts each piece when splitting."""
    out = []
    for text, first in words:
        text = text.replace(" ", replacement)
        if (scheme == "always" or scheme == "first" and first) and not text.startswith(replacement):
            text = replacement + text
        pieces = re.split(f"(?={re.escape(replacement)})", text) if split else [text]
        out += [(p, first and i == 0) for i, p in enumerate(p for p in pieces if p)]
    return out


@dataclass
class _AddedToken:
    id: int
    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


class T5Tokenizer:
    """SentencePiece-unigram tokenizer from a Hugging Face `tokenizer.json`.

    Per prompt: split out added/special tokens, normalise, pre-tokenise into "▁"-prefixed words,
    Viterbi-segment each word into the highest-scoring pieces (unknown characters fused into one
    <unk>), then apply the post-processor template (T5: append </s>).
    """

    def __init__(self, spec: dict):
        model = spec.get("model") or {}
        if model.get("type") != "Unigram":
            raise ValueError(f"tokenizer.json model type is {model.get('type')!r}; a T5 tokenizer "
                             "is a SentencePiece 'Unigram' model")
        if model.get("byte_fallback"):
            raise ValueError("tokenizer.json: Unigram byte_fallback is not supported (T5 does not "
                             "use it)")
        vocab = model.get("vocab") or []
        if not vocab:
            raise ValueError("tokenizer.json: the Unigram model has an empty vocabulary")
        # piece -> (id, score); a repeated piece resolves to its last entry, as in `tokenizers`
        self.pieces = {piece: (i, score) for i, (piece, score) in enumerate(vocab)}
        self.max_piece_length = max(map(len, self.pieces))
        self.unk_id = model.get("unk_id")
        self.unk_score = min(score for _, score in vocab) - _K_UNK_PENALTY

        added = [_AddedToken(**{k: t[k] for k in _AddedToken.__dataclass_fields__ if k in t})
                 for t in spec.get("added_tokens") or []]
        self.vocab_size = max([len(vocab)] + [t.id + 1 for t in added])  # ids the model must embed
        self.normalize = _build_normalizer(spec.get("normalizer"))
        self.pre_tokenize = _build_pre_tokenizer(spec.get("pre_tokenizer"))
        # Raw-text tokens are matched before normalisation, "normalized" ones in normalised text.
        self.raw_added = {t.content: t for t in added if not t.normalized}
        self.normalized_added = {self.normalize(t.content): t for t in added if t.normalized}
        self.raw_pattern = self._alternation(self.raw_added)
        self.normalized_pattern = self._alternation(self.normalized_added)
        self.prefix, self.suffix = self._template(spec.get("post_processor"))

        added_ids = {t.content: t.id for t in added}
        pad = (spec.get("padding") or {}).get("pad_token", "<pad>")
        self.pad_id = added_ids.get(pad, self.pieces.get(pad, (None,))[0])
        if self.pad_id is None:
            raise ValueError(f"tokenizer.json defines no padding token {pad!r}")

    @classmethod
    def from_file(cls, path) -> T5Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        return cls(json.loads(path.read_text(encoding="utf-8")))

    @staticmethod
    def _alternation(tokens: dict) -> re.Pattern | None:
        # longest first, so the regex alternation finds the leftmost-longest match
        ordered = sorted(tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @staticmethod
    def _template(spec) -> tuple[list[int], list[int]]:
        """Special ids the post-processor puts before / after the sequence ($A)."""
        if spec is None:
            return [], []
        if spec.get("type") != "TemplateProcessing":
            raise ValueError(f"tokenizer.json post_processor type {spec.get('type')!r} is not "
                             "supported; supported: TemplateProcessing")
        prefix, suffix = [], []
        target = prefix
        for item in spec["single"]:
            if "Sequence" in item:
                target = suffix
            else:
                target += spec["special_tokens"][item["SpecialToken"]["id"]]["ids"]
        return prefix, suffix

    def _split_added(self, text: str, pattern, tokens: dict, first: bool):
        """-> [(text, added token id or None, starts_the_input)] covering text."""
        if pattern is None:
            return [(text, None, first)] if text else []
        out, position = [], 0
        for match in pattern.finditer(text):
            token = tokens[match.group()]
            start, stop = match.span()
            if token.single_word and (re.search(r"\w\Z", text[:start])
                                      or re.match(r"\w", text[stop:])):
                continue
            if token.lstrip:
                start = max(_TRAILING_SPACE.search(text[:start]).start(), position)
            if token.rstrip:
                stop += _LEADING_SPACE.match(text[stop:]).end()
            if position < start:
                out.append((text[position:start], None, first and position == 0))
            out.append((text[start:stop], token.id, False))
            position = stop
        if position < len(text):
            out.append((text[position:], None, first and position == 0))
        return out

    def _unigram(self, word: str) -> list[int]:
        """Best segmentation of one pre-tokenised word into piece ids (Viterbi)."""
        n = len(word)
        score = [0.0] + [-math.inf] * n
        back: list[tuple[int, int] | None] = [None] * (n + 1)  # best (start, id) ending here
        for i in range(n):
            has_single_char_piece = False
            for j in range(i + 1, min(n, i + self.max_piece_length) + 1):
                entry = self.pieces.get(word[i:j])
                if entry is None:
                    continue
                candidate = score[i] + entry[1]
                # strict ">" keeps the first-found path on ties, like the reference
                if back[j] is None or candidate > score[j]:
                    score[j], back[j] = candidate, (i, entry[0])
                has_single_char_piece |= j == i + 1
            if not has_single_char_piece:
                if self.unk_id is None:
                    raise ValueError(f"character {word[i]!r} is not in the vocabulary and "
                                     "tokenizer.json defines no unk_id")
                candidate = score[i] + self.unk_score
                if back[i + 1] is None or candidate > score[i + 1]:
                    score[i + 1], back[i + 1] = candidate, (i, self.unk_id)
        segments = []
        j = n
        while j > 0:
            i, piece_id = back[j]
            segments.append((word[i:j], piece_id))
            j = i
        ids, unknown = [], ""
        for text, piece_id in reversed(segments):
            if piece_id == self.unk_id:  # consecutive unknowns become one <unk>
                unknown += text
                continue
            if unknown:
                ids.append(self.pieces.get(unknown, (self.unk_id,))[0])
                unknown = ""
            ids.append(piece_id)
        if unknown:
            ids.append(self.pieces.get(unknown, (self.unk_id,))[0])
        return ids

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one prompt, with the template's special tokens; at most max_length ids."""
        ids = []
        raw_parts = self._split_added(text, self.raw_pattern, self.raw_added, True)
        for raw, raw_id, raw_first in raw_parts:
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for part, part_id, part_first in self._split_added(
                    self.normalize(raw), self.normalized_pattern, self.normalized_added, raw_first):
                if part_id is not None:
                    ids.append(part_id)
                    continue
                for word, _ in self.pre_tokenize([(part, part_first)]):
                    ids += self._unigram(word)
        if max_length is not None:  # truncation keeps room for the template's special tokens
            reserved = len(self.prefix) + len(self.suffix)
            if not isinstance(max_length, int) or max_length <= reserved:
                raise ValueError(f"max_length must be an integer > {reserved} (the template's "
                                 f"special tokens), got {max_length!r}")
            ids = ids[:max_length - reserved]
        return self.prefix + ids + self.suffix

    def __call__(self, prompts: list[str], max_length: int = 120,
                 padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-encode -> (ids (B, L) int64, mask (B, L) bool), right-padded with the pad id."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}; "
                             "wrap a single prompt in a list")
        if not prompts:
            raise ValueError("prompts is empty; pass at least one string")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must all be strings; entries {bad[:5]} are not")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        sequences = [self.encode(p, max_length) for p in prompts]
        length = max_length if padding == "max_length" else max(map(len, sequences))
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = True
        return ids, mask
