"""Video data: a folder-of-videos dataset, mp4 reading/writing, and the built-in synthetic data.

Paper: §3, §4.1 and Appendix F.1. VideoFlexTok trains on 17-frame clips at 4 fps (about four seconds; 81 frames for
long-video training), 128x128 for Kinetics-600 and 256x256 for Panda-style data, as float videos in [-1, 1].

    ds = VideoFolder("k600/train", frames=17, fps=4.0, size=128)    # train=True: random clip start
    video, label, caption = ds[0]    # (3, 17, 128, 128) float32 in [-1, 1], class index or -1, caption or ""
    ds.set_epoch(epoch)              # the random start depends on (seed, epoch, index): resumable data order
    write_video("clip.mp4", to_uint8(video), fps=4)                  # also read_video, load_clip, write_png_grid

    python data.py synthetic out/synthetic --num 480 --seed 0   # moving shapes, Kinetics layout, captions.jsonl
    python data.py scan k600/train --frames 17 --fps 4           # index a folder and list what it skips

Folder layout. Videos (mp4, webm, mkv, avi, mov) are found recursively. If every video lies in a subfolder of the
root, the Kinetics layout `root/<class>/.../<video>` is assumed and the first folder names the class (labels index
the sorted class names); otherwise every label is -1. An optional `root/captions.jsonl` holds lines
`{"path": "<path relative to root>", "caption": "..."}`.

Clip sampling. A clip of T frames at `fps` is the frames of the video nearest in time to start + i / fps,
i = 0..T-1, whatever the video's own frame rate: a 30 fps video gives every 7th or 8th frame at 4 fps, and a video
slower than `fps` repeats frames (a tie goes to the earlier frame). The start is a frame of the video: drawn
uniformly among the starts that fit the clip in training, from a generator seeded by (seed, epoch, index); the
middle one (or the first, `eval_start="first"`) in evaluation. Only the frames needed are decoded: we seek to the
keyframe before the start (or decode from the beginning where the demuxer lands after it) and decode until the
clip is complete, one decoding thread per process (the parallelism comes from DataLoader workers). Each kept frame is resized by FFmpeg's swscale (area filter) so that
its short side is `size`, then centre-cropped to `size` x `size`, in training too: the paper names no crop
augmentation. Rotation metadata (phone videos) is ignored.

Bad files. Construction probes every file's stream metadata without decoding (threads), and skips, with one
warning line each, files that cannot be opened (corrupt, zero bytes, not a video), have no video stream or no frame
rate, have no usable size (zero, or an aspect ratio beyond 4:1), or are too short for the clip. `skipped` lists
them as (path, reason). A clip that still fails when read (e.g. a file corrupt in the middle) is replaced by
another index drawn from the same seeded generator, with a warning, and recorded in `failed`; in DataLoader
workers `failed` lives in each worker process. A folder with no usable video is a ValueError.

Index cache. Probing Kinetics-600 (~400k files) takes minutes, so the metadata (not the too-short decision, which
depends on the clip) is cached in `root/.videofolder-index.json` (or `index=PATH`; `index=False` disables it),
one entry per file keyed by its relative path, size and mtime: a second start only lists the folder and probes new
or changed files. If the root is not writable the cache is skipped silently. When several processes (torchrun)
start on a fresh folder they all probe it; let rank 0 build the index first to avoid that.
"""

import argparse
import concurrent.futures
import json
import logging
import os
import struct
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger("videoflextok.data")

EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
MAX_ASPECT = 4.0                # wider (or taller) than 4:1 is "odd size": the centre crop would keep < 1/4
INDEX_NAME = ".videofolder-index.json"
INDEX_VERSION = 1
_EPS = 1e-6                     # seconds; float slack when comparing timestamps


