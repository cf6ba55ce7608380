"""The VideoFlexTok encoder: VAE latents -> K discrete register tokens per latent frame.

Paper: §3.1 and Appendix F.1. The latent video is cut into patch tokens p_t per latent frame; each
frame gets its own set of K learned register tokens r_t, and the sequence [p_1, r_1, ..., p_T, r_T]
goes through a transformer under a time-causal mask (frame t sees frames < t; inside a frame,
patches see patches and register i sees the patches and registers <= i). The register outputs are
projected to 6 dimensions and quantized with FSQ. Time causality lets long videos be tokenized in
chunks and a video still arriving be tokenized one latent frame at a time (`encode_frame`, with the
earlier frames' keys and values cached); register causality means that the first k tokens of a
frame are a self-contained coarse encoding of it.

References: FlexTok (Bachmann et al., 2025) and the official VideoFlexTok release for the
per-frame register table `[T_max, K, D]`, the additive (t, y, x) position embedding and the
zero-initialised LayerNorm+Linear head.
"""
import torch
import torch.nn as nn

from fsq import FSQ
from transformer import (AxialPositionEmbedding, FrameCache, Layout, Transformer, init_linear, layer_norm, patchify,
                         zero_linear)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim = cfg.enc_width
        self.patch_embed = nn.Linear(cfg.patch_size ** 2 * cfg.latent_channels, dim)
        self.pos = AxialPositionEmbedding(dim, cfg.patch_pos_sizes)
        # A separate register set per latent-frame index: frame 0 (the VAE's lone first frame)
        # and later frames carry different information.
        self.registers = nn.Parameter(torch.randn(cfg.max_frames, cfg.registers, dim) * 0.02)
        self.transformer = Transformer(dim, cfg.enc_depth, cfg.enc_mask)
        # Zero-initialised: every token starts at the FSQ grid's centre and the encoder learns
        # to spread them out.
        self.to_codes = zero_linear(dim, len(cfg.fsq_levels))
        self.fsq = FSQ(cfg.fsq_levels)
        init_linear(self)

    def forward(self, latents):
        """latents (B, C, T, H, W) -> codes (B, T, K, 6) with straight-through gradients, ids (B, T, K)."""
        B, C, T, H, W = latents.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        x = self.patch_embed(patchify(latents, p)) + self.pos(T, h, w)
        layout = Layout(T, h * w, self.cfg.registers)
        x = self.transformer(layout.interleave(x, self.registers[:T].expand(B, -1, -1, -1)), layout)
        _, registers = layout.split(x)
        return self.fsq(self.to_codes(layer_norm(registers)))

    def frame_cache(self):
        """An empty FrameCache for `encode_frame`: a new clip (or chunk) starts with one."""
        return FrameCache(len(self.transformer.blocks))

    def encode_frame(self, latent, cache):
        """Streaming: latent frame t (B, C, 1, H, W), where t = cache.frames, the frames before it being held by
        `cache` -> codes (B, 1, K, 6), ids (B, 1, K): what `forward` gives for frame t of the whole clip, since
        frame t sees only frames < t. Runs only frame t's tokens through the transformer."""
        B, C, _, H, W = latent.shape
        t, p = cache.frames, self.cfg.patch_size
        if t >= self.cfg.max_frames:
            raise ValueError(f"the encoder takes {self.cfg.max_frames} latent frames per clip; start a new chunk "
                             "with a new frame_cache()")
        h, w = H // p, W // p
        x = self.patch_embed(patchify(latent, p)) + self.pos(t + 1, h, w)[t:]
        one = Layout(1, h * w, self.cfg.registers)
        x = self.transformer(one.interleave(x, self.registers[t:t + 1].expand(B, -1, -1, -1)),
                             Layout(t + 1, h * w, self.cfg.registers), cache=cache)
        _, registers = one.split(x)
        return self.fsq(self.to_codes(layer_norm(registers)))
