"""The transformer parts shared by the VideoFlexTok encoder, decoder and REPA head.

Paper: §3.1-§3.2 and Appendix F.1 (time-causal masks over interleaved frames), following FlexTok
(Bachmann et al., 2025) for the block design. References: DiT (adaLN-zero), FlexTok / VideoFlexTok
official inference code (non-affine fp32 LayerNorm, QK-norm, SwiGLU, separate modulation for patch
and register tokens, `time_block_causal_last` mask), the PyTorch FlexAttention API.

Sequence layout. Every sequence in this project is a stack of T frame blocks, each block holding
the frame's P patch tokens followed by its R register tokens:

    [ patches_1 | registers_1 | patches_2 | registers_2 | ... | patches_T | registers_T ]

(The paper writes the decoder sequence as [r_1, x_1, ...]; the order *inside* a frame block only
matters for the encoder's mask, and we keep the official release's patches-first order everywhere.)

Masks are written once as FlexAttention `mask_mod` functions of (q_idx, kv_idx) over this layout.
The same function gives two attention backends:
- "flex": a FlexAttention BlockMask, built once per shape and cached (fast on CUDA, compiled);
- "sdpa": a dense boolean (S, S) mask for `scaled_dot_product_attention` (CPU, debugging, and
  training on CPU where FlexAttention has no backward).
The "full" mask is no mask on either backend: unmasked SDPA is faster than any masked kernel.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

HEAD_DIM = 64


def layer_norm(x, eps=1e-5):
    """Non-affine LayerNorm computed in fp32 (bf16-safe), as every norm in the tokenizer."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm (T5's layer norm, LLaMA's norm): scale by the root mean square (computed in fp32), no centring,
    no bias; used by the AR model and T5."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


################################################################################
# Layout and masks

@dataclass(frozen=True)
class Layout:
    """T frame blocks of P patch tokens followed by R register tokens."""
    frames: int
    patches: int
    registers: int

    @property
    def block(self):
        return self.patches + self.registers

    @property
    def length(self):
        return self.frames * self.block

    def interleave(self, patches, registers):
        """(B, T, P, D), (B, T, R, D) -> (B, S, D)."""
        return torch.cat([patches, registers], dim=2).flatten(1, 2)

    def split(self, x):
        """(B, S, D) -> (B, T, P, D), (B, T, R, D)."""
        x = x.unflatten(1, (self.frames, self.block))
        return x[:, :, :self.patches], x[:, :, self.patches:]


def mask_mod_for(kind, layout):
    """The attention rule `mask_mod(b, h, q_idx, kv_idx) -> bool` of a mask kind over a layout.

    - "causal_registers" (encoder, §3.1): frame t sees every token of frames < t. Inside frame t,
      patches see the frame's patches only, and register i sees the patches and registers <= i.
      Register causality is what makes every prefix of a frame's tokens a valid encoding.
    - "time_causal" (decoder, §3.2): frame t sees frames <= t, fully inside its own frame.
    - "full": everything sees everything (decoder fine-tuning stage, Appendix F.1).

    Written with tensor ops only so it works element-wise under FlexAttention's vmap and on
    broadcast index grids alike.
    """
    L, P = layout.block, layout.patches
    if kind == "full":
        return lambda b, h, q, kv: (q >= 0) & (kv >= 0)
    if kind == "time_causal":
        return lambda b, h, q, kv: kv // L <= q // L
    if kind == "causal_registers":
        def mask_mod(b, h, q, kv):
            q_frame, kv_frame = q // L, kv // L
            q_pos, kv_pos = q % L, kv % L
            inside = (kv_pos < P) | ((q_pos >= P) & (kv_pos <= q_pos))
            return (kv_frame < q_frame) | ((kv_frame == q_frame) & inside)
        return mask_mod
    raise ValueError(f"mask kind must be one of 'causal_registers', 'time_causal', 'full'; got {kind!r}")


def dense_mask(kind, layout, device="cpu"):
    """(S, S) boolean mask, True where attention is allowed."""
    idx = torch.arange(layout.length, device=device)
    return mask_mod_for(kind, layout)(None, None, idx[:, None], idx[None, :])


