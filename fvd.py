"""Fréchet Video Distance (FVD) with the Kinetics-400 I3D network.

The paper reports reconstruction and generation fidelity as rFVD and gFVD (§4.1). FVD compares
two sets of videos by the Fréchet distance between Gaussians fitted to their I3D features:

    FVD = |mu_1 - mu_2|^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^(1/2)).

Standard protocol, as in the original TensorFlow implementation: frames resized to 224x224 with
TF1 bilinear resizing (no crop, aspect ratio not kept), scaled to [-1, 1], fed to the TF-Hub
`i3d-kinetics-400` model; the feature is the 400-d pre-softmax logits averaged over the remaining
time steps; means and unbiased covariances in float64.

The network is InceptionI3d with TF "SAME" padding computed from the input size at run time
(the extra pixel of odd padding goes at the end), BatchNorm with eps 1e-3 and no learned scale
in TF (ones in the file), max pools padded the same way. It loads `i3d_pretrained_400.pt`, the
TF-Hub FVD weights converted to the pytorch-i3d layout (287 tensors). Clips need >= 9 frames:
three stride-2 stages and a 2-frame average pool must leave at least one time step.

References: Unterthiner et al., "Towards Accurate Generative Models of Video: A New Metric &
Challenges" (2018) and google-research/frechet_video_distance; Carreira & Zisserman, "Quo Vadis,
Action Recognition?" (I3D, 2017); piergiaj/pytorch-i3d (module layout), VideoGPT / TATS (weight
conversion), StyleGAN-V (FVD protocol notes); TF-GAN `trace_sqrt_product` (the eigenvalue form of
the trace term). Facts only; the code is written from scratch.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import check_state_dict, torch_load

MIN_FRAMES = 9
I3D_SIZE = 224
NUM_CLASSES = 400


################################################################################
# The I3D network

# Inception modules: input channels and the widths of
# [branch 0 (1x1), branch 1 (1x1 -> 3x3x3), branch 2 (1x1 -> 3x3x3), branch 3 (pool -> 1x1)].
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def _same_pad(x, kernel, stride):
    """TF "SAME" padding of (T, H, W): output size ceil(n / s), odd padding's extra at the end."""
    pads = []
    for n, k, s in zip(x.shape[-3:], kernel, stride):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((total // 2, total - total // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    # Zeros are also right for the max pools: their inputs are ReLU outputs (>= 0), so a zero
    # border never wins over TF's -inf border.
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


def _max_pool(x, kernel, stride):
    return F.max_pool3d(_same_pad(x, kernel, stride), kernel, stride)


class _FrozenBatchNorm(nn.Module):
    """Inference-only BatchNorm3d with the usual state-dict names (FVD never trains I3D)."""

    def __init__(self, channels, eps):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class _Unit3D(nn.Module):
    """SAME-padded Conv3d + BatchNorm + ReLU; the logits unit has a bias and neither of the rest."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), eps=1e-3, logits=False):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        self.bn = None if logits else _FrozenBatchNorm(cout, eps)

    def forward(self, x):
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        return x if self.bn is None else F.relu(self.bn(x))


class _Mixed(nn.Module):
    def __init__(self, cin, widths, eps):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        k3 = (3, 3, 3)
        self.b0 = _Unit3D(cin, w0, eps=eps)
        self.b1a, self.b1b = _Unit3D(cin, w1a, eps=eps), _Unit3D(w1a, w1b, k3, eps=eps)
        self.b2a, self.b2b = _Unit3D(cin, w2a, eps=eps), _Unit3D(w2a, w2b, k3, eps=eps)
        self.b3b = _Unit3D(cin, w3, eps=eps)

    def forward(self, x):
        pooled = _max_pool(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], 1)


class I3D(nn.Module):
    """InceptionI3d (Kinetics-400) returning the time-averaged 400-d logits used by FVD.

    `forward(x)`: x (B, 3, T, 224, 224) RGB in [-1, 1] with T >= 9 -> (B, 400).
    `eps` is the BatchNorm epsilon: 1e-3 as in TF (default); 1e-5 reproduces the VideoGPT/TATS
    copies of this network.
    """

    def __init__(self, eps=1e-3):
        super().__init__()
        self.Conv3d_1a_7x7 = _Unit3D(3, 64, (7, 7, 7), (2, 2, 2), eps)
        self.Conv3d_2b_1x1 = _Unit3D(64, 64, eps=eps)
        self.Conv3d_2c_3x3 = _Unit3D(64, 192, (3, 3, 3), eps=eps)
        for name, (cin, widths) in _MIXED.items():
            setattr(self, name, _Mixed(cin, widths, eps))
        self.logits = _Unit3D(1024, NUM_CLASSES, logits=True)

    def logits_per_step(self, x):
        """Logits before the temporal mean: (B, 400, T''), T'' = ceil(ceil(ceil(T/2)/2)/2) - 1."""
        x = self.Conv3d_1a_7x7(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = _max_pool(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = _max_pool(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: 7x7 -> 1x1 at 224 px
        return self.logits(x).flatten(2)  # dropout before the logits is a no-op at inference

    def forward(self, x):
        if x.ndim != 5 or x.shape[1] != 3 or x.shape[-2:] != (I3D_SIZE, I3D_SIZE):
            raise ValueError(f"I3D input must be (B, 3, T, {I3D_SIZE}, {I3D_SIZE}), got {tuple(x.shape)}; "
                             "resize with preprocess_videos")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs clips of at least {MIN_FRAMES} frames, got T={x.shape[2]}")
        return self.logits_per_step(x).mean(dim=2)


def load_i3d(path, *, eps=1e-3):
    """Load `i3d_pretrained_400.pt` (pytorch-i3d layout) with strict checking; eval mode, frozen."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D checkpoint not found: {path} (expected i3d_pretrained_400.pt)")
    state = torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a plain state dict (name -> tensor)")
    # nn.BatchNorm3d saves a step counter that inference has no use for.
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    model = I3D(eps)
    check_state_dict(model, state, str(path), "Use the Kinetics-400 I3D checkpoint in the pytorch-i3d layout "
                     "(i3d_pretrained_400.pt).")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


################################################################################
# Preprocessing: TF1 resizing to 224x224

def _tf_resize_matrix(n, size):
    """(size, n) matrix of TF1 `resize_bilinear` along one axis: source = out_index * n / size
    (no half-pixel offset), blending the two neighbouring pixels, clamped at the last one."""
    src = torch.arange(size, dtype=torch.float64) * (n / size)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    rows = torch.arange(size)
    weights = torch.zeros(size, n, dtype=torch.float64)
    weights[rows, lo] += 1 - (src - lo)
    weights[rows, hi] += src - lo  # separate statement: accumulates where hi == lo
    return weights


def preprocess_videos(videos, resize="tf"):
    """(B, 3, T, H, W) videos, float in [-1, 1] or uint8 in [0, 255] -> I3D input, clamped to [-1, 1].

    `resize="tf"` (default) reproduces the original FVD's TF1 bilinear resize to 224x224
    (corner-aligned source grid, no half-pixel offset); `resize="torch"` uses
    `F.interpolate(bilinear, align_corners=False)` as the TATS and cd-fvd ports do. No crop.
    """
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must have shape (B, 3, T, H, W), got {tuple(videos.shape)}")
    if resize not in ("tf", "torch"):
        raise ValueError(f"resize must be 'tf' or 'torch', got {resize!r}")
    x = videos.float() / 127.5 - 1 if videos.dtype == torch.uint8 else videos.float()
    if x.shape[-2:] != (I3D_SIZE, I3D_SIZE):
        if resize == "tf":  # separable: rows, then columns, as two matrix products
            rows = _tf_resize_matrix(x.shape[-2], I3D_SIZE).to(x)
            cols = _tf_resize_matrix(x.shape[-1], I3D_SIZE).to(x)
            x = rows @ x @ cols.T
        else:
            b, c, t, h, w = x.shape
            x = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), size=(I3D_SIZE, I3D_SIZE),
                              mode="bilinear", align_corners=False)
            x = x.view(b, t, c, I3D_SIZE, I3D_SIZE).transpose(1, 2)
    return x.clamp(-1, 1)


