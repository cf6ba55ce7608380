"""The built-in synthetic data: videos of one coloured shape crossing a grey background, and the detector that
reads colour, shape and motion back from any video of that world (generated samples and reconstructions included).

Paper: §4.1 and §4.3. The paper trains on Kinetics-600 and Panda-style data and scores generated videos with a
video classifier ("Evaluation metrics", §4.1); this world stands in for both at CPU scale: 48 classes (4 colours x
3 shapes x 4 motions) with captions like "a red circle moving left", and a hand-written detector that plays the
classifier without training anything.

    python synthetic.py out/synthetic --num 480 --seed 0   # moving shapes, Kinetics layout, captions.jsonl
    root = synthetic_data()                                 # the same, generated on first use under out/
    color, shape, motion = detect(video)                    # ("red", "circle", "left") or None per part
    scores = adherence(videos, ["red_circle_left", ...])    # fraction matching per attribute and per class

Adherence. Every video of this world is one saturated shape on a grey background (render_shapes), so
- the background is a linear colour gradient: fitted by least squares on the pixels near the frame's median
  colour (the shape covers well under half of a frame), refined once without the pixels far from that fit;
- a pixel's coverage alpha in [0, 1] is the projection of (pixel - background) onto (shape colour -
  background), the shape colour being the mean of the pixels farthest from the background; the colour is the
  nearest of COLORS to it;
- motion is the sign of the dominant axis of the alpha-weighted centroid's displacement between the first and
  the last frame where the shape is visible;
- shape is the fill ratio area / (tallest column x widest row), with area, column and row the sums of alpha:
  1 for a square, pi/4 = 0.79 for a circle and 1/2 for an apex-up triangle. Sums of coverage keep their value
  through anti-aliasing, area resizing and compression, where a bounding box of thresholded pixels is off by
  a pixel, a fifth of the shape's width at 32 px.
Its own accuracy on real synthetic videos is measured in tests/test_eval.py (see `measure` below).
"""

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from video import write_video

# Saturated shape colours; the background is a low-saturation grey, so it is never one of them.
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}   # (dx, dy), image y points down
SYNTHETIC_CLASSES = [f"{c}_{s}_{m}" for c in COLORS for s in SHAPES for m in MOTIONS]   # 48 classes


################################################################################
# The moving-shapes world

def synthetic_scene(color, shape, motion, rng, size=64, frames=40, fps=8.0):
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


def render_scene(scene):
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


def render_shapes(color, shape, motion, rng, size=64, frames=40, fps=8.0):
    """One synthetic video, uint8 (frames, size, size, 3): a shape of `color` crossing a grey background
    (synthetic_scene lists what is random)."""
    return render_scene(synthetic_scene(color, shape, motion, rng, size, frames, fps))


def _sdf(shape, px, py, r):
    """Signed distance in pixels (negative inside) from a shape of half-size r centred at the origin."""
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - 0.85 * r    # same area as the circle, about
    # Upward equilateral triangle: the farthest of its three edge lines, apex at the top (y points down).
    inradius = 0.6 * r
    edges = np.maximum(py, np.maximum(0.866 * px - 0.5 * py, -0.866 * px - 0.5 * py))
    return edges - inradius


################################################################################
# Writing the data set

def make_synthetic(out, num=480, seed=0, size=64, frames=40, fps=8.0, progress=False):
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


def synthetic_data(root=None, num=480, seed=0, size=64, frames=40, fps=8.0):
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
            shutil.rmtree(tmp, ignore_errors=True)
    return root


################################################################################
# Reading it back: the adherence detector

# Detector constants, set from measurements on make_synthetic videos (32 and 64 px, see `measure`).
FG_DISTANCE = 40.0        # RGB distance from the background fit that surely is shape: the grey's gradient and
                          # H.264 noise stay under ~25, a 50%-covered pixel of the dullest colour is ~60 away
