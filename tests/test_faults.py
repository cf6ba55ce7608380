"""Fault injection: what training, loading and sampling do with a diverging run, bad arguments, a run
directory that already holds a run, broken or hostile checkpoint files and a failing disk. Every fault
must end in a one-line message and a non-zero exit, and lose nothing that was written before it."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import eval as eval_cli
import sample
import train_ar
import train_tok
import trainer
from ar import load_ar
from checkpoint import read_safetensors_header, torch_load
from synthetic import make_synthetic
from tokenizer import VideoFlexTok

ROOT = Path(__file__).resolve().parents[1]
CLIP = ["--frames", "5", "--fps", "4", "--size", "16"]
FAST = [*CLIP, "--preset", "tiny", "--batch-size", "2", "--num-workers", "0", "--log-every", "1", "--val-clips", "1",
        "--val-steps", "2", "--warmup", "2", "--lr", "1e-3", "--val-every", "100"]
AR_FAST = ["--batch-size", "2", "--num-workers", "0", "--log-every", "1", "--warmup", "2", "--lr", "1e-3",
           "--sample-every", "0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """8 synthetic videos, a tiny tokenizer trained for 2 steps, its token cache, an AR model of 2 steps."""
    root = tmp_path_factory.mktemp("faults")
    make_synthetic(root / "videos", num=8, seed=0, size=32, frames=24)
    train_tok.main(["--data", str(root / "videos"), "--run-dir", str(root / "tok"), *FAST, "--steps", "2",
                    "--ckpt-every", "2"])
    train_ar.main(["--tokenize", "--tok-ckpt", str(root / "tok" / "ckpt-0000002.pt"), "--data", str(root / "videos"),
                   *CLIP, "--cache", str(root / "cache"), "--num-workers", "0"])
    train_ar.main(["--cache", str(root / "cache"), "--run-dir", str(root / "ar"), *AR_FAST, "--steps", "2"])
    return root


def tok(work, run_dir, *extra):
    train_tok.main(["--data", str(work / "videos"), "--run-dir", str(run_dir), *FAST, *extra])


def finite(path):
    state = torch.load(path, weights_only=True)
    return all(torch.isfinite(v).all() for part in ("model", "ema") if state[part] for v in state[part].values()
               if v.is_floating_point())


def strict_json(line):
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in log.jsonl is not JSON"))


# ------------------------------------------------------------------------------------------------
# A run that diverges

def test_exploding_learning_rate_stops_with_a_message_and_only_finite_checkpoints(work, tmp_path):
    with pytest.raises(SystemExit, match="non-finite loss or gradient.*learning rate is likely too high"):
        tok(work, tmp_path, "--lr", "10", "--steps", "30", "--ckpt-every", "1")
    ckpts = sorted(tmp_path.glob("ckpt-*.pt"))
    assert ckpts and len(ckpts) < 30 and all(finite(p) for p in ckpts)
    records = [strict_json(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("loss", 0) is None for r in records)   # the NaN steps are logged as null
    VideoFlexTok.from_checkpoint(ckpts[-1])                  # and the last checkpoint is usable


def test_loaders_refuse_non_finite_weights(work, tmp_path):
    for name, ckpt, load in (("tok", work / "tok" / "ckpt-0000002.pt", VideoFlexTok.from_checkpoint),
                             ("ar", work / "ar" / "ckpt-0000002.pt", lambda p: load_ar(p, "cpu"))):
        state = torch.load(ckpt, weights_only=True)
        part = "ema" if state.get("ema") else "model"
        key = next(k for k, v in state[part].items() if v.is_floating_point())
        state[part][key] = torch.full_like(state[part][key], float("nan"))
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match="non-finite weights"):
            load(tmp_path / f"{name}.pt")


# ------------------------------------------------------------------------------------------------
# Run directories and resuming

def test_a_fresh_run_does_not_overwrite_an_existing_one(work, tmp_path):
    tok(work, tmp_path, "--steps", "2", "--ckpt-every", "2")
    before = (tmp_path / "ckpt-0000002.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        tok(work, tmp_path, "--steps", "2", "--ckpt-every", "2", "--seed", "1")
    assert (tmp_path / "ckpt-0000002.pt").read_bytes() == before
    (tmp_path / "ckpt-0000004.tmp").write_bytes(b"left by a kill")
    tok(work, tmp_path, "--steps", "1", "--ckpt-every", "1", "--overwrite")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000001.pt"]   # old run and .tmp gone
    assert [r["step"] for r in map(strict_json, (tmp_path / "log.jsonl").read_text().splitlines())
            if "loss" in r] == [1]


@pytest.mark.parametrize("damage", ["truncated", "empty", "non-finite"])
def test_resume_falls_back_to_the_newest_usable_checkpoint(work, tmp_path, damage, capsys):
    tok(work, tmp_path, "--steps", "4", "--ckpt-every", "2")
    newest = tmp_path / "ckpt-0000004.pt"
    if damage == "non-finite":
        state = torch.load(newest, weights_only=True)
        state["model"] = {k: v * float("inf") if v.is_floating_point() else v for k, v in state["model"].items()}
        torch.save(state, newest)
    else:
        newest.write_bytes(newest.read_bytes()[:1000] if damage == "truncated" else b"")
    tok(work, tmp_path, "--steps", "4", "--ckpt-every", "2", "--resume")
    out = capsys.readouterr().out
    assert "skipping" in out and "ckpt-0000004.pt" in out and "resumed from" in out and "ckpt-0000002.pt" in out
    assert finite(newest) and torch.load(newest, weights_only=True)["step"] == 4


def test_a_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(work, tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left on device.*disk full.*intact"):
        tok(work, tmp_path, "--steps", "4", "--ckpt-every", "2")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000002.pt"] and finite(tmp_path / "ckpt-0000002.pt")


# ------------------------------------------------------------------------------------------------
# Arguments and data

BAD_TRAINING_ARGS = [
    (["--grad-clip", "-1"], "--grad-clip must be > 0"), (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--log-every", "0"], "--log-every must be >= 1"), (["--ckpt-every", "0"], "--ckpt-every must be >= 1"),
    (["--val-every", "0"], "--val-every must be >= 1"), (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0; got nan"), (["--val-clips", "0"], "--val-clips must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"), (["--ema", "1"], r"--ema must be in \[0, 1\)"),
    (["--batch-size", "100"], "--batch-size 100 needs at least 100 training clips; the data has 7"),
    (["--device", "cuda"], "no usable CUDA"),
]


@pytest.mark.parametrize("args,message", BAD_TRAINING_ARGS, ids=[" ".join(a) for a, _ in BAD_TRAINING_ARGS])
def test_bad_training_arguments_are_refused_before_anything_is_written(work, tmp_path, args, message):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=message):
        tok(work, tmp_path / "run", "--steps", "2", *args)
    assert not list((tmp_path / "run").glob("ckpt-*")) and not (tmp_path / "run" / "log.jsonl").exists()


def test_ar_batch_larger_than_the_cache_is_refused(work, tmp_path):
    with pytest.raises(SystemExit, match="--batch-size 64 needs at least 64 token sequences; the cache|data has 8"):
        train_ar.main(["--cache", str(work / "cache"), "--run-dir", str(tmp_path), *AR_FAST, "--batch-size", "64"])


BAD_SAMPLE_ARGS = [
    (["--size", "0"], "--size must be >= 1"), (["--fps", "0"], "--fps must be > 0"),
    (["--guidance", "nan"], "--guidance must be >= 0; got nan"), (["--temperature", "nan"], "--temperature must be > 0"),
    (["--top-p", "2"], r"--top-p must be in \(0, 1\]"), (["--steps", "0"], "--steps must be >= 1"),
]


@pytest.mark.parametrize("args,message", BAD_SAMPLE_ARGS, ids=[" ".join(a) for a, _ in BAD_SAMPLE_ARGS])
def test_bad_sampling_arguments_are_refused_before_sampling(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        sample.main(["--prompt", "a red circle moving left", "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


BAD_OTHER_ARGS = [
    (eval_cli.main, ["recon", "--tok-ckpt", "x.pt", "--steps", "0"], "--steps must be >= 1"),
    (eval_cli.main, ["probe", "--tok-ckpt", "x.pt", "--heldout", "h", "--fps", "nan"], "--fps must be > 0; got nan"),
    (eval_cli.main, ["gfvd", "--real", "a", "--fake", "b", "--num", "0"], "--num must be >= 1"),
    (demo.main, ["train-vae", "--data", "d", "--out", "v.pt", "--lr", "inf"], "--lr must be > 0; got inf"),
    (demo.main, ["train-vae", "--data", "d", "--out", "v.pt", "--size", "30"], "--size must be a positive multiple of 4"),
]


@pytest.mark.parametrize("cli,args,message", BAD_OTHER_ARGS, ids=[" ".join(a) for _, a, _ in BAD_OTHER_ARGS])
def test_bad_evaluation_and_vae_arguments_are_refused(cli, args, message):
    with pytest.raises(SystemExit, match=message):
        cli(args)


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_missing_or_empty_data_folder_is_named(tmp_path, folder):
    data = tmp_path / "data"
    if folder == "empty":
        data.mkdir()
    with pytest.raises(SystemExit, match=str(data)):
        train_tok.main(["--data", str(data), "--run-dir", str(tmp_path / "run"), *FAST, "--steps", "1"])


# ------------------------------------------------------------------------------------------------
# Hostile and mistaken files

def test_a_config_bomb_is_refused_before_allocating(work, tmp_path):
    """A 1 KB-scale config asking for 400 blocks of width 16384, checked in a process capped at 3 GB."""
    state = torch.load(work / "tok" / "ckpt-0000002.pt", weights_only=True)
    state["config"] |= {"enc_depth": 200, "dec_depth": 200, "enc_dim": 16384, "dec_dim": 16384}
    torch.save(state, tmp_path / "bomb.pt")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from tokenizer import VideoFlexTok\n"
            "try:\n    VideoFlexTok.from_checkpoint(sys.argv[1])\nexcept ValueError as err:\n    print(err)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.pt")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "does not match" in out.stdout and "shape mismatches" in out.stdout


def test_wrong_and_broken_files_get_one_line_messages(work, tmp_path):
    ar_ckpt, tok_ckpt = work / "ar" / "ckpt-0000002.pt", work / "tok" / "ckpt-0000002.pt"
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(tok_ckpt.read_bytes()[:2000])
    for path in ("empty.pt", "cut.pt"):
        with pytest.raises(SystemExit, match="not a readable PyTorch checkpoint.*truncated"):
            sample.main(["--reconstruct", str(tmp_path / "x.mp4"), "--tok-ckpt", str(tmp_path / path)])
    with pytest.raises(SystemExit, match="not a tokenizer config.*an AR checkpoint"):
        sample.main(["--class", "0", "--ar-ckpt", str(ar_ckpt), "--tok-ckpt", str(ar_ckpt)])
    with pytest.raises(SystemExit, match="not a tokenizer config"):
        tok(work, tmp_path / "stage2", "--stage", "2", "--init", str(ar_ckpt), "--steps", "1")
    with pytest.raises(SystemExit, match="not a tokenizer config"):
        train_ar.main(["--tokenize", "--tok-ckpt", str(ar_ckpt), "--data", str(work / "videos"), *CLIP,
                       "--cache", str(tmp_path / "cache"), "--num-workers", "0"])
    # A safetensors file where a train_ar.py checkpoint belongs, and a header nested 100000 deep.
    header = b'{"__metadata__": {}}'
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(SystemExit, match="not a (readable PyTorch|train_ar.py) checkpoint"):
        sample.main(["--class", "0", "--ar-ckpt", str(tmp_path / "model.safetensors"), "--tok-ckpt", str(tok_ckpt)])
    nested = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "deep.safetensors").write_bytes(len(nested).to_bytes(8, "little") + nested)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_safetensors_header(tmp_path / "deep.safetensors")


def test_cli_failures_exit_non_zero_without_a_traceback(work, tmp_path):
    runs = [["train_tok.py", "--data", str(work / "videos"), "--run-dir", str(tmp_path / "run"), *FAST, "--lr", "-1"],
            ["sample.py", "--class", "0", "--ar-ckpt", str(work / "ar" / "ckpt-0000002.pt"),
             "--tok-ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]]
    for argv in runs:
        out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "error" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_an_ar_checkpoint_finds_its_tokenizer_from_another_directory(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the AR checkpoint stores where its tokenizer was, as an absolute path
    state = torch_load(work / "ar" / "ckpt-0000002.pt")
    assert Path(state["tok_ckpt"]).is_absolute() and Path(state["tok_ckpt"]).is_file()
    written = sample.main(["--class", "0", "--ar-ckpt", str(work / "ar" / "ckpt-0000002.pt"), "--steps", "2",
                           "--out", str(tmp_path / "out"), "--no-apg"])
    assert written and all(math.isfinite(p.stat().st_size) for p in written)
