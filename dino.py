"""DINOv2 vision transformer (ViT-S/B/L/g, patch 14, with or without registers) and REPA targets.

VideoFlexTok distils DINOv2 patch features into its decoder with the REPA loss (paper §3.2,
Appendix F.1): a small time-causal head on an early decoder layer predicts, for every latent
frame, the DINOv2 patch features of the corresponding RGB frames, and a cosine-similarity loss
pulls them together. This file provides the frozen teacher: a from-scratch DINOv2 that loads the
public checkpoints, and `repa_targets`, which turns a video into per-latent-frame targets on the
decoder's token grid.

Supported files:
- the official hub files `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` (plain state dicts; our
  module and parameter names equal the official ones, so they load with strict checking);
- the Hugging Face layout (a directory with `config.json` and `model.safetensors` or
  `pytorch_model.bin`, as in facebook/dinov2-* and facebook/dinov2-with-registers-*), whose
  legacy on-disk names are translated (split q/k/v projections are re-joined into `qkv`).

Position embeddings are stored for a 37x37 grid (518 px) and resized bicubically for other
inputs. The official code has two rules, selected per checkpoint by `interpolate_offset` and
`interpolate_antialias` (defaults follow the official hub constructors):
- models without registers: `scale_factor = (grid + 0.1) / 37`, no antialiasing (a historical
  kludge from DINO; PyTorch maps coordinates with the given scale, so it is not the same as
  asking for the output size);
- `_reg4` models: `size = grid` with antialiasing.
Hugging Face's Dinov2Model uses `size = grid` without antialiasing (offset 0.0, antialias False);
REPA resamples with `size = grid` and antialiasing (offset 0.0, antialias True). Both are
reachable through the two flags.

References: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (2023);
Darcet et al., "Vision Transformers Need Registers" (2023); Yu et al., "Representation Alignment
for Generation" (REPA, 2025); the facebookresearch/dinov2 repository and the Hugging Face
transformers DINOv2 models (facts on layout and numerics only).
"""
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import check_state_dict, load_safetensors, torch_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


################################################################################
# The network

@dataclass(frozen=True)
class DinoConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    swiglu: bool = False  # ViT-g uses a SwiGLU MLP, the others a GELU MLP
    patch_size: int = 14
    img_size: int = 518  # sets the stored position-embedding grid (518 / 14 = 37)
    num_registers: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    eps: float = 1e-6


def _with_registers(cfg):
    # The official `_reg` constructors also switch to the size-based, antialiased resize rule.
    return replace(cfg, num_registers=4, interpolate_offset=0.0, interpolate_antialias=True)


_BASE = {
    "vits14": DinoConfig(dim=384, depth=12, heads=6),
    "vitb14": DinoConfig(dim=768, depth=12, heads=12),
    "vitl14": DinoConfig(dim=1024, depth=24, heads=16),
    "vitg14": DinoConfig(dim=1536, depth=40, heads=24, swiglu=True),
}
# Names follow the hub file names: "vitb14" <-> dinov2_vitb14_pretrain.pth,
# "vitb14_reg4" <-> dinov2_vitb14_reg4_pretrain.pth.
PRESETS = {**_BASE, **{f"{name}_reg4": _with_registers(cfg) for name, cfg in _BASE.items()}}


class _PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major over the grid


class _Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as in the official model


class _SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # Two thirds of the MLP width, rounded up to a multiple of 8 (4096 for ViT-g).
        hidden = (int(cfg.dim * cfg.mlp_ratio * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(cfg.dim, 2 * hidden)  # rows: [gate; value]
        self.w3 = nn.Linear(hidden, cfg.dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class _Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = _Attention(cfg)
        self.ls1 = _LayerScale(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = _SwiGLU(cfg) if cfg.swiglu else _Mlp(cfg)
        self.ls2 = _LayerScale(cfg.dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 backbone with the official parameter names (no classification head).

    `forward(images)` takes ImageNet-normalised RGB images (B, 3, H, W) with H and W multiples
    of the patch size and returns the final-normed token sequence (B, 1 + R + h*w, D):
    [cls, R registers, patches in row-major order] (= Hugging Face `last_hidden_state`).
    The position-embedding rule lives in the `interpolate_offset` / `interpolate_antialias`
    attributes (initialised from the config), so it can be switched on a loaded model.
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size={cfg.img_size} must be a multiple of patch_size={cfg.patch_size}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim={cfg.dim} must be divisible by heads={cfg.heads}")
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.interpolate_offset = cfg.interpolate_offset
        self.interpolate_antialias = cfg.interpolate_antialias
        grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.dim))
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim))
        # Only used by DINOv2's masked-image training, but part of every released checkpoint;
        # kept so the official files load with strict checking.
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.patch_embed = _PatchEmbed(cfg)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def _pos_embed(self, h, w):
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        if (h, w) == (grid, grid):
            return self.pos_embed
        # Resample in float32: bicubic in half precision visibly shifts the embeddings.
        cls_pos, patch_pos = self.pos_embed.float().split([1, grid * grid], dim=1)
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h + self.interpolate_offset) / grid, (w + self.interpolate_offset) / grid)
            resize = {"scale_factor": scale}
        else:
            resize = {"size": (h, w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False,
                                  antialias=self.interpolate_antialias, **resize)
        patch_pos = patch_pos.flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        height, width = images.shape[-2:]
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} cannot be patched: H and W must be multiples of "
                f"{p}; resize to e.g. {max(p, round(height / p) * p)}x{max(p, round(width / p) * p)}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self._pos_embed(height // p, width // p).to(x.dtype)
        if self.cfg.num_registers:  # registers carry no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, images):
        """The official `forward_features` outputs (without the pre-norm tokens)."""
        x = self.forward(images)
        r = self.cfg.num_registers
        return {"x_norm_clstoken": x[:, 0], "x_norm_regtokens": x[:, 1:1 + r],
                "x_norm_patchtokens": x[:, 1 + r:]}


