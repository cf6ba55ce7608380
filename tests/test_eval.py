"""synthetic.py's detector on real make_synthetic videos (decoded from mp4, at the demo's 32 px and 17 frames at
4 fps, and at 64 px), no-foreground handling, prompt parsing, adherence aggregation; metrics.py's PSNR per token
budget on a tiny random tokenizer, rFVD and gFVD with a randomly initialised I3D; and eval.py's command line.

Measured with larger sets (192 and 480 videos per size, seeds 1-3, VideoFolder clips of 17 frames at 4 fps):
colour, shape, motion and full class all 100% at 32 and 64 px. The thresholds below leave margin for that."""
import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch

import eval as ev
import fvd
from data import VideoFolder
from decoder import token_budgets
from metrics import (adaptive_comparison, codebook_usage, one_step_predictions, psnr,
                     reconstruction_metrics, token_reliance)
from synthetic import (CIRCLE_SQUARE, TRIANGLE_SKEW, adherence, class_from_prompt, class_name, detect, make_synthetic,
                       measure, render_shapes)
from tokenizer import TokenizerConfig, VideoFlexTok
from vae import PixelVAE
from video import read_video, write_video


@pytest.fixture(scope="module", params=[32, 64])
def synthetic(request, tmp_path_factory):
    """One video per class (48), written as mp4 by make_synthetic and read back as 17-frame 4 fps clips."""
    size = request.param
    root = make_synthetic(tmp_path_factory.mktemp(f"syn{size}"), num=48, seed=5, size=size)
    ds = VideoFolder(root, frames=17, fps=4.0, size=size, train=False, index=False)
    return root, [ds[i][0] for i in range(len(ds))], [ds.classes[label] for label in ds.labels]


def test_detector_recovers_the_class_of_real_synthetic_videos(synthetic):
    _, videos, names = synthetic
    scores = adherence(videos, names)
    assert scores["n"] == 48
    assert scores["color"] >= 0.95 and scores["motion"] >= 0.95
    assert scores["shape"] >= 0.9 and scores["class"] >= 0.9


def test_shape_boundaries_sit_midway_between_the_classes(synthetic):
    """The calibration rule of CIRCLE_SQUARE and TRIANGLE_SKEW, on today's synthetic look."""
    _, videos, names = synthetic
    by_shape = {}
    for video, name in zip(videos, names):
        by_shape.setdefault(name.split("_")[1], []).append(measure(video))
    fill, skew = ({shape: np.mean([m[i] for m in ms]) for shape, ms in by_shape.items()} for i in (0, 1))
    assert CIRCLE_SQUARE == pytest.approx((fill["circle"] + fill["square"]) / 2, abs=0.015)
    assert TRIANGLE_SKEW == pytest.approx((skew["circle"] + skew["square"]) / 4 + skew["triangle"] / 2, abs=0.02)


def test_detector_takes_uint8_frames_of_a_whole_file(synthetic):
    root, _, _ = synthetic
    path = sorted(root.rglob("*.mp4"))[7]
    frames, _ = read_video(path)   # 40 frames at 8 fps, (T, H, W, 3) uint8
    assert class_name(*detect(frames)) == path.parent.name
    assert class_name(*detect(torch.from_numpy(frames))) == path.parent.name


def test_no_foreground_and_no_motion():
    grey = torch.full((3, 9, 32, 32), -0.2)
    assert detect(grey) == (None, None, None)
    ramp = np.linspace(60, 160, 32)[None, None, :, None].repeat(9, 0).repeat(32, 1).repeat(3, 3)
    assert detect(ramp.astype(np.uint8)) == (None, None, None)   # a grey gradient is background
    still = render_shapes("blue", "square", "left", np.random.default_rng(0), size=32, frames=1)
    color, shape, motion = detect(np.repeat(still, 9, axis=0))
    assert (color, shape, motion) == ("blue", "square", None)
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((4, 8, 8, 3), np.float32))


