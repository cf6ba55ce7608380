"""The VideoFlexTok decoder: a rectified-flow DiT that turns any number of tokens into VAE latents.

Paper: §3.1 (nested dropout), §3.2 (flow decoder, REPA), §3.4 (decoding conditioned on clean
frames) and Appendix F.1 (time-causal decoder, full-attention fine-tuning, frame conditioning).
References: DiT (adaLN-zero), cloneofsimo/minRF (rectified-flow convention), REPA (Yu et al., 2025),
APG (Sadat et al., 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales"), the
official VideoFlexTok release (register path, mask/null/prefix tokens, APG settings).

Flow convention: x_t = t * eps + (1 - t) * x, so t = 1 is noise and t = 0 is data; the network
predicts the velocity v = eps - x, and sampling integrates x <- x - dt * v from t = 1 to t = 0.

The register path, in order: FSQ codes (B, T, K, 6) -> Linear to the width -> + a (t, k) position
embedding (learned, or a fixed sine-cosine table: cfg.register_pos_embedding) -> three replacements
by learned tokens, in the official module order:
1. nested dropout: registers beyond the first k of every frame become the mask token, so a dropped
   slot carries no position and "k tokens" looks the same in training and at inference;
2. clean prefix frames: all registers of those frames become the prefix token (the frames are given
   as latents instead);
3. null condition: for classifier-free guidance, every register becomes the null token.
The registers are then interleaved frame by frame with the patchified noised latents and run through
a transformer with timestep adaLN-zero, separate for patches and registers, under a time-causal mask
(or a full one in the fine-tuning stage). The time-causal decoder turns reconstruction into
prediction of future frames from the tokens of past frames, which the paper finds makes early tokens
more semantic.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer import (POSITION_KINDS, AxialPositionEmbedding, Layout, TimestepEmbedder, Transformer,
                         compile_or_eager, init_linear, layer_norm, modulate, patchify, unpatchify, zero_linear)


def token_budgets(K):
    """The paper's token budgets per frame: 1, 2, 4, ... up to K, with K itself always included."""
    return sorted({2 ** i for i in range(K.bit_length()) if 2 ** i <= K} | {K})


def sample_keep_k(batch, K, mode, device="cpu"):
    """Nested dropout: how many registers per frame each clip keeps, k in [1, K], one k per clip.

    "pow2" draws uniformly from {1, 2, 4, ..., K} (the paper's exponentially spaced set; K itself
    is always included), "uniform" from {1, ..., K}.
    """
    if mode == "uniform":
        return torch.randint(1, K + 1, (batch,), device=device)
    if mode == "pow2":
        # token_budgets(K) as 1, 2, 4, ... capped at K, made on the device: a tensor made from a Python
        # list is copied in, and that makes the host wait for the GPU in every training step.
        n = len(token_budgets(K))
        choices = torch.clamp(2 ** torch.arange(n, device=device), max=K)
        return choices[torch.randint(n, (batch,), device=device)]
    raise ValueError(f"nested dropout mode must be 'pow2' or 'uniform'; got {mode!r}")


def repa_loss(pred, target):
    """REPA: negative cosine similarity between predicted and target features, averaged over tokens."""
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


class RepaHead(nn.Module):
    """Small transformer over an early decoder layer's patch features -> DINOv2 width (App. F.1:
    "a Transformer with time-causal attention mimicking the decoder design"). It reads features
    of the decoder's width; its output layer starts at zero."""

    def __init__(self, dim, depth, out_dim, mask):
        super().__init__()
        self.transformer = Transformer(dim, depth, mask)
        self.out = zero_linear(dim, out_dim, bias=False)

    def forward(self, patches):
        """(B, T, P, D) -> (B, T, P, out_dim)."""
        B, T, P, D = patches.shape
        x = self.transformer(patches.reshape(B, T * P, D), Layout(T, P, 0))
        return self.out(x).view(B, T, P, -1)


@dataclass
class APG:
    """Adaptive projected guidance settings. The official video defaults: no momentum, the
    difference clipped to norm 0.6 (per sample and channel, over T, H, W), no parallel part."""
    momentum: float = 0.0
    norm_threshold: float = 0.6
    eta: float = 0.0


