"""The autoregressive (AR) model that generates VideoFlexTok tokens, sampled with any token budget.

Paper: §3.3, §4.1 ("AR model training"), §4.3, Appendix C.3 (generation order) and F.2 (sizes).
References (facts, not code): LlamaGen (Sun et al., 2024; FoundationVision/LlamaGen gpt.py) for
the LLaMA-style trunk, class conditioning and zero-initialised head; gpt-fast (pytorch-labs) for the
per-layer KV cache of fixed size; Infinity (FoundationVision) for the cross-attention block;
Kondratyuk et al. 2023 (VideoPoet) for text cross-attention in a video AR model.

Architecture. A pre-norm decoder-only transformer: RMSNorm, causal self-attention with rotary
position embedding (RoPE) and no QK-norm, SwiGLU (`transformer.SwiGLU`, hidden int(8/3 * D)), no
biases, width 64 * depth, heads = depth (F.2), N(0, 0.02) init and a zero-initialised vocabulary
head, so the first loss is exactly ln(64000). Optional dropout (the paper uses 0.1 for
class-to-video) on attention probabilities, the attention projection and the FFN output.

Order. Token ids (B, T', K) are generated in the *time-first* order of Appendix C.3: the first
token of every latent frame, then the second of every frame, and so on:

    sequence[n] = ids[:, n % T', n // T']

so "k tokens per frame" is the prefix of length k * T' and one model serves every token budget.
The model input is [SOS, sequence[:-1]] and position n predicts sequence[n].

Positions. Two signals, each doing what the other cannot:
- 1D RoPE (base 10000) over the flat sequence index, as in LlamaGen's 1D variant. The [SOS]
  position is index 0 and gets the identity rotation (not LlamaGen's zero rows, which silently
  remove the condition's queries and keys; see its issue tracker).
- A learned embedding of the (frame, token index) of the token each position *predicts*, as a sum
  of a frame vector and a token-index vector (`transformer.AxialPositionEmbedding`). It is the
  target's position rather than the input's because the number of frames is a sampling argument:
  in time-first order, what comes after (t, j) is (t + 1, j) or (0, j + 1) depending on T', so the
  model is told explicitly which frame and which coarse-to-fine level it must produce next.

Conditioning.
- Class: a class embedding added to a learned [SOS] vector (§4.1); index `num_classes` is the null
  class, and in training a class is replaced by it with probability `class_dropout` (0.1), for CFG.
- Text: features (B, L, text_dim) with a padding mask enter every block through cross-attention
  (§4.1, "cross-attention layers"), after a 2-layer MLP to the model width (LlamaGen's caption
  embedder). Features come from T5 (`t5.T5Encoder.encode_text`, text="t5") or from a small
  trainable byte-level encoder (`ByteTextEncoder`, text="bytes") for runs without T5 weights; both
  give (features, mask). The unconditional text is one learned null feature vector (dropout 0.1).

Sampling lives in generate.py (a fixed-size KV cache, one decode step, compiled or eager); this
file gives it `trunk` (the blocks over any positions, with or without `KVCache`s), `hidden` (a
whole sequence) and `condition`. Inputs are checked once where they enter, by the functions at the
end of this file: `ARModel.loss` for training, `generate.Sampler` for sampling; the layers below
take them as checked. `load_ar` reads a train_ar.py checkpoint.

Presets (`ARConfig.preset`). Parameters measured on the meta device (checked in tests/test_ar.py).
"trunk" is the blocks' self-attention and SwiGLU only; "c2v" is the whole model with 600 classes;
"t2v" the whole model with T5-XL cross-attention (text_dim 2048, `num_classes=0, text="t5"`):

    preset  depth  width    trunk   c2v total   t2v total
    tiny        2    128     0.4M       16.8M           -   CPU tests (17 frames x 16 tokens)
    demo        3    192                                   the bundled demo (make demo-train), vocabulary 1000
    d12        12    768    85.0M      183.9M      213.9M
    d16        16   1024   201.3M      333.3M      402.9M   t2v ~ "400M", the smallest T2V model
    d20        20   1280   393.2M      558.2M      692.8M
    d24        24   1536   679.6M      877.5M     1108.6M   t2v ~ "1.1B" (the abstract's T2V model)
    d28        28   1792  1079.0M     1309.9M     1675.4M   c2v ~ "1.3B" (the C2V model of Fig. 6)
    d32        32   2048  1610.7M     1874.6M     2418.7M
    d36        36   2304  2293.4M     2590.3M     3363.4M
    d40        40   2560  3145.7M     3475.6M     4534.6M
    d42        42   2688  3641.8M     3988.2M     5213.3M   t2v ~ "5.2B", the largest T2V model

The paper publishes sizes, not depths (its Tables 6-7 were not available to us); the notes above
are where a depth lands on a quoted size and are our inference. The "200M" model of C.3 is d12
(c2v 184M) or d16 (trunk 201M); the "3.2B" long-video model matches no depth cleanly (d35-d36 t2v,
or the d40 trunk).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import build_checked, torch_load
from fsq import LEVELS
from transformer import HEAD_DIM, AxialPositionEmbedding, Block, RMSNorm, SwiGLU, layer_norm, zero_linear

TEXT_KINDS = ("none", "t5", "bytes")


@dataclass
class ARConfig:
    depth: int = 16
    vocab: int = math.prod(LEVELS)  # the 64000 FSQ codes ([SOS] is a separate learned vector)
    max_frames: int = 5             # T': latent frames trained on (17 frames / 4 + 1)
    tokens_per_frame: int = 256     # K: tokens per latent frame (the tokenizer's registers)
    num_classes: int = 600          # 0: no class conditioning (Kinetics-600 by default)
    text: str = "none"              # "none", "t5" (features given) or "bytes" (own small encoder)
    text_dim: int = 2048            # feature width: T5 d_model (flan-t5-xl), or the byte encoder's
    max_text_len: int = 120         # LlamaGen's T5 length; bytes incl. the end token for "bytes"
    text_depth: int = 2             # layers of the byte encoder
    dropout: float = 0.1            # attention, projection and FFN (0.1 for class-to-video)
    class_dropout: float = 0.1      # condition dropout for classifier-free guidance (class or text)

    def __post_init__(self):
        if self.text not in TEXT_KINDS:
            raise ValueError(f"ARConfig.text must be one of {TEXT_KINDS}; got {self.text!r}")
        if self.text == "bytes" and self.text_dim % HEAD_DIM:
            raise ValueError(f"ARConfig.text_dim must be a multiple of {HEAD_DIM} for text='bytes'; "
                             f"got {self.text_dim}")
        for name in ("depth", "vocab", "max_frames", "tokens_per_frame", "text_dim", "max_text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ARConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.num_classes < 0 or not 0 <= self.dropout < 1 or not 0 <= self.class_dropout <= 1:
            raise ValueError("ARConfig needs num_classes >= 0, dropout in [0, 1), class_dropout in [0, 1]; "
                             f"got {self.num_classes}, {self.dropout}, {self.class_dropout}")

    @property
    def width(self):
        return 64 * self.depth

    @classmethod
    def preset(cls, name, **overrides):
        presets = {"tiny": dict(depth=2, max_frames=17, tokens_per_frame=16, num_classes=10, dropout=0.0,
                                text_dim=128, max_text_len=64),
                   # the bundled demo models (make demo-train): 5 latent frames x 8 tokens, 48 classes
                   "demo": dict(depth=3, max_frames=5, tokens_per_frame=8, num_classes=48, dropout=0.1,
                                text_dim=128, max_text_len=64)}
        presets.update({f"d{d}": dict(depth=d) for d in (12, 16, 20, 24, 28, 32, 36, 40, 42)})
        if name not in presets:
            raise ValueError(f"unknown AR preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


################################################################################
# Time-first order

def to_sequence(ids):
    """Ids (B, T', k) -> time-first sequence (B, k * T'): sequence[n] = ids[:, n % T', n // T']."""
    return ids.transpose(1, 2).flatten(1)


def from_sequence(seq, frames):
    """Inverse of `to_sequence`: (B, k * T') -> (B, T', k)."""
    if seq.dim() != 2 or seq.shape[1] % frames:
        raise ValueError(f"seq must be (B, k * frames) with frames={frames}; got {tuple(seq.shape)}")
    return seq.unflatten(1, (-1, frames)).transpose(1, 2)


################################################################################
# Layers

def rope_tables(positions, base=10000.0):
    """cos, sin (S, HEAD_DIM / 2) for integer positions (S,), in fp32. Computed per call rather than
    stored as buffers, which `model.to(torch.bfloat16)` would round (angles reach ~1000 rad)."""
    freqs = base ** (-torch.arange(0, HEAD_DIM, 2, device=positions.device, dtype=torch.float32) / HEAD_DIM)
    angles = positions.float()[:, None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate (B, H, S, HEAD_DIM) by position; the two halves of each head form the rotated pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache(nn.Module):
    """One layer's cache of fixed size (gpt-fast): keys and values for every position of the longest
    sequence, written in place at the positions of each call, so that every decode step has the same
    shapes; and the cross-attention keys, values and mask of the text, written once per generation."""

    def __init__(self, batch, heads, length, text_len, dtype, device):
        super().__init__()
        shape = (batch, heads, length, HEAD_DIM)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if text_len:
            shape = (batch, heads, text_len, HEAD_DIM)
            self.register_buffer("text_k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer("text_v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer("text_mask", torch.zeros(batch, 1, 1, text_len, dtype=torch.bool, device=device),
                                 persistent=False)

    def update(self, n, k, v):
        """Write keys and values (B, H, S, HEAD_DIM) at positions n (S,); -> the whole cache."""
        self.k.index_copy_(2, n, k)
        self.v.index_copy_(2, n, v)
        return self.k, self.v


def split_heads(x):
    """(B, S, D) -> (B, H, S, HEAD_DIM)."""
    return x.unflatten(-1, (-1, HEAD_DIM)).transpose(1, 2)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE and an optional KV cache; no biases, no QK-norm."""

    def __init__(self, dim, dropout):
        super().__init__()
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x, rope, cache=None, n=None):
        """x (B, S, D). Without a cache: a fresh causal sequence. With one: x sits at positions n (S,),
        its keys and values go into the cache, and query i sees the cached keys at positions <= n[i]
        (later slots hold stale entries of an earlier generation, or zeros: masked out)."""
        q, k, v = (split_heads(t) for t in self.wqkv(x).chunk(3, dim=-1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if cache is not None:
            k, v = cache.update(n, k, v)
            mask = torch.arange(k.shape[2], device=x.device) <= n[:, None]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None, dropout_p=p)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Attention from the video tokens to the text features; padded text positions are masked out."""

    def __init__(self, dim, dropout):
        super().__init__()
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def context(self, text, text_mask):
        """Text (B, L, D), mask (B, L) -> keys, values and SDPA mask: fixed for a whole generation."""
        k, v = (split_heads(t) for t in self.wkv(text).chunk(2, dim=-1))
        return k, v, text_mask[:, None, None, :]

    def forward(self, x, context):
        k, v, mask = context
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(split_heads(self.wq(x)), k, v, attn_mask=mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).flatten(2))


class ARBlock(nn.Module):
    """Pre-norm block: self-attention, [cross-attention to the text], SwiGLU; dropout on each branch."""

    def __init__(self, dim, dropout, cross):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(dim, 1e-5), RMSNorm(dim, 1e-5)
        self.attn = SelfAttention(dim, dropout)
        self.cross_norm = RMSNorm(dim, 1e-5) if cross else None
        self.cross = CrossAttention(dim, dropout) if cross else None
        self.mlp = SwiGLU(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, text=None, cache=None, n=None):
        """text: (projected features, mask) of the condition; with a cache, its stored keys and values."""
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, n))
        if self.cross is not None:
            context = self.cross.context(*text) if cache is None else (cache.text_k, cache.text_v, cache.text_mask)
            x = x + self.drop(self.cross(self.cross_norm(x), context))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class ByteTextEncoder(nn.Module):
    """A small trainable text encoder over UTF-8 bytes, for runs without T5 weights.

    Bytes (truncated to max_len - 1) plus an end token, a learned position per byte, `depth`
    bidirectional blocks from transformer.py (key-padding mask) and a final LayerNorm. Same
    interface as `t5.T5Encoder.encode_text`.
    """

    END = 256

    def __init__(self, dim, depth, max_len):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(257, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))

    def encode_text(self, prompts, max_length=None):
        """prompts -> (features (B, L, dim), mask (B, L) bool), L = the longest prompt + 1 (end token)."""
        max_length = min(max_length or self.max_len, self.max_len)
        rows = [list(p.encode("utf-8")[:max_length - 1]) + [self.END] for p in prompts]
        L = max(map(len, rows))
        device = self.pos.device
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows], device=device)
        mask = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in rows], device=device)
        x = self.embed(ids) + self.pos[:L]
        for block in self.blocks:
            x = block(x, mask[:, None, None, :], None)
        return layer_norm(x), mask


################################################################################
# Model

class ARModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.tok_emb = nn.Embedding(cfg.vocab, D)
        # [SOS], the one special token: a learned vector, never predicted (lengths are fixed).
        self.sos = nn.Parameter(torch.randn(D) * 0.02)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None  # last: null
        self.pos = AxialPositionEmbedding(D, (cfg.tokens_per_frame, cfg.max_frames))
        if cfg.text != "none":
            self.text_encoder = ByteTextEncoder(cfg.text_dim, cfg.text_depth, cfg.max_text_len) \
                if cfg.text == "bytes" else None
            self.null_text = nn.Parameter(torch.randn(cfg.text_dim) * 0.02)
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D, bias=False), nn.GELU(approximate="tanh"),
                                           nn.Linear(D, D, bias=False))
        self.blocks = nn.ModuleList(ARBlock(D, cfg.dropout, cfg.text != "none") for _ in range(cfg.depth))
        self.norm = RMSNorm(D, 1e-5)
        # Zero head: the first prediction is uniform, loss ln(vocab) (LlamaGen).
        self.head = zero_linear(D, cfg.vocab, bias=False)
        self.apply(_init_weights)

    def forward(self, seq, cls=None, text=None, text_mask=None, frames=None):
        """Logits (B, n + 1, vocab) in fp32 for a time-first prefix seq (B, n) of a sequence of `frames`
        latent frames (default max_frames): position i predicts seq[i]. In training mode the class / text
        is dropped to the null condition with prob. class_dropout. `loss` checks what it passes here."""
        frames = self.cfg.max_frames if frames is None else frames
        return self.head(self.hidden(seq, frames, *self.condition(seq.shape[0], cls, text, text_mask))).float()

    def loss(self, ids, cls=None, text=None, text_mask=None):
        """Cross-entropy of ids (B, T', k) (any k <= K: train on the first k tokens of every frame)."""
        check_ids(self.cfg, ids)
        check_condition(self.cfg, ids.shape[0], cls, text, text_mask)
        seq = to_sequence(ids)
        logits = self(seq[:, :-1], cls, text, text_mask, frames=ids.shape[1])
        return F.cross_entropy(logits.flatten(0, 1), seq.flatten())

    def encode_text(self, prompts, t5=None):
        """Prompts -> (features, mask) for `text`/`text_mask`: our byte encoder (text="bytes", trainable)
        or a `t5.T5Encoder` with its tokenizer (text="t5")."""
        check_prompts(prompts)
        if self.cfg.text == "bytes":
            return self.text_encoder.encode_text(prompts, self.cfg.max_text_len)
        if self.cfg.text == "t5":
            if t5 is None:
                raise ValueError("this model reads T5 features: pass t5=T5Encoder.from_pretrained(...)")
            return t5.encode_text(prompts, max_length=self.cfg.max_text_len, padding="longest")
        raise ValueError("this model has no text conditioning (ARConfig.text='none')")

    def check_vocabulary(self, codebook_size):
        """Refuse a tokenizer whose codebook is not the one this model's vocabulary was trained on."""
        if codebook_size != self.cfg.vocab:
            raise ValueError(f"tokenizer codebook has {codebook_size} codes but this AR model predicts "
                             f"{self.cfg.vocab}: the tokenizer and AR checkpoints do not belong together")

    def check_tokenizer(self, tokenizer):
        """Refuse a `VideoFlexTok` that cannot decode this model's ids (codebook, K, frames)."""
        self.check_vocabulary(tokenizer.codebook_size)
        tk, tf = tokenizer.cfg.registers, tokenizer.cfg.max_frames
        if self.cfg.tokens_per_frame > tk or self.cfg.max_frames > tf:
            raise ValueError(f"this AR model makes up to {self.cfg.max_frames} frames x {self.cfg.tokens_per_frame} "
                             f"tokens; the tokenizer decodes at most {tf} x {tk}")

    def hidden(self, seq, frames, sos, text):
        """Final hidden states (B, n + 1, D) of the input [SOS, seq] (seq (B, n)), at positions 0..n."""
        x = torch.cat([sos[:, None].to(self.tok_emb.weight.dtype), self.tok_emb(seq)], dim=1)
        return self.trunk(x, torch.arange(x.shape[1], device=x.device), frames, text)

    def trunk(self, x, n, frames, text=None, caches=None):
        """Input vectors x (B, S, D) at sequence positions n (S,) -> final hidden states (B, S, D).

        Without caches x is a whole sequence from position 0 (causal attention); with one `KVCache`
        per block, positions n of a longer one (generate.py), the text read from the caches.
        """
        # Position n predicts token n // frames of frame n % frames: index the two axes directly
        # (the same sum as the module's (K, frames) grid flattened in time-first order).
        x = x + self.pos.axes[0][n // frames] + self.pos.axes[1][n % frames]
        rope = rope_tables(n)  # RoPE over the same flat index ([SOS] = 0)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, text, caches[i] if caches is not None else None, n)
        return self.norm(x)

    def condition(self, B, cls, text, text_mask):
        """-> ([SOS] vectors (B, D), (projected text (B, L, D), mask) or None), with training dropout.
        The inputs are checked where they enter (`loss`, generate.Sampler): here they are the model's."""
        if text is not None:
            text = text.to(self.null_text.dtype)
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(B, device=self.sos.device) < self.cfg.class_dropout
            null_cls, null_text, null_mask = self.null_inputs(B, text)
            if cls is not None:
                cls = torch.where(drop, null_cls, cls)
            if text is not None:
                text = torch.where(drop[:, None, None], null_text, text)
                text_mask = torch.where(drop[:, None], null_mask, text_mask)
        sos = self.sos.expand(B, -1)
        if cls is not None:
            sos = sos + self.class_emb(cls)
        return sos, None if text is None else (self.text_proj(text), text_mask)

    def null_inputs(self, B, text):
        """(cls, text, text_mask) of the unconditional branch: the null class, the null text padded to L."""
        cls = torch.full((B,), self.cfg.num_classes, device=self.sos.device) if self.class_emb is not None else None
        if self.cfg.text == "none":
            return cls, None, None
        L = text.shape[1]
        features = torch.zeros(B, L, self.cfg.text_dim, dtype=self.null_text.dtype, device=self.sos.device)
        features[:, 0] = self.null_text
        mask = torch.zeros(B, L, dtype=torch.bool, device=self.sos.device)
        mask[:, 0] = True
        return cls, features, mask


def _init_weights(m):
    """N(0, 0.02) for Linear and Embedding weights (LlamaGen); zero-initialised layers stay zero."""
    if isinstance(m, (nn.Linear, nn.Embedding)) and not getattr(m, "zero_init", False):
        nn.init.normal_(m.weight, std=0.02)


################################################################################
# Input checks, made once where input enters: ARModel.loss (training) and generate.Sampler (sampling).
# Every error names the argument and what is allowed.

def check_prompts(prompts):
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r:.80}")


def check_shape(cfg, frames, k):
    """Latent frames and tokens per frame (None: the model's) -> both, within what the model was trained for."""
    frames = cfg.max_frames if frames is None else frames
    k = cfg.tokens_per_frame if k is None else k
    if not 1 <= frames <= cfg.max_frames:
        raise ValueError(f"frames={frames}: this model was trained for 1 to {cfg.max_frames} latent frames")
    if not 1 <= k <= cfg.tokens_per_frame:
        raise ValueError(f"tokens_per_frame={k} must be in [1, {cfg.tokens_per_frame}]")
    return frames, k


def check_ids(cfg, ids):
    if not torch.is_tensor(ids) or ids.dim() != 3 or ids.dtype.is_floating_point:
        raise ValueError(f"ids must be an integer tensor (B, T', k); got {getattr(ids, 'shape', ids)!r}")
    check_shape(cfg, ids.shape[1], ids.shape[2])
    if ids.min() < 0 or ids.max() >= cfg.vocab:
        raise ValueError(f"ids must be in [0, {cfg.vocab}); got [{ids.min().item()}, {ids.max().item()}]")


def check_condition(cfg, B, cls, text, text_mask):
    """The class ids (B,) and text features (B, L, text_dim) with mask (B, L) that the model was built for."""
    if cfg.num_classes:
        n = cfg.num_classes
        if not torch.is_tensor(cls) or cls.shape != (B,) or cls.dtype.is_floating_point:
            raise ValueError(f"cls must be an integer tensor of {B} class ids in [0, {n}); got {cls!r:.80}")
        if cls.min() < 0 or cls.max() >= n:
            raise ValueError(f"unknown class id: cls must be in [0, {n}); got [{cls.min().item()}, {cls.max().item()}]")
    elif cls is not None:
        raise ValueError("cls given, but this model has no class conditioning (num_classes=0)")
    if cfg.text == "none":
        if text is not None:
            raise ValueError("text given, but this model has no text conditioning (ARConfig.text='none')")
        return
    L_max, Dt = cfg.max_text_len, cfg.text_dim
    if not torch.is_tensor(text) or text.dim() != 3 or text.shape[0] != B or text.shape[2] != Dt \
            or not 1 <= text.shape[1] <= L_max:
        raise ValueError(f"text must be features (B={B}, L <= {L_max}, {Dt}) from encode_text; "
                         f"got {getattr(text, 'shape', text)!r:.80}")
    if not torch.is_tensor(text_mask) or text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
        raise ValueError(f"text_mask must be a bool tensor {tuple(text.shape[:2])}; got {text_mask!r:.80}")
    if not text_mask.any(1).all():
        raise ValueError("text_mask has a row without any valid position; every prompt needs >= 1 token")


################################################################################
# Loading

def load_ar(path, device):
    """A train_ar.py checkpoint -> (ARModel in eval mode with its EMA weights when present, the raw state)."""
    state = torch_load(path)
    if not isinstance(state, dict) or not {"config", "model"} <= set(state):
        raise ValueError(f"{path} is not a train_ar.py checkpoint (it has no 'config' and 'model')")
    weights = state.get("ema") or state["model"]
    model = build_checked(lambda: ARModel(ARConfig(**state["config"])), weights, path,
                          "Use a checkpoint written by train_ar.py.")
    model.load_state_dict(weights)
    return model.to(device).eval(), state
