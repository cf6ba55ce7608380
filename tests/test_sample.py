"""sample.py end to end on tiny random checkpoints made here: class- and text-to-video, reconstruction
per token budget, an 81-frame video through a 4x VAE (21 latent frames), chunk-by-chunk decoding
conditioned on the overlap frame, reproducibility, and refusal of bad input with nothing left behind."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from ar import ARConfig, ARModel
from checkpoint import DEMO_ASSETS
from chunks import Chunks, decode_long, decode_pieces, tokenize_long, tokenize_stream
from tokenizer import TokenizerConfig, VideoFlexTok
from vae import PixelVAE, VidTokVAE
from video import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (8, 5, 5, 5)  # a 1000-code FSQ keeps the AR embedding and head small
FAST = ["--steps", "2", "--guidance", "1", "--num-samples", "1"]


def save_tokenizer(path, **overrides):
    cfg = TokenizerConfig.preset("tiny", latent_size=16, max_frames=5, registers=8, repa_dim=0, fsq_levels=LEVELS,
                                 **overrides)
    torch.save({"config": dataclasses.asdict(cfg), "model": VideoFlexTok(cfg).state_dict(), "ema": None}, path)
    return path


def save_ar(path, tok_ckpt, **overrides):
    cfg = ARConfig.preset("tiny", **{"vocab": 1000, "max_frames": 5, "tokens_per_frame": 8, **overrides})
    torch.save({"config": dataclasses.asdict(cfg), "model": ARModel(cfg).state_dict(), "ema": None,
                "tok_ckpt": str(tok_ckpt)}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Pixel tokenizer (5 latent frames per chunk), a class AR model in a train_ar.py run directory
    (class names in its cache's meta.json), a text AR model, and a short input video."""
    root = tmp_path_factory.mktemp("sample")
    tok = save_tokenizer(root / "tok.pt")
    (root / "run").mkdir()
    save_ar(root / "run" / "ckpt.pt", tok, num_classes=3)
    (root / "cache").mkdir()
    (root / "cache" / "meta.json").write_text(json.dumps({"settings": {"classes": ["cat", "dog", "fish"]}}))
    (root / "run" / "config.json").write_text(json.dumps({"cache": str(root / "cache")}))
    save_ar(root / "text.pt", tok, num_classes=0, text="bytes")
    frames = np.random.default_rng(0).integers(0, 256, (12, 24, 20, 3), dtype=np.uint8)
    write_video(root / "input.mp4", frames, fps=4)
    return root


def frames_of(path):
    return read_video(path)[0]


