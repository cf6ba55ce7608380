"""The training data: a folder of videos as a data set of clips, with class labels, captions and a metadata cache.

Paper: §3, §4.1 and Appendix F.1. VideoFlexTok trains on 17-frame clips at 4 fps (about four seconds; 81 frames for
long-video training), 128x128 for Kinetics-600 and 256x256 for Panda-style data, as float videos in [-1, 1]. Reading
and writing video files is video.py's; the built-in moving-shapes data is synthetic.py's.

    ds = VideoFolder("k600/train", frames=17, fps=4.0, size=128)    # train=True: random clip start
    video, label, caption = ds[0]    # (3, 17, 128, 128) float32 in [-1, 1], class index or -1, caption or ""
    ds.set_epoch(epoch)              # the random start depends on (seed, epoch, index): resumable data order

    python data.py scan k600/train --frames 17 --fps 4           # index a folder and list what it skips

Folder layout. Videos (mp4, webm, mkv, avi, mov) are found recursively. If every video lies in a subfolder of the
root, the Kinetics layout `root/<class>/.../<video>` is assumed and the first folder names the class (labels index
the sorted class names); otherwise every label is -1. An optional `root/captions.jsonl` holds lines
`{"path": "<path relative to root>", "caption": "..."}`.

Clip sampling. A clip of T frames at `fps` is the frames of the video nearest in time to start + i / fps
(video.load_clip, which also resizes and centre-crops every frame to `size`, in training too: the paper names no
crop augmentation). The start is a frame of the video: drawn uniformly among the starts that fit the clip in
training, from a generator seeded by (seed, epoch, index); the middle one (or the first, `eval_start="first"`) in
evaluation.

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
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from video import EXTENSIONS, BadVideo, from_uint8, load_clip, one_line, probe, start_frames

log = logging.getLogger("videoflextok.data")

MAX_ASPECT = 4.0                # wider (or taller) than 4:1 is "odd size": the centre crop would keep < 1/4
INDEX_NAME = ".videofolder-index.json"
INDEX_VERSION = 1


################################################################################
# The data set

class VideoFolder(torch.utils.data.Dataset):
    """Clips from a folder of videos: item i -> (video (3, frames, size, size) float32 in [-1, 1], label, caption).

    frames, fps: clip length and rate (17 at 4 fps in the paper; 81 for long videos). size: output side.
    train: random start per (seed, epoch, index), else a fixed start, `eval_start` "center" or "first".
    index: path of the metadata cache, None for `root/.videofolder-index.json`, False for none.
    probe_workers: threads probing the files at construction.
    Attributes: files (usable paths), classes (sorted names; [] without class layout), skipped and failed
    (lists of (path, reason)), epoch."""

    def __init__(self, root, frames=17, fps=4.0, size=128, train=True, seed=0, eval_start="center", index=None,
                 probe_workers=None):
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
                             "`python synthetic.py out/synthetic` and pass that folder")
        self.frames, self.fps, self.size, self.train = frames, float(fps), size, train
        self.seed, self.eval_start, self.epoch = seed, eval_start, 0
        self.failed = []

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

    def _unusable(self, meta):
        w, h = meta["width"], meta["height"]
        if w < 1 or h < 1 or max(w, h) > MAX_ASPECT * min(w, h):
            return f"odd size {w}x{h}"
        if start_frames(meta, self.frames, self.fps) == 0:
            have = max(meta["frames"] - 1, 0) / meta["fps"]
            return (f"too short: {meta['frames']} frames at {meta['fps']:g} fps span {have:.2f} s, "
                    f"a {self.frames}-frame clip at {self.fps:g} fps needs {(self.frames - 1) / self.fps:.2f} s")
        return ""

    def __len__(self):
        return len(self.files)

    def set_epoch(self, epoch):
        """Select the epoch whose clip starts training draws. Call it before creating the DataLoader iterator:
        workers copy the dataset when an iterator starts, so with persistent_workers=True it has no effect."""
        self.epoch = int(epoch)

    def start_time(self, i, rng=None):
        """Start (seconds from the first frame) of item i's clip: drawn with `rng` in training, fixed otherwise."""
        count, rate = self.starts[i]
        if self.train:
            k = int((rng or self._rng(i)).integers(count))
        else:
            k = (count - 1) // 2 if self.eval_start == "center" else 0
        return k / rate

    def _rng(self, i):
        return np.random.default_rng([self.seed, self.epoch, i])

    def __getitem__(self, i):
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

    def __repr__(self):
        return (f"VideoFolder({str(self.root)!r}, {len(self)} videos, {len(self.classes)} classes, "
                f"{len(self.skipped)} skipped, frames={self.frames}, fps={self.fps:g}, size={self.size}, "
                f"train={self.train})")


def _find_videos(root):
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


def _probe_all(root, paths, rel, index, workers):
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
            results[n] = f"unreadable ({one_line(err)})"
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


def _read_captions(root):
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
                             f"({one_line(err)})") from err
        if key.is_absolute():
            try:
                key = key.relative_to(root.resolve())
            except ValueError:
                continue                  # a caption for a file outside the root
        captions[key.as_posix()] = caption
    return captions


################################################################################
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="index a video folder and list the files it skips")
    scan.add_argument("root")
    scan.add_argument("--frames", type=int, default=17)
    scan.add_argument("--fps", type=float, default=4.0)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    start = time.time()
    ds = VideoFolder(args.root, frames=args.frames, fps=args.fps)
    print(f"{ds} in {time.time() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