################################################################################
# Loading

# Hugging Face on-disk names (legacy names, which transformers keeps in files even where v5
# renames modules in memory) -> official names, within one transformer layer.
_HF_LAYER_MODULES = {
    "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
}
_HF_LAYER = {f"{hf}.{p}": f"{ours}.{p}" for hf, ours in _HF_LAYER_MODULES.items() for p in ("weight", "bias")}
_HF_LAYER |= {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def _hf_to_official(hf):
    """Translate HF names; unknown keys are kept as they are so the key check reports them."""
    out, qkv = {}, {}
    for key, value in hf.items():
        if key.startswith("classifier."):  # Dinov2ForImageClassification head
            continue
        layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        part = layer and re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", layer[2])
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif layer and layer[2] in _HF_LAYER:
            out[f"blocks.{layer[1]}.{_HF_LAYER[layer[2]]}"] = value
        elif part:  # HF splits the fused qkv projection; ours keeps the official fused one
            qkv.setdefault((layer[1], part[2]), {})[part[1]] = value
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer}: incomplete q/k/v {kind} tensors ({sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _read_weights(file):
    if file.suffix == ".safetensors":
        state = load_safetensors(file)
    else:
        state = torch_load(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a plain state dict (name -> tensor)")
    return state


def _strip_prefixes(state):
    # DataParallel saves add "module.", Dinov2ForImageClassification adds "dinov2.".
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "dinov2."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _infer_config(state, hf_config):
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
    if missing:
        raise ValueError(f"not a DINOv2 checkpoint: missing {missing} "
                         f"(found e.g. {sorted(state)[:3]})")
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = 1 + max((int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    swiglu = "blocks.0.mlp.w12.weight" in state
    mlp_ratio = 4.0 if swiglu or "blocks.0.mlp.fc1.weight" not in state else (
        state["blocks.0.mlp.fc1.weight"].shape[0] / dim)
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    # Every released DINOv2 uses 64-dimensional heads; HF configs state the count explicitly.
    heads = hf_config["num_attention_heads"] if hf_config else dim // 64
    eps = hf_config.get("layer_norm_eps", 1e-6) if hf_config else 1e-6
    cfg = DinoConfig(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, swiglu=swiglu,
                     patch_size=patch, img_size=grid * patch, num_registers=registers, eps=eps)
    # The official constructors pair registers with the size-based, antialiased resize rule.
    return replace(cfg, interpolate_offset=0.0, interpolate_antialias=True) if registers else cfg


def load_dinov2(path, *, interpolate_offset=None, interpolate_antialias=None):
    """Build a DINOv2 from a checkpoint and load it with strict checking; returns it in eval mode.

    `path` is either an official hub file (`dinov2_vitb14_pretrain.pth` etc.) or a Hugging Face
    model directory (`config.json` + `model.safetensors` or `pytorch_model.bin`). The architecture
    is read from the tensor shapes (and `config.json`). `interpolate_offset` /
    `interpolate_antialias` override the official position-embedding resize rule of the variant.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DINOv2 checkpoint not found: {path}")
    hf_config = None
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json (Hugging Face layout)")
        hf_config = json.loads(config_file.read_text())
        if hf_config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"{config_file}: model_type={hf_config.get('model_type')!r} is not "
                             "'dinov2' or 'dinov2_with_registers'")
        if hf_config.get("hidden_act", "gelu") != "gelu" or not hf_config.get("qkv_bias", True):
            raise ValueError(f"{config_file}: only hidden_act='gelu' with qkv_bias=True is supported")
        files = [path / "model.safetensors", path / "pytorch_model.bin"]
        weights = next((f for f in files if f.is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    else:
        weights = path
    state = _strip_prefixes(_read_weights(weights))
    if "embeddings.cls_token" in state:
        state = _hf_to_official(state)
    cfg = _infer_config(state, hf_config)
    if interpolate_offset is not None:
        cfg = replace(cfg, interpolate_offset=float(interpolate_offset))
    if interpolate_antialias is not None:
        cfg = replace(cfg, interpolate_antialias=bool(interpolate_antialias))
    model = DinoV2(cfg)
    check_state_dict(model, state, str(weights), "Use an official DINOv2 hub file or a Hugging Face "
                     "facebook/dinov2-* directory.")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


################################################################################
# REPA targets

VAE_TIME_STRIDE = 4  # causal VAE: latent frame 0 <- RGB frame 0, latent frame j <- 4j-3..4j


@torch.no_grad()
def repa_targets(video, model, grid, *, resolution=None, align="mean", chunk=32):
    """DINOv2 REPA targets for each latent frame, on the decoder's patch-token grid.

    `video` is (B, 3, T, H, W) RGB in [-1, 1] with T = 4k + 1 (what the causal 4x8x8 VAE takes),
    `model` a DinoV2 (e.g. from `load_dinov2`) and `grid` the (h, w) token grid of the decoder's
    REPA head, (H / 8 / p, W / 8 / p) for patch size p; e.g. (16, 16) for 256x256 video with
    p = 2. The result is (B, T_latent, h * w, D) with T_latent = k + 1 and D the DINOv2 width, the
    tokens of each latent frame in row-major (h, w) order. These are the patch tokens after
    DINOv2's final LayerNorm (not L2-normalised: the REPA cosine loss normalises both sides).

    `resolution` is the DINOv2 input size (int or (height, width)), multiples of the patch size
    14. By default it is 14 * grid, so the DINOv2 patch grid equals the token grid exactly
    (224x224 for a 16x16 grid). Otherwise the features are resized to the grid (bilinear,
    antialiased when shrinking).

    `align` says how RGB frames map to latent frames. Latent frame 0 always takes RGB frame 0.
    With "mean" (default), latent frame j >= 1 takes the mean of the features of RGB frames
    4j-3..4j. The latent frame summarises those four frames and the decoder reconstructs all four
    from it, so the target covers all of them, like the VAE's own temporal pooling. With "last",
    it takes RGB frame 4j only (4x cheaper; the newest frame the causal latent has seen).

    `chunk` is the number of frames per DINOv2 forward pass (it bounds memory).

    Frames are mapped to [0, 1], ImageNet-normalised and resized with antialiased bicubic
    interpolation to `resolution` (stretching if the aspect ratio differs). The model's
    position-embedding rule applies at that resolution; REPA's variant (size-based, antialiased)
    is `load_dinov2(..., interpolate_offset=0.0, interpolate_antialias=True)`.
    """
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must have shape (B, 3, T, H, W), got {tuple(video.shape)}")
    frames = video.shape[2]
    if frames % VAE_TIME_STRIDE != 1:
        raise ValueError(f"video has T={frames} frames; the causal VAE needs T = 4k + 1 "
                         f"(e.g. {max(1, frames - (frames - 1) % VAE_TIME_STRIDE)} or 17)")
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"grid must be two positive ints (h, w), got {grid!r}")
    p = model.patch_size
    if resolution is None:
        resolution = (grid[0] * p, grid[1] * p)
    elif isinstance(resolution, int):
        resolution = (resolution, resolution)
    if len(resolution) != 2 or any(r <= 0 or r % p for r in resolution):
        raise ValueError(f"resolution must be positive multiples of {p}, got {resolution!r}")
    if align not in ("mean", "last"):
        raise ValueError(f"align must be 'mean' or 'last', got {align!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    if align == "last":
        video = video[:, :, ::VAE_TIME_STRIDE]  # frames 0, 4, 8, ...: one per latent frame
    b, _, t, height, width = video.shape
    images = video.transpose(1, 2).reshape(b * t, 3, height, width)
    param = model.pos_embed
    mean = torch.tensor(IMAGENET_MEAN, device=param.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=param.device).view(1, 3, 1, 1)
    feats = []
    for x in images.split(chunk):
        # Preprocess in float32 whatever the model's dtype; cast just before the forward pass.
        x = ((x.to(param.device, torch.float32) + 1) / 2 - mean) / std
        if tuple(x.shape[-2:]) != resolution:
            x = F.interpolate(x, size=resolution, mode="bicubic", align_corners=False, antialias=True)
        x = x.to(param.dtype)
        tokens = model.forward_features(x)["x_norm_patchtokens"]
        gh, gw = resolution[0] // p, resolution[1] // p
        if (gh, gw) != tuple(grid):
            tokens = tokens.transpose(1, 2).reshape(len(x), -1, gh, gw)
            tokens = F.interpolate(tokens, size=grid, mode="bilinear", align_corners=False,
                                   antialias=True).flatten(2).transpose(1, 2)
        feats.append(tokens)
    feats = torch.cat(feats).view(b, t, grid[0] * grid[1], -1)
    if align == "last":
        return feats
    groups = feats[:, 1:].unflatten(1, (-1, VAE_TIME_STRIDE)).mean(dim=2)
    return torch.cat([feats[:, :1], groups], dim=1)
