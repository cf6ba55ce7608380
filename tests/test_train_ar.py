"""train_ar.py on CPU: tokenizing once, refusing another tokenizer's cache, class and text
training with samples, exact resume, and torchrun keeping ranks in sync."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_ar
import train_tok
from synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
CLIP = ["--frames", "5", "--size", "16"]
FAST = ["--batch-size", "2", "--num-workers", "0", "--log-every", "1", "--warmup", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny tokenizer trained for 2 steps, and the synthetic folder tokenized with it."""
    root = tmp_path_factory.mktemp("ar")
    make_synthetic(root / "videos", num=8, seed=0, size=32, frames=24)
    train_tok.main(["--data", str(root / "videos"), "--run-dir", str(root / "tok"), "--preset", "tiny", *CLIP,
                    "--batch-size", "2", "--num-workers", "0", "--steps", "2", "--val-every", "100", "--ckpt-every", "2"])
    tokenize(root, root / "cache", root / "tok" / "ckpt-0000002.pt")
    return root


def tokenize(root, cache, tok_ckpt):
    train_ar.main(["--tokenize", "--tok-ckpt", str(tok_ckpt), "--data", str(root / "videos"), *CLIP,
                   "--cache", str(cache), "--num-workers", "0"])


def train(cache, run_dir, *extra):
    train_ar.main(["--cache", str(cache / "cache"), "--run-dir", str(run_dir), *FAST, *extra])


def test_tokenize_stores_compact_ids_labels_and_captions(cache):
    meta = json.loads((cache / "cache" / "meta.json").read_text())
    assert meta["fields"] == ["ids", "label", "caption"]
    # The VAE that made the ids is recorded whole, so samples decode through the same one.
    assert (meta["settings"]["vae"], meta["settings"]["vae_ckpt"], meta["settings"]["vae_version"]) == ("pixel", None, "v1.0")
    shard = torch.load(next((cache / "cache").glob("shard-*.pt")), weights_only=True)
    assert shard["ids"].dtype == torch.uint16 and shard["ids"].shape == (8, 5, 16)
    assert sorted(set(shard["label"].tolist())) == list(range(8))
    assert all(c.startswith("a ") and " moving " in c for c in shard["caption"])
    # The same tokenizer again: the cache is reused; another tokenizer's cache is refused.
    tokenize(cache, cache / "cache", cache / "tok" / "ckpt-0000002.pt")
    other = torch.load(cache / "tok" / "ckpt-0000002.pt", weights_only=True)
    other["ema"]["encoder.to_codes.bias"] += 1
    torch.save(other, cache / "other.pt")
    with pytest.raises(SystemExit, match="built with other settings.*checksum"):
        tokenize(cache, cache / "cache", cache / "other.pt")


@pytest.mark.parametrize("cond", ["class", "text"])
def test_training_writes_checkpoints_and_decoded_samples(cache, tmp_path, cond):
    train(cache, tmp_path, "--cond", cond, "--steps", "2", "--sample-every", "2", "--num-samples", "2",
          "--tokens-per-frame", "4")
    state = torch.load(tmp_path / "ckpt-0000002.pt", weights_only=True)
    assert state["config"]["tokens_per_frame"] == 4 and state["config"]["text"] == ("bytes" if cond == "text" else "none")
    samples = sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    assert len(samples) == 2 and ("moving" in samples[0]) == (cond == "text")


def test_bad_flags_are_refused(cache, tmp_path):
    with pytest.raises(SystemExit, match=r"--tokens-per-frame must be in \[1, 16\]"):
        train(cache, tmp_path, "--tokens-per-frame", "17", "--steps", "1")
    with pytest.raises(SystemExit, match="needs T5 features"):
        train(cache, tmp_path, "--cond", "text", "--text-encoder", "t5", "--steps", "1")
    with pytest.raises(SystemExit, match="no token cache"):
        train_ar.main(["--cache", str(tmp_path / "none"), "--run-dir", str(tmp_path)])


def test_resume_reproduces_an_uninterrupted_run(cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--steps", "6", "--ckpt-every", "3", "--sample-every", "0", "--ema", "0.9"]
    train(cache, straight, *args)
    resumed.mkdir()
    shutil.copy(straight / "ckpt-0000003.pt", resumed / "ckpt-0000003.pt")
    train(cache, resumed, *args, "--resume")
    a, b = (torch.load(d / "ckpt-0000006.pt", weights_only=True) for d in (straight, resumed))
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.allclose(tensor, b[part][name], atol=1e-6), (part, name)
    logged = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert logged[:3] == [4, 5, 6]


def test_torchrun_two_processes_keep_identical_weights(cache, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
           str(ROOT / "train_ar.py"), "--cache", str(cache / "cache"), "--run-dir", str(tmp_path), *FAST,
           "--cond", "text", "--steps", "3", "--sample-every", "0"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "final" in line]
    sums = final[0]["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]


def test_checkpoints_carry_the_class_names(cache, tmp_path):
    train(cache, tmp_path, "--steps", "1", "--sample-every", "0")
    state = torch.load(tmp_path / "ckpt-0000001.pt", weights_only=True)
    assert state["classes"] == json.loads((cache / "cache" / "meta.json").read_text())["settings"]["classes"]
    assert len(state["classes"]) == 8 and "red_circle_left" in state["classes"]
