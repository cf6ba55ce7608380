"""Tests for video.py and data.py: clip sampling (fps resampling, train/eval starts), bad files, the index cache,
captions and labels, and synthetic.py's generator. Videos are tiny (32-64 px) and written on the fly with `write_video`."""

import json
import logging
import os
import struct
import zlib

import av
import numpy as np
import pytest
import torch

import data
from data import VideoFolder
from synthetic import SYNTHETIC_CLASSES, make_synthetic, render_scene, render_shapes, synthetic_data, synthetic_scene
from synthetic import main as synthetic_main
from video import BadVideo, _pick_nearest, _SeekMissed, load_clip, probe, read_video, write_png_grid, write_video


def numbered(count, size=32, width=None):
    """Grey frames whose brightness encodes their index: frame i has value 8 * i + 4, for up to 32 frames."""
    width = width or size
    return np.broadcast_to((8 * np.arange(count) + 4).astype(np.uint8)[:, None, None, None],
                           (count, size, width, 3)).copy()


def indices(clip):
    """Frame indices back from `numbered` brightness (lossy coding moves values by a few levels only)."""
    return [int(round((float(np.asarray(f, dtype=np.float64).mean()) - 4) / 8)) for f in clip]


def item_indices(video):
    """`indices` of a dataset item's video (3, T, H, W) in [-1, 1]."""
    return indices(((video + 1) * 127.5).permute(1, 2, 3, 0).numpy())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "a"
    return make_synthetic(root, num=12, seed=3, size=32, frames=24, fps=4.0)


def test_write_read_roundtrip(tmp_path):
    frames = numbered(10)
    path = write_video(tmp_path / "v.mp4", frames, fps=5)
    back, fps = read_video(path)
    assert back.shape == frames.shape and fps == 5
    assert indices(back) == list(range(10))
    meta = probe(path)
    assert meta["frames"] == 10 and meta["fps"] == 5 and (meta["width"], meta["height"]) == (32, 32)
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.mp4", numbered(3, size=31), fps=5)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", frames.astype(np.float32), fps=5)


def test_fps_resampling_picks_nearest_frames(tmp_path):
    path = write_video(tmp_path / "v8.mp4", numbered(30), fps=8)
    assert indices(load_clip(path, 0.0, 8, 4.0, 32)) == [0, 2, 4, 6, 8, 10, 12, 14]   # every 2nd frame
    assert indices(load_clip(path, 0.0, 6, 8.0, 32)) == [0, 1, 2, 3, 4, 5]
    assert indices(load_clip(path, 1.0, 4, 4.0, 32)) == [8, 10, 12, 14]               # after a seek
    assert indices(load_clip(path, 0.0, 5, 3.0, 32)) == [0, 3, 5, 8, 11]              # 8/3 frames apart: nearest
    # A video slower than the clip rate repeats frames; a tie (0.25 s between frames 0 and 1) takes the earlier.
    slow = write_video(tmp_path / "v2.mp4", numbered(10), fps=2)
    assert indices(load_clip(slow, 0.0, 8, 4.0, 32)) == [0, 0, 1, 1, 2, 2, 3, 3]


class FakeFrame:
    def __init__(self, time):
        self.time = time

    def to_ndarray(self, format):
        return np.full((2, 2, 3), round(self.time * 8), np.uint8)


def test_nearest_selection_and_seek_overshoot():
    frames = [FakeFrame(k / 8) for k in range(8, 40)]        # what a seek that landed at 1.0 s would decode
    clip = _pick_nearest(iter(frames), np.array([1.5, 1.75, 2.0]), 8.0, 4.0, None, seeked=True)
    assert clip[:, 0, 0, 0].tolist() == [12, 14, 16]
    with pytest.raises(_SeekMissed):                    # landed after the start: load_clip starts over
        _pick_nearest(iter(frames), np.array([0.5, 0.75]), 8.0, 4.0, None, seeked=True)
    with pytest.raises(BadVideo, match="video ends at 4.88 s"):   # decoding stopped well before the clip end
        _pick_nearest(iter(frames), np.array([4.5, 5.5]), 8.0, 4.0, None, seeked=False)


def test_resize_short_side_and_centre_crop(tmp_path):
    # Portrait, 32 wide x 64 high: dark top and bottom quarters, bright middle. The short side goes to 16 (64 -> 32
    # rows) and the centre 16x16 crop keeps rows 8..23 of 32, the bright middle only.
    frames = np.full((4, 64, 32, 3), 200, np.uint8)
    frames[:, :16] = 20
    frames[:, 48:] = 20
    path = write_video(tmp_path / "p.mp4", frames, fps=4)
    clip = load_clip(path, 0.0, 2, 4.0, 16)
    assert clip.shape == (2, 16, 16, 3)
    assert clip.min() > 180