@functools.lru_cache(maxsize=64)
def attention_mask(kind, layout, device, backend):
    """The mask for one shape, built once and cached: BlockMask (flex), bool tensor (sdpa), or None.

    A full mask is None on both backends: unmasked SDPA dispatches to the fastest kernel. On an H100 it ran the
    d18-d18 full-attention forward+backward 1.56x faster than FlexAttention with an all-True block mask
    (`bench.py attention`, BENCHMARKS.md).
    """
    device = torch.device(device)
    if backend not in ("flex", "sdpa"):
        raise ValueError(f"attention backend must be 'flex' or 'sdpa'; got {backend!r}")
    if kind == "full":
        return None
    if backend == "sdpa":
        return dense_mask(kind, layout, device)
    return block_mask(kind, layout, device)


@functools.lru_cache(maxsize=64)
def last_block_mask(kind, layout, device):
    """The rows of the last frame block of `layout` in its dense mask, (L, S): what that frame's tokens may see when
    the frames before it are cached keys and values (FrameCache). "full" is refused: no frame can run before the
    later ones there."""
    if kind == "full":
        raise ValueError("a full-attention transformer cannot run frame by frame: every frame sees the later ones")
    idx = torch.arange(layout.length, device=torch.device(device))
    return mask_mod_for(kind, layout)(None, None, idx[-layout.block:, None], idx[None, :])


def block_mask(kind, layout, device):
    """A mask kind as a FlexAttention BlockMask (compiled construction on CUDA: eager builds the dense mask)."""
    S = layout.length
    build = torch.compile(create_block_mask) if torch.device(device).type == "cuda" else create_block_mask
    return build(mask_mod_for(kind, layout), None, None, S, S, device=device)


