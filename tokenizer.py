"""VideoFlexTok: the whole tokenizer (encoder + FSQ + flow decoder), its configurations and its API.

Paper: §3 (method), §4.1 and Appendix F.1 / Table 5 (model sizes). The tokenizer maps VAE latents
(B, C, T', h, w) to token ids (B, T', K), K registers per latent frame, and decodes any prefix of
k <= K tokens per frame back to latents with the flow decoder: few tokens give a plausible video
that keeps the semantics and motion, more tokens add detail.

    tok = VideoFlexTok(TokenizerConfig.preset("d18-d18"))
    ids = tok.encode(latents)                      # (B, T', 256) in [0, 64000)
    latents = tok.decode(ids[..., :32], steps=25)  # decode from the first 32 tokens of every frame
    ids = tok.tokenize(video, vae); video = tok.detokenize(ids, vae)  # through a VAE
    tok = VideoFlexTok.from_checkpoint("ckpt.pt")  # a train_tok.py checkpoint
    tok = official.load_tokenizer("model.safetensors")  # the official release, or a train_tok.py checkpoint
    for latent in tok.decode_frames(ids, steps=25): ...  # progressive: one latent frame at a time
    ids, table = budget_psnr(tok, vae, video)             # adaptive budgets: PSNR of every clip at every k,
    k = choose_budgets(table, token_budgets(256), target_psnr=30)   # the fewest tokens reaching 30 dB
    video = tok.detokenize(ids, vae, budget=k)

Presets: `tiny` (CPU tests and demo, on pixels), `d12-d12` (the paper's ablation size),
`d18-d18` (Kinetics-600, 17x128x128, patch 1), `d18-d28` (256x256, patch 2). Widths follow the
paper: width = 64 * depth, heads = depth.

This module knows nothing of the official file format: official.py turns a release file into a
TokenizerConfig and a state dict of this model.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from decoder import Decoder, token_budgets
from encoder import Encoder
from fsq import LEVELS
from checkpoint import build_checked, check_state_dict, torch_load
from transformer import Transformer

# Settings that checkpoints written by earlier versions store, each with the one value the model now computes
# with (the only one a known file needs): `from_dict` accepts them at that value and refuses any other.
RETIRED = {"pos_embedding": "learnable_sum", "register_masks": ("nested", "prefix", "null")}


@dataclass
class TokenizerConfig:
    enc_depth: int = 18
    dec_depth: int = 18
    latent_channels: int = 16      # VidTok 4x8x8 16-channel latents
    latent_size: int = 16          # side of the latent grid trained on (128 px / 8)
    patch_size: int = 1            # latent pixels per token side
    max_frames: int = 5            # latent frames (17 video frames)
    registers: int = 256           # K, tokens per latent frame
    fsq_levels: tuple = LEVELS     # 64000 codes
    enc_mask: str = "causal_registers"
    dec_mask: str = "time_causal"  # "full" in the decoder fine-tuning stage
    nested_dropout: str = "pow2"   # or "uniform"
    null_cond_prob: float = 0.1    # whole-register dropout, for classifier-free guidance
    time_sampling: str = "logit_normal"  # training noise levels t: "logit_normal" (SD3, the official
                                   # default) or "uniform" (the official ln=False: 7x more clips at t < 0.1)
    prefix_noise: float = 0.02     # max noise level of a clean conditioning frame (official value)
    repa_dim: int = 1024           # DINOv2-L width; 0 removes the REPA head
    repa_depth: int = 2
    repa_layer: int = 1            # 0-based decoder block whose output the REPA head reads
    repa_weight: float = 0.5       # lambda; REPA's default
    enc_dim: int = 0               # encoder width; 0 = 64 * enc_depth, the paper's rule
    dec_dim: int = 0               # decoder width; 0 = 64 * dec_depth
    # Options kept for the official release files (official.py sets them), each for what the official code
    # does by default; the defaults here are ours.
    square_positions: bool = False  # learned position tables as the official code always stores them: every
                                    # axis as long as the table's longest (the extra rows are never used)
    register_pos_embedding: str = "learnable_sum"  # the decoder's (t, k) register positions, or "sincos": the
                                    # fixed table of the official PositionalEmbeddingAdder's default posemb_type
    time_scale: float = 1000.0     # the timestep embedding sees time_scale * t; official: 1000 / max_timestep,
                                   # 1 with the official TimestepEmbedder's default max_timestep of 1000

    @property
    def enc_width(self):
        return self.enc_dim or 64 * self.enc_depth

    @property
    def dec_width(self):
        return self.dec_dim or 64 * self.dec_depth

    @property
    def max_grid(self):
        return self.latent_size // self.patch_size

    @property
    def patch_pos_sizes(self):
        """Axis lengths of the (t, y, x) patch position tables, encoder's and decoder's alike."""
        return self._pos_sizes((self.max_frames, self.max_grid, self.max_grid))

    @property
    def register_pos_sizes(self):
        """Axis lengths of the decoder's (t, k) register position table (a sincos table is never squared)."""
        sizes = (self.max_frames, self.registers)
        return sizes if self.register_pos_embedding == "sincos" else self._pos_sizes(sizes)

    def _pos_sizes(self, sizes):
        return (max(sizes),) * len(sizes) if self.square_positions else sizes

    @classmethod
    def from_dict(cls, fields):
        """The inverse of dataclasses.asdict, as stored in checkpoints (JSON turns tuples into lists).

        Fields that earlier versions stored are accepted with the one value this version computes with."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)} - set(RETIRED))
        if unknown:
            raise ValueError(f"not a tokenizer config: unknown fields {', '.join(unknown[:4])} (an AR checkpoint?)")
        for name, value in RETIRED.items():
            found = fields.get(name, value)
            if (tuple(found) if isinstance(found, list) else found) != value:
                raise ValueError(f"this checkpoint's tokenizer has {name} = {found!r}; this version computes only "
                                 f"{name} = {value!r}")
        fields = {k: v for k, v in fields.items() if k not in RETIRED}
        if "fsq_levels" in fields:
            fields["fsq_levels"] = tuple(fields["fsq_levels"])
        return cls(**fields)

    @classmethod
    def preset(cls, name, **overrides):
        presets = {
            "tiny": dict(enc_depth=2, dec_depth=2, latent_channels=3, latent_size=32, patch_size=4,
                         max_frames=17, registers=16, repa_dim=384, repa_depth=1, repa_layer=0),
            # The bundled demo model (make demo-train): 5-frame 32 px clips through the demo VAE (8x8x4 latents),
            # K = 8, and a small FSQ grid, so that the AR model's vocabulary is small too. Patch 4 (a 2x2 grid
            # of patch tokens per frame): with 2 blocks and a few thousand steps, the encoder learns where the
            # shape is only when each token sees a whole quadrant (measured: README, "What was tried"). A decoder
            # of 3 blocks: with 2, the later tokens' detail is drawn less well (the same table).
            "demo": dict(enc_depth=2, dec_depth=3, enc_dim=128, dec_dim=128, latent_channels=4, latent_size=8,
                         patch_size=4, max_frames=5, registers=8, fsq_levels=(8, 5, 5, 5), repa_dim=0,
                         time_sampling="uniform"),
            "d12-d12": dict(enc_depth=12, dec_depth=12),
            "d18-d18": dict(),
            "d18-d28": dict(dec_depth=28, latent_size=32, patch_size=2),
        }
        if name not in presets:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


class VideoFlexTok(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @classmethod
    def from_checkpoint(cls, path):
        """A train_tok.py checkpoint -> its tokenizer with the EMA weights (when it has them), in eval
        mode and frozen."""
        state = torch_load(path)
        if not isinstance(state, dict) or not {"config", "model", "ema"} <= set(state):
            raise ValueError(f"{path} is not a train_tok.py checkpoint (it needs 'config', 'model' and 'ema')")
        fix = "Use a checkpoint written by train_tok.py."
        make = lambda: cls(TokenizerConfig.from_dict(state["config"]))  # noqa: E731
        weights = state["ema"] or state["model"]
        model = build_checked(make, weights, path, fix)
        model.load_state_dict(weights)
        return model.eval().requires_grad_(False)

    def load_checkpoint_weights(self, state, source):
        """Load a train_tok.py checkpoint's weights (its EMA when it has one) into this tokenizer.

        The REPA head is the one part allowed to differ: it only serves training, so a checkpoint
        trained with REPA loads into a model without it (inference, stage 2 without DINOv2) and a
        checkpoint without it into a model that has one (its head then starts afresh).
        """
        head = "decoder.repa_head."
        if not isinstance(state, dict) or not {"model", "ema"} <= set(state):
            raise ValueError(f"{source} is not a train_tok.py checkpoint (it needs 'model' and 'ema')")
        weights = state["ema"] or state["model"]
        ours = {k: v for k, v in self.state_dict().items() if k.startswith(head)}
        theirs = {k: v for k, v in weights.items() if k.startswith(head)}
        if {k: v.shape for k, v in theirs.items()} != {k: v.shape for k, v in ours.items()}:
            weights = {k: v for k, v in weights.items() if not k.startswith(head)} | ours
        check_state_dict(self, weights, source, "Use a checkpoint trained with this tokenizer's preset and settings.")
        self.load_state_dict(weights)

    @property
    def codebook_size(self):
        return self.encoder.fsq.codebook_size

    def set_attention_backend(self, backend):
        """"flex" (FlexAttention block masks), "sdpa" (dense masks) or None (by device)."""
        for m in self.modules():
            if isinstance(m, Transformer):
                m.backend = backend

    def forward(self, latents, repa_target=None, prefix=None):
        """Training losses {"loss", "flow", ["repa"]} for clean latents (B, C, T', h, w)."""
        self._check_latents(latents)
        codes, _ = self.encoder(latents)
        return self.decoder.loss(latents, codes, repa_target, prefix)

    @torch.no_grad()
    def encode(self, latents):
        """Latents (B, C, T', h, w) -> token ids (B, T', K)."""
        self._check_latents(latents)
        return self.encoder(latents)[1]

    @torch.no_grad()
    def decode(self, ids, steps=25, guidance=1.0, apg=None, prefix_latents=None, generator=None, size=None,
               budget=None):
        """Token ids (B, T', k), any 1 <= k <= K (the first k tokens of every frame) -> latents.

        steps: Euler steps; guidance: CFG scale (1 = off), with `apg=decoder.APG()` for adaptive projected
        guidance (the official video setting is guidance 25 with APG); prefix_latents: clean
        leading latent frames to condition on; size: latent (h, w), default the trained size;
        budget (B,): tokens per frame of each clip, <= k (adaptive budgets, `choose_budgets`); default k.
        """
        codes, keep_k, size = self._decoder_inputs(ids, prefix_latents, size, budget)
        return self.decoder.sample(codes, keep_k, size, steps, guidance, apg, prefix_latents, generator)

    def decode_frames(self, ids, steps=25, guidance=1.0, prefix_latents=None, generator=None, size=None):
        """`decode`, one latent frame at a time (progressive decoding, `Decoder.sample_frames`): an iterator of
        latents (B, C, 1, h, w), frame 0 first, each equal to that frame of `decode` with the same generator.
        Needs the time-causal decoder; no APG."""
        codes, keep_k, size = self._decoder_inputs(ids, prefix_latents, size)
        return self.decoder.sample_frames(codes, keep_k, size, steps, guidance, prefix_latents, generator)

    def _decoder_inputs(self, ids, prefix_latents, size, budget=None):
        """Checked ids -> the decoder's (codes (B, T, K, 6), keep_k (B,), latent size (h, w))."""
        K = self.cfg.registers
        self._check_ids(ids)
        B, T, k = ids.shape
        size = tuple(size or (self.cfg.latent_size, self.cfg.latent_size))
        self._check_size(size, "size")
        if prefix_latents is not None:
            want = (B, self.cfg.latent_channels, prefix_latents.shape[2], *size)
            if prefix_latents.dim() != 5 or tuple(prefix_latents.shape) != want or not 0 < want[2] < T:
                raise ValueError(f"prefix_latents must have shape (B, C, n, h, w) = {want} with 0 < n < {T} "
                                 f"(the number of decoded frames); got {tuple(prefix_latents.shape)}")
        # The dropped tail becomes the mask token inside the decoder, so the padding value is irrelevant.
        padded = torch.zeros(B, T, K, dtype=torch.long, device=ids.device)
        padded[..., :k] = ids
        codes = self.encoder.fsq.ids_to_codes(padded).to(self.decoder.from_codes.weight.dtype)
        if budget is None:
            return codes, torch.full((B,), k, device=ids.device), size
        budget = torch.as_tensor(budget, device=ids.device)
        if budget.shape != (B,) or not ((1 <= budget) & (budget <= k)).all():
            raise ValueError(f"budget must hold one tokens-per-frame count in [1, {k}] per clip ({B}); got "
                             f"{budget.tolist()}")
        return codes, budget, size

    def tokenize(self, video, vae):
        """Video (B, 3, T, H, W) in [-1, 1] -> ids, through a frozen VAE (`vae.VidTokVAE`, `vae.PixelVAE`,
        or anything with `encode(video) -> latents`)."""
        self.check_vae(vae)
        return self.encode(vae.encode(video))

    def detokenize(self, ids, vae, **decode_kwargs):
        """Ids -> video, through the flow decoder and then `vae.decode(latents)`."""
        self.check_vae(vae)
        return vae.decode(self.decode(ids, **decode_kwargs))

    ############################################################################
    # Input checks: every error names the argument and what is allowed.

    def _check_size(self, size, name):
        p, g = self.cfg.patch_size, self.cfg.max_grid
        if any(s % p or not 0 < s // p <= g for s in size):
            raise ValueError(f"{name} (latent h, w) must be multiples of the patch size {p} and at most "
                             f"{g * p}; got {tuple(size)}")

    def check_vae(self, vae):
        """Refuse a VAE whose latents this tokenizer was not built for."""
        channels = getattr(vae, "latent_channels", self.cfg.latent_channels)
        if channels != self.cfg.latent_channels:
            raise ValueError(f"the VAE makes {channels}-channel latents but this tokenizer was built for "
                             f"{self.cfg.latent_channels}; use the VAE it was trained with (PixelVAE for 3, "
                             "DemoVAE for 4, VidTokVAE for 16)")

    def _check_latents(self, latents):
        C, T_max = self.cfg.latent_channels, self.cfg.max_frames
        if not torch.is_tensor(latents) or latents.dim() != 5 or latents.shape[1] != C \
                or not latents.dtype.is_floating_point:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents must be a float tensor (B, {C}, T', h, w); got {shape}")
        if not 1 <= latents.shape[2] <= T_max:
            raise ValueError(f"latents have T'={latents.shape[2]} latent frames; this tokenizer takes 1 to "
                             f"{T_max} (its register table). Tokenize longer videos in chunks.")
        self._check_size(latents.shape[3:], "latents")

    def _check_ids(self, ids):
        K, T_max, V = self.cfg.registers, self.cfg.max_frames, self.codebook_size
        if not torch.is_tensor(ids) or ids.dim() != 3 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"ids must be an integer tensor (B, T', k); got {shape}")
        B, T, k = ids.shape
        if not 1 <= k <= K:
            raise ValueError(f"ids have k={k} tokens per frame; k must be in [1, {K}]")
        if not 1 <= T <= T_max:
            raise ValueError(f"ids have T'={T} latent frames; this tokenizer decodes 1 to {T_max}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"ids must be in [0, {V}) (the FSQ codebook); got range "
                             f"[{ids.min().item()}, {ids.max().item()}]")


################################################################################
# Adaptive token budgets: each clip gets the tokens its content needs (a flexible-length code's use)

@torch.no_grad()
def budget_psnr(tok, vae, video, seed=0, **decode_kwargs):
    """(ids (B, T', K), PSNR table (B, budgets)): every clip of `video` (B, 3, T, H, W) reconstructed from its
    first k tokens per frame for k = 1, 2, 4, ..., K (`decode` settings as given), with the same seed at every k."""
    ids = tok.tokenize(video, vae)
    table = []
    for k in token_budgets(tok.cfg.registers):
        gen = torch.Generator(video.device).manual_seed(seed)
        recon = tok.detokenize(ids[..., :k], vae, generator=gen, **decode_kwargs).clamp(-1, 1)
        mse = (recon - video.clamp(-1, 1)).float().pow(2).flatten(1).mean(1)
        table.append(10 * torch.log10(4 / mse.clamp_min(1e-10)))
    return ids, torch.stack(table, 1).cpu()


def greedy_budgets(table, budgets, limit=None):
    """The allocation path over a PSNR table (B, len(budgets)): every clip starts at the smallest budget, then,
    step after step, the clip and higher budget with the most PSNR gained per extra token per frame is moved up
    (among the moves that keep the total within `limit`, if given). Yields (budget index per clip (B,), tokens
    per frame summed over the clips, mean PSNR) at every step; it ends when no move gains."""
    B, n = table.shape
    at, rows = torch.zeros(B, dtype=torch.long), torch.arange(B)
    cost = torch.tensor(budgets, dtype=torch.float)
    while True:
        tokens = int(cost[at].sum())
        yield at.clone(), tokens, float(table[rows, at].mean())
        extra = cost[None] - cost[at][:, None]                                   # (B, n)
        gain = (table - table[rows, at][:, None]) / extra.clamp_min(1e-9)
        blocked = torch.arange(n)[None] <= at[:, None]                           # only upward moves
        if limit is not None:
            blocked |= extra > limit - tokens
        gain[blocked] = -float("inf")
        best = int(gain.argmax())
        if gain.flatten()[best] <= 0:
            return
        at[best // n] = best % n


def choose_budgets(table, budgets, target_psnr=None, total_tokens=None):
    """Tokens per frame for every clip (B,) from its PSNR table (B, len(budgets)).

    target_psnr: the smallest budget whose PSNR reaches the target, and the largest where none does (compare
    the table at the result with the target to see which). total_tokens: a total of tokens per frame over the
    clips (a clip at k counts k), spread by `greedy_budgets` to the clips that gain the most from it."""
    budgets_t = torch.tensor(budgets)
    if (target_psnr is None) == (total_tokens is None):
        raise ValueError("give one of target_psnr or total_tokens")
    if target_psnr is not None:
        reached = table >= target_psnr
        last = torch.full((len(table),), len(budgets) - 1)
        return budgets_t[torch.where(reached.any(1), reached.float().argmax(1), last)]
    if total_tokens < budgets[0] * len(table):
        raise ValueError(f"total_tokens must be at least {budgets[0] * len(table)} (every clip at {budgets[0]} "
                         f"token per frame); got {total_tokens}")
    *_, (at, _, _) = greedy_budgets(table, budgets, limit=total_tokens)
    return budgets_t[at]
