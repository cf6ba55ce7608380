"""FVD: I3D key layout and loading, clip-length rules, TF "SAME" padding and TF1 resizing, the
Fréchet distance against scipy and closed forms, streaming statistics, and input errors.

The full-width I3D costs a few seconds per 224x224 clip on CPU, so only three real forward
passes run (module-scoped network); the FVD plumbing is also checked with a cheap stand-in.
Set I3D_WEIGHTS=/path/to/i3d_pretrained_400.pt to also check a published calibration value.
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fvd

scipy_linalg = pytest.importorskip("scipy.linalg")

# The pytorch-i3d layout, spelled out from the reference table: unit name -> conv weight shape.
_INCEPTION = {  # in channels, [b0, b1a, b1b, b2a, b2b, b3b]
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]), "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (480, [192, 96, 208, 16, 48, 64]), "Mixed_4c": (512, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (512, [128, 128, 256, 24, 64, 64]), "Mixed_4e": (512, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (528, [256, 160, 320, 32, 128, 128]), "Mixed_5b": (832, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (832, [384, 192, 384, 48, 128, 128]),
}


def _official_shapes():
    units = {"Conv3d_1a_7x7": (64, 3, 7, 7, 7), "Conv3d_2b_1x1": (64, 64, 1, 1, 1),
             "Conv3d_2c_3x3": (192, 64, 3, 3, 3)}
    for name, (cin, (b0, b1a, b1b, b2a, b2b, b3b)) in _INCEPTION.items():
        units |= {f"{name}.b0": (b0, cin, 1, 1, 1), f"{name}.b1a": (b1a, cin, 1, 1, 1),
                  f"{name}.b1b": (b1b, b1a, 3, 3, 3), f"{name}.b2a": (b2a, cin, 1, 1, 1),
                  f"{name}.b2b": (b2b, b2a, 3, 3, 3), f"{name}.b3b": (b3b, cin, 1, 1, 1)}
    shapes = {"logits.conv3d.weight": (400, 1024, 1, 1, 1), "logits.conv3d.bias": (400,)}
    for unit, w in units.items():
        shapes[f"{unit}.conv3d.weight"] = w
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{unit}.bn.{p}"] = (w[0],)
    return shapes


def _random_checkpoint(seed=0):
    """Random tensors under the 287 official names, saved as a modern nn.BatchNorm3d model would."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in _official_shapes().items():
        if name.endswith("conv3d.weight"):  # He init keeps activations in range through 20 layers
            t = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif name.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif name.endswith("bn.weight"):
            t = torch.ones(shape)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        state[name] = t
        if name.endswith("running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    state = _random_checkpoint()
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def i3d(checkpoint):
    return fvd.load_i3d(checkpoint[0])


def test_state_dict_has_the_287_official_keys():
    with torch.device("meta"):
        sd = fvd.I3D().state_dict()
    expected = _official_shapes()
    assert len(sd) == len(expected) == 287
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_loads_the_checkpoint_strictly(checkpoint, i3d):
    _, state = checkpoint
    loaded = i3d.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if "num_batches_tracked" not in k)
    assert not i3d.training and not any(p.requires_grad for p in i3d.parameters())
    assert all(m.eps == 1e-3 for m in i3d.modules() if isinstance(m, fvd._FrozenBatchNorm))


def test_logits_for_16_frame_clips(i3d):
    out = i3d(torch.rand(1, 3, 16, 224, 224) * 2 - 1)
    assert out.shape == (1, 400) and torch.isfinite(out).all() and out.abs().max() > 0


def test_clip_length_arithmetic():
    with torch.device("meta"):
        model = fvd.I3D()
        for t in (9, 10, 16, 17, 24, 25, 33):
            steps = math.ceil(math.ceil(math.ceil(t / 2) / 2) / 2) - 1
            assert model.logits_per_step(torch.empty(2, 3, t, 224, 224)).shape == (2, 400, steps)
        assert model(torch.empty(2, 3, 17, 224, 224)).shape == (2, 400)
        with pytest.raises(ValueError, match="at least 9 frames"):
            model(torch.empty(1, 3, 8, 224, 224))
        with pytest.raises(ValueError, match="224"):
            model(torch.empty(1, 3, 16, 256, 256))