def default_backend(device):
    """FlexAttention on CUDA; SDPA with a dense mask elsewhere (no FlexAttention backward on CPU)."""
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def allow_recompiles(limit=64):
    """Raise Dynamo's per-function recompile limit (default 8). Every new shape, head count, mask or grad mode is a
    recompile; past the limit Dynamo silently runs the function uncompiled, which for flex_attention is the
    unfused reference kernel (25x slower, measured with bench.py attention). A tokenizer's encoder, decoder and
    REPA head, each in training and evaluation, come close to 8 by themselves."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def compile_or_eager(fn, what, **options):
    """torch.compile(fn, **options) that, where compilation fails (no C++ compiler, an unsupported torch build or
    device), says so in one line and runs fn eagerly from then on. The eager rerun re-raises any error that was
    not the compiler's."""
    allow_recompiles()
    compiled = torch.compile(fn, **options)

    def call(*args):
        nonlocal compiled
        if compiled is fn:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 -- any compiler failure, see above
            print(f"torch.compile failed for {what} ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                  "running it eagerly")
            compiled = fn
            return fn(*args)
    return call


@functools.cache
def _compiled_flex():
    allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


################################################################################
# Layers

class Attention(nn.Module):
    """Multi-head self-attention without biases, with per-head non-affine QK LayerNorm."""

    def __init__(self, dim):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask, past=None):
        """x (B, S, D). `past`: a dict holding the keys and values of earlier tokens (FrameCache), which the
        queries also attend to; this call's keys and values are appended to it."""
        B, S, D = x.shape
        # One GEMM three times as wide runs closer to the GPU's peak than three; q, k and v stay separate
        # parameters so that checkpoints keep the official names.
        qkv = F.linear(x, torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]))
        q, k, v = qkv.view(B, S, 3, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        # QK-norm keeps attention logits bounded, which is what makes large-lr training stable.
        q, k = layer_norm(q), layer_norm(k)
        if past is not None:
            if "k" in past:
                k, v = torch.cat([past["k"], k], 2), torch.cat([past["v"], v], 2)
            past["k"], past["v"] = k, v
        if isinstance(mask, BlockMask):
            # Inside a compiled block, Dynamo turns flex_attention into its fused kernel itself; called eagerly,
            # it needs its own compiled wrapper on CUDA. Eager flex (forward only) is for the CPU parity tests.
            attend = _compiled_flex() if x.is_cuda and not torch.compiler.is_compiling() else flex_attention
            out = attend(q, k, v, block_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class SwiGLU(nn.Module):
    """Gated MLP: w2(silu(w1 x) * w3 x), hidden width int(2/3 * 4 * dim), no biases."""

    def __init__(self, dim):
        super().__init__()
        hidden = int(2 * 4 * dim / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        # w1 and w3 as one GEMM, for the same reason as q, k and v in Attention.
        gate, up = F.linear(x, torch.cat([self.w1.weight, self.w3.weight])).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-norm transformer block, optionally with adaLN-zero modulation.

    With `groups=2` the conditioning produces separate (gate, shift, scale) vectors for the patch
    tokens and for the register tokens of every frame block, as in the official decoder. The
    modulation is broadcast over a (B, T, L, D) frame-block view of the sequence, so it costs
    B*L*D memory rather than B*S*D (the official code copies it over the whole sequence).
    """

    def __init__(self, dim, cond_dim=None, groups=1):
        super().__init__()
        self.attn = Attention(dim)
        self.mlp = SwiGLU(dim)
        self.groups = groups
        # Zero init: every block starts as the identity, the "zero" of adaLN-zero (DiT).
        self.adaLN = zero_linear(cond_dim, groups * 6 * dim) if cond_dim is not None else None

    def forward(self, x, mask, layout, cond=None, past=None):
        if self.adaLN is None:
            x = x + self.attn(layer_norm(x), mask, past)
            return x + self.mlp(layer_norm(x))
        B, S, D = x.shape
        frames = lambda y: y.view(B, layout.frames, layout.block, D)  # noqa: E731
        mod = group_modulation(self.adaLN(F.silu(cond)), layout, self.groups)
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = mod.chunk(6, dim=-1)
        h = modulate(frames(layer_norm(x)), shift_msa, scale_msa).view(B, S, D)
        x = x + (gate_msa * frames(self.attn(h, mask, past))).view(B, S, D)
        h = modulate(frames(layer_norm(x)), shift_mlp, scale_mlp).view(B, S, D)
        return x + (gate_mlp * frames(self.mlp(h))).view(B, S, D)


def group_modulation(mod, layout, groups):
    """(B, groups*n) conditioning output -> (B, 1, L, n): the vector each position of a frame block uses.

    Group 0 serves the patch tokens, group 1 (if any) the register tokens, matching the
    official group-major split of the adaLN output.
    """
    mod = mod.unflatten(-1, (groups, -1))  # (B, groups, n)
    # Made on the device: a tensor made from a Python list is copied in, which makes the host wait for the GPU.
    which = (torch.arange(layout.block, device=mod.device) >= layout.patches).long() * min(1, groups - 1)
    return mod[:, which][:, None]


class Transformer(nn.Module):
    """A stack of blocks that share one mask kind."""

    def __init__(self, dim, depth, mask, cond_dim=None, groups=1):
        super().__init__()
        self.mask_kind = mask
        self.blocks = nn.ModuleList(Block(dim, cond_dim, groups) for _ in range(depth))
        self.backend = None  # None: pick by device (see default_backend); or "flex" / "sdpa"
        # Activation checkpointing: keep only each block's input for the backward and run the block again
        # there. About a third more compute for a fraction of the activation memory (train_tok.py's
        # --activation-checkpointing), which lets larger batches fill a GPU.
        self.checkpointing = False

    def forward(self, x, layout, cond=None, cache=None):
        """x: (B, S, D) -> (B, S, D).

        With a FrameCache, x holds only the last frame block of `layout` and the earlier ones are the cache's
        keys and values (SDPA with that block's rows of the mask, on every device); the cache takes this
        block's keys and values."""
        return self._run(x, layout, cond, cache)[0]

    def forward_with_features(self, x, layout, cond, layer):
        """(output, output of block `layer` (0-based)), both (B, S, D): the decoder's REPA head reads the
        features of an early block beside the decoder's own output."""
        return self._run(x, layout, cond, None, layer)

    def _run(self, x, layout, cond, cache, layer=None):
        if cache is not None:
            mask = last_block_mask(self.mask_kind, layout, str(x.device))
            layout = Layout(1, layout.patches, layout.registers)   # what x holds, for the blocks' modulation
        else:
            mask = attention_mask(self.mask_kind, layout, str(x.device), self.backend or default_backend(x.device))
        features = None
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, layout, cond, use_reentrant=False)
            else:
                x = block(x, mask, layout, cond, None if cache is None else cache.layers[i])
            if i == layer:
                features = x
        if cache is not None:
            cache.frames += 1
        return x, features


def use_checkpointing(model, on=True):
    """Turn activation checkpointing on (or off) in every Transformer of `model`."""
    for module in model.modules():
        if isinstance(module, Transformer):
            module.checkpointing = on


class FrameCache:
    """The keys and values of the frame blocks a Transformer has run so far, one dict per block: with a
    time-causal mask a new frame block attends only to them and to itself, so running the frames one at a time
    gives what the whole sequence gives (streaming tokenization). Its memory grows with the frames it holds, so
    a new chunk starts with a new cache."""

    def __init__(self, depth):
        self.layers = [{} for _ in range(depth)]
        self.frames = 0


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> vector: sinusoid of scale * t (max period 256, cos then sin), then MLP.

    The scale of 1000 and the max period of 256 follow the official release (DiT uses t in [0, 1000] and a
    period of 10000). The official module's scale is 1000 / max_timestep, a config value whose default, 1000,
    gives a scale of 1. The scale is folded into the frequencies, as there, so that fp32 rounding agrees.
    """

    def __init__(self, dim, freq_dim=256, max_period=256, scale=1000.0):
        super().__init__()
        half = freq_dim // 2
        freqs = scale * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        args = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


################################################################################
# Patches and positions

def patchify(latents, p):
    """(B, C, T, H, W) -> (B, T, (H/p)*(W/p), p*p*C), patches in raster order."""
    B, C, T, H, W = latents.shape
    x = latents.reshape(B, C, T, H // p, p, W // p, p)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(B, T, (H // p) * (W // p), p * p * C)


def unpatchify(patches, p, C, grid):
    """Inverse of `patchify`: (B, T, h*w, p*p*C) -> (B, C, T, h*p, w*p)."""
    B, T = patches.shape[:2]
    h, w = grid
    x = patches.reshape(B, T, h, w, p, p, C)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, C, T, h * p, w * p)


POSITION_KINDS = ("learnable_sum", "sincos")


class AxialPositionEmbedding(nn.Module):
    """Position embedding over a grid of axes: (t, y, x) for patches, (t, k) for decoder registers.

    The kinds are the official release's:
    - "learnable_sum" (default): one learned vector per index of every axis, summed. It costs sum(sizes)
      vectors of width D instead of their product;
    - "sincos": a fixed 2D sine-cosine table (MoCo v3), two axes only, so the decoder's (t, k) registers
      alone may use it. It is a buffer, saved with the weights, because the official files store it too.
    """

    def __init__(self, dim, sizes, kind="learnable_sum"):
        super().__init__()
        if kind not in POSITION_KINDS:
            raise ValueError(f"position embedding kind must be one of {POSITION_KINDS}; got {kind!r}")
        self.kind = kind
        if kind == "sincos":
            if len(sizes) != 2 or dim % 4:
                raise ValueError(f"sincos position embeddings need 2 axes and a width divisible by 4; got "
                                 f"sizes {tuple(sizes)}, width {dim}")
            self.register_buffer("table", sincos_2d(dim, *sizes))
        else:
            self.axes = nn.ParameterList(nn.Parameter(torch.randn(n, dim) * 0.02) for n in sizes)

    def forward(self, *lengths):
        """-> (lengths[0], prod(lengths[1:]), D): one vector per position, the first axis kept apart."""
        if self.kind == "sincos":
            return self.table[:lengths[0], :lengths[1]]
        # Summed from the last axis backwards, ((y + x) + t), in the official order: the same numbers up to
        # float rounding either way, but this way bit for bit.
        pos = None
        for i in reversed(range(len(lengths))):
            shape = [1] * len(lengths) + [-1]
            shape[i] = lengths[i]
            axis = self.axes[i][:lengths[i]].view(shape)
            pos = axis if pos is None else axis + pos
        return pos.flatten(1, -2)


def sincos_2d(dim, rows, cols, temperature=10000.0):
    """(rows, cols, dim) fixed table, laid out exactly as the official `build_2d_sincos_posemb`: it
    flattens a (cols, rows) grid and reads it back as (rows, cols), so for rows != cols the
    coordinates are permuted; for square tables entry (i, j) is [sin(i w), cos(i w), sin(j w), cos(j w)]."""
    n = torch.arange(rows * cols, dtype=torch.float32)
    first, second = torch.div(n, rows, rounding_mode="floor"), n % rows
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    a, b = first[:, None] * omega, second[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).view(rows, cols, dim)


def zero_linear(d_in, d_out, bias=True):
    """A Linear layer that starts at zero (adaLN modulations, output heads) and that
    `init_linear` leaves at zero."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    layer.zero_init = True
    return layer


def init_linear(module):
    """Xavier-uniform weights and zero biases for every Linear (the official init), except the
    zero-initialised ones."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "zero_init", False):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