def test_videofolder_labels_captions_shapes(synthetic):
    ds = VideoFolder(synthetic, frames=5, fps=2.0, size=32, train=False)
    assert len(ds) == 12 and not ds.skipped
    assert len(ds.classes) == 12 and ds.classes == sorted(ds.classes)   # 12 videos -> the first 12 of 48 classes
    for i in range(len(ds)):
        video, label, caption = ds[i]
        assert video.shape == (3, 5, 32, 32) and video.dtype == torch.float32
        assert -1 <= video.min() and video.max() <= 1 and video.std() > 0.05
        color, shape, motion = ds.classes[label].split("_")
        assert ds.files[i].parent.name == ds.classes[label]
        assert caption == f"a {color} {shape} moving {motion}"
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 5, 32, 32) and batch[1].dtype == torch.long and len(batch[2]) == 4


def test_synthetic_generator(tmp_path, synthetic):
    again = make_synthetic(tmp_path / "b", num=12, seed=3, size=32, frames=24, fps=4.0)
    other = make_synthetic(tmp_path / "c", num=2, seed=4, size=32, frames=24, fps=4.0)
    lines = [json.loads(x) for x in (synthetic / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and lines == [json.loads(x) for x in (again / "captions.jsonl").read_text().splitlines()]
    for item in lines:
        a, fps = read_video(synthetic / item["path"])
        b, _ = read_video(again / item["path"])
        assert a.shape == (24, 32, 32, 3) and fps == 4 and np.array_equal(a, b)   # same seed: same frames
    first = lines[0]["path"]
    assert first == "red_circle_left/red_circle_left_00000.mp4" and lines[0]["caption"] == "a red circle moving left"
    assert not np.array_equal(read_video(synthetic / first)[0], read_video(other / first)[0])
    assert len(SYNTHETIC_CLASSES) == 48


def test_synthetic_content():
    """Background never a shape colour (low saturation); the shape has its colour and moves the right way."""
    rng = np.random.default_rng(0)
    for motion, axis, sign in (("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)):
        video = render_shapes("blue", "triangle", motion, rng, size=64, frames=40, fps=8.0).astype(int)
        saturation = video.max(-1) - video.min(-1)
        shape = saturation > 100                       # shape colours differ by >= 150 between channels
        near = shape.copy()                            # the shape and its anti-aliased 1-pixel rim
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
            near |= np.roll(shape, (dy, dx), axis=(1, 2))
        assert (saturation[~near] < 60).all()         # background: grey with a small tint
        assert (video[shape][:, 2] > video[shape][:, 0]).all()     # blue dominates
        centres = [np.argwhere(m).mean(0)[axis] for m in shape[[0, -1]]]
        assert sign * (centres[1] - centres[0]) > 10  # moved at least 10 px in the right direction


def test_a_scene_renders_as_render_shapes_draws_it():
    """synthetic_scene holds every random choice: render_scene draws exactly what render_shapes draws from the same
    generator state, and the centres follow the motion."""
    scene = synthetic_scene("yellow", "triangle", "down", np.random.default_rng(3), size=32, frames=5, fps=4.0)
    x, y = np.asarray(scene["centres"]).T
    assert (np.diff(y) > 0).all() and (np.diff(x) == 0).all()     # moving down in the image
    again = render_shapes("yellow", "triangle", "down", np.random.default_rng(3), size=32, frames=5, fps=4.0)
    assert np.array_equal(render_scene(scene), again)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = root / "good.mp4"
    write_video(good, numbered(24), fps=8)
    (root / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is not a video\n")
    write_video(root / "three.mp4", numbered(3), fps=8)
    write_video(root / "portrait.mp4", numbered(24, size=48, width=32), fps=8)
    return root


def test_bad_files_are_skipped_and_counted(bad_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="videoflextok.data"):
        ds = VideoFolder(bad_folder, frames=5, fps=4.0, size=16, index=False)
    assert sorted(p.name for p in ds.files) == ["good.mp4", "portrait.mp4"]
    skipped = {os.path.basename(p): why for p, why in ds.skipped}
    assert sorted(skipped) == ["empty.mp4", "notes.mp4", "three.mp4", "truncated.mp4"]
    assert "too short" in skipped["three.mp4"] and "0 bytes" in skipped["empty.mp4"]
    assert "unreadable" in skipped["notes.mp4"] and "unreadable" in skipped["truncated.mp4"]
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping ") for m in lines) == 4 and all("\n" not in m for m in lines)
    assert any("skipped 4" in m for m in lines)
    assert ds.classes == [] and all(ds[i][1] == -1 and ds[i][2] == "" for i in range(len(ds)))
    portrait = ds[[p.name for p in ds.files].index("portrait.mp4")][0]
    assert portrait.shape == (3, 5, 16, 16)


def test_no_usable_video_is_a_clear_error(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mkv").write_text("nope")
    write_video(tmp_path / "strip.mp4", numbered(24, size=16, width=80), fps=8)   # 5:1, beyond MAX_ASPECT
    with pytest.raises(ValueError, match="no usable video .* 3 files .* 3 skipped") as info:
        VideoFolder(tmp_path, frames=5, index=False)
    assert "empty.mp4: empty file" in str(info.value) and "strip.mp4: odd size 80x16" in str(info.value)
    with pytest.raises(ValueError, match="not a folder"):
        VideoFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="frames must be"):
        VideoFolder(tmp_path, frames=0)


def test_clip_failing_at_read_time_is_replaced(tmp_path, caplog):
    # An mp4 with its index first ("faststart") and its second half cut off: the metadata probes fine, with all
    # 24 frames, and only decoding finds out.
    write_video(tmp_path / "a.mp4", numbered(24), fps=8)
    with av.open(str(tmp_path / "whole.mp4"), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in numbered(24):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    whole = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "b.mp4").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "whole.mp4").unlink()
    ds = VideoFolder(tmp_path, frames=5, fps=4.0, size=16, index=False)
    assert [p.name for p in ds.files] == ["a.mp4", "b.mp4"] and not ds.skipped
    with caplog.at_level(logging.WARNING, logger="videoflextok.data"):
        video, _, _ = ds[1]
    assert video.shape == (3, 5, 16, 16)
    assert len(ds.failed) == 1 and ds.failed[0][0].endswith("b.mp4") and "decoding failed" in ds.failed[0][1]
    assert "using item 0 instead" in caplog.records[-1].getMessage()
    assert torch.equal(video, ds[1][0])       # the replacement is deterministic too


def test_train_start_varies_with_epoch_eval_start_fixed(tmp_path):
    write_video(tmp_path / "v.mp4", numbered(30), fps=8)
    train = VideoFolder(tmp_path, frames=3, fps=4.0, size=16, seed=1, index=False)
    firsts = []
    for epoch in range(6):
        train.set_epoch(epoch)
        idx = item_indices(train[0][0])
        assert idx == [idx[0], idx[0] + 2, idx[0] + 4]
        assert idx == item_indices(train[0][0])                  # same epoch: same clip
        firsts.append(idx[0])
    assert len(set(firsts)) > 1 and all(0 <= f <= 25 for f in firsts)   # 30 frames, a clip spans 5
    # Eval: the middle start, whatever the epoch. 26 possible starts (0..25) -> start frame 12.
    evaluate = VideoFolder(tmp_path, frames=3, fps=4.0, size=16, train=False, index=False)
    for epoch in (0, 5):
        evaluate.set_epoch(epoch)
        assert item_indices(evaluate[0][0]) == [12, 14, 16]
    first = VideoFolder(tmp_path, frames=3, fps=4.0, size=16, train=False, eval_start="first", index=False)
    assert item_indices(first[0][0]) == [0, 2, 4]


def test_index_cache_reused_and_refreshed(tmp_path, monkeypatch):
    write_video(tmp_path / "x" / "a.mp4", numbered(24), fps=8)
    write_video(tmp_path / "y" / "b.mp4", numbered(24), fps=8)
    first = VideoFolder(tmp_path, frames=5, fps=4.0, size=16)
    assert (tmp_path / data.INDEX_NAME).is_file() and first.classes == ["x", "y"]
    probed = []
    real_probe = data.probe
    monkeypatch.setattr(data, "probe", lambda p: probed.append(p.name) or real_probe(p))
    second = VideoFolder(tmp_path, frames=9, fps=4.0, size=16)    # another clip length, the same cached metadata
    assert probed == [] and len(second) == 2
    write_video(tmp_path / "y" / "b.mp4", numbered(3), fps=8)     # changed file: probed again, now too short
    third = VideoFolder(tmp_path, frames=5, fps=4.0, size=16)
    assert probed == ["b.mp4"] and [p.name for p in third.files] == ["a.mp4"] and third.labels == [0]


def test_synthetic_data_builds_once_and_cli(tmp_path):
    root = synthetic_data(tmp_path / "s", num=3, seed=1, size=16, frames=12, fps=4.0)
    files = sorted(root.glob("*/*.mp4"))
    assert len(files) == 3 and json.loads((root / "synthetic.json").read_text())["num"] == 3
    stamp = files[0].stat().st_mtime_ns
    assert synthetic_data(root, num=3, seed=1, size=16, frames=12, fps=4.0) == root   # reused, not rewritten
    assert files[0].stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="not synthetic data with"):
        synthetic_data(root, num=4, seed=1, size=16, frames=12, fps=4.0)
    synthetic_main([str(tmp_path / "cli"), "--num", "2", "--seed", "1", "--size", "16", "--frames", "12", "--fps", "4"])
    for name in ("red_circle_left/red_circle_left_00000.mp4", "red_circle_right/red_circle_right_00001.mp4"):
        assert np.array_equal(read_video(tmp_path / "cli" / name)[0], read_video(root / name)[0])


def test_write_png_grid(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5, 3), dtype=np.uint8)
    raw = write_png_grid(tmp_path / "g.png", grid, gap=1).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == (3 * 5 + 2, 2 * 4 + 1)
    start = raw.index(b"IDAT")
    length = struct.unpack(">I", raw[start - 4:start])[0]
    rows = np.frombuffer(zlib.decompress(raw[start + 4:start + 4 + length]), np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 0).all()                                   # filter type 0 on every scanline
    sheet = rows[:, 1:].reshape(height, width, 3)
    assert np.array_equal(sheet[5:9, 12:17], grid[1, 2]) and (sheet[4] == 255).all()