def test_same_padding_puts_the_odd_pixel_at_the_end():
    size, k, s = (4, 5, 6), 3, 2
    padded = fvd._same_pad(torch.ones(1, 1, *size), (k,) * 3, (s,) * 3)
    out = F.conv3d(padded, torch.ones(1, 1, k, k, k), stride=s)  # counts unpadded inputs per window

    def valid_counts(n):  # TF: pad total, front = total // 2, window i covers [i*s - front, +k)
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        front = total // 2
        return [sum(0 <= i * s - front + j < n for j in range(k)) for i in range(math.ceil(n / s))]

    expected = torch.tensor(np.einsum("i,j,k->ijk", *[valid_counts(n) for n in size]), dtype=torch.float32)
    assert torch.equal(out[0, 0], expected)


def test_tf_legacy_resize_and_scaling():
    x = torch.rand(1, 3, 9, 112, 112) * 2 - 1
    up = fvd.preprocess_videos(x)
    assert up.shape == (1, 3, 9, 224, 224)
    assert torch.allclose(up[..., ::2, ::2], x, atol=1e-6)  # source = out * in / out: no shift
    mid = (x[..., :-1] + x[..., 1:]) / 2
    assert torch.allclose(up[..., ::2, 1:-1:2], mid, atol=1e-6)
    assert torch.allclose(up[..., ::2, -1], x[..., -1], atol=1e-6)  # clamped at the border
    big = torch.rand(1, 3, 9, 448, 448) * 2 - 1
    assert torch.allclose(fvd.preprocess_videos(big), big[..., ::2, ::2], atol=1e-6)
    u8 = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 1, 2).expand(1, 3, 9, 224, 2)
    u8 = torch.cat([u8] * 112, dim=-1)
    assert fvd.preprocess_videos(u8).unique().tolist() == [-1.0, 1.0]
    torch_style = fvd.preprocess_videos(x, resize="torch")
    assert torch.allclose(torch_style[:, :, 0], F.interpolate(x[:, :, 0], size=(224, 224), mode="bilinear"))


def _scipy_fd(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n", [300, 40])  # 40 < d: rank-deficient covariances
def test_frechet_distance_matches_scipy(n):
    rng = np.random.default_rng(n)
    d = 64
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n + 7, d)) @ rng.normal(size=(d, d)) * 0.5 + 1.0
    ours = fvd.frechet_distance_from_stats(fvd.FeatureStats().update(torch.from_numpy(a)),
                                           fvd.FeatureStats().update(torch.from_numpy(b)))
    assert ours == pytest.approx(_scipy_fd(a, b), rel=1e-3)


def test_frechet_distance_closed_form_and_self_distance():
    d = 50
    mu = torch.linspace(-1, 1, d, dtype=torch.float64)
    # N(0, I) vs N(mu, 4I): |mu|^2 + d (1 + 4 - 2 * 2)
    assert fvd.frechet_distance(torch.zeros(d), torch.eye(d), mu, 4 * torch.eye(d)) == pytest.approx(
        float(mu @ mu) + d, rel=1e-10)
    x = torch.randn(500, d) * 3 + 2
    stats = fvd.FeatureStats().update(x)
    assert abs(fvd.frechet_distance_from_stats(stats, stats)) < 1e-8 * float(stats.covariance.trace())


def test_streaming_stats_equal_one_shot_numpy():
    x = torch.randn(103, 12, dtype=torch.float64) * 10 + 1e3  # large offset: tests the centred merge
    stats = fvd.FeatureStats()
    for chunk in x.split(17):
        stats.update(chunk)
    assert stats.n == 103
    np.testing.assert_allclose(stats.mean.numpy(), x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)