################################################################################
# Feature statistics and the Fréchet distance

class FeatureStats:
    """Streaming mean and covariance of feature vectors, accumulated in float64.

    Batches are merged with Chan et al.'s pairwise update (centred sums), which avoids the
    cancellation of the raw second-moment formula. `covariance` is unbiased (N - 1), as in TF-GAN.
    """

    def __init__(self):
        self.n = 0
        self._mean = None
        self._m2 = None  # sum of outer products of deviations from the mean

    def update(self, features):
        """Fold in a batch of features (N, D); returns self."""
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"features must be a non-empty (N, D) matrix, got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        if self._mean is not None and f.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature size {f.shape[1]} differs from the {self._mean.shape[0]} seen so far")
        mean = f.mean(0)
        centred = f - mean
        m2 = centred.T @ centred
        if self._mean is None:
            self.n, self._mean, self._m2 = len(f), mean, m2
        else:
            n = self.n + len(f)
            delta = mean - self._mean
            self._mean = self._mean + delta * (len(f) / n)
            self._m2 = self._m2 + m2 + torch.outer(delta, delta) * (self.n * len(f) / n)
            self.n = n
        return self

    @property
    def mean(self):
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for Fréchet statistics, got {self.n}")
        return self._mean

    @property
    def covariance(self):
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for Fréchet statistics, got {self.n}")
        return self._m2 / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1 S2, which equal those
    of the symmetric PSD matrix A S2 A with A = S1^(1/2); two symmetric eigendecompositions
    replace scipy's sqrtm. Round-off can make the result of identical sets slightly negative.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"mismatched statistics: means {tuple(mu1.shape)}, {tuple(mu2.shape)}, "
                         f"covariances {tuple(sigma1.shape)}, {tuple(sigma2.shape)}; all must share D")
    evals, evecs = torch.linalg.eigh(sigma1)
    root1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    m = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def frechet_distance_from_stats(a, b):
    """Fréchet distance between the Gaussians of two FeatureStats, as a float."""
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