def test_class_from_prompt():
    assert class_from_prompt("a red circle moving left") == "red_circle_left"
    assert class_from_prompt("A Yellow Triangle moving UP.") == "yellow_triangle_up"
    assert class_from_prompt("a_green_square_moving_down") == "green_square_down"   # sample.py's slug
    assert class_from_prompt("blue_circle_right") == "blue_circle_right"            # a class name
    assert class_from_prompt("class3") is None
    assert class_from_prompt("a purple circle moving left") is None
    assert class_name("red", "square", "up") == "red_square_up"


def test_adherence_counts_each_attribute():
    rng = np.random.default_rng(1)
    videos = [render_shapes(c, s, m, rng, size=32, frames=17, fps=4.0)
              for c, s, m in [("red", "circle", "left"), ("green", "square", "up"), ("blue", "triangle", "down"),
                              ("yellow", "circle", "right")]]
    requested = ["red_circle_left", "green_square_down", "red_triangle_down", "yellow_square_left"]
    scores = adherence(videos, requested)
    assert scores == {"color": 0.75, "shape": 0.75, "motion": 0.5, "class": 0.25, "n": 4}
    with pytest.raises(ValueError, match="one requested class per video"):
        adherence(videos, requested[:2])
    with pytest.raises(ValueError, match="<color>_<shape>_<motion>"):
        adherence(videos[:1], ["red_circle"])


def tiny_tokenizer():
    cfg = TokenizerConfig.preset("tiny", latent_size=8, max_frames=9, registers=4, repa_dim=0, fsq_levels=(8, 5, 5, 5))
    return VideoFlexTok(cfg).eval()


def psnr_by_budget(tok, vae, videos, budgets=None, steps=25, generator=None):
    return {k: m["psnr"] for k, m in reconstruction_metrics(tok, vae, videos, budgets, steps, generator).items()}


def test_psnr_by_budget_over_a_set():
    tok, vae = tiny_tokenizer(), PixelVAE()
    videos = torch.rand(3, 3, 9, 8, 8) * 2 - 1
    result = psnr_by_budget(tok, vae, videos, steps=2, generator=torch.Generator().manual_seed(0))
    assert list(result) == token_budgets(4) == [1, 2, 4]
    assert all(math.isfinite(v) and 0 < v < 60 for v in result.values())
    # one batch: exactly the psnr of the reconstruction
    ids = tok.encode(vae.encode(videos))
    recon = vae.decode(tok.decode(ids[..., :2], steps=2, generator=torch.Generator().manual_seed(0)))
    one = psnr_by_budget(tok, vae, videos, [2], steps=2, generator=torch.Generator().manual_seed(0))
    assert one[2] == pytest.approx(psnr(recon, videos), abs=1e-4)
    frames = reconstruction_metrics(tok, vae, videos, [2], steps=2, generator=torch.Generator().manual_seed(0))
    assert frames[2]["psnr_by_frame"] == pytest.approx([psnr(recon[:, :, t], videos[:, :, t]) for t in range(9)],
                                                       abs=1e-4)
    # batches of unequal size pool the squared error of every pixel
    split = psnr_by_budget(tok, vae, [videos[:1], videos[1:]], [4], steps=2, generator=torch.Generator())
    assert math.isfinite(split[4])
    with pytest.raises(ValueError, match="budgets must lie in"):
        psnr_by_budget(tok, vae, videos, [8], steps=1)


@pytest.fixture(scope="module")
def i3d_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_random.pt"
    torch.manual_seed(0)
    torch.save(fvd.I3D().state_dict(), path)
    return path


def test_rfvd_with_a_random_i3d(i3d_ckpt):
    tok, vae, i3d = tiny_tokenizer(), PixelVAE(), fvd.load_i3d(i3d_ckpt)
    videos = torch.rand(2, 3, 9, 8, 8) * 2 - 1
    metrics = reconstruction_metrics(tok, vae, videos, [4], steps=1, generator=torch.Generator(), i3d=i3d,
                                        batch_size=2)
    assert math.isfinite(metrics[4]["psnr"]) and math.isfinite(metrics[4]["rfvd"]) and metrics[4]["rfvd"] > 0


