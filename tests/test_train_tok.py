"""train_tok.py on CPU: resuming gives the weights of an uninterrupted run, torchrun keeps ranks in
sync, validation writes its sheet, stage 2 freezes the encoder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_tok
from synthetic import make_synthetic
from trainer import Shards
from vae import PixelVAE

ROOT = Path(__file__).resolve().parents[1]
# A few-second configuration: 5 frames of 16x16 pixels, a 2-block tiny tokenizer.
FAST = ["--preset", "tiny", "--frames", "5", "--fps", "4", "--size", "16", "--batch-size", "2",
        "--num-workers", "0", "--log-every", "1", "--val-clips", "1", "--val-steps", "2", "--warmup", "2",
        "--lr", "1e-3"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num=8, seed=0, size=32, frames=24)
    return root


def run(videos, run_dir, *extra):
    train_tok.main(["--data", str(videos), "--run-dir", str(run_dir), *FAST, *extra])


def weights(path):
    return torch.load(path, weights_only=True)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_resume_reproduces_an_uninterrupted_run(videos, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(videos, straight, "--steps", "6", "--ckpt-every", "3", "--val-every", "100")
    # A run killed after its step-3 checkpoint, while writing the next one: the half-written file
    # must be ignored and training must continue from step 3.
    resumed.mkdir()
    shutil.copy(straight / "ckpt-0000003.pt", resumed / "ckpt-0000003.pt")
    (resumed / "ckpt-0000006.tmp").write_bytes(b"half a checkpoint")
    # Activation checkpointing recomputes the same activations: it changes memory, not the weights.
    run(videos, resumed, "--steps", "6", "--ckpt-every", "3", "--val-every", "100", "--resume",
        "--activation-checkpointing")
    a, b = weights(straight / "ckpt-0000006.pt"), weights(resumed / "ckpt-0000006.pt")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.allclose(tensor, b[part][name], atol=1e-6), (part, name)
    losses = {r["step"]: r["loss"] for r in read_log(straight) if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in read_log(resumed) if "loss" in r}
    assert sorted(resumed_losses) == [4, 5, 6]  # it did resume: a fresh run would log steps 1-6
    assert all(abs(losses[s] - resumed_losses[s]) < 1e-6 for s in (4, 5, 6))


def test_validation_logs_psnr_per_token_budget_and_writes_sheets(videos, tmp_path):
    run(videos, tmp_path, "--steps", "2", "--ckpt-every", "100", "--val-every", "2", "--time-sampling", "uniform")
    assert json.loads((tmp_path / "config.json").read_text())["tokenizer"]["time_sampling"] == "uniform"
    val = [r for r in read_log(tmp_path) if "val_psnr" in r]
    assert len(val) == 1 and sorted(int(k) for k in val[0]["val_psnr"]) == [1, 2, 4, 8, 16]
    assert all(0 < v < 100 for v in val[0]["val_psnr"].values())
    codes = val[0]["val_codes"]
    assert 1 <= codes["distinct_first_ids"] <= codes["first_tokens"]
    assert (tmp_path / "val" / "step0000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "val").glob("step0000002-k*.mp4"))) == 5


def test_stage_two_freezes_the_encoder_and_uses_full_attention(videos, tmp_path):
    run(videos, tmp_path / "s1", "--steps", "2", "--ckpt-every", "2", "--val-every", "100")
    run(videos, tmp_path / "s2", "--steps", "2", "--ckpt-every", "2", "--val-every", "100",
        "--stage", "2", "--init", str(tmp_path / "s1" / "ckpt-0000002.pt"))
    s1, s2 = weights(tmp_path / "s1" / "ckpt-0000002.pt"), weights(tmp_path / "s2" / "ckpt-0000002.pt")
    assert s2["config"]["dec_mask"] == "full"
    assert s1["config"]["max_frames"] == s2["config"]["max_frames"] == 5  # sized for the 5-frame clips
    with pytest.raises(SystemExit, match="trained on 5 latent frames; --frames 9 gives 9"):
        run(videos, tmp_path / "s3", "--steps", "1", "--stage", "2", "--init", str(tmp_path / "s1" / "ckpt-0000002.pt"),
            "--frames", "9")
    encoder = [k for k in s1["model"] if k.startswith("encoder.")]
    decoder = [k for k in s1["model"] if k.startswith("decoder.")]
    # Stage 2 starts from the stage-1 EMA weights; the encoder then stays where it started.
    assert all(torch.equal(s1["ema"][k], s2["model"][k]) for k in encoder)
    assert any(not torch.equal(s1["ema"][k], s2["model"][k]) for k in decoder)


def test_torchrun_two_processes_keep_identical_weights(videos, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "train_tok.py"), "--data", str(videos), "--run-dir", str(tmp_path), *FAST,
           "--steps", "3", "--ckpt-every", "3", "--val-every", "100"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in read_log(tmp_path) if r.get("final")]
    sums = final[0]["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert len(weights(tmp_path / "ckpt-0000003.pt")["rng"]) == 2  # one random state per rank


def test_cache_is_built_once_trained_from_and_refused_for_other_settings(videos, tmp_path):
    cache = tmp_path / "cache"
    run(videos, tmp_path / "a", "--steps", "2", "--ckpt-every", "100", "--val-every", "100", "--cache", str(cache))
    meta = json.loads((cache / "meta.json").read_text())["settings"]
    assert meta["size"] == 16 and meta["frames"] == 5 and meta["clips"] == 7  # 8 videos, 1 held out
    cached = Shards(cache, ["latents", "targets"])
    assert len(cached) == 7
    latents, targets = cached[0]
    assert latents.shape == (3, 5, 16, 16) and targets.numel() == 0  # pixel "latents", no REPA
    # The cached clip is the evaluation-mode clip of the same video (fixed start), in fp16.
    train_set, val_set, _ = train_tok.build_data(train_tok.parse_args(["--data", str(videos), *FAST]),
                                                 train_tok.TokenizerConfig.preset("tiny"), PixelVAE(), 0)
    assert torch.allclose(latents.float(), val_set.dataset[train_set.indices[0]][0], atol=1e-3)
    # A second run reuses it; other settings are refused.
    stamp = (cache / "shard-00000.pt").stat().st_mtime_ns
    run(videos, tmp_path / "b", "--steps", "1", "--ckpt-every", "100", "--val-every", "100", "--cache", str(cache))
    assert (cache / "shard-00000.pt").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="cache .* was built with other settings.*'size': \\(16, 32\\)"):
        train_tok.main(["--data", str(videos), "--run-dir", str(tmp_path / "c"), *FAST, "--size", "32",
                        "--steps", "1", "--cache", str(cache)])


def test_training_batches_are_the_same_with_workers_and_when_resumed(videos):
    """One loader for the whole run (workers kept across epochs): the batches equal those of the main process,
    epoch after epoch (each epoch's random clip starts included), and a run resumed at any step, an epoch's
    last one included, continues with the same batches."""
    from data import VideoFolder
    from trainer import Progress, batches

    folder = VideoFolder(videos, frames=5, fps=4.0, size=16, train=True, index=False)   # 8 clips: 4 batches
    def run(workers, progress, steps=10):
        out = []
        for batch in batches(folder, progress, steps, 2, workers, 0, 1, 0):
            out.append((batch[0].clone(), (progress.epoch, progress.batch_in_epoch)))
            progress.step += 1
        return out

    plain = run(0, Progress())
    assert [where for _, where in plain[:6]] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert not torch.equal(plain[0][0], plain[4][0])   # epoch 1 draws other clips
    with_workers = run(2, Progress())
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(plain, with_workers))
    for stop in (3, 4, 6):   # resumed from the progress a checkpoint taken in step `stop` holds
        step, (epoch, batch) = stop, plain[stop - 1][1]
        resumed = run(0, Progress(step=step, epoch=epoch, batch_in_epoch=batch))
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(plain[stop:], resumed)) and len(resumed) == 10 - stop