################################################################################
# FVD of video sets

@torch.no_grad()
def video_stats(videos, i3d, *, batch_size=8, resize="tf", stats=None):
    """I3D feature statistics of a video set, streamed batch by batch.

    `videos` is a (N, 3, T, H, W) tensor or any iterable of such batches (e.g. a DataLoader),
    so a large set never has to be in memory at once. Each batch is preprocessed, run on the
    I3D's device in chunks of `batch_size` and folded into `stats` (a new FeatureStats if None).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = FeatureStats() if stats is None else stats
    device = next(i3d.parameters()).device
    for batch in ([videos] if isinstance(videos, torch.Tensor) else videos):
        if batch.ndim != 5 or batch.shape[2] < MIN_FRAMES:
            raise ValueError(f"videos must be (N, 3, T, H, W) with T >= {MIN_FRAMES} (I3D's minimum), "
                             f"got {tuple(batch.shape)}")
        for chunk in batch.split(batch_size):
            stats.update(i3d(preprocess_videos(chunk.to(device), resize)))
    return stats


def fvd(real_videos, fake_videos, i3d, *, batch_size=8, resize="tf"):
    """FVD between two video sets; each is a tensor, an iterable of batches or a FeatureStats.

    Videos are (N, 3, T, H, W), float in [-1, 1] or uint8, T >= 9 (16 is the standard clip
    length). Passing precomputed FeatureStats for the real set avoids re-running I3D on it.
    """
    def stats(videos):
        if isinstance(videos, FeatureStats):
            return videos
        return video_stats(videos, i3d, batch_size=batch_size, resize=resize)

    return frechet_distance_from_stats(stats(real_videos), stats(fake_videos))