def test_gfvd_command_line(i3d_ckpt, tmp_path, capsys):
    real = make_synthetic(tmp_path / "real", num=2, seed=0, size=32, frames=9, fps=4.0)
    fake = tmp_path / "fake"
    rng = np.random.default_rng(0)
    for n in range(2):
        write_video(fake / f"sample-{n:02d}-red_circle_left.mp4", rng.integers(0, 256, (9, 32, 32, 3), np.uint8), 4)
    value = ev.main(["gfvd", "--real", str(real), "--fake", str(fake), "--i3d-ckpt", str(i3d_ckpt),
                     "--frames", "9", "--batch-size", "2"])
    assert math.isfinite(value) and value > 0
    assert f"gFVD {value:.1f}" in capsys.readouterr().out


def test_missing_i3d_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="gfvd needs --i3d-ckpt"):
        ev.main(["gfvd", "--real", str(tmp_path), "--fake", str(tmp_path)])
    tok = tmp_path / "tok.pt"
    cfg = tiny_tokenizer().cfg
    torch.save({"config": dataclasses.asdict(cfg), "model": VideoFlexTok(cfg).state_dict(), "ema": None}, tok)
    with pytest.raises(SystemExit, match="I3D checkpoint not found"):
        ev.main(["recon", "--tok-ckpt", str(tok), "--data", str(tmp_path), "--i3d-ckpt", str(tmp_path / "nope.pt")])


def test_adherence_command_line_on_sample_named_files(synthetic, tmp_path, capsys):
    root, _, _ = synthetic
    paths = sorted(root.rglob("*.mp4"))[:12]
    for n, path in enumerate(paths):
        color, shape, motion = path.parent.name.split("_")
        label = path.parent.name if n % 2 else f"a_{color}_{shape}_moving_{motion}"   # --class or --prompt
        shutil.copy(path, tmp_path / f"sample-{n:02d}-{label}.mp4")
    (tmp_path / "sample-99-class3.mp4").write_bytes(paths[0].read_bytes())   # an id: no class to check
    scores = ev.main(["adherence", str(tmp_path)])
    out = capsys.readouterr().out
    assert scores["n"] == 12 and scores["color"] == scores["motion"] == 1.0 and scores["class"] >= 0.9
    assert "skipped: sample-99-class3.mp4" in out and "adherence over 12 videos" in out
    assert "shape measures by requested shape" in out and "fill ratio" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="names a class"):
        ev.main(["adherence", str(tmp_path / "empty")])


def test_codebook_usage_tells_a_collapsed_encoder_from_a_healthy_one(tmp_path, capsys):
    tok, vae = tiny_tokenizer(), PixelVAE()
    videos = torch.rand(6, 3, 9, 8, 8) * 2 - 1
    # At initialisation the code projection is zero: every token is the grid's centre, and tanh is not saturated.
    fresh = codebook_usage(tok, vae, [videos[:4], videos[4:]])
    assert fresh["clips"] == 6 and fresh["tokens"] == 6 * 9 * 4
    assert fresh["distinct_by_position"] == [1, 1, 1, 1] and fresh["distinct"] == 1 and fresh["saturated"] == 0
    # Large random projections: the ids spread out, and almost every FSQ input sits on tanh's flat tails.
    with torch.no_grad():
        tok.encoder.to_codes.weight.normal_(0, 100)
    big = codebook_usage(tok, vae, [videos])
    assert big["distinct"] > 6 and big["saturated"] > 0.9
    # The command line, on a train_tok.py-style checkpoint and a video folder.
    ckpt = tmp_path / "tok.pt"
    torch.save({"config": dataclasses.asdict(tok.cfg), "model": tok.state_dict(), "ema": None}, ckpt)
    root = make_synthetic(tmp_path / "clips", num=3, size=8, frames=9, fps=4.0)
    usage = ev.main(["codes", "--tok-ckpt", str(ckpt), "--data", str(root), "--frames", "9", "--num", "3"])
    assert usage["clips"] == 3
    assert "FSQ inputs with tanh saturated" in capsys.readouterr().out