def test_class_to_video_writes_videos_sheet_and_is_reproducible(ckpts, tmp_path, capsys):
    args = ["--ar-ckpt", str(ckpts / "run" / "ckpt.pt"), "--class", "dog", "--class", "0", *FAST, "--seed", "3",
            "--frames", "17"]
    first = sample.main([*args, "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    second = sample.main([*args, "--out", str(tmp_path / "b")])
    videos = sorted(p.name for p in first if p.suffix == ".mp4")
    assert videos == ["sample-00-dog.mp4", "sample-01-cat.mp4"]
    assert (tmp_path / "a" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "a" / "samples.png") in out and "17 frames at 16x16" in out
    for a, b in zip(first, second):
        if a.suffix == ".mp4":
            fa, fb = frames_of(a), frames_of(b)
            assert fa.shape == (17, 16, 16, 3) and np.array_equal(fa, fb)
    # 17 frames with 5-frame chunks: 1 + 4 * 4 latent frames, k = min(32, K) = 8 tokens each.
    assert torch.load(tmp_path / "a" / "tokens.pt").shape == (2, 17, 8)
    assert not list((tmp_path / "a").glob(".sample-*"))


def test_text_to_video_with_apg_guidance_and_size(ckpts, tmp_path):
    written = sample.main(["--ar-ckpt", str(ckpts / "text.pt"), "--prompt", "a red circle", "--prompt", "blue",
                           "--num-samples", "2", "--steps", "2", "--guidance", "3", "--tokens-per-frame", "3",
                           "--frames", "9", "--size", "8", "--top-k", "50", "--top-p", "0.9",
                           "--out", str(tmp_path)])
    videos = [p for p in written if p.suffix == ".mp4"]
    assert len(videos) == 4 and all(frames_of(p).shape == (9, 8, 8, 3) for p in videos)
    assert torch.load(tmp_path / "tokens.pt").shape == (4, 9, 3)


def test_reconstruct_decodes_every_budget_with_psnr(ckpts, tmp_path, capsys):
    written = sample.main(["--tok-ckpt", str(ckpts / "tok.pt"), "--reconstruct", str(ckpts / "input.mp4"),
                           "--frames", "9", "--steps", "2", "--guidance", "1", "--out", str(tmp_path)])
    names = sorted(p.name for p in written)
    assert names == ["input.mp4", "psnr.json", "recon-k001.mp4", "recon-k002.mp4", "recon-k004.mp4", "recon-k008.mp4",
                     "reconstruct.png", "tokens.pt"]
    assert all(frames_of(tmp_path / n).shape == (9, 16, 16, 3) for n in names if n.endswith(".mp4"))
    results = json.loads((tmp_path / "psnr.json").read_text())
    assert list(results) == ["1", "2", "4", "8"] and all(np.isfinite(v) for v in results.values())
    assert "PSNR" in capsys.readouterr().out


def tiny_vidtok():
    torch.manual_seed(0)
    return VidTokVAE("v1.0", ch=8).eval()


def vidtok_tokenizer():
    """A 16-channel tokenizer for 32 px through the 4x8x8 VAE: 5 latent frames = 17-frame chunks."""
    cfg = TokenizerConfig.preset("tiny", latent_channels=16, latent_size=4, patch_size=1, max_frames=5, registers=8,
                                 repa_dim=0, fsq_levels=LEVELS)
    return VideoFlexTok(cfg).eval()


def test_81_frames_through_a_4x_vae_are_21_latent_frames(tmp_path, monkeypatch):
    tok = vidtok_tokenizer()
    torch.save({"config": dataclasses.asdict(tok.cfg), "model": tok.state_dict(), "ema": None}, tmp_path / "tok.pt")
    save_ar(tmp_path / "ar.pt", tmp_path / "tok.pt", num_classes=2)
    # load_vae builds the full-width VidTok; the test swaps in a narrow one with random weights.
    monkeypatch.setattr(sample, "load_vae", lambda *a, **k: tiny_vidtok())
    written = sample.main(["--ar-ckpt", str(tmp_path / "ar.pt"), "--class", "1", "--frames", "81",
                           "--tokens-per-frame", "2", *FAST, "--vae", "vidtok", "--out", str(tmp_path / "out")])
    video = next(p for p in written if p.suffix == ".mp4")
    assert frames_of(video).shape == (81, 32, 32, 3)
    assert torch.load(tmp_path / "out" / "tokens.pt").shape == (1, 21, 2)  # 1 + 80 / 4 latent frames x k


def test_tokenize_long_drops_each_later_chunks_overlap_latent():
    tok, vae = vidtok_tokenizer(), tiny_vidtok()
    video = torch.rand(1, 3, 33, 32, 32) * 2 - 1
    chunks = Chunks(tok.cfg.max_frames, vae.temporal_factor)
    ids = tokenize_long(tok, vae, video, chunks)
    assert (chunks.frames, chunks.stride) == (17, 16) and ids.shape == (1, 9, 8)
    assert torch.equal(ids[:, :5], tok.tokenize(video[:, :, :17], vae))
    assert torch.equal(ids[:, 5:], tok.tokenize(video[:, :, 16:], vae)[:, 1:])


def uneven(frames, sizes=(3, 1, 7, 10, 2)):
    """Group sizes that add up to `frames`, cycling through `sizes`."""
    out = []
    while sum(out) < frames:
        out.append(min(sizes[len(out) % len(sizes)], frames - sum(out)))
    return out


@pytest.mark.parametrize("rule", [["--target-psnr", "1000"], ["--target-psnr", "1"], ["--mean-tokens", "3"]],
                         ids=["unreachable", "easy", "mean"])
def test_reconstruct_with_adaptive_budgets_per_chunk(ckpts, tmp_path, capsys, rule):
    sample.main(["--tok-ckpt", str(ckpts / "tok.pt"), "--reconstruct", str(ckpts / "input.mp4"), "--frames", "9",
                 "--steps", "2", "--guidance", "1", *rule, "--out", str(tmp_path)])
    adaptive = json.loads((tmp_path / "psnr.json").read_text())["adaptive"]
    saved = torch.load(tmp_path / "tokens.pt", weights_only=True)
    assert saved["ids"].shape == (1, 9, 8) and saved["tokens_per_frame"].tolist() == adaptive["tokens_per_frame"]
    per_chunk = adaptive["tokens_per_frame"]                        # 9 frames in 5-frame chunks: two chunks
    assert len(per_chunk) == 2 and frames_of(tmp_path / "recon-adaptive.mp4").shape == (9, 16, 16, 3)
    printed = capsys.readouterr().out
    if rule[1] == "1000":   # no budget reaches it: the result says so and uses K
        assert per_chunk == [8, 8] and "no budget reaches 1000.0 dB" in printed
    elif rule[1] == "1":
        assert per_chunk == [1, 1]
    else:
        assert sum(per_chunk) <= 6 and all(k in (1, 2, 4, 8) for k in per_chunk)


@pytest.mark.parametrize("frames", [17, 81])
@pytest.mark.parametrize("kind", ["vidtok", "pixel"])
def test_streaming_tokenization_gives_the_ids_of_batch_tokenization(kind, frames):
    if kind == "vidtok":
        tok, vae, size = vidtok_tokenizer(), tiny_vidtok(), 32
    else:   # 5-frame chunks on pixels: 17 and 81 frames are 4 and 20 chunks
        cfg = TokenizerConfig.preset("tiny", latent_size=8, max_frames=5, registers=8, repa_dim=0, fsq_levels=LEVELS)
        tok, vae, size = VideoFlexTok(cfg).eval(), PixelVAE(), 8
    torch.manual_seed(1)
    with torch.no_grad():   # random weights everywhere: the zero-initialised head would give one id only
        for p in tok.parameters():
            p.normal_(0, 0.2)
    video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    chunks = Chunks(tok.cfg.max_frames, vae.temporal_factor)
    batch = tokenize_long(tok, vae, video, chunks)
    assert batch.unique().numel() > 20
    for sizes in ([1] * frames, uneven(frames)):
        edges = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        groups = (video[:, :, a:b] for a, b in zip(edges[:-1], edges[1:]))
        streamed = list(tokenize_stream(tok, vae, groups, chunks))
        assert all(ids.shape == (1, 1, 8) for ids in streamed)
        assert torch.equal(torch.cat(streamed, 1), batch)


def test_a_stream_that_ends_inside_a_latent_frame_keeps_what_it_yielded():
    tok, vae = vidtok_tokenizer(), tiny_vidtok()
    chunks = Chunks(tok.cfg.max_frames, vae.temporal_factor)
    stream = tokenize_stream(tok, vae, iter([torch.zeros(1, 3, 7, 32, 32)]), chunks)
    assert next(stream).shape == (1, 1, 8) and next(stream).shape == (1, 1, 8)   # frames 0 and 1-4
    with pytest.raises(ValueError, match="ended 2 frames into a latent frame"):
        next(stream)


def test_chunked_decoding_is_conditioned_on_the_last_decoded_frame(monkeypatch):
    cfg = TokenizerConfig.preset("tiny", latent_size=16, max_frames=5, registers=8, repa_dim=0, fsq_levels=LEVELS)
    tok, vae = VideoFlexTok(cfg).eval(), PixelVAE()
    calls, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: calls.append((ids, kw)) or decode(ids, **kw))
    ids = torch.randint(0, 1000, (2, 9, 3))
    chunks = Chunks(5, 1)
    video = decode_long(tok, vae, ids, chunks, steps=2, generator=torch.Generator().manual_seed(0))
    assert video.shape == (2, 3, 9, 16, 16) and len(calls) == 2
    (first, kw1), (second, kw2) = calls
    assert torch.equal(first, ids[:, :5]) and kw1.get("prefix_latents") is None
    # Chunk 2: the re-encoded overlap frame (video frame 4, the last of chunk 1, unclamped as the official
    # wrapper has it) is its clean prefix and its tokens come first, then the new latent frames 5..8.
    prefix = kw2["prefix_latents"]
    assert video[:, :, 4].abs().max() > 1   # random weights overshoot, so a clamp would show
    assert torch.equal(prefix, video[:, :, 4:5])
    assert torch.equal(second[:, :1], tok.encode(prefix)[..., :3]) and torch.equal(second[:, 1:], ids[:, 5:])


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_progressive_chunked_decoding_gives_the_same_video_frame_by_frame(guidance):
    cfg = TokenizerConfig.preset("tiny", latent_size=16, max_frames=5, registers=8, repa_dim=0, fsq_levels=LEVELS)
    tok, vae = VideoFlexTok(cfg).eval(), PixelVAE()
    ids, chunks = torch.randint(0, 1000, (2, 9, 3)), Chunks(5, 1)
    kw = dict(steps=2, guidance=guidance)
    joint = decode_long(tok, vae, ids, chunks, generator=torch.Generator().manual_seed(0), **kw)
    pieces = list(decode_pieces(tok, vae, ids, chunks, progressive=True,
                                       generator=torch.Generator().manual_seed(0), **kw))
    assert [p.shape[2] for p in pieces] == [1] * 9                 # one frame at a time, over both chunks
    assert (torch.cat(pieces, 2) - joint).abs().max() <= 1e-5 * joint.abs().max().clamp_min(1)


@pytest.mark.skipif(not (DEMO_ASSETS / "tok.pt").is_file(), reason="no bundled demo models")
def test_progressive_sampling_writes_every_frame_as_it_is_decoded(tmp_path, capsys):
    out = tmp_path / "s"
    sample.main(["--class", "red_circle_left", "--tokens-per-frame", "2", "--steps", "3", "--progressive",
                 "--out", str(out)])
    frames = sorted((out / "frames" / "sample-00-red_circle_left").glob("frame-*.png"))
    assert [f.name for f in frames] == [f"frame-{t:04d}.png" for t in range(5)]
    assert (out / "sample-00-red_circle_left.mp4").is_file()
    assert capsys.readouterr().out.count("decoded and written after") == 5
    with pytest.raises(SystemExit, match="--progressive is for --prompt / --class"):
        sample.main(["--reconstruct", "x.mp4", "--progressive", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="cannot use APG.*--no-apg"):
        sample.main(["--class", "red_circle_left", "--guidance", "3", "--progressive", "--out", str(tmp_path / "g")])


@pytest.mark.parametrize("extra, message", [
    (["--class", "bird"], r"unknown class 'bird'.*0: cat, 1: dog, 2: fish"),
    (["--prompt", "a cat"], "class-conditional"),
    (["--class", "cat", "--tokens-per-frame", "9"], r"--tokens-per-frame must be in \[1, 8\]"),
    (["--class", "cat", "--tokens-per-frame", "0"], r"--tokens-per-frame must be in \[1, 8\]"),
    (["--class", "cat", "--frames", "18"], r"--frames must be 1 \+ 4n"),
    (["--class", "cat", "--vae", "vidtok"], "needs its checkpoint"),
])
def test_bad_sampling_requests_are_refused_before_writing(ckpts, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        sample.main(["--ar-ckpt", str(ckpts / "run" / "ckpt.pt"), *FAST, *extra, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_files_and_outputs_are_refused(ckpts, tmp_path):
    def refused(message, *args):
        with pytest.raises(SystemExit, match=message):
            sample.main([*FAST, *args])

    out = ["--out", str(tmp_path / "out")]
    refused("checkpoint not found", "--ar-ckpt", str(tmp_path / "missing.pt"), *out)
    save_ar(tmp_path / "other.pt", ckpts / "tok.pt", vocab=999)
    refused("do not belong together", "--ar-ckpt", str(tmp_path / "other.pt"), "--class", "0", *out)
    torch.save({"weights": {}}, tmp_path / "junk.pt")
    refused("not a train_ar.py checkpoint", "--ar-ckpt", str(tmp_path / "junk.pt"), *out)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    refused("cannot read --reconstruct", "--tok-ckpt", str(ckpts / "tok.pt"), "--reconstruct",
            str(tmp_path / "broken.mp4"), *out)
    refused("too short", "--tok-ckpt", str(ckpts / "tok.pt"), "--reconstruct", str(ckpts / "input.mp4"),
            "--frames", "17", *out)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    refused("cannot write to --out", "--ar-ckpt", str(ckpts / "run" / "ckpt.pt"), "--class", "0",
            "--out", str(tmp_path / "file" / "sub"))


def test_command_line_exits_non_zero_with_a_message(ckpts, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ar-ckpt", str(ckpts / "text.pt"),
                             "--class", "cat", "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no class conditioning: use --prompt" in result.stderr
    assert not (tmp_path / "out").exists()
