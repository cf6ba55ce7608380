"""Video files: reading clips, whole videos, writing mp4 and PNG sheets, and the conversions to model tensors.

Paper: §4.1 and Appendix F.1. VideoFlexTok works on clips of 17 frames at 4 fps (about four seconds; 81 frames for
long-video training), 128x128 for Kinetics-600 and 256x256 for Panda-style data, as float videos in [-1, 1]. The
data set (data.VideoFolder) and the synthetic data (synthetic.py) read and write their videos here.

    meta = probe("clip.mp4")                              # stream metadata, no decoding: fps, frames, size
    clip = load_clip("clip.mp4", start=1.5, frames=17, fps=4.0, size=128)   # uint8 (17, 128, 128, 3)
    video = from_uint8(clip)                              # float (3, 17, 128, 128) in [-1, 1]
    write_video("out.mp4", to_uint8(video), fps=4)        # also read_video, write_png_grid

Clip sampling. A clip of T frames at `fps` is the frames of the video nearest in time to start + i / fps,
i = 0..T-1, whatever the video's own frame rate: a 30 fps video gives every 7th or 8th frame at 4 fps, and a video
slower than `fps` repeats frames (a tie goes to the earlier frame). Only the frames needed are decoded: we seek to
the keyframe before the start (or decode from the beginning where the demuxer lands after it) and decode until the
clip is complete, one decoding thread per process (the parallelism comes from DataLoader workers). Each kept frame
is resized by FFmpeg's swscale (area filter) so that its short side is `size`, then centre-cropped to `size` x
`size`. Rotation metadata (phone videos) is ignored.

Bad files. Whatever fails to open or decode raises BadVideo, whose message is a one-line reason (the data set
skips such files with it).

References: FFmpeg through PyAV (av); PNG (ISO/IEC 15948) written by hand with zlib.
"""

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
_EPS = 1e-6                     # seconds; float slack when comparing timestamps


class BadVideo(Exception):
    """A file that cannot give a clip; the message is the one-line reason."""


################################################################################
# Reading clips

def probe(path):
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
        raise BadVideo(f"unreadable ({one_line(err)})") from err


def start_frames(meta, frames, fps):
    """How many of the video's frames can start a clip of `frames` frames at `fps` (0: the video is too short)."""
    span = (frames - 1) / fps                      # seconds from the first to the last frame of the clip
    last = (meta["frames"] - 1) / meta["fps"]      # time of the video's last frame
    if meta["frames"] < 1 or last + _EPS < span:
        return 0
    return int(np.floor((last - span) * meta["fps"] + _EPS)) + 1


def load_clip(path, start, frames, fps, size):
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
        raise BadVideo(f"decoding failed ({one_line(err)})") from err


class _SeekMissed(Exception):
    pass


def _read_clip(path, start, frames, fps, size, seek):
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


def _pick_nearest(decoded, targets, rate, fps, size, seeked):
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


def _converted(entry, size):
    if entry[2] is None:
        entry[2] = _resize_crop(entry[1], size)
    return entry[2]


def _resize_crop(frame, size):
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


################################################################################
# Whole videos, PNG sheets and conversions

def read_video(path):
    """All frames of a video as uint8 (T, H, W, 3), and its frame rate."""
    meta = probe(path)
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as err:
        raise BadVideo(f"decoding failed ({one_line(err)})") from err
    if not frames:
        raise BadVideo("no frame decoded")
    return np.stack(frames), meta["fps"]


def write_video(path, frames, fps, codec=None, crf=18):
    """Write uint8 frames (T, H, W, 3) (numpy or torch) as a yuv420p video, H.264 (libx264) by default.

    `codec="mpeg4"` (or any FFmpeg encoder) is the fallback where libx264 is missing; `crf` is libx264's quality
    (0 lossless, 18 near-transparent). For a float video (3, T, H, W) in [-1, 1] use `to_uint8` first."""
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1; got {frames.dtype} {tuple(frames.shape)} "
                         "(use video.to_uint8 for float videos (3, T, H, W) in [-1, 1])")
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


def from_uint8(frames):
    """uint8 frames (T, H, W, 3) -> float video (3, T, H, W) in [-1, 1]; the inverse of `to_uint8`."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(video):
    """Float video (3, T, H, W) in [-1, 1] -> uint8 frames (T, H, W, 3) for `write_video`."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must have shape (3, T, H, W); got {tuple(video.shape)}")
    pixels = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).numpy()


def write_png_grid(path, grid, gap=2):
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

    def chunk(kind, payload):
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, no interlace
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + chunk(b"IEND", b""))
    return path


def one_line(err):
    """An exception's message on one line of at most 160 characters: the form of every BadVideo reason."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."
