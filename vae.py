"""Frozen video VAEs whose latent space the tokenizer works in (VideoFlexTok paper, §4.1).

`VidTokVAE` is the VidTok causal KL video VAE (4x temporal, 8x8 spatial compression, 16 latent channels), written
from scratch in plain PyTorch so that the official checkpoints `vidtok_kl_causal_488_16chn.ckpt` (v1.0) and
`vidtok_kl_causal_488_16chn_v1_1.ckpt` (v1.1) load with `strict=True` and reconstruct as upstream does.
`PixelVAE` is an identity "latent space" with the same API, for tiny CPU runs and tests without weights.

References (facts only, no code taken): "VidTok: A Versatile and Open-Source Video Tokenizer" (Tang et al.,
arXiv 2412.13061) and its repository microsoft/VidTok (modules `model_3dcausal` for v1.0, `model_3dcausal_v1_1` for
v1.1); the diffusers class `AutoencoderVidTok`, which implements the v1.1 semantics.

The network: spatial 2D ResNet blocks alternate with per-pixel causal 1D temporal blocks; the middle holds two causal
3D ResNet blocks around a per-frame self-attention; norms are channel LayerNorms; temporal down/upsampling mixes a
pooling/interpolation path with a causal conv by a learned sigmoid weight. The two released weight generations share
every parameter name and shape but not their forward semantics, so the version is chosen explicitly:

- v1.0: causal convs pad the front of the video with zeros; temporal upsampling repeats each frame.
- v1.1: causal convs pad with copies of the first frame; temporal upsampling is linear, with latent 0's frames
  upsampled on their own so that they never blend with latent 1.

Both encode T = 4k+1 frames into k+1 latent frames (frame 0 alone gives latent 0) and decode them back to 4k+1.

Implementation notes. Activations are kept channels-last, (B, T, H, W, C): the LayerNorms act on the last axis and
the convolutions receive channels-last strided views, the layout oneDNN prefers on CPU, so no permute copies are made.
Every temporal operator is causal, so a video is pushed through the network in consecutive temporal chunks, each
operator carrying over from one chunk to the next the few frames it needs (`_Stream`); a single chunk holding the
whole video is the same code path. This makes chunked results equal to unchunked ones up to float rounding, for both
versions, encode and decode, while peak memory depends on the chunk length only. v1.1's linear upsampling needs one
frame of look-ahead, so each of its upsamplers holds back its last output frame until the next chunk (or the end)
arrives. (Upstream v1.1's own chunked decoder approximates at chunk seams instead; we reproduce its unchunked output.)

The file is one piece, longer than most: the network, its streaming and the checkpoint layout it must match are read
together, and the two small stand-ins (`PixelVAE`, `DemoVAE`) share the streaming API they are written against.
"""

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import build_checked, check_state_dict, load_safetensors, read_safetensors_header, torch_load

VERSIONS = ("v1.0", "v1.1")
VAE_KINDS = ("pixel", "demo", "vidtok")   # the --vae choices of every script
# How far outside [-1, 1] input values may stray (e.g. resampling overshoot) before we call them a range mistake.
_RANGE_SLACK = 0.5


################################################################################
# Building blocks. All take and return channels-last activations: (B, T, H, W, C), or (N, H, W, C) for single frames.

class _Stream:
    """State of one encode or decode pass that feeds a video through the network in temporal chunks.

    `carry[layer]` holds what a temporal layer needs from the previous chunk; `last` tells the layers that no more
    frames follow (only v1.1's linear upsampling, which looks one frame ahead, cares)."""

    def __init__(self, version):
        self.version = version
        self.carry: dict[nn.Module, torch.Tensor] = {}
        self.last = False


