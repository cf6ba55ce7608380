"""The demo: the demo VAE, the token-position probe, demo.py's bundle and export, and the bundled models
themselves (assets/demo): they load, and their samples show the requested class."""
import json

import numpy as np
import pytest
import torch

import demo
import sample
from data import VideoFolder
from demo import train_demo_vae
from metrics import token_probe
from synthetic import SYNTHETIC_CLASSES, adherence, class_from_prompt, make_synthetic
from vae import DemoVAE, load_vae

BUNDLED = all((sample.DEMO_ASSETS / name).is_file() for name in demo.FILES)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), num=48, seed=3, size=32, frames=5, fps=4.0)


def test_demo_vae_trains_saves_and_loads_in_fp16(tiny_folder, tmp_path):
    out = tmp_path / "vae.pt"
    report = train_demo_vae(tiny_folder, out, frames=5, fps=4.0, size=32, steps=60, batch_size=16, log_every=0)
    assert report["steps"] == 60 and report["val_psnr"] > 14   # a grey guess of these frames gives ~12 dB
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state["model"].values())
    vae = load_vae("demo", out)
    clips = VideoFolder(tiny_folder, frames=5, fps=4.0, size=32, train=False, index=False)
    video = torch.stack([clips[0][0], clips[1][0]])
    latents = vae.encode(video)
    assert latents.shape == (2, 4, 5, 8, 8)
    assert vae.decode(latents).shape == video.shape
    # per frame: a frame's latents do not depend on the other frames
    assert torch.allclose(vae.encode(video[:, :, 2:3]), latents[:, :, 2:3], atol=1e-5)
    assert 0.5 < latents.std() < 2   # `scale` gives the training latents about unit spread


def test_train_vae_command_line(tiny_folder, tmp_path, capsys):
    """demo.py train-vae is train_demo_vae with its flags; `python demo.py [flags]` is the run command."""
    out = tmp_path / "vae.pt"
    demo.main(["train-vae", "--data", str(tiny_folder), "--out", str(out), "--steps", "2", "--batch-size", "4"])
    assert "held-out PSNR" in capsys.readouterr().out and isinstance(DemoVAE.from_checkpoint(out), DemoVAE)
    assert demo.parse_args(["--out", "x"]).command == "run" and demo.parse_args([]).command == "run"
    assert demo.parse_args(["export", "--work", "w"]).work.name == "w"


def test_demo_vae_refuses_other_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a demo VAE checkpoint"):
        DemoVAE.from_checkpoint(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="--vae-ckpt"):
        load_vae("demo")


def test_probe_finds_the_position_that_carries_the_class():
    rng = np.random.default_rng(0)
    names = [SYNTHETIC_CLASSES[i % 48] for i in range(480)]
    labels = torch.tensor([SYNTHETIC_CLASSES.index(n) for n in names])
    levels = (8, 5, 5, 5)
    ids = torch.from_numpy(rng.integers(0, 1000, (480, 5, 3)))
    # position 1: the colour and shape in frame 0 (two FSQ digits), the motion in frame 4; position 2: noise;
    # position 3: the colour in every frame's second digit
    ids[:, 0, 0] = labels // 12 + 8 * ((labels // 4) % 3)
    ids[:, 4, 0] = labels % 4
    ids[:, :, 2] = (labels // 12)[:, None] * 8 + torch.from_numpy(rng.integers(0, 8, (480, 5)))
    scores = token_probe(ids[:384], names[:384], ids[384:], names[384:], levels)
    assert min(scores[key][0] for key in ("color", "shape", "motion")) >= 0.95 and scores["class"][0] > 0.5
    assert max(scores[key][1] for key in ("color", "shape", "motion")) < 0.6
    assert scores["color"][2] == 1.0 and scores["motion"][2] < 0.5


@pytest.mark.skipif(not BUNDLED, reason="no bundled demo models (make demo-train)")
def test_bundled_models_draw_the_requested_class():
    """A change that breaks the models, their loading or their sampling fails here. 8 samples per condition at
    the top budget; the thresholds sit below the bundled figures (demo.json at k = 8: colour 100%, shape 100%
    and 94%, motion 100%, class 100% and 94% for text and classes) to leave room for sampling noise."""
    torch.manual_seed(0)
    bundle = demo.Bundle()
    K = bundle.tok.cfg.registers
    for cond, names in (("text", demo.PROMPTS[:2]), ("class", demo.CLASSES[:2])):
        videos, wanted = [], []
        for i, name in enumerate(names):
            videos += list(bundle.sample(cond, name, K, 4, seed=i))
            wanted += [class_from_prompt(name) if cond == "text" else name] * 4
        scores = adherence(videos, wanted)
        assert scores["color"] >= 0.75 and scores["shape"] >= 0.5 and scores["motion"] >= 0.6, (cond, scores)
        assert scores["class"] >= 0.375, (cond, scores)   # chance: 1 in 48


@pytest.mark.skipif(not BUNDLED, reason="no bundled demo models (make demo-train)")
def test_bundled_files_are_small_fp16_and_described():
    total = sum((sample.DEMO_ASSETS / name).stat().st_size for name in demo.FILES)
    assert total <= 25 * 2 ** 20
    tok = torch.load(sample.DEMO_ASSETS / "tok.pt", weights_only=True)
    assert tok["model"] is None and all(v.dtype == torch.float16 for v in tok["ema"].values())
    info = json.loads((sample.DEMO_ASSETS / "demo.json").read_text())
    assert {"commit", "command", "figures", "machine"} <= set(info)


@pytest.mark.skipif(not BUNDLED, reason="no bundled demo models (make demo-train)")
def test_sample_uses_the_bundled_models_by_default(tmp_path, capsys):
    out = tmp_path / "s"
    sample.main(["--prompt", "a red circle moving left", "--tokens-per-frame", "2", "--out", str(out),
                 "--steps", "4"])
    printed = capsys.readouterr().out
    assert "bundled demo models" in printed
    assert len(list(out.glob("*.mp4"))) == 1
    sample.main(["--prompt", "a purple hexagon jumping", "--tokens-per-frame", "1", "--out", str(tmp_path / "p"),
                 "--steps", "2"])
    assert "none of the 48 captions this model was trained on" in capsys.readouterr().out


def test_missing_or_corrupt_bundled_models_name_make_demo_train(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "DEMO_ASSETS", tmp_path)
    with pytest.raises(SystemExit, match="make demo-train"):
        sample.main(["--prompt", "a red circle moving left", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="make demo-train"):
        demo.Bundle(tmp_path)
    for name in demo.FILES:
        (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt.*make demo-train"):
        demo.Bundle(tmp_path)
    with pytest.raises(SystemExit, match="make demo-train"):
        sample.main(["--prompt", "a red circle moving left", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not BUNDLED, reason="no bundled demo models (make demo-train)")
def test_bundled_tokenizer_decodes_frame_by_frame_as_it_decodes_jointly():
    """Progressive decoding on trained weights (values of order 1): within 1e-5 of joint decoding in fp32."""
    bundle = demo.Bundle()
    ids = torch.randint(0, bundle.tok.codebook_size, (2, 5, 8), generator=torch.Generator().manual_seed(0))
    for guidance in (1.0, 2.0):
        kw = dict(steps=6, guidance=guidance)
        joint = bundle.tok.decode(ids, generator=torch.Generator().manual_seed(1), **kw)
        frames = torch.cat(list(bundle.tok.decode_frames(ids, generator=torch.Generator().manual_seed(1), **kw)), 2)
        assert (frames - joint).abs().max() < 1e-5