class BadVideo(Exception):
    """A file that cannot give a clip; the message is the one-line reason."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing videos
# ---------------------------------------------------------------------------------------------------------------------


def probe(path) -> dict:
    """Stream metadata of a video file, without decoding: {"fps", "frames", "duration", "start", "width", "height"}.

    `frames` is the container's frame count, or duration x fps where the container has none (webm, mkv).
    Raises BadVideo with a one-line reason if the file cannot be opened or has no video stream / frame rate."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadVideo("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or rate <= 0:
                raise BadVideo("unknown frame rate")
            fps = float(rate)
            tb = stream.time_base
            start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
            if stream.duration and tb:
                duration = float(stream.duration * tb)
            elif container.duration:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            frames = stream.frames or int(round(duration * fps))
            ctx = stream.codec_context
            return dict(fps=fps, frames=int(frames), duration=duration, start=start,
                        width=int(ctx.width or 0), height=int(ctx.height or 0))
    except BadVideo:
        raise
    except Exception as err:  # FFmpeg errors, OSError, and whatever a broken container throws
        raise BadVideo(f"unreadable ({_one_line(err)})") from err


def start_frames(meta: dict, frames: int, fps: float) -> int:
    """How many of the video's frames can start a clip of `frames` frames at `fps` (0: the video is too short)."""
    span = (frames - 1) / fps                      # seconds from the first to the last frame of the clip
    last = (meta["frames"] - 1) / meta["fps"]      # time of the video's last frame
    if meta["frames"] < 1 or last + _EPS < span:
        return 0
    return int(np.floor((last - span) * meta["fps"] + _EPS)) + 1


def load_clip(path, start: float, frames: int, fps: float, size: int | None) -> np.ndarray:
    """Frames nearest to start + i / fps (seconds from the first frame), i < frames -> uint8 (frames, H, W, 3).

    With `size`, each frame is resized so its short side is `size` and centre-cropped to (size, size); with None
    it keeps its own size. Raises BadVideo if the file fails to decode or ends well before the clip does."""
    try:
        try:
            return _read_clip(path, start, frames, fps, size, seek=start > 0)
        except _SeekMissed:               # the demuxer landed after the start: decode from the beginning instead
            return _read_clip(path, start, frames, fps, size, seek=False)
    except BadVideo:
        raise
    except Exception as err:
        raise BadVideo(f"decoding failed ({_one_line(err)})") from err


class _SeekMissed(Exception):
    pass


def _read_clip(path, start: float, frames: int, fps: float, size: int | None, seek: bool) -> np.ndarray:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise BadVideo("no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        tb = stream.time_base
        rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or fps)
        t0 = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
        targets = t0 + start + np.arange(frames) / fps
        seek = seek and bool(tb)
        if seek:
            container.seek(int(targets[0] / tb), stream=stream)   # the keyframe at or before the start
        return _pick_nearest(container.decode(stream), targets, rate, fps, size, seek)


def _pick_nearest(decoded, targets: np.ndarray, rate: float, fps: float, size: int | None, seeked: bool) -> np.ndarray:
    """Walk decoded frames in time order and give every target time the nearest frame (converting each once)."""
    out = [None] * len(targets)
    j = 0
    prev = None                                     # [time, frame, converted array or None]
    for frame in decoded:
        t = frame.time if frame.time is not None else (prev[0] + 1 / rate if prev else 0.0)
        if seeked and prev is None and t > targets[0] + 1 / rate + _EPS:
            raise _SeekMissed
        cur = [t, frame, None]
        while j < len(targets) and t >= targets[j] - _EPS:
            # The target lies between prev and cur: take the nearer one, the earlier one on a tie.
            use_prev = prev is not None and targets[j] - prev[0] <= t - targets[j] + _EPS
            out[j] = _converted(prev if use_prev else cur, size)
            j += 1
        if j == len(targets):
            break
        prev = cur
    if j < len(targets):
        if prev is None:
            raise BadVideo("no frame decoded")
        # Metadata durations are approximate by about a frame; beyond that the file ended early (truncated).
        if targets[-1] - prev[0] > 1 / fps + 1 / rate + _EPS:
            raise BadVideo(f"video ends at {prev[0]:.2f} s but the clip needs frames up to {targets[-1]:.2f} s")
        for k in range(j, len(targets)):
            out[k] = _converted(prev, size)
    return np.stack(out)