class _Norm(nn.Module):
    """LayerNorm over channels at every position; the wrapper exists for the checkpoint's `….norm.weight` names."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x)


def _conv2d(conv, x):
    """Apply a 2D conv to every frame of a channels-last (..., H, W, C) tensor."""
    y = conv(x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-3], *y.shape[-2:], y.shape[1])


def _pointwise(conv, x):
    """A 1x1 (or 1x1x1) conv is a linear map over the channel axis."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class _CausalConv(nn.Module):
    """A conv with kernel k along time that only looks back: it sees `k - stride` frames before each chunk.

    Those are carried over from the previous chunk, or, before the first frame, zeros (v1.0) or copies of the first
    frame (v1.1). The child `conv` is a Conv1d (a per-pixel temporal conv) or a Conv3d (zero-padded "same" in space),
    named and shaped as in the checkpoint."""

    def __init__(self, cin, cout, kernel, dims, stride=1):
        super().__init__()
        if dims == 1:
            self.conv = nn.Conv1d(cin, cout, kernel)
        else:
            self.conv = nn.Conv3d(cin, cout, kernel, stride=(stride, 1, 1), padding=(0, kernel // 2, kernel // 2))
        self.kernel, self.stride = kernel, stride

    def pad(self, x, stream):
        """Prepend the frames preceding `x` and keep, for the next chunk, those the conv has not finished with."""
        before = stream.carry.get(self)
        if before is None:
            first = x[:, :1] if stream.version == "v1.1" else torch.zeros_like(x[:, :1])
            before = first.expand(-1, self.kernel - self.stride, *x.shape[2:])
        padded = torch.cat([before, x], dim=1)
        consumed = ((padded.shape[1] - self.kernel) // self.stride + 1) * self.stride
        # A copy, so the carried frames do not keep the whole chunk alive.
        stream.carry[self] = padded[:, consumed:].clone()
        return padded

    def run(self, padded):
        """The conv itself, on a time-padded (B, T, H, W, C) tensor."""
        if isinstance(self.conv, nn.Conv1d):
            b, t, h, w, c = padded.shape
            # Per-pixel temporal conv as a (k x 1) 2D conv over (time, pixels): the channels-last data is not moved.
            grid = padded.reshape(b, t, h * w, c).permute(0, 3, 1, 2)
            y = F.conv2d(grid, self.conv.weight[..., None], self.conv.bias)
            return y.permute(0, 2, 3, 1).reshape(b, -1, h, w, y.shape[1])
        return self.conv(padded.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)

    def forward(self, x, stream):
        return self.run(self.pad(x, stream))


class _ResBlock(nn.Module):
    """Pre-norm ResNet block: norm, SiLU, conv, norm, SiLU, conv, plus a (1x1 projected) skip.

    kind "2d": per-frame 3x3 convs (plain Conv2d); "1d": causal temporal convs per pixel; "3d": causal 3x3x3 convs."""

    def __init__(self, cin, cout, kind):
        super().__init__()
        if kind == "2d":
            make = lambda i, o: nn.Conv2d(i, o, 3, padding=1)  # noqa: E731
        else:
            make = lambda i, o: _CausalConv(i, o, 3, dims=1 if kind == "1d" else 3)  # noqa: E731
        self.norm1, self.conv1 = _Norm(cin), make(cin, cout)
        self.norm2, self.conv2 = _Norm(cout), make(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def _conv(self, conv, x, stream):
        return _conv2d(conv, x) if isinstance(conv, nn.Conv2d) else conv(x, stream)

    def forward(self, x, stream):
        h = self._conv(self.conv1, F.silu(self.norm1(x), inplace=True), stream)
        h = self._conv(self.conv2, F.silu(self.norm2(h), inplace=True), stream)
        return h.add_(_pointwise(self.nin_shortcut, x) if hasattr(self, "nin_shortcut") else x)


class _Pointwise(nn.Module):
    """A 1x1x1 conv (the checkpoint stores q/k/v/proj_out as `….conv.weight` of shape (C, C, 1, 1, 1))."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 1)

    def forward(self, x):
        return _pointwise(self.conv, x)


class _FrameAttention(nn.Module):
    """Single-head softmax self-attention among the pixels of each frame (no attention across time), residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _Norm(channels)
        self.q, self.k, self.v, self.proj_out = (_Pointwise(channels) for _ in range(4))

    def forward(self, x):
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b, t, h * w, c)
        y = F.scaled_dot_product_attention(self.q(y), self.k(y), self.v(y))
        return self.proj_out(y).reshape(x.shape).add_(x)


class _Mid(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1 = _ResBlock(channels, channels, "3d")
        self.attn_1 = _FrameAttention(channels)
        self.block_2 = _ResBlock(channels, channels, "3d")

    def forward(self, x, stream):
        return self.block_2(self.attn_1(self.block_1(x, stream)), stream)


class _Downsample(nn.Module):
    """Per-frame 2x spatial downsampling: zero pad right and bottom by one pixel, then a stride-2 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return _conv2d(self.conv, F.pad(x, (0, 0, 0, 1, 0, 1)))


class _Upsample(nn.Module):
    """Per-frame 2x nearest spatial upsampling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        *lead, h, w, c = x.shape
        x = x[..., :, None, :, None, :].expand(*lead, h, 2, w, 2, c).reshape(*lead, 2 * h, 2 * w, c)
        return _conv2d(self.conv, x)


class _TimeDownsample(nn.Module):
    """2x temporal downsampling: sigmoid(mix_factor) * causal 3-frame average + the rest * stride-2 causal conv."""

    def __init__(self, channels):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([2.0]))
        self.conv = _CausalConv(channels, channels, 3, dims=3, stride=2)

    def forward(self, x, stream):
        # The average sees the same windows, and the same front padding, as the strided conv.
        padded = self.conv.pad(x, stream)
        n = (padded.shape[1] - 1) // 2
        pooled = (padded[:, 0 : 2 * n : 2] + padded[:, 1 : 2 * n : 2] + padded[:, 2 : 2 * n + 1 : 2]) / 3
        return self.conv.run(padded).lerp_(pooled, torch.sigmoid(self.mix_factor))


def _linear2x(seq, start, end):
    """Linear 2x upsampling along time (align_corners=False) of `seq`, or of the part of a longer segment that it is.

    Output frames between input frames j and j+1 are 0.75/0.25 and 0.25/0.75 blends; the segment's first and last
    output frames copy its end frames, and are emitted only if `seq` starts / ends the segment."""
    s = seq.float()  # upstream interpolates in fp32
    a, b = s[:, :-1], s[:, 1:]
    inner = torch.stack([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b], dim=2).flatten(1, 2)
    return torch.cat([s[:, :1]] * start + [inner] + [s[:, -1:]] * end, dim=1).to(seq.dtype)


class _TimeUpsample(nn.Module):
    """2x temporal upsampling: sigmoid(mix_factor) * u + the rest * causal conv(u), where u is the input with each frame
    repeated (v1.0) or linearly upsampled (v1.1). `head` is the number of input frames that come from latent 0: v1.1
    upsamples those on their own."""

    def __init__(self, channels, head):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([2.0]))
        self.conv = _CausalConv(channels, channels, 3, dims=3)
        self.head = head

    def _double(self, x, stream):
        if stream.version == "v1.0":
            return x.repeat_interleave(2, dim=1)
        parts = []
        before = stream.carry.get(self)
        if before is None:  # first chunk: it always holds all of latent 0's frames
            parts.append(_linear2x(x[:, : self.head], start=True, end=True))
            x, before = x[:, self.head :], x[:, :0]
        seq = torch.cat([before, x], dim=1)
        if seq.shape[1]:
            parts.append(_linear2x(seq, start=before.shape[1] == 0, end=stream.last))
        # The last frame's second output blends it with the next frame: it is emitted with the next chunk.
        stream.carry[self] = seq[:, -1:].clone()
        return torch.cat(parts, dim=1)

    def forward(self, x, stream):
        u = self._double(x, stream)
        return self.conv(u, stream).lerp_(u, torch.sigmoid(self.mix_factor))


def _level(blocks, **resample):
    """A container with the checkpoint's names: a `block` list and, unless None, a `downsample` / `upsample`."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    for name, module in resample.items():
        if module is not None:
            setattr(level, name, module)
    return level


# Temporal 2x resampling happens at resolution levels 1 and 2 (upstream `tempo_ds` = [2, 1], `tempo_us` = [1, 2]).
_TIME_LEVELS = (1, 2)


class _Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = _CausalConv(3, ch, 3, dims=3)
        self.down, self.down_temporal = nn.ModuleList(), nn.ModuleList()
        cin = ch
        for i, c in enumerate(widths):
            spatial = [_ResBlock(cin if j == 0 else c, c, "2d") for j in range(num_res_blocks)]
            temporal = [_ResBlock(c, c, "1d") for _ in range(num_res_blocks)]
            self.down.append(_level(spatial, downsample=_Downsample(c) if i < len(widths) - 1 else None))
            self.down_temporal.append(_level(temporal, downsample=_TimeDownsample(c) if i in _TIME_LEVELS else None))
            cin = c
        self.mid = _Mid(cin)
        self.norm_out = _Norm(cin)
        self.conv_out = _CausalConv(cin, 2 * z_channels, 3, dims=3)  # mean and log-variance

    def forward(self, x, stream):
        h = self.conv_in(x, stream)
        for spatial, temporal in zip(self.down, self.down_temporal):
            for block_s, block_t in zip(spatial.block, temporal.block):
                h = block_t(block_s(h, stream), stream)
            if hasattr(spatial, "downsample"):
                h = spatial.downsample(h)
            if hasattr(temporal, "downsample"):
                h = temporal.downsample(h, stream)
        h = self.mid(h, stream)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True), stream)


class _Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = _CausalConv(z_channels, widths[-1], 3, dims=3)
        self.mid = _Mid(widths[-1])
        # `up[i]` is level i (up[0] is full resolution); the decoder runs them from the last level down.
        self.up, self.up_temporal = nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(widths):
            cin = widths[min(i + 1, len(widths) - 1)]
            spatial = [_ResBlock(cin if j == 0 else c, c, "2d") for j in range(num_res_blocks + 1)]
            temporal = [_ResBlock(c, c, "1d") for _ in range(num_res_blocks + 1)]
            # Frames per latent entering the temporal upsampler: 1 at level 2, 2 at level 1.
            time_up = _TimeUpsample(c, head=2 ** (max(_TIME_LEVELS) - i)) if i in _TIME_LEVELS else None
            self.up.append(_level(spatial, upsample=_Upsample(c) if i > 0 else None))
            self.up_temporal.append(_level(temporal, upsample=time_up))
        self.norm_out = _Norm(widths[0])
        self.conv_out = _CausalConv(widths[0], 3, 3, dims=3)

    def forward(self, z, stream):
        h = self.mid(self.conv_in(z, stream), stream)
        for spatial, temporal in zip(reversed(self.up), reversed(self.up_temporal)):
            for block_s, block_t in zip(spatial.block, temporal.block):
                h = block_t(block_s(h, stream), stream)
            if hasattr(spatial, "upsample"):
                h = spatial.upsample(h)
            if hasattr(temporal, "upsample"):
                h = temporal.upsample(h, stream)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True), stream)


################################################################################
# Public API

def _check_video(video, temporal_factor, spatial_factor, check_range=True):
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be a (B, 3, T, H, W) tensor, got {got}")
    if not video.is_floating_point():
        raise ValueError(
            f"video must be a float tensor in [-1, 1], got {video.dtype}; map uint8 frames with x / 127.5 - 1"
        )
    _, c, t, h, w = video.shape
    if c != 3:
        raise ValueError(f"video must have 3 (RGB) channels in dim 1, got {c}; the layout is (B, 3, T, H, W)")
    if t < 1 or (t - 1) % temporal_factor:
        raise ValueError(
            f"video has T={t} frames; this VAE needs T = {temporal_factor}k+1 (e.g. 1, {temporal_factor + 1}, "
            f"{2 * temporal_factor + 1}, ...): trim the clip or repeat its last frame"
        )
    if h < 1 or w < 1 or h % spatial_factor or w % spatial_factor:
        raise ValueError(
            f"video height and width must be positive multiples of {spatial_factor}, got {h}x{w}: resize or crop"
        )
    if check_range and video.numel():
        lo, hi = video.aminmax()
        if not (-1 - _RANGE_SLACK <= lo.item() and hi.item() <= 1 + _RANGE_SLACK):
            raise ValueError(
                f"video values must lie in [-1, 1], got min {lo.item():.3g} and max {hi.item():.3g}; "
                "map uint8 frames with x / 127.5 - 1 (and [0, 1] frames with 2x - 1)"
            )


def _check_latents(latents, channels):
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or not latents.is_floating_point():
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a float (B, {channels}, T, H, W) tensor, got {got}")
    if latents.shape[1] != channels:
        raise ValueError(f"latents must have {channels} channels in dim 1, got {latents.shape[1]}")
    if min(latents.shape[2:]) < 1:
        raise ValueError(f"latents must have at least one frame and pixel, got shape {tuple(latents.shape)}")


def _pieces(latents, total, channels):
    """The pieces (B, C, n, h, w) of a latent stream, checked, each with whether it is the last: they must add up
    to `total` latent frames, neither more nor fewer."""
    if total < 1:
        raise ValueError(f"a latent stream needs total >= 1 latent frames; got {total}")
    seen = 0
    for z in latents:
        _check_latents(z, channels)
        seen += z.shape[2]
        if seen > total:
            raise ValueError(f"the latent stream holds more than the {total} latent frames it announced")
        yield z, seen == total
    if seen < total:
        raise ValueError(f"the latent stream ended after {seen} of the {total} latent frames it announced; the "
                         "frames decoded so far were yielded")


def checked_frame_stream(frames):
    """The groups (B, 3, n, H, W) of a frame stream, each the same batch and frame size as the first; an empty
    stream is refused once it ends."""
    first = None
    for group in frames:
        if not isinstance(group, torch.Tensor) or group.dim() != 5:
            raise ValueError(f"a frame stream yields (B, 3, n, H, W) tensors; got "
                             f"{tuple(group.shape) if isinstance(group, torch.Tensor) else type(group).__name__}")
        shape = (group.shape[0], *group.shape[3:])
        if first is None:
            first = shape
        elif shape != first:
            raise ValueError(f"the frame stream changed from batch x height x width {first} to {shape}: every group "
                             "must have the batch and frame size of the first; the frames before were encoded")
        yield group
    if first is None:
        raise ValueError("the frame stream held no frames")


class _EncodeStream:
    """VidTokVAE's causal encoder fed as frames arrive: latent 0 from frame 0 alone (behind three copies of it),
    then one latent per `temporal_factor` frames, `per_call` latents per encoder call (None: all that are there)."""

    def __init__(self, vae, per_call):
        self.vae, self.per_call = vae, per_call
        self.stream = _Stream(vae.version)
        self.pending = None   # frames received and not yet encoded, channels-last (B, n, H, W, 3)

    def push(self, frames):
        """(B, 3, n, H, W) more frames, checked by the caller -> the moments (B, m, h, w, 32) of the latents they
        complete, one tensor per encoder call."""
        x = frames.permute(0, 2, 3, 4, 1)
        f, out = self.vae.temporal_factor, []
        if self.pending is None:   # the stream's first frame
            out.append(self.vae.encoder(torch.cat([x[:, :1].expand(-1, f - 1, -1, -1, -1), x[:, :1]], 1), self.stream))
            x = x[:, 1:]
        else:
            x = torch.cat([self.pending, x], 1)
        step = f * self.per_call if self.per_call else x.shape[1] // f * f
        while step and x.shape[1] >= step:
            out.append(self.vae.encoder(x[:, :step], self.stream))
            x = x[:, step:]
        self.pending = x
        return out

    def close(self):
        """The moments of the frames still pending (fewer than per_call latents); refuses a partial latent."""
        left = 0 if self.pending is None else self.pending.shape[1]
        f = self.vae.temporal_factor
        if left % f:
            raise ValueError(f"the stream ended {left % f} frames into a latent frame, which needs {f}: those frames "
                             f"were not encoded (a video has {f}k+1 frames); every complete latent frame was yielded")
        return [self.vae.encoder(self.pending, self.stream)] if left else []


def _spans(total, first, step):
    """Chunk boundaries along time: [0, first), then spans of `step` (the last may be shorter); None = one span."""
    if step is None:
        return [(0, total)]
    edges = [0, *range(first, total, step), total]
    return list(zip(edges[:-1], edges[1:]))


def _version_in_filename(name):
    """The official files are named `vidtok_kl_causal_488_16chn.ckpt` and `vidtok_kl_causal_488_16chn_v1_1.ckpt`."""
    if re.search(r"v1[._]1", name):
        return "v1.1"
    return "v1.0" if name == "vidtok_kl_causal_488_16chn.ckpt" else None


# In an official VideoFlexTok model.safetensors the VAE's tensors are vae.vidtok.* (video_tokenizer.vae.vidtok.* in the
# Hugging Face hub layout).
_OFFICIAL_PREFIX = re.compile(r"(video_tokenizer\.)?vae\.vidtok\.")


def _read_checkpoint(path, trusted):
    """The encoder/decoder weights of a Lightning checkpoint (weights under `state_dict`), of a bare state dict, or of
    an official VideoFlexTok model.safetensors (the VidTok it was trained with, stored beside the tokenizer)."""
    if path.suffix == ".safetensors":
        names = [k for k in read_safetensors_header(path)[0] if _OFFICIAL_PREFIX.match(k)]
        if not names:
            raise ValueError(f"{path} holds no VidTok tensors (vae.vidtok.*); it is not an official VideoFlexTok file")
        return {_OFFICIAL_PREFIX.sub("", k, count=1): v for k, v in load_safetensors(path, names=names).items()}
    ckpt = torch_load(path, trusted)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither a Lightning checkpoint with a 'state_dict' nor a state dict of tensors")
    # `loss.*` holds the training losses' weights (LPIPS, discriminator), which inference does not use.
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


class VidTokVAE(nn.Module):
    """VidTok causal KL VAE: video (B, 3, 4k+1, H, W) in [-1, 1] <-> latents (B, 16, k+1, H/8, W/8).

    `version` is "v1.0" (zero temporal padding, frame-repeat upsampling; the default, because VideoFlexTok's weights
    were trained on v1.0 latents) or "v1.1" (replicate padding, linear upsampling). The widths `ch`, `ch_mult`,
    `num_res_blocks` and `z_channels` are named as in diffusers' `AutoencoderVidTok`; the defaults are the official
    16-channel model, and `ch_mult` must have 4 entries (3 spatial 2x steps make the 8x). `chunk_latents` is the
    number of latent frames per chunk (4 latents = 16 video frames) in encode and decode, which bounds peak memory
    regardless of video length; None processes the whole video at once. Results are the same.

    encode/decode run without autograd: the VAE is frozen.
    """

    temporal_factor = 4
    spatial_factor = 8

    def __init__(
        self,
        version="v1.0",
        *,
        ch=128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        z_channels=16,
        chunk_latents=4,
    ):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if len(ch_mult) != 4:
            raise ValueError(f"ch_mult must have 4 entries (VidTok's 4x8x8 layout), got {tuple(ch_mult)}")
        if chunk_latents is not None and chunk_latents < 1:
            raise ValueError(f"chunk_latents must be a positive int or None, got {chunk_latents!r}")
        self.version = version
        self.latent_channels = z_channels
        self.chunk_latents = chunk_latents
        self.encoder = _Encoder(ch, tuple(ch_mult), num_res_blocks, z_channels)
        self.decoder = _Decoder(ch, tuple(ch_mult), num_res_blocks, z_channels)
        # Store conv weights channels-last too (same shapes, other strides), or every conv call would convert them.
        for conv in self.modules():
            if isinstance(conv, nn.Conv1d):
                conv.weight = nn.Parameter(conv.weight.detach().transpose(1, 2).contiguous().transpose(1, 2))
            elif isinstance(conv, (nn.Conv2d, nn.Conv3d)):
                layout = torch.channels_last if isinstance(conv, nn.Conv2d) else torch.channels_last_3d
                conv.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=layout))

    @classmethod
    def from_checkpoint(cls, path, version="v1.0", trusted=False,
                        **kwargs):
        """Load an official VidTok checkpoint (Lightning `.ckpt`) or a saved state dict; returns the model in eval mode.

        `version` must match the file: v1.0 is `vidtok_kl_causal_488_16chn.ckpt`, v1.1 is
        `vidtok_kl_causal_488_16chn_v1_1.ckpt` (same tensors, different forward semantics); an official VideoFlexTok
        model.safetensors holds its v1.0 VidTok (causal convs padded with zeros). The file is read with
        `weights_only=True`; `trusted=True` allows a file that also pickles other objects (see
        checkpoint.torch_load). `kwargs` go to the constructor."""
        path = Path(path)
        named = "v1.0" if path.suffix == ".safetensors" else _version_in_filename(path.name)  # official: v1.0
        if version in VERSIONS and named is not None and named != version:
            raise ValueError(
                f"{path.name} holds the VidTok {named} checkpoint but version={version!r} was asked for; pass "
                f"version={named!r} (both versions load the same tensors, but their forward passes differ)"
            )
        model = cls(version, **kwargs)
        state = _read_checkpoint(path, trusted)
        check_state_dict(model, state, str(path),
                         "Use the causal 4x8x8 16-channel KL checkpoint (vidtok_kl_causal_488_16chn.ckpt or its "
                         "_v1_1 version from the microsoft/VidTok Hugging Face repository), or pass the ch / "
                         "ch_mult / num_res_blocks / z_channels it was trained with.")
        model.load_state_dict(state, strict=True)
        return model.eval()

    @torch.no_grad()
    def encode(
        self, video, *, sample=False, generator=None,
        check_range=True,
    ):
        """(B, 3, 4k+1, H, W) in [-1, 1] -> (B, 16, k+1, H/8, W/8): the posterior mean, or a sample if `sample`.
        check_range=False takes values outside [-1, 1]: a decoded frame re-encoded as it is (chunks.decode_long)."""
        _check_video(video, self.temporal_factor, self.spatial_factor, check_range)
        stream = _EncodeStream(self, self.chunk_latents)
        moments = stream.push(video) + stream.close()
        mean, logvar = torch.cat(moments, dim=1).chunk(2, dim=-1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean.permute(0, 4, 1, 2, 3).contiguous()

    @torch.no_grad()
    def encode_stream(self, frames, *, check_range=True):
        """`encode` as the frames arrive: an iterable of groups (B, 3, n, H, W), any n >= 1 -> every latent frame
        (B, 16, 1, H/8, W/8), the posterior mean, as soon as the causal encoder has its frames (latent 0 after
        frame 0, latent j after frame 4j). The temporal layers carry their state from call to call, so the latents
        equal `encode` of the whole up to float rounding. A stream that ends inside a latent's 4 frames is refused
        at the end, after every complete latent was yielded."""
        stream = _EncodeStream(self, 1)
        for group in checked_frame_stream(frames):
            _check_video(group, 1, self.spatial_factor, check_range)   # any number of frames per group
            for moments in stream.push(group):
                yield moments.chunk(2, dim=-1)[0].permute(0, 4, 1, 2, 3).contiguous()
        stream.close()

    @torch.no_grad()
    def decode(self, latents):
        """(B, 16, k+1, h, w) -> (B, 3, 4k+1, 8h, 8w), not clamped (values may stray slightly outside [-1, 1])."""
        _check_latents(latents, self.latent_channels)
        n = latents.shape[2]
        video, at = None, 0
        for frames in self.decode_stream((latents[:, :, a:b] for a, b in _spans(n, 1, self.chunk_latents)), n):
            if video is None:   # filled in place: peak memory is the video and one chunk, not two videos
                B, _, _, H, W = frames.shape
                video = frames.new_empty(B, 3, self.temporal_factor * (n - 1) + 1, H, W)
            video[:, :, at:at + frames.shape[2]] = frames
            at += frames.shape[2]
        return video

    @torch.no_grad()
    def decode_stream(self, latents, total):
        """`decode` as the latents arrive: an iterable of pieces (B, 16, n, h, w) that add up to `total` latent
        frames -> video frames (B, 3, f, 8h, 8w) as soon as they are decoded: with v1.0, latent 0 gives frame 0
        and every later latent 4 frames; v1.1's linear upsampling looks one frame ahead, so some of a piece's
        frames come with the next one (`total` tells it where the stream ends). The causal temporal layers
        carry their state from piece to piece, so the frames equal `decode` of the whole up to float rounding."""
        drop = self.temporal_factor - 1  # the decoder's first 3 frames stand for the encoder's front padding
        stream = _Stream(self.version)
        done = 0  # decoded frames so far, counting the dropped ones
        for z, last in _pieces(latents, total, self.latent_channels):
            stream.last = last
            frames = self.decoder(z.permute(0, 2, 3, 4, 1), stream)
            keep = frames[:, max(drop - done, 0):]
            done += frames.shape[1]
            yield keep.permute(0, 4, 1, 2, 3)


class _FramewiseStream:
    """encode_stream and decode_stream for a VAE that takes every frame on its own (temporal factor 1)."""

    @torch.no_grad()
    def encode_stream(self, frames, *, check_range=True):
        """An iterable of frame groups (B, 3, n, H, W) -> every latent frame (B, C, 1, h, w) as its frame arrives
        (see VidTokVAE.encode_stream)."""
        for group in checked_frame_stream(frames):
            latents = self.encode(group, check_range=check_range)
            yield from latents.split(1, dim=2)

    @torch.no_grad()
    def decode_stream(self, latents, total):
        """An iterable of latent pieces (B, C, n, h, w) adding up to `total` frames -> their frames, one piece
        at a time (see VidTokVAE.decode_stream)."""
        for z, _ in _pieces(latents, total, self.latent_channels):
            yield self.decode(z)


class PixelVAE(_FramewiseStream, nn.Module):
    """Identity latent space: the latents are the pixels, so the tokenizer works on pixels. For tiny CPU runs and
    tests that need no weights; same API as `VidTokVAE` (any T, H, W; the posterior is a point, so `sample` changes
    nothing)."""

    latent_channels = 3
    temporal_factor = 1
    spatial_factor = 1

    def encode(
        self, video, *, sample=False, generator=None,
        check_range=True,
    ):
        _check_video(video, self.temporal_factor, self.spatial_factor, check_range)
        return video.clone()

    def decode(self, latents):
        _check_latents(latents, self.latent_channels)
        return latents.clone()


class DemoVAE(_FramewiseStream, nn.Module):
    """A small convolutional autoencoder for the built-in synthetic data: each frame (3, H, W) <-> (4, H/4, W/4).

    The paper's tokenizer works in the smooth latent space of a VAE, where a latent pixel stands for a patch of
    the image; on raw pixels every patch token must choose its own colours and a small decoder draws speckle
    rather than objects. VidTok is far too large for the CPU demo, so the demo trains this one in minutes on its
    own data (`python demo.py train-vae`). It is per frame (temporal factor 1: a clip of T frames is T latent
    frames) and deterministic. Training adds noise to the latents, so that the slightly-off latents a flow
    decoder samples still decode to clean shapes; `scale` (set from the training latents) gives the latents unit
    standard deviation, the range the flow decoder's noise assumes."""

    temporal_factor = 1
    spatial_factor = 4

    def __init__(self, channels=4, width=64):
        super().__init__()
        self.latent_channels, self.width = channels, width
        act = nn.SiLU()
        self.enc = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1), act, nn.Conv2d(width // 2, width, 4, stride=2, padding=1), act,
            nn.Conv2d(width, width, 3, padding=1), act, nn.Conv2d(width, width, 4, stride=2, padding=1), act,
            nn.Conv2d(width, channels, 3, padding=1))
        self.dec = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), act, nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            act, nn.Conv2d(width, width, 3, padding=1), act,
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), act, nn.Conv2d(width // 2, 3, 3, padding=1))
        self.register_buffer("scale", torch.ones(()))

    @staticmethod
    def _frames(x):
        """(B, C, T, H, W) -> (B*T, C, H, W) and T."""
        B, C, T, H, W = x.shape
        return x.transpose(1, 2).reshape(B * T, C, H, W), T

    @staticmethod
    def _video(x, T):
        """(B*T, C, H, W) -> (B, C, T, H, W)."""
        return x.view(-1, T, *x.shape[1:]).transpose(1, 2)

    def encode_frames(self, frames):
        return self.enc(frames) * self.scale

    def decode_frames(self, latents):
        return self.dec(latents / self.scale)

    @torch.no_grad()
    def encode(self, video, *, sample=False, generator=None,
               check_range=True):
        """(B, 3, T, H, W) in [-1, 1] -> (B, 4, T, H/4, W/4); `sample` changes nothing (no posterior)."""
        _check_video(video, self.temporal_factor, self.spatial_factor, check_range)
        frames, T = self._frames(video)
        return self._video(self.encode_frames(frames), T).contiguous()

    @torch.no_grad()
    def decode(self, latents):
        """(B, 4, T, h, w) -> (B, 3, T, 4h, 4w), not clamped."""
        _check_latents(latents, self.latent_channels)
        frames, T = self._frames(latents)
        return self._video(self.decode_frames(frames), T).contiguous()

    @classmethod
    def from_checkpoint(cls, path):
        """A file written by `demo.train_demo_vae` -> the model in eval mode, frozen."""
        state = torch_load(path)
        if not isinstance(state, dict) or not {"config", "model"} <= set(state):
            raise ValueError(f"{path} is not a demo VAE checkpoint (python demo.py train-vae writes one)")
        weights = {k: v.float() for k, v in state["model"].items()}
        model = build_checked(lambda: cls(**state["config"]), weights, path, "Train it again with python demo.py train-vae.")
        model.load_state_dict(weights)
        return model.eval().requires_grad_(False)


def load_vae(kind, ckpt=None, version="v1.0", device="cpu"):
    """The frozen VAE a script asks for by name: "pixel" (PixelVAE), "demo" (DemoVAE from `ckpt`) or "vidtok"
    (VidTokVAE from `ckpt`)."""
    if kind == "pixel":
        return PixelVAE()
    if kind not in VAE_KINDS:
        raise ValueError(f"VAE kind must be one of {VAE_KINDS}; got {kind!r}")
    if ckpt is None:
        raise ValueError("the VidTok VAE needs its checkpoint (vidtok_kl_causal_488_16chn.ckpt from the microsoft/VidTok "
                         "Hugging Face repository; flag --vae-ckpt), or use the pixel VAE (--vae pixel)" if kind == "vidtok"
                         else "the demo VAE needs its checkpoint (--vae-ckpt; python demo.py train-vae writes one)")
    if kind == "demo":
        return DemoVAE.from_checkpoint(ckpt).to(device)
    return VidTokVAE.from_checkpoint(ckpt, version=version).to(device)