MIN_AREA = 2.0            # alpha-summed pixels below which a frame has no visible shape
MIN_TRAVEL = 1.0          # pixels of centroid displacement below which there is no motion
# The two shape boundaries sit midway between the classes' measures on today's synthetic look (32 and 64 px,
# H.264): fill ratio circle 0.79, square 0.99; skewness circle and square 0, triangle -0.52 to -0.55. Midway,
# because a model's blur moves both classes toward each other (a soft square fills less, a soft circle more).
CIRCLE_SQUARE = 0.89      # fill-ratio boundary between circle and square
TRIANGLE_SKEW = -0.27     # vertical skewness below which the shape is an apex-up triangle
# Colour, shape and motion in a prompt like "a red circle moving left" (class_from_prompt, which also reads slugs).
PROMPT = re.compile(r"\b(" + "|".join(COLORS) + r")\b\W+(" + "|".join(SHAPES) + r")\b\W+(?:moving\W+)?("
                    + "|".join(MOTIONS) + r")\b", re.IGNORECASE)


def _pixels(video):
    """Float video (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3) -> float64 (T, H, W, 3) in [0, 255]."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.dtype != torch.uint8:
            if video.dim() != 4 or video.shape[0] != 3:
                raise ValueError(f"a float video must be (3, T, H, W) in [-1, 1]; got {tuple(video.shape)}")
            return (video.double().clamp(-1, 1).permute(1, 2, 3, 0).numpy() + 1) * 127.5
        video = video.numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3); "
                         f"got {video.dtype} {tuple(video.shape)}")
    return video.astype(np.float64)


def _background(frames):
    """Per-frame linear colour gradient a + b x + c y fitted to the non-shape pixels -> (T, H, W, 3)."""
    t, h, w, _ = frames.shape
    ys, xs = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xs.ravel() / w - 0.5, ys.ravel() / h - 0.5], 1)   # (HW, 3)
    out = np.empty_like(frames)
    for i, frame in enumerate(frames.reshape(t, h * w, 3)):
        fit = np.broadcast_to(np.median(frame, 0), frame.shape)
        for _ in range(2):   # median first (robust to the shape), then the gradient on what is left
            keep = np.linalg.norm(frame - fit, axis=1) < FG_DISTANCE / 2
            if keep.sum() < 3:
                break
            coef = np.linalg.lstsq(design[keep], frame[keep], rcond=None)[0]
            fit = design @ coef
        out[i] = fit.reshape(h, w, 3)
    return out


def _coverage(frames):
    """-> (alpha (T, H, W) in [0, 1], shape colour RGB), or (None, None) when nothing is far from grey."""
    diff = frames - _background(frames)
    dist = np.linalg.norm(diff, axis=-1)
    sure = dist > FG_DISTANCE
    if sure.sum() < MIN_AREA:
        return None, None
    # The shape's own colour: the core pixels, those at least 3/4 as far from the background as the farthest.
    core = dist >= 0.75 * np.percentile(dist[sure], 95)
    colour = frames[core].mean(0)
    direction = diff[core].mean(0)
    alpha = np.clip(diff @ direction / (direction @ direction), 0, 1)
    alpha[alpha < 0.1] = 0   # background noise, summed over thousands of pixels, would swamp the shape's area
    return alpha, colour


def _shape_measures(alpha):
    """(fill ratio, vertical skewness) of one frame's coverage alpha (H, W), within 2 px of the sure shape.

    Fill ratio: area / (tallest column x widest row), all sums of coverage. Skewness of the rows' coverage
    mass: an apex-up triangle's mass sits low (-0.57 for a sharp one), a circle's or a square's is symmetric (0);
    a symmetric blur (resizing, chroma subsampling) leaves the third central moment as it is."""
    ys, xs = np.nonzero(alpha > 0.5)
    if len(ys) == 0:
        return float("nan"), float("nan")
    window = alpha[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3]
    rows = window.sum(1)
    area = rows.sum()
    fill = area / max(rows.max() * window.sum(0).max(), 1e-9)
    y = np.arange(len(rows))
    mean = (rows * y).sum() / area
    var = (rows * (y - mean) ** 2).sum() / area
    skew = (rows * (y - mean) ** 3).sum() / area / max(var, 1e-9) ** 1.5
    return float(fill), float(skew)


def detect(video):
    """(color, shape, motion) of a synthetic-style video: float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3).

    Each part is None when it cannot be read: no foreground at all, the shape visible in fewer than two frames
    (motion), or a centroid that moves less than MIN_TRAVEL pixels (motion)."""
    frames = _pixels(video)
    alpha, colour = _coverage(frames)
    if alpha is None:
        return None, None, None
    color = min(COLORS, key=lambda c: np.linalg.norm(colour - np.array(COLORS[c])))
    area = alpha.sum((1, 2))
    visible = np.flatnonzero(area >= MIN_AREA)
    _, h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w]
    shape = _classify_shape(shape_measures(alpha, visible))
    motion = None
    if len(visible) >= 2:
        first, last = visible[0], visible[-1]
        centre = lambda t: np.array([(alpha[t] * xs).sum(), (alpha[t] * ys).sum()]) / area[t]   # noqa: E731
        dx, dy = centre(last) - centre(first)
        if max(abs(dx), abs(dy)) >= MIN_TRAVEL:
            motion = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return color, shape, motion


def shape_measures(alpha, visible):
    """Mean (fill ratio, vertical skewness) over the visible frames whose shape does not touch the border (a cut
    shape measures differently), or over all visible frames if it always does; None if no frame is visible."""
    sure = alpha > 0.5
    inside = [t for t in visible if not (sure[t, 0].any() or sure[t, -1].any() or sure[t, :, 0].any()
                                         or sure[t, :, -1].any())] or list(visible)
    measures = np.array([_shape_measures(alpha[t]) for t in inside]).reshape(-1, 2)
    measures = measures[~np.isnan(measures).any(1)]
    return tuple(measures.mean(0)) if len(measures) else None


def _classify_shape(measures):
    if measures is None:
        return None
    fill, skew = measures
    return "triangle" if skew < TRIANGLE_SKEW else "square" if fill > CIRCLE_SQUARE else "circle"


def measure(video):
    """The (fill ratio, skewness) `detect` classifies the shape by, None without foreground; for calibration."""
    alpha, _ = _coverage(_pixels(video))
    return None if alpha is None else shape_measures(alpha, np.flatnonzero(alpha.sum((1, 2)) >= MIN_AREA))


def class_name(color, shape, motion):
    """The synthetic data's class folder name, e.g. red_circle_left."""
    return f"{color}_{shape}_{motion}"