def test_fvd_of_a_set_with_itself_is_zero(i3d):
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 3, 9, 48, 64, generator=g) * 2 - 1  # 9 frames (the minimum), resized to 224x224
    stats = fvd.video_stats(videos, i3d, batch_size=2)
    # Zero up to float64 round-off, relative to the size of the statistics (2 samples in 400
    # dimensions make the covariance rank-deficient, where eigenvalue round-off is largest).
    scale = stats.covariance.trace().item() + stats.mean.square().sum().item()
    assert abs(fvd.fvd(videos, videos, i3d, batch_size=2)) < 1e-9 * max(1.0, scale) + 1e-5


class _StandIn(nn.Module):
    """Cheap feature network with I3D's interface, for the streaming/batching plumbing."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 2 * 4 * 4, 16)

    def forward(self, x):
        return self.proj(F.adaptive_avg_pool3d(x, (2, 4, 4)).flatten(1))


def test_fvd_streams_batches_and_reuses_stats():
    torch.manual_seed(0)
    net = _StandIn()
    real = torch.randint(0, 256, (10, 3, 9, 8, 8), dtype=torch.uint8)
    fake = torch.randint(0, 200, (8, 3, 9, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        feats = [net(fvd.preprocess_videos(v)).double() for v in (real, fake)]
    (mu1, cov1), (mu2, cov2) = [(f.mean(0), torch.cov(f.T)) for f in feats]
    one_shot = fvd.frechet_distance(mu1, cov1, mu2, cov2)
    streamed = fvd.fvd(iter(real.split(3)), fake, net, batch_size=4)
    real_stats = fvd.video_stats(real, net, batch_size=16)
    assert streamed == pytest.approx(one_shot, rel=1e-6)
    assert fvd.fvd(real_stats, fake.float() / 127.5 - 1, net) == pytest.approx(one_shot, rel=1e-5)
    assert one_shot > 0


def test_bad_inputs(tmp_path, i3d):
    with pytest.raises(FileNotFoundError):
        fvd.load_i3d(tmp_path / "i3d_pretrained_400.pt")
    dino_like = {"cls_token": torch.zeros(1, 1, 768), "pos_embed": torch.zeros(1, 1370, 768)}
    torch.save(dino_like, tmp_path / "dino.pth")
    with pytest.raises(ValueError, match="does not match the I3D.*missing keys.*Kinetics-400 I3D checkpoint"):
        fvd.load_i3d(tmp_path / "dino.pth")
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = fvd.FeatureStats().update(torch.randn(1, 400)).covariance
    with pytest.raises(ValueError, match="feature size"):
        fvd.FeatureStats().update(torch.randn(3, 400)).update(torch.randn(3, 399))
    with pytest.raises(ValueError, match="mismatched"):
        fvd.frechet_distance(torch.zeros(400), torch.eye(400), torch.zeros(399), torch.eye(399))
    with pytest.raises(ValueError, match="T >= 9"):
        fvd.fvd(torch.zeros(2, 3, 8, 64, 64), torch.zeros(2, 3, 16, 64, 64), i3d)
    with pytest.raises(ValueError, match="resize"):
        fvd.preprocess_videos(torch.zeros(1, 3, 9, 64, 64), resize="nearest")


@pytest.mark.skipif(not os.environ.get("I3D_WEIGHTS"), reason="set I3D_WEIGHTS to i3d_pretrained_400.pt")
def test_calibration_with_real_weights():
    # Constant black vs white clips (30 frames): covariances vanish, FVD = |mean logit gap|^2.
    # Published: 151.39 (TF original), 151.26 (StyleGAN-V TorchScript port).
    model = fvd.load_i3d(os.environ["I3D_WEIGHTS"])
    black, white = torch.full((2, 3, 30, 64, 64), -1.0), torch.full((2, 3, 30, 64, 64), 1.0)
    assert fvd.fvd(black, white, model) == pytest.approx(151.3, abs=1.0)