def _converted(entry: list, size: int | None) -> np.ndarray:
    if entry[2] is None:
        entry[2] = _resize_crop(entry[1], size)
    return entry[2]


def _resize_crop(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    """Short side to `size` (FFmpeg area filter, which averages when shrinking), then the centre size x size."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    w, h = frame.width, frame.height
    if w <= h:
        nw, nh = size, max(size, round(h * size / w))
    else:
        nw, nh = max(size, round(w * size / h)), size
    rgb = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (nh - size) // 2, (nw - size) // 2
    return rgb[top:top + size, left:left + size]


def read_video(path) -> tuple[np.ndarray, float]:
    """All frames of a video as uint8 (T, H, W, 3), and its frame rate."""
    meta = probe(path)
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as err:
        raise BadVideo(f"decoding failed ({_one_line(err)})") from err
    if not frames:
        raise BadVideo("no frame decoded")
    return np.stack(frames), meta["fps"]


def write_video(path, frames, fps: float, codec: str | None = None, crf: int = 18) -> Path:
    """Write uint8 frames (T, H, W, 3) (numpy or torch) as a yuv420p video, H.264 (libx264) by default.

    `codec="mpeg4"` (or any FFmpeg encoder) is the fallback where libx264 is missing; `crf` is libx264's quality
    (0 lossless, 18 near-transparent). For a float video (3, T, H, W) in [-1, 1] use `to_uint8` first."""
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1; got {frames.dtype} {tuple(frames.shape)} "
                         "(use data.to_uint8 for float videos (3, T, H, W) in [-1, 1])")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frames must have even height and width for yuv420p; got {h}x{w}: crop or pad by a pixel")
    if not fps > 0:
        raise ValueError(f"fps must be positive; got {fps}")
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        # x264's macroblock-tree rate control made the bytes (and decoded pixels) of the same frames differ from
        # run to run in our tests; without it the output is reproducible, which the synthetic data needs.
        options = {"crf": str(crf), "x264-params": "mbtree=0"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec != "libx264":
            stream.bit_rate = max(500_000, int(2 * w * h * fps))   # about 2 bits per pixel: visually clean
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())   # flush the encoder
    return path


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float video (3, T, H, W) in [-1, 1]; the inverse of `to_uint8`."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Float video (3, T, H, W) in [-1, 1] -> uint8 frames (T, H, W, 3) for `write_video`."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must have shape (3, T, H, W); got {tuple(video.shape)}")
    pixels = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).numpy()


def write_png_grid(path, grid, gap: int = 2) -> Path:
    """Write uint8 frames (rows, columns, H, W, 3) as one PNG sheet, `gap` white pixels between tiles.

    E.g. rows = token budgets and columns = frames of a clip. PNG is written by hand (zlib, filter 0) to keep the
    runtime dependencies at torch, numpy, av and tqdm."""
    grid = grid.numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid)
    if grid.dtype != np.uint8 or grid.ndim != 5 or grid.shape[-1] != 3:
        raise ValueError(f"grid must be uint8 (rows, columns, H, W, 3); got {grid.dtype} {tuple(grid.shape)}")
    rows, cols, h, w, _ = grid.shape
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = grid[r, c]
    height, width = sheet.shape[:2]
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), sheet.reshape(height, -1)], axis=1)  # filter 0

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, no interlace
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + chunk(b"IEND", b""))
    return path


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------------


class VideoFolder(torch.utils.data.Dataset):
    """Clips from a folder of videos: item i -> (video (3, frames, size, size) float32 in [-1, 1], label, caption).

    frames, fps: clip length and rate (17 at 4 fps in the paper; 81 for long videos). size: output side.
    train: random start per (seed, epoch, index), else a fixed start, `eval_start` "center" or "first".
    index: path of the metadata cache, None for `root/.videofolder-index.json`, False for none.
    probe_workers: threads probing the files at construction.
    Attributes: files (usable paths), classes (sorted names; [] without class layout), skipped and failed
    (lists of (path, reason)), epoch."""

    def __init__(self, root, frames: int = 17, fps: float = 4.0, size: int = 128, train: bool = True,
                 seed: int = 0, eval_start: str = "center", index=None, probe_workers: int | None = None):
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int (17 in the paper, 81 for long videos); got {frames!r}")
        if not fps > 0:
            raise ValueError(f"fps must be positive (4 in the paper); got {fps!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int (128 for Kinetics-600, 256 for Panda); got {size!r}")
        if eval_start not in ("center", "first"):
            raise ValueError(f"eval_start must be 'center' or 'first'; got {eval_start!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root {str(root)!r} is not a folder; for the built-in data run "
                             "`python data.py synthetic out/synthetic` and pass that folder")
        self.frames, self.fps, self.size, self.train = frames, float(fps), size, train
        self.seed, self.eval_start, self.epoch = seed, eval_start, 0
        self.failed: list[tuple[str, str]] = []

        found = _find_videos(self.root)
        rel = [p.relative_to(self.root).as_posix() for p in found]
        metas = _probe_all(self.root, found, rel, index, probe_workers)
        # Classes come from every video file found, usable or not, so labels do not shift when a file goes bad.
        layered = bool(rel) and all("/" in r for r in rel)
        self.classes = sorted({r.split("/", 1)[0] for r in rel}) if layered else []
        class_index = {name: i for i, name in enumerate(self.classes)}
        captions = _read_captions(self.root)

        self.files, self.labels, self.captions, self.starts, self.skipped = [], [], [], [], []
        for path, r, meta in zip(found, rel, metas):
            reason = meta if isinstance(meta, str) else self._unusable(meta)
            if reason:
                self.skipped.append((str(path), reason))
                log.warning("skipping %s: %s", path, reason)
                continue
            self.files.append(path)
            self.labels.append(class_index[r.split("/", 1)[0]] if layered else -1)
            self.captions.append(captions.get(r, ""))
            self.starts.append((start_frames(meta, frames, self.fps), meta["fps"]))
        if not self.files:
            first = "; ".join(f"{Path(p).name}: {why}" for p, why in self.skipped[:3])
            raise ValueError(f"no usable video under {str(root)!r}: {len(found)} files with extensions "
                             f"{', '.join(EXTENSIONS)}, {len(self.skipped)} skipped ({first or 'none found'})")
        if self.skipped:
            log.warning("%s: %d usable videos, skipped %d (listed above)", self.root, len(self.files), len(self.skipped))
        tiny = [f"{Path(p).name} ({m['width']}x{m['height']})" for p, m in zip(found, metas)
                if isinstance(m, dict) and size and 0 < min(m["width"], m["height"]) * 4 < size]
        if tiny:
            log.warning("%s: %d videos are upscaled more than 4x to %d px, e.g. %s", self.root, len(tiny), size,
                        ", ".join(tiny[:3]))

    def _unusable(self, meta: dict) -> str:
        w, h = meta["width"], meta["height"]
        if w < 1 or h < 1 or max(w, h) > MAX_ASPECT * min(w, h):
            return f"odd size {w}x{h}"
        if start_frames(meta, self.frames, self.fps) == 0:
            have = max(meta["frames"] - 1, 0) / meta["fps"]
            return (f"too short: {meta['frames']} frames at {meta['fps']:g} fps span {have:.2f} s, "
                    f"a {self.frames}-frame clip at {self.fps:g} fps needs {(self.frames - 1) / self.fps:.2f} s")
        return ""

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose clip starts training draws. Call it before creating the DataLoader iterator:
        workers copy the dataset when an iterator starts, so with persistent_workers=True it has no effect."""
        self.epoch = int(epoch)

    def start_time(self, i: int, rng: np.random.Generator | None = None) -> float:
        """Start (seconds from the first frame) of item i's clip: drawn with `rng` in training, fixed otherwise."""
        count, rate = self.starts[i]
        if self.train:
            k = int((rng or self._rng(i)).integers(count))
        else:
            k = (count - 1) // 2 if self.eval_start == "center" else 0
        return k / rate

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        rng = self._rng(i)
        for _ in range(10):
            try:
                clip = load_clip(self.files[i], self.start_time(i, rng), self.frames, self.fps, self.size)
                break
            except BadVideo as err:
                self.failed.append((str(self.files[i]), str(err)))
                if len(self) == 1:
                    raise RuntimeError(f"the only usable video failed to decode: {self.failed[-1]}") from err
                replacement = (i + 1 + int(rng.integers(len(self) - 1))) % len(self)   # any other item
                log.warning("clip from %s failed (%s); using item %d instead", self.files[i], err, replacement)
                i = replacement
        else:
            raise RuntimeError(f"10 clips in a row failed to decode; last: {self.failed[-1]}")
        return from_uint8(clip), self.labels[i], self.captions[i]

    def __repr__(self) -> str:
        return (f"VideoFolder({str(self.root)!r}, {len(self)} videos, {len(self.classes)} classes, "
                f"{len(self.skipped)} skipped, frames={self.frames}, fps={self.fps:g}, size={self.size}, "
                f"train={self.train})")


def _find_videos(root: Path) -> list[Path]:
    """Video files under root, recursively, sorted; symlinked folders are followed once each."""
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:             # a symlink loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, n) for n in names if n.lower().endswith(EXTENSIONS) and not n.startswith(".")]
    return sorted(found)


def _probe_all(root: Path, paths: list[Path], rel: list[str], index, workers: int | None) -> list:
    """Metadata dict (or a skip reason str) per file, reusing the index cache for files whose size and mtime match."""
    cache_path = None if index is False else Path(index) if index is not None else root / INDEX_NAME
    cached = {}
    if cache_path is not None and cache_path.is_file():
        try:
            data = json.loads(cache_path.read_text())
            cached = data["files"] if data.get("version") == INDEX_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            cached = {}                # a damaged cache is rebuilt
    results, todo, stats = [None] * len(paths), [], []
    for n, (path, r) in enumerate(zip(paths, rel)):
        try:
            st = path.stat()
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError as err:
            stats.append((-1, -1))
            results[n] = f"unreadable ({_one_line(err)})"
            continue
        entry = cached.get(r)
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            results[n] = entry.get("meta") or entry.get("error", "unreadable")
        elif st.st_size == 0:
            results[n] = "empty file (0 bytes)"
        else:
            todo.append(n)

    def one(n):
        try:
            return probe(paths[n])
        except BadVideo as err:
            return str(err)

    if todo:
        workers = workers or min(32, 4 * (os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            done = tqdm(pool.map(one, todo), total=len(todo), desc=f"probing {root}", disable=len(todo) < 2000)
            for n, meta in zip(todo, done):
                results[n] = meta
    if cache_path is not None and (todo or set(cached) != set(rel)):
        files = {}
        for r, (size, mtime), meta in zip(rel, stats, results):
            files[r] = {"size": size, "mtime_ns": mtime, **({"error": meta} if isinstance(meta, str) else {"meta": meta})}
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"version": INDEX_VERSION, "files": files}))
            os.replace(tmp, cache_path)   # atomic: concurrent processes never read half a file
        except OSError:
            tmp.unlink(missing_ok=True)   # read-only data: work without a cache
    return results