def class_from_prompt(text):
    """'a red circle moving left' (or a slug of it, or a class name) -> 'red_circle_left'; None if no class."""
    match = PROMPT.search(text.replace("_", " "))
    return class_name(*(g.lower() for g in match.groups())) if match else None


def adherence(videos, requested):
    """Fraction of videos whose detected color, shape, motion and full class match the requested class names.

    videos: iterable of videos `detect` takes; requested: class names like red_circle_left, one per video."""
    videos, requested = list(videos), list(requested)
    if len(videos) != len(requested) or not videos:
        raise ValueError(f"need one requested class per video and at least one video; got {len(videos)} videos "
                         f"and {len(requested)} classes")
    hits = {"color": 0, "shape": 0, "motion": 0, "class": 0}
    for video, name in zip(videos, requested):
        want = name.split("_")
        if len(want) != 3:
            raise ValueError(f"requested class {name!r} is not <color>_<shape>_<motion>")
        got = detect(video)
        for key, a, b in zip(("color", "shape", "motion"), got, want):
            hits[key] += a == b
        hits["class"] += tuple(got) == tuple(want)
    return {key: n / len(videos) for key, n in hits.items()} | {"n": len(videos)}


################################################################################
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the moving-shapes data set: mp4 videos in the Kinetics "
                                                 "layout, captions.jsonl and synthetic.json.")
    parser.add_argument("out")
    parser.add_argument("--num", type=int, default=480, help="videos in all, spread over the 48 classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    parser.add_argument("--frames", type=int, default=40, help="frames per video")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the written videos")
    args = parser.parse_args(argv)
    start = time.time()
    make_synthetic(args.out, args.num, args.seed, args.size, args.frames, args.fps, progress=True)
    print(f"wrote {args.num} videos to {args.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