def guide(v_cond, v_uncond, scale, apg=None, running=None):
    """Guided velocity and the updated APG momentum state (one per sample).

    CFG: v_u + w (v_c - v_u) = v_c + (w - 1)(v_c - v_u). APG takes the same difference, adds
    momentum, clips its norm and keeps only the part orthogonal to v_c (plus eta times the
    parallel part): the parallel part is what oversaturates at high guidance.
    """
    diff = v_cond - v_uncond
    if apg is None:
        return v_cond + (scale - 1) * diff, running
    dims = (-3, -2, -1)
    running = diff if running is None else diff + apg.momentum * running
    diff = running
    if apg.norm_threshold > 0:
        norm = torch.linalg.vector_norm(diff, dim=dims, keepdim=True)
        diff = diff * torch.clamp(apg.norm_threshold / norm, max=1.0)
    v64, d64 = v_cond.double(), diff.double()
    unit = v64 / torch.linalg.vector_norm(v64, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (d64 * unit).sum(dims, keepdim=True) * unit
    update = (d64 - parallel + apg.eta * parallel).to(v_cond.dtype)
    return v_cond + (scale - 1) * update, running


TIME_SAMPLING = ("logit_normal", "uniform")   # the training noise-level distributions (TokenizerConfig.time_sampling)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim, p, C = cfg.dec_width, cfg.patch_size, cfg.latent_channels
        if cfg.time_sampling not in TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLING}; got {cfg.time_sampling!r}")
        if cfg.register_pos_embedding not in POSITION_KINDS:   # named here: the embedding only knows its kind
            raise ValueError(f"register_pos_embedding must be one of {POSITION_KINDS}; got "
                             f"{cfg.register_pos_embedding!r}")
        self.from_codes = nn.Linear(len(cfg.fsq_levels), dim)
        self.register_pos = AxialPositionEmbedding(dim, cfg.register_pos_sizes, cfg.register_pos_embedding)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)     # nested dropout
        self.prefix_token = nn.Parameter(torch.randn(dim) * 0.02)   # registers of clean prefix frames
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)     # the null condition (CFG)
        self.patch_embed = nn.Linear(p * p * C, dim)
        self.pos = AxialPositionEmbedding(dim, cfg.patch_pos_sizes)
        self.time = TimestepEmbedder(dim, scale=cfg.time_scale)
        self.transformer = Transformer(dim, cfg.dec_depth, cfg.dec_mask, cond_dim=dim, groups=2)
        self.head_adaLN = zero_linear(dim, 2 * dim)
        self.head = zero_linear(dim, p * p * C)
        self.repa_head = RepaHead(dim, cfg.repa_depth, cfg.repa_dim, cfg.dec_mask) if cfg.repa_dim else None
        init_linear(self)

    def embed_registers(self, codes, keep_k=None, prefix=None, null=None):
        """codes (B, T, K, 6) -> register tokens (B, T, K, D).

        keep_k (B,): registers kept per frame; prefix (B,): number of clean leading frames whose
        registers are masked; null (B,) bool: clips decoded with no tokens at all.
        """
        B, T, K, _ = codes.shape
        device = codes.device
        r = self.from_codes(codes) + self.register_pos(T, K)  # (B, T, K, D)
        # Where the steps overlap, the later one wins: a prefix frame's dropped slots hold the prefix token.
        if keep_k is not None:
            dropped = (torch.arange(K, device=device) >= keep_k[:, None]).view(B, 1, K, 1)
            r = torch.where(dropped, self.mask_token.to(r.dtype), r)
        if prefix is not None:
            clean = (torch.arange(T, device=device) < prefix[:, None]).view(B, T, 1, 1)
            r = torch.where(clean, self.prefix_token.to(r.dtype), r)
        if null is not None:
            r = torch.where(null.view(B, 1, 1, 1), self.null_token.to(r.dtype), r)
        return r

    def forward(self, x_t, t, registers):
        """x_t (B, C, T, H, W), t (B,), registers (B, T, K, D) -> velocity (B, C, T, H, W)."""
        x, cond, layout = self._sequence(x_t, t, registers)
        return self._to_velocity(self.transformer(x, layout, cond), cond, layout, x_t.shape)

    def forward_with_repa(self, x_t, t, registers):
        """`forward`, and the REPA head's prediction (B, T, h*w, repa_dim) from the patch features of decoder
        block `cfg.repa_layer` (training)."""
        x, cond, layout = self._sequence(x_t, t, registers)
        x, features = self.transformer.forward_with_features(x, layout, cond, self.cfg.repa_layer)
        return self._to_velocity(x, cond, layout, x_t.shape), self.repa_head(layout.split(features)[0])

    def _sequence(self, x_t, t, registers):
        """The transformer's input (B, S, D), its conditioning (the timestep embedding) and its layout."""
        p = self.cfg.patch_size
        T, H, W = x_t.shape[2:]
        layout = Layout(T, (H // p) * (W // p), registers.shape[2])
        patches = self.patch_embed(patchify(x_t, p)) + self.pos(T, H // p, W // p)
        return layout.interleave(patches, registers), self.time(t), layout

    def _to_velocity(self, x, cond, layout, shape):
        """The transformer's output -> the velocity (B, C, T, H, W) of latents of `shape`, from the patch tokens."""
        C, H, W, p = shape[1], shape[3], shape[4], self.cfg.patch_size
        patches, _ = layout.split(x)
        shift, scale = self.head_adaLN(F.silu(cond))[:, None, None].chunk(2, dim=-1)
        return unpatchify(self.head(modulate(layer_norm(patches), shift, scale)), p, C, (H // p, W // p))

    def loss(self, latents, codes, repa_target=None, prefix=None):
        """Training losses for one batch: {"flow", "repa" (if a target is given), "loss"}.

        latents (B, C, T, H, W) are the clean x; codes (B, T, K, 6) the encoder output; repa_target
        (B, T, h*w, repa_dim) DINOv2 features; prefix (B,) the number of leading latent frames
        given clean (frame conditioning, App. F.1): their registers are masked, they are lightly
        noised for half the clips, and they are left out of the flow loss.
        """
        cfg = self.cfg
        B, T = latents.shape[0], latents.shape[2]
        device = latents.device
        keep_k = sample_keep_k(B, cfg.registers, cfg.nested_dropout, device)
        null = torch.rand(B, device=device) < cfg.null_cond_prob
        # The prefix path runs even when no frame is clean, so that every parameter takes part in
        # every step (DistributedDataParallel requires it).
        prefix = torch.zeros(B, dtype=torch.long, device=device) if prefix is None else prefix
        registers = self.embed_registers(codes, keep_k, prefix, null)

        if cfg.time_sampling == "uniform":                # one t per clip
            t = torch.rand(B, device=device)
        else:
            t = torch.sigmoid(torch.randn(B, device=device))  # logit-normal
        eps = torch.randn_like(latents)
        x_t = t.view(B, 1, 1, 1, 1) * eps + (1 - t.view(B, 1, 1, 1, 1)) * latents
        is_prefix = (torch.arange(T, device=device) < prefix[:, None]).view(B, 1, T, 1, 1)
        # Half the clips see a slightly noisy condition, so that a re-encoded decoded frame (long
        # videos) is not out of distribution.
        sigma = torch.rand(B, device=device) * cfg.prefix_noise * (torch.rand(B, device=device) < 0.5)
        sigma = sigma.view(B, 1, 1, 1, 1)
        x_t = torch.where(is_prefix, sigma * eps + (1 - sigma) * latents, x_t)
        frame_weight = (~is_prefix).view(B, T).float()

        want_repa = repa_target is not None
        if want_repa and self.repa_head is None:
            raise ValueError("repa_target was given but this decoder has no REPA head (repa_dim=0 in its config)")
        v, repa_pred = self.forward_with_repa(x_t, t, registers) if want_repa else (self(x_t, t, registers), None)
        per_frame = (v.float() - (eps - latents).float()).pow(2).mean(dim=(1, 3, 4))  # (B, T)
        flow = (per_frame * frame_weight).sum() / frame_weight.sum().clamp_min(1)
        losses = {"flow": flow, "loss": flow}
        if want_repa:
            losses["repa"] = repa_loss(repa_pred, repa_target)
            losses["loss"] = flow + cfg.repa_weight * losses["repa"]
        return losses

    @torch.no_grad()
    def sample(self, codes, keep_k, size, steps=25, guidance=1.0, apg=None, prefix_latents=None, generator=None):
        """Euler sampling from noise at t = 1 to latents at t = 0.

        codes (B, T, K, 6), keep_k (B,), size (H, W) of the latent grid. guidance > 1 applies
        classifier-free guidance against the null condition (conditional and unconditional passes
        in one doubled batch), with APG if `apg` is given. prefix_latents (B, C, n, H, W) are clean
        leading frames held fixed throughout (chunk-by-chunk long-video decoding, frame
        conditioning). `generator` makes the starting noise reproducible.

        Without APG, decoded frame t depends only on the tokens of frames <= t under the
        time-causal mask. APG's norms span all frames, so it trades that exactness for quality.
        """
        x, registers, n = self._start(codes, keep_k, size, guidance, prefix_latents, generator)
        running = None
        for i in range(steps, 0, -1):
            if n:
                x[:, :, :n] = prefix_latents
            # t as a tensor: a compiled step then has the same inputs at every step (a float would be a constant)
            t = torch.full((x.shape[0],), i / steps, device=x.device)
            x, running = self.euler_step(x, t, registers, 1 / steps, guidance, apg, running)
        if n:
            x[:, :, :n] = prefix_latents
        return x

    def euler_step(self, x, t, registers, dt, guidance, apg, running):
        """x at noise level t (B,) -> x at t - dt, and the APG state. `compile_sampling` replaces it by its
        compiled version; both read and return tensors only, so a step never waits for the host."""
        v, running = self._velocity(x, t, registers, guidance, apg, running)
        return x - v.to(x.dtype) * dt, running

    def compile_sampling(self):
        """torch.compile the Euler step (guidance and APG included) for fixed shapes, with CUDA graphs on CUDA
        (mode "reduce-overhead"): a clip's 25 steps then replay one graph. Shapes, settings and the first
        APG step (no state yet) each compile once."""
        mode = "reduce-overhead" if self.patch_embed.weight.is_cuda else None
        self.euler_step = compile_or_eager(self.euler_step, "the flow decoder's Euler step", mode=mode, dynamic=False)
        return self

    @torch.no_grad()
    def sample_frames(self, codes, keep_k, size, steps=25, guidance=1.0, prefix_latents=None, generator=None):
        """`sample`, one latent frame at a time: yields (B, C, 1, H, W) for frames 0, 1, ..., T - 1, each as
        soon as its flow steps are done, equal to what `sample` returns for that frame (no APG).

        Under the time-causal mask the velocity of frame j at a step reads only frames <= j at that step.
        So frame j runs its steps alone, beside the states frames < j had at the same steps, kept from
        their own runs: the first frame's forward passes hold one frame instead of T. Frames < j are
        recomputed at every step (no key/value cache), so in all the passes hold (T + 1) / 2 times the
        frames of joint sampling. Not with APG (its norms span all frames) nor with a full-attention decoder,
        where a frame depends on later ones.
        """
        if self.cfg.dec_mask != "time_causal":
            raise ValueError(f"frame-by-frame decoding needs the time-causal decoder; this one has dec_mask="
                             f"{self.cfg.dec_mask!r} (a frame depends on later frames): decode the clip jointly")
        x, registers, n = self._start(codes, keep_k, size, guidance, prefix_latents, generator)
        past = [x[:, :, :0]] * steps   # per step, the states of the frames done so far at that step
        for j in range(x.shape[2]):
            if j < n:   # a clean prefix frame is held fixed at every step
                frame = prefix_latents[:, :, j:j + 1]
                past = [torch.cat([p, frame], 2) for p in past]
                yield frame
                continue
            frame = x[:, :, j:j + 1]
            for s, i in enumerate(range(steps, 0, -1)):
                states = torch.cat([past[s], frame], 2)
                past[s] = states
                t = torch.full((states.shape[0],), i / steps, device=states.device)
                v, _ = self._velocity(states, t, registers[:, :j + 1], guidance, None, None)
                frame = frame - v[:, :, -1:].to(frame.dtype) / steps
            yield frame

    def _start(self, codes, keep_k, size, guidance, prefix_latents, generator):
        """The starting noise (B, C, T, H, W), the register tokens (doubled with the null condition when
        guided) and the number of clean prefix frames, shared by `sample` and `sample_frames`."""
        B, T = codes.shape[:2]
        device = codes.device
        x = torch.randn((B, self.cfg.latent_channels, T, *size), generator=generator, device=device)
        n = 0 if prefix_latents is None else prefix_latents.shape[2]
        prefix = torch.full((B,), n, device=device) if n else None
        registers = self.embed_registers(codes, keep_k, prefix)
        if guidance != 1.0:
            null = self.embed_registers(codes, keep_k, prefix, null=torch.ones(B, dtype=torch.bool, device=device))
            registers = torch.cat([registers, null])
        return x, registers, n

    def _velocity(self, x, t, registers, guidance, apg, running):
        """The (guided) velocity at noise levels t (B,) for every frame of x, and the APG momentum state."""
        if guidance == 1.0:
            return self(x, t, registers), running
        v_cond, v_uncond = self(torch.cat([x, x]), torch.cat([t, t]), registers).chunk(2)
        return guide(v_cond, v_uncond, guidance, apg, running)
