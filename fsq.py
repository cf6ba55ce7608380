"""Finite scalar quantization (FSQ): the discrete bottleneck of the VideoFlexTok encoder.

Paper: §3.1 ("we apply FSQ quantization (64000 codebook size) to the register tokens' output").
References: Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple" (2023); the FlexTok /
VideoFlexTok official release for the levels (8, 8, 8, 5, 5, 5) and the even-level offset.

Each register output is projected to 6 numbers. Dimension i is squashed with tanh into the range of
L_i levels and rounded, so a token is a point of the grid {levels} in [-1, 1]^6, and its id is the
mixed-radix number of its level indices (the first dimension least significant). FSQ has no
codebook to learn and needs no commitment or entropy loss; gradients pass the rounding through a
straight-through estimator.
"""
import math

import torch
import torch.nn as nn

LEVELS = (8, 8, 8, 5, 5, 5)


class FSQ(nn.Module):
    def __init__(self, levels=LEVELS, eps=1e-3):
        super().__init__()
        self.levels = tuple(levels)
        self.codebook_size = math.prod(self.levels)
        L = torch.tensor(self.levels, dtype=torch.float64)
        # Even L has no level at 0: the half-level offset and the matching tanh shift centre the
        # grid {-L/2, ..., L/2 - 1}. The (1 + eps) keeps the extreme levels reachable by tanh.
        half_l = (L - 1) * (1 + eps) / 2
        offset = torch.where(L % 2 == 0, 0.5, 0.0)
        self.register_buffer("half_l", half_l.float(), persistent=False)
        self.register_buffer("offset", offset.float(), persistent=False)
        self.register_buffer("shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("half_width", (L // 2).float(), persistent=False)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def dim(self):
        return len(self.levels)

    def forward(self, z):
        """z: (..., 6) real -> (codes (..., 6) in [-1, 1], ids (...) in [0, codebook_size))."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            bounded = torch.tanh(z + self.shift) * self.half_l - self.offset
            rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through
            codes = rounded / self.half_width
        return codes, self.codes_to_ids(codes.detach())

    def codes_to_ids(self, codes):
        digits = torch.round(codes * self.half_width + self.half_width).long()
        return (digits * self.basis).sum(-1)

    def ids_to_codes(self, ids):
        if ids.dtype.is_floating_point or ids.numel() and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(f"ids must be integers in [0, {self.codebook_size}); "
                             f"got dtype {ids.dtype}, range [{ids.min().item()}, {ids.max().item()}]")
        digits = (ids.long()[..., None] // self.basis) % torch.tensor(self.levels, device=ids.device)
        return (digits - self.half_width) / self.half_width