def _read_captions(root: Path) -> dict[str, str]:
    """root/captions.jsonl -> {path relative to root: caption}; absent file -> {}."""
    path = root / "captions.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, caption = Path(item["path"]), str(item["caption"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} line {n}: expected {{\"path\": ..., \"caption\": ...}}; got {line[:80]!r} "
                             f"({_one_line(err)})") from err
        if key.is_absolute():
            try:
                key = key.relative_to(root.resolve())
            except ValueError:
                continue                  # a caption for a file outside the root
        captions[key.as_posix()] = caption
    return captions


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data: moving shapes
# ---------------------------------------------------------------------------------------------------------------------

# Saturated shape colours; the background is a low-saturation grey, so it is never one of them.
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}   # (dx, dy), image y points down
SYNTHETIC_CLASSES = [f"{c}_{s}_{m}" for c in COLORS for s in SHAPES for m in MOTIONS]   # 48 classes


def synthetic_scene(color: str, shape: str, motion: str, rng: np.random.Generator, size: int = 64,
                    frames: int = 40, fps: float = 8.0) -> dict:
    """The random parameters of one synthetic video (render_scene draws it).

    The look is chosen so that what VideoFlexTok's first tokens should carry, the object and its motion, is also
    what matters most for reconstruction, and so that a small model can learn it in CPU minutes: a large shape
    (half-width r, 24-28% of the frame) that crosses 36-40% of the frame over the video whatever its length (`fps`
    only sets the frame rate), along a path through the frame's centre, on a nearly plain background. The class
    alone thus fixes where the shape is in every frame, up to a few pixels. What is left for later tokens is detail:
    those few pixels (+-4% of the frame along the motion, +-6% across), size, a +-15 colour jitter, and the
    background's grey level (110-146), a faint tint and a faint gradient.
    `centres` (frames, 2) holds the shape's (x, y) in pixels in every frame."""
    r = rng.uniform(0.24, 0.28) * size
    travel = min(rng.uniform(0.36, 0.40) * size, size - 2 * r - 1)
    dx, dy = MOTIONS[motion]
    # The path's midpoint is the frame's centre, shifted a little; the shape stays fully inside the frame.
    along = np.clip(size / 2 - (dx + dy) * travel / 2 + rng.uniform(-0.04, 0.04) * size,
                    r + max(0, -(dx + dy)) * travel, size - r - max(0, dx + dy) * travel)
    across = size / 2 + rng.uniform(-0.06, 0.06) * size
    x0, y0 = (along, across) if dx else (across, along)
    rgb = np.clip(np.array(COLORS[color]) + rng.integers(-15, 16, 3), 0, 255)
    grey = rng.uniform(110, 146) + rng.uniform(-4, 4, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(-10, 10)
    step = travel * np.arange(frames) / max(frames - 1, 1)
    centres = np.stack([x0 + dx * step, y0 + dy * step], axis=1)
    return dict(color=color, shape=shape, r=r, rgb=rgb, grey=grey, angle=angle, ramp=ramp, centres=centres, size=size)


def render_scene(scene: dict) -> np.ndarray:
    """A synthetic_scene as uint8 (frames, size, size, 3): the shape anti-aliased by its pixel coverage, from a
    signed distance, over a grey background with a linear gradient."""
    size = scene["size"]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5       # pixel centres
    angle = scene["angle"]
    ramp = ((xs - size / 2) * np.cos(angle) + (ys - size / 2) * np.sin(angle)) / size
    background = scene["grey"] + scene["ramp"] * ramp[..., None]
    out = np.empty((len(scene["centres"]), size, size, 3), np.uint8)
    for t, (cx, cy) in enumerate(scene["centres"]):
        alpha = np.clip(0.5 - _sdf(scene["shape"], xs - cx, ys - cy, scene["r"]), 0, 1)[..., None]
        out[t] = np.clip(background * (1 - alpha) + scene["rgb"] * alpha + 0.5, 0, 255).astype(np.uint8)
    return out


def render_shapes(color: str, shape: str, motion: str, rng: np.random.Generator, size: int = 64,
                  frames: int = 40, fps: float = 8.0) -> np.ndarray:
    """One synthetic video, uint8 (frames, size, size, 3): a shape of `color` crossing a grey background
    (synthetic_scene lists what is random)."""
    return render_scene(synthetic_scene(color, shape, motion, rng, size, frames, fps))


def _sdf(shape: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) from a shape of half-size r centred at the origin."""
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - 0.85 * r    # same area as the circle, about
    # Upward equilateral triangle: the farthest of its three edge lines, apex at the top (y points down).
    inradius = 0.6 * r
    edges = np.maximum(py, np.maximum(0.866 * px - 0.5 * py, -0.866 * px - 0.5 * py))
    return edges - inradius


def make_synthetic(out, num: int = 480, seed: int = 0, size: int = 64, frames: int = 40, fps: float = 8.0,
                   progress: bool = False) -> Path:
    """Write `num` moving-shape videos as mp4 in the Kinetics layout `out/<color>_<shape>_<motion>/*.mp4`, plus
    `out/captions.jsonl` ("a red circle moving left") and `out/synthetic.json` (the parameters).

    Video n has class n mod 48, so classes are balanced; its randomness comes from a generator seeded by (seed, n),
    so a seed gives the same videos whatever `num` is. The defaults (64x64, 40 frames at 8 fps = 5 s) cover a
    17-frame clip at 4 fps with room for random starts, and keep the CPU demo fast."""
    if num < 1 or size < 8 or size % 2 or frames < 1 or not fps > 0:
        raise ValueError(f"need num >= 1, an even size >= 8, frames >= 1 and fps > 0; "
                         f"got num={num}, size={size}, frames={frames}, fps={fps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for n in tqdm(range(num), desc=f"writing {out}", disable=not progress):
        name = SYNTHETIC_CLASSES[n % len(SYNTHETIC_CLASSES)]
        color, shape, motion = name.split("_")
        video = render_shapes(color, shape, motion, np.random.default_rng([seed, n]), size, frames, fps)
        rel = f"{name}/{name}_{n:05d}.mp4"
        write_video(out / rel, video, fps)
        lines.append(json.dumps({"path": rel, "caption": f"a {color} {shape} moving {motion}"}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    params = dict(num=num, seed=seed, size=size, frames=frames, fps=fps)
    (out / "synthetic.json").write_text(json.dumps(params) + "\n")
    return out


def synthetic_data(root=None, num: int = 480, seed: int = 0, size: int = 64, frames: int = 40,
                   fps: float = 8.0) -> Path:
    """The built-in data: the synthetic folder for these parameters, generated on first use.

    Default location `out/synthetic-<size>px-<num>-s<seed>` next to this file. Generation goes to a temporary
    folder renamed into place, so concurrent processes (torchrun) never see a half-written folder."""
    params = dict(num=num, seed=seed, size=size, frames=frames, fps=float(fps))
    root = Path(root) if root else Path(__file__).parent / "out" / f"synthetic-{size}px-{num}-s{seed}"

    def ready():
        try:
            return json.loads((root / "synthetic.json").read_text()) == params
        except (OSError, ValueError):
            return False

    if not ready():
        if root.exists():
            raise ValueError(f"{root} exists but is not synthetic data with {params}; remove it or pass another root")
        tmp = root.with_name(f"{root.name}.{os.getpid()}.tmp")
        make_synthetic(tmp, **params)
        try:
            os.rename(tmp, root)
        except OSError:                   # another process finished first
            if not ready():
                raise
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    syn = commands.add_parser("synthetic", help="write the moving-shapes data set (mp4, Kinetics layout, captions)")
    syn.add_argument("out")
    syn.add_argument("--num", type=int, default=480, help="videos in all, spread over the 48 classes")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    syn.add_argument("--frames", type=int, default=40, help="frames per video")
    syn.add_argument("--fps", type=float, default=8.0, help="frame rate of the written videos")
    scan = commands.add_parser("scan", help="index a video folder and list the files it skips")
    scan.add_argument("root")
    scan.add_argument("--frames", type=int, default=17)
    scan.add_argument("--fps", type=float, default=4.0)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    start = time.time()
    if args.command == "synthetic":
        make_synthetic(args.out, args.num, args.seed, args.size, args.frames, args.fps, progress=True)
        print(f"wrote {args.num} videos to {args.out} in {time.time() - start:.1f} s")
    else:
        ds = VideoFolder(args.root, frames=args.frames, fps=args.fps)
        print(f"{ds} in {time.time() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