def test_token_reliance_tells_a_decoder_that_ignores_its_tokens(tmp_path, capsys):
    tok, vae = tiny_tokenizer(), PixelVAE()
    with torch.no_grad():   # every weight random, so the encoder's codes differ from clip to clip
        for p in tok.parameters():
            p.normal_(0, 0.2)
    videos = torch.rand(4, 3, 9, 8, 8) * 2 - 1
    losses = token_reliance(tok, vae, [videos[:1], videos[1:]], ts=(0.5, 1.0), generator=torch.Generator())
    assert list(losses) == [0.5, 1.0] and all(set(pair) == {"tokens", "null"} for pair in losses.values())
    assert losses[1.0]["tokens"] != pytest.approx(losses[1.0]["null"], rel=1e-3)
    # One batch at t = 1: exactly the flow loss computed by hand.
    x = vae.encode(videos)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    codes, _ = tok.encoder(x)
    registers = tok.decoder.embed_registers(codes, torch.full((4,), 4))
    by_hand = (tok.decoder(eps, torch.ones(4), registers) - (eps - x)).pow(2).mean().item()
    one = token_reliance(tok, vae, [videos], ts=(1.0,), generator=torch.Generator().manual_seed(3))
    assert one[1.0]["tokens"] == pytest.approx(by_hand, rel=1e-5)
    # A decoder that cannot see its tokens (codes projected to the null token): the columns are equal.
    with torch.no_grad():
        tok.decoder.from_codes.weight.zero_()
        tok.decoder.from_codes.bias.zero_()
        tok.decoder.register_pos.axes[0].zero_()
        tok.decoder.register_pos.axes[1].zero_()
        tok.decoder.null_token.zero_()
    blind = token_reliance(tok, vae, [videos], ts=(1.0,), generator=torch.Generator().manual_seed(3))
    assert blind[1.0]["tokens"] == pytest.approx(blind[1.0]["null"], rel=1e-6)
    # The command line.
    ckpt = tmp_path / "tok.pt"
    torch.save({"config": dataclasses.asdict(tok.cfg), "model": tok.state_dict(), "ema": None}, ckpt)
    root = make_synthetic(tmp_path / "clips", num=2, size=8, frames=9, fps=4.0)
    sheet = tmp_path / "one-step.png"
    result = ev.main(["flow", "--tok-ckpt", str(ckpt), "--data", str(root), "--frames", "9", "--num", "2",
                      "--sheet", str(sheet)])
    assert set(result) == {0.1, 0.3, 0.5, 0.7, 0.9, 1.0}
    assert "with none (null condition)" in capsys.readouterr().out
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_step_predictions_are_the_flow_estimate_of_the_clean_clip():
    """x_0 = x_t - t v at t = 1, with the tokens and with the null condition; a blind decoder draws the same."""
    tok, vae = tiny_tokenizer(), PixelVAE()
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(0, 0.2)
    videos = torch.rand(2, 3, 9, 8, 8) * 2 - 1
    tokens, null = one_step_predictions(tok, vae, videos, torch.Generator().manual_seed(0))
    assert tokens.shape == null.shape == videos.shape
    eps = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    codes, _ = tok.encoder(videos)
    by_hand = eps - tok.decoder(eps, torch.ones(2), tok.decoder.embed_registers(codes))
    assert torch.allclose(tokens, by_hand, atol=1e-6)
    assert not torch.allclose(tokens, null, atol=1e-3)


def test_adaptive_budgets_beat_fixed_ones_on_a_mixed_set():
    """Easy clips (flat PSNR) beside hard ones (PSNR rising with k): adaptive budgets give the hard clips the
    tokens, so they reach a fixed budget's mean PSNR with fewer tokens and beat it at the same total."""
    easy, hard = [30.0, 30.1, 30.1, 30.2], [20.0, 24.0, 28.0, 31.0]
    rows = adaptive_comparison(torch.tensor([easy, hard] * 4), [1, 2, 4, 8])
    assert [r["k"] for r in rows] == [1, 2, 4, 8]
    for r in rows:
        assert r["adaptive_psnr"] >= r["fixed_psnr"] and r["adaptive_tokens"] <= r["k"]
    for r in rows[1:3]:   # k = 2 and 4 (at K every clip has all its tokens either way)
        assert r["adaptive_psnr"] > r["fixed_psnr"] + 0.9 and r["tokens_to_match"] <= 0.875 * r["k"]
