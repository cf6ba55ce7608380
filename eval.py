"""Evaluation: reconstruction PSNR per token budget, rFVD and gFVD, and a class-adherence score on the
synthetic moving-shapes data.

Paper: §4.1 ("Evaluation metrics": rFVD, gFVD and a classification score for generated videos), §4.2-4.3
(reconstruction and generation from a variable number of tokens per frame).

    python eval.py adherence samples/                      # sample-NN-<class or prompt>.mp4 written by sample.py
    python eval.py recon --tok-ckpt runs/tok/ckpt-0002000.pt --data out/synthetic --num 32 [--i3d-ckpt I3D]
    python eval.py codes --tok-ckpt runs/tok/ckpt-0002000.pt --data out/synthetic   # FSQ codebook usage
    python eval.py flow --tok-ckpt runs/tok/ckpt-0002000.pt --data out/synthetic    # does the decoder read its tokens?
    python eval.py gfvd --real out/synthetic --fake samples/ --i3d-ckpt i3d_pretrained_400.pt
    python eval.py ceiling --frames 9 --steps 8000      # a decoder trained on true scenes: the best tokens' samples

Adherence. The paper scores generated Kinetics videos with a video classifier. On the synthetic data a
hand-written detector does that job without training anything: every video is one saturated shape on a
grey background (data.render_shapes), so
- the background is a linear colour gradient: fitted by least squares on the pixels near the frame's median
  colour (the shape covers well under half of a frame), refined once without the pixels far from that fit;
- a pixel's coverage alpha in [0, 1] is the projection of (pixel - background) onto (shape colour -
  background), the shape colour being the mean of the pixels farthest from the background; the colour is the
  nearest of data.COLORS to it;
- motion is the sign of the dominant axis of the alpha-weighted centroid's displacement between the first and
  the last frame where the shape is visible;
- shape is the fill ratio area / (tallest column x widest row), with area, column and row the sums of alpha:
  1 for a square, pi/4 = 0.79 for a circle and 1/2 for an apex-up triangle. Sums of coverage keep their value
  through anti-aliasing, area resizing and compression, where a bounding box of thresholded pixels is off by
  a pixel, a fifth of the shape's width at 32 px.
Its own accuracy on real synthetic videos is measured in tests/test_eval.py (see `measure` below).

FVD needs the Kinetics-400 I3D weights (`--i3d-ckpt i3d_pretrained_400.pt`, see fvd.py); clips need >= 9 frames.

References: Unterthiner et al. 2018 (FVD, via fvd.py).
"""
import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from data import (COLORS, MOTIONS, SHAPES, SYNTHETIC_CLASSES, BadVideo, VideoFolder, from_uint8, probe, read_video,
                  render_scene, synthetic_data, synthetic_scene, to_uint8, write_png_grid)
from decoder import TIME_SAMPLING, Decoder, token_budgets
from trainer import at_least, check_args, lr_at, make_optimizer, optimizer_step, pick_device, positive
from vae import VAE_KINDS

# Detector constants, set from measurements on data.make_synthetic videos (32 and 64 px, see `measure`).
FG_DISTANCE = 40.0        # RGB distance from the background fit that surely is shape: the grey's gradient and
                          # H.264 noise stay under ~25, a 50%-covered pixel of the dullest colour is ~60 away
MIN_AREA = 2.0            # alpha-summed pixels below which a frame has no visible shape
MIN_TRAVEL = 1.0          # pixels of centroid displacement below which there is no motion
# The two shape boundaries sit midway between the classes' measures on today's synthetic look (32 and 64 px,
# H.264): fill ratio circle 0.79, square 0.99; skewness circle and square 0, triangle -0.52 to -0.55. Midway,
# because a model's blur moves both classes toward each other (a soft square fills less, a soft circle more).
CIRCLE_SQUARE = 0.89      # fill-ratio boundary between circle and square
TRIANGLE_SKEW = -0.27     # vertical skewness below which the shape is an apex-up triangle
PROMPT = re.compile(r"\b(" + "|".join(COLORS) + r")\b\W+(" + "|".join(SHAPES) + r")\b\W+(?:moving\W+)?("
                    + "|".join(MOTIONS) + r")\b", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------------------------


def _pixels(video) -> np.ndarray:
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


def _background(frames: np.ndarray) -> np.ndarray:
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


def _coverage(frames: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
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


def _shape_measures(alpha: np.ndarray) -> tuple[float, float]:
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


def detect(video) -> tuple[str | None, str | None, str | None]:
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


def shape_measures(alpha: np.ndarray, visible: np.ndarray) -> tuple[float, float] | None:
    """Mean (fill ratio, vertical skewness) over the visible frames whose shape does not touch the border (a cut
    shape measures differently), or over all visible frames if it always does; None if no frame is visible."""
    sure = alpha > 0.5
    inside = [t for t in visible if not (sure[t, 0].any() or sure[t, -1].any() or sure[t, :, 0].any()
                                         or sure[t, :, -1].any())] or list(visible)
    measures = np.array([_shape_measures(alpha[t]) for t in inside]).reshape(-1, 2)
    measures = measures[~np.isnan(measures).any(1)]
    return tuple(measures.mean(0)) if len(measures) else None


def _classify_shape(measures) -> str | None:
    if measures is None:
        return None
    fill, skew = measures
    return "triangle" if skew < TRIANGLE_SKEW else "square" if fill > CIRCLE_SQUARE else "circle"


def measure(video) -> tuple[float, float] | None:
    """The (fill ratio, skewness) `detect` classifies the shape by, None without foreground; for calibration."""
    alpha, _ = _coverage(_pixels(video))
    return None if alpha is None else shape_measures(alpha, np.flatnonzero(alpha.sum((1, 2)) >= MIN_AREA))


def class_name(color, shape, motion) -> str:
    """The synthetic data's class folder name, e.g. red_circle_left."""
    return f"{color}_{shape}_{motion}"


def class_from_prompt(text: str) -> str | None:
    """'a red circle moving left' (or a slug of it, or a class name) -> 'red_circle_left'; None if no class."""
    match = PROMPT.search(text.replace("_", " "))
    return class_name(*(g.lower() for g in match.groups())) if match else None


def adherence(videos, requested) -> dict:
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


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction: PSNR per token budget and rFVD; generation: gFVD
# ---------------------------------------------------------------------------------------------------------------------


def _batches(videos):
    """A (N, 3, T, H, W) tensor is one batch; anything else is taken as an iterable of such batches."""
    return [videos] if isinstance(videos, torch.Tensor) else videos


@torch.no_grad()
def mse(a, b):
    """Mean squared error of videos in [-1, 1], each clamped to that range first."""
    return (a.clamp(-1, 1) - b.clamp(-1, 1)).float().pow(2).mean().item()


def psnr(a, b):
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2, so the peak power is 4)."""
    return float(10 * np.log10(4 / max(mse(a, b), 1e-10)))


def reconstruction_metrics(tokenizer, vae, videos, budgets=None, steps: int = 25, generator=None, i3d=None,
                           batch_size: int = 8, names=None) -> dict:
    """{k: {"psnr": dB, "psnr_by_frame": [dB per video frame], "rfvd": FVD or None[, "adherence"]}} for
    reconstructions from the first k tokens of every latent frame.

    videos: (N, 3, T, H, W) in [-1, 1] or an iterable of such batches, encoded once each. budgets: default
    1, 2, 4, ..., K. PSNR is over the whole set (the mean squared error of every pixel, as `psnr` on one
    batch; per frame, the same over frame t of every clip: the time-causal decoder knows more at later frames);
    rFVD (real clips against their reconstructions) needs `i3d` (fvd.load_i3d) and >= 9 frames.
    names: the synthetic class of every video, to score the reconstructions' adherence too."""
    from fvd import FeatureStats, frechet_distance_from_stats, video_stats

    budgets = list(budgets or token_budgets(tokenizer.cfg.registers))
    if not all(1 <= k <= tokenizer.cfg.registers for k in budgets):
        raise ValueError(f"budgets must lie in [1, {tokenizer.cfg.registers}] (the tokenizer's K); got {budgets}")
    # Summed per-pixel squared error per video frame, so that batches of any size weigh fairly.
    frame_err = {k: 0.0 for k in budgets}
    real, fake = FeatureStats(), {k: FeatureStats() for k in budgets}
    scores = {k: [] for k in budgets}
    pixels = seen = 0
    for batch in _batches(videos):
        latents = vae.encode(batch)
        ids = tokenizer.encode(latents)
        if i3d is not None:
            video_stats(batch, i3d, batch_size=batch_size, stats=real)
        for k in budgets:
            recon = vae.decode(tokenizer.decode(ids[..., :k], steps=steps, generator=generator,
                                                size=latents.shape[-2:]))
            frame_err[k] = frame_err[k] + (recon.clamp(-1, 1) - batch.clamp(-1, 1)).float().pow(2).sum((0, 1, 3, 4))
            if i3d is not None:
                video_stats(recon, i3d, batch_size=batch_size, stats=fake[k])
            if names is not None:
                scores[k].append(adherence(list(recon), names[seen:seen + len(batch)]))
        pixels += batch.numel()
        seen += len(batch)
    if not pixels:
        raise ValueError("no videos to evaluate")
    per_frame = pixels / batch.shape[2]
    out = {k: {"psnr": float(10 * np.log10(4 / (float(frame_err[k].sum()) / pixels))),
               "psnr_by_frame": [float(10 * np.log10(4 / max(e / per_frame, 1e-10))) for e in frame_err[k].tolist()],
               "rfvd": frechet_distance_from_stats(real, fake[k]) if i3d is not None else None} for k in budgets}
    for k in budgets if names is not None else ():
        out[k]["adherence"] = {key: sum(a[key] * a["n"] for a in scores[k]) / seen for key in ("color", "shape",
                                                                                               "motion", "class")}
    return out


def psnr_by_budget(tokenizer, vae, videos, budgets=None, steps: int = 25, generator=None) -> dict:
    """{k: PSNR in dB} of reconstructions from k tokens per latent frame over a set of videos (see above)."""
    metrics = reconstruction_metrics(tokenizer, vae, videos, budgets, steps, generator)
    return {k: m["psnr"] for k, m in metrics.items()}


@torch.no_grad()
def codebook_usage(tokenizer, vae, videos, positions: int = 4) -> dict:
    """How much of the FSQ grid the encoder uses on `videos` (an iterable of batches).

    - distinct ids at each of the first `positions` token positions, and over all tokens;
    - the fraction of FSQ inputs where tanh is saturated (derivative < 0.05). FSQ collapses when the
      encoder's outputs grow: the gradient through tanh vanishes and the codes stop moving, so most clips
      share an id. A healthy tokenizer has many distinct first ids and few saturated inputs."""
    fsq = tokenizer.encoder.fsq
    inputs = []
    hook = tokenizer.encoder.to_codes.register_forward_hook(lambda module, args, z: inputs.append(z.float()))
    try:
        ids = torch.cat([tokenizer.encode(vae.encode(batch)).cpu() for batch in videos])   # (N, T, K)
    finally:
        hook.remove()
    z = torch.cat([x.flatten(0, -2) for x in inputs]) + fsq.shift
    return {"tokens": ids.numel(), "clips": len(ids),
            "distinct_by_position": [len(torch.unique(ids[..., i])) for i in range(min(positions, ids.shape[-1]))],
            "distinct": len(torch.unique(ids)),
            "saturated": (1 - torch.tanh(z) ** 2 < 0.05).float().mean().item()}


def class_attributes(names) -> dict:
    """Class names like red_circle_left -> {"color", "shape", "motion", "class"}: integer labels (N,) each."""
    parts = [name.split("_") for name in names]
    vocab = {"color": list(COLORS), "shape": list(SHAPES), "motion": list(MOTIONS)}
    labels = {key: torch.tensor([values.index(p[i]) for p in parts]) for i, (key, values) in enumerate(vocab.items())}
    labels["class"] = torch.tensor([SYNTHETIC_CLASSES.index(name) for name in names])
    return labels


def one_hot_digits(ids, levels) -> torch.Tensor:
    """Token ids (N, T) of one token position -> (N, T * sum(levels)) floats: the one-hot FSQ level of every
    dimension in every frame. A linear model on these can read any per-dimension value, not only a monotone one."""
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels)[:-1]), 0)
    digits = (ids.long()[..., None] // basis) % torch.tensor(levels)                      # (N, T, dims)
    return torch.cat([torch.nn.functional.one_hot(digits[..., i], n) for i, n in enumerate(levels)], -1).flatten(1).float()


def fit_logistic(x, y, classes: int, steps: int = 200, weight_decay: float = 1e-3):
    """Multinomial logistic regression (L-BFGS, a small L2 penalty) -> a function from features to logits."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda features: features @ w + b


@torch.no_grad()
def token_probe(train_ids, train_names, test_ids, test_names, levels) -> dict:
    """How much of the class each token position carries: for every position j (1..K), a logistic regression of
    the whole class (48-way) on the codes of token j in every frame (`one_hot_digits`), fitted on training clips
    and scored on held-out ones; colour, shape and motion are read from its class probabilities, summed over the
    classes that share the attribute. ids (N, T, K). Returns {attribute: [accuracy per position]}.

    Why through the class: an attribute such as "left" is the union of 12 class clusters in code space, which a
    linear model of the attribute alone cannot separate even when every cluster is plain (on the bundled demo
    tokenizer, position 1: motion 88% read directly, 99% through the class model, whose class accuracy is 95%).

    The paper's claim is that the first tokens carry semantics and motion (§1, §4.2): then position 1 predicts
    colour and motion well, and later positions, which refine the reconstruction, predict less."""
    train_y, test_y = class_attributes(train_names), class_attributes(test_names)
    parts = class_attributes(SYNTHETIC_CLASSES)   # the colour, shape and motion label of each of the 48 classes
    out = {key: [] for key in ("color", "shape", "motion", "class")}
    for j in range(train_ids.shape[-1]):
        x_train, x_test = one_hot_digits(train_ids[..., j], levels), one_hot_digits(test_ids[..., j], levels)
        probs = fit_logistic(x_train, train_y["class"], len(SYNTHETIC_CLASSES))(x_test).softmax(-1)
        for key in out:
            if key == "class":
                guess = probs.argmax(-1)
            else:
                guess = torch.zeros(len(probs), int(parts[key].max()) + 1).index_add_(1, parts[key], probs).argmax(-1)
            out[key].append((guess == test_y[key]).float().mean().item())
    return out


def token_and_null_registers(decoder, codes) -> dict:
    """{"tokens", "null"}: the decoder's register tokens for `codes` with every token kept, and with none."""
    none = torch.ones(len(codes), dtype=torch.bool, device=codes.device)
    return {"tokens": decoder.embed_registers(codes), "null": decoder.embed_registers(codes, null=none)}


@torch.no_grad()
def token_reliance(tokenizer, vae, videos, ts=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0), generator=None) -> dict:
    """{t: {"tokens": loss, "null": loss}}: the decoder's flow loss at fixed noise levels t over `videos`
    (an iterable of batches), given all K tokens of every frame and given none (the null condition).

    This is the check to run when reconstructions look like the data's average: near t = 1 the noisy
    input holds almost nothing, so a decoder that reads its tokens has a clearly lower loss with them than
    without, and one that ignores them (the encoder not yet trained into it) has the two columns equal.
    At low t the input itself gives the answer away and the columns meet."""
    sums = {t: {"tokens": 0.0, "null": 0.0} for t in ts}
    clips = 0
    for batch in videos:
        x = vae.encode(batch)
        codes, _ = tokenizer.encoder(x)
        for t, pair in flow_losses(tokenizer.decoder, x, codes, ts, generator).items():
            for name, loss in pair.items():
                sums[t][name] += loss * len(x)
        clips += len(x)
    if not clips:
        raise ValueError("no videos to evaluate")
    return {t: {name: total / clips for name, total in pair.items()} for t, pair in sums.items()}


def flow_losses(decoder, x, codes, ts, generator=None) -> dict:
    """{t: {"tokens": loss, "null": loss}}: the decoder's mean flow loss on latents x (B, C, T, H, W) at each fixed
    noise level t, given the FSQ codes (B, T, K, 6) and given the null condition; the same noise for both."""
    registers = token_and_null_registers(decoder, codes)
    out = {}
    for t in ts:
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        x_t = t * eps + (1 - t) * x
        v_t = torch.full((len(x),), t, device=x.device)
        out[t] = {name: (decoder(x_t, v_t, r).float() - (eps - x).float()).pow(2).mean().item()
                  for name, r in registers.items()}
    return out


@torch.no_grad()
def one_step_predictions(tokenizer, vae, videos, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's one-step prediction of clean clips from pure noise (t = 1, x_0 = x_t - v), given all K tokens
    of every frame and given none: two pixel batches shaped like `videos` (B, 3, T, H, W).

    At t = 1 the input is noise alone, so the prediction is the average clip the decoder expects from what it is
    given. Whatever it draws from the tokens and not from the null condition, the tokens carry: a decoder and
    encoder that work draw the clip's shape in place; early in training only the background appears."""
    dec = tokenizer.decoder
    x = vae.encode(videos)
    codes, _ = tokenizer.encoder(x)
    eps = torch.randn(x.shape, generator=generator, device=x.device)
    t = torch.ones(len(x), device=x.device)
    # x_0 = x_t - t v, with x_t = eps at t = 1
    return tuple(vae.decode(eps - dec(eps, t, r)) for r in token_and_null_registers(dec, codes).values())


# ---------------------------------------------------------------------------------------------------------------------
# The decoder's ceiling: trained on the true scene instead of an encoder's tokens
# ---------------------------------------------------------------------------------------------------------------------


def scene_codes(scene: dict, registers: int) -> torch.Tensor:
    """The codes a perfect encoder could give for a data.synthetic_scene, (frames, registers, 6) in [-1, 1].

    Register 0 of frame t holds the shape: its centre in frame t, colour, kind and size; register 1 the background:
    grey level, tint and gradient. The other registers repeat register 0, so every budget k >= 1 holds the shape."""
    size, (cx, cy) = scene["size"], np.asarray(scene["centres"], np.float32).T
    frames = len(cx)
    grey, tint = scene["grey"].mean(), scene["grey"] - scene["grey"].mean()
    color = list(COLORS).index(scene["color"])
    shape_codes = np.stack([cx / size * 2 - 1, cy / size * 2 - 1, np.full(frames, color / 1.5 - 1),
                            np.full(frames, SHAPES.index(scene["shape"]) - 1.0),
                            np.full(frames, (scene["r"] / size - 0.26) / 0.02), np.zeros(frames)], axis=1)
    background = [(grey - 128) / 18, *(tint / 4), scene["ramp"] / 10 * np.cos(scene["angle"]),
                  scene["ramp"] / 10 * np.sin(scene["angle"])]
    codes = np.repeat(shape_codes[:, None], registers, axis=1)
    if registers > 1:
        codes[:, 1] = background
    return torch.from_numpy(codes.astype(np.float32))


def decoder_ceiling(cfg, steps: int, batch_size: int, lr: float, frames: int, fps: float, num: int = 480,
                    eval_every: int = 500, eval_num: int = 48, seed: int = 0, sheet=None, device="cpu",
                    log=print) -> list[dict]:
    """Train a tokenizer's flow decoder alone, from ground-truth codes of synthetic clips (scene_codes), and
    score its samples every `eval_every` steps: what a decoder of this size draws within this budget when its
    tokens hold everything about the scene. No encoder can give it more information (a learned one may find a
    format easier to read than these coordinates), so samples that miss the requested class here point at the
    decoder's training budget, not at the encoder or the AR model.

    cfg: a pixel-space TokenizerConfig (latent_channels 3; latent_size the frame side). Returns one dict per
    evaluation: step, seconds, flow loss at t = 1 with the codes and without, PSNR and adherence of the samples
    (every register kept, 25 Euler steps). `sheet` (a path with {step}) gets the first 6 samples over their clips."""

    def clips(count, data_seed):
        names = [SYNTHETIC_CLASSES[n % len(SYNTHETIC_CLASSES)] for n in range(count)]
        scenes = [synthetic_scene(*name.split("_"), np.random.default_rng([data_seed, n]), cfg.latent_size, frames,
                                  fps) for n, name in enumerate(names)]
        x = torch.stack([from_uint8(render_scene(sc)) for sc in scenes])
        codes = torch.stack([scene_codes(sc, cfg.registers) for sc in scenes])
        return x.to(device), codes.to(device), names

    torch.manual_seed(seed)
    x, codes, _ = clips(num, seed)
    x_val, codes_val, names_val = clips(eval_num, seed + 1)
    dec = Decoder(cfg).to(device)
    opt, params = make_optimizer(dec, lr, 0.05, (0.9, 0.99), False)   # train_tok.py's optimizer and schedule
    order = torch.Generator().manual_seed(seed)
    rows, start = [], time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(num, (batch_size,), generator=order).to(device)
        loss = dec.loss(x[idx], codes[idx])["loss"]
        optimizer_step(opt, params, loss, lr_at(step - 1, lr, min(100, steps // 10), steps, 0.1), 1.0)
        if step % eval_every and step != steps:
            continue
        dec.eval()
        with torch.no_grad():
            at_1 = flow_losses(dec, x_val, codes_val, (1.0,), torch.Generator(device).manual_seed(seed))[1.0]
            out = dec.sample(codes_val, torch.full((eval_num,), cfg.registers, device=device), tuple(x_val.shape[-2:]),
                             generator=torch.Generator(device).manual_seed(seed))
        dec.train()
        scores = adherence([to_uint8(v) for v in out], names_val)
        rows.append(dict(step=step, seconds=time.time() - start, loss_tokens=at_1["tokens"], loss_null=at_1["null"],
                         psnr=psnr(out, x_val), **{k: v for k, v in scores.items() if k != "n"}))
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))
        if sheet:
            write_png_grid(str(sheet).format(step=step), np.stack([to_uint8(v) for v in [*out[:6], *x_val[:6]]]))
    return rows


def rfvd(tokenizer, vae, videos, k: int, i3d, steps: int = 25, generator=None) -> float:
    """rFVD of a set of real clips against their reconstructions from k tokens per latent frame."""
    return reconstruction_metrics(tokenizer, vae, videos, [k], steps, generator, i3d)[k]["rfvd"]


def folder_batches(root, frames: int, fps: float, size: int, num: int | None = None, batch_size: int = 8,
                   eval_start: str = "center", index=None):
    """Batches (B, 3, frames, size, size) of the fixed evaluation clips of a video folder (data.VideoFolder),
    the first `num` videos (all by default)."""
    yield from batches_of(VideoFolder(root, frames=frames, fps=fps, size=size, train=False, eval_start=eval_start,
                                      index=index), num, batch_size)


def batches_of(ds, num: int | None = None, batch_size: int = 8):
    """Batches (B, 3, T, H, W) of the first `num` clips of a VideoFolder (all by default)."""
    n = len(ds) if num is None else min(num, len(ds))
    for start in range(0, n, batch_size):
        yield torch.stack([ds[i][0] for i in range(start, min(start + batch_size, n))])


def class_names(ds, num: int | None = None) -> list[str]:
    """The class folder names of the first `num` clips of a VideoFolder ([] without the class layout)."""
    return [ds.classes[label] for label in ds.labels[:num]] if ds.classes else []


def gfvd(real_root, fake_root, i3d, frames: int = 17, fps: float = 4.0, size: int | None = None,
         num: int | None = None, batch_size: int = 8) -> float:
    """gFVD of a folder of generated videos (their first `frames` frames) against clips of a real video folder,
    both at `size` pixels (default: the generated videos' own size)."""
    from fvd import fvd

    if size is None:
        first = next(iter(sorted(Path(fake_root).rglob("*.mp4"))), None)
        if first is None:
            raise ValueError(f"no mp4 under {fake_root}")
        size = min(probe(first)["width"], probe(first)["height"])
    real = folder_batches(real_root, frames, fps, size, num, batch_size)
    # index=False: no metadata cache file is left in the folder of samples
    fake = folder_batches(fake_root, frames, fps, size, None, batch_size, eval_start="first", index=False)
    return fvd(real, fake, i3d, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    adh = commands.add_parser("adherence", help="detected vs requested class of sample.py's videos (synthetic data)")
    adh.add_argument("dir", type=Path, help="folder of mp4s named like sample-00-red_circle_left.mp4 or "
                                            "sample-00-a_red_circle_moving_left.mp4 (searched recursively)")
    rec = commands.add_parser("recon", help="PSNR per token budget and, with --i3d-ckpt, rFVD of reconstructions")
    codes = commands.add_parser("codes", help="FSQ codebook usage of a tokenizer: distinct ids, saturation")
    flow = commands.add_parser("flow", help="the decoder's flow loss per noise level, with its tokens and without")
    adapt = commands.add_parser("adaptive", help="adaptive token budgets against fixed ones: PSNR at equal tokens, "
                                                 "tokens at equal PSNR (tokenizer.choose_budgets)")
    probe_cmd = commands.add_parser("probe", help="held-out accuracy of colour, shape and motion from each token position "
                                              "(logistic regression on the synthetic data's codes)")
    for sub in (rec, codes, flow, probe_cmd, adapt):
        sub.add_argument("--tok-ckpt", type=Path, required=True,
                         help="tokenizer checkpoint (train_tok.py, or an official model.safetensors)")
        sub.add_argument("--data", type=Path, default=None, help="video folder; default: the built-in synthetic data")
        sub.add_argument("--vae", default="pixel", choices=VAE_KINDS, help="the VAE the tokenizer was trained with")
        sub.add_argument("--vae-ckpt", type=Path, default=None)
        sub.add_argument("--vae-version", default="v1.0", choices=["v1.0", "v1.1"])
        sub.add_argument("--num", type=int, default=32, help="clips evaluated (the first ones of the folder)")
    probe_cmd.add_argument("--heldout", type=Path, required=True, help="synthetic video folder the probe is scored on")
    probe_cmd.set_defaults(num=None)   # fit on every training clip
    for sub in (rec, adapt):
        sub.add_argument("--steps", type=int, default=25, help="Euler steps of the flow decoder")
    adapt.add_argument("--static", action="store_true", help="freeze every other clip on its first frame: a set "
                                                             "that mixes static and moving scenes")
    adapt.add_argument("--target-psnr", type=float, default=None, help="also: the budgets a PSNR target gives")
    for sub in (rec, flow, adapt):
        sub.add_argument("--seed", type=int, default=0)
    flow.add_argument("--sheet", type=Path, default=None,
                      help="also write a PNG: the first 4 clips and the decoder's one-step predictions of them from "
                           "pure noise, with their tokens and without (what the tokens carry)")
    ceil = commands.add_parser("ceiling", help="train a decoder alone from the true scenes of synthetic clips: the "
                                               "samples the best possible tokens would give at this size and budget")
    ceil.add_argument("--steps", type=int, default=2000)
    ceil.add_argument("--eval-every", type=int, default=500)
    ceil.add_argument("--lr", type=float, default=1e-3)
    ceil.add_argument("--size", type=int, default=32, help="frame side in pixels")
    ceil.add_argument("--registers", type=int, default=16, help="registers per frame (K)")
    ceil.add_argument("--depth", type=int, default=2, help="decoder blocks (width 64 x depth)")
    ceil.add_argument("--time-sampling", default="uniform", choices=TIME_SAMPLING)
    ceil.add_argument("--sheet", default=None,
                      help="PNG path with {step}: 6 samples over their clips at every evaluation")
    ceil.add_argument("--seed", type=int, default=0)
    gen = commands.add_parser("gfvd", help="FVD of a folder of generated videos against a real video folder")
    gen.add_argument("--real", type=Path, required=True, help="real video folder (e.g. the training data)")
    gen.add_argument("--fake", type=Path, required=True, help="folder of generated mp4s (sample.py --out)")
    gen.add_argument("--num", type=int, default=None, help="real clips used; default all")
    gen.add_argument("--size", type=int, default=None, help="side in pixels; default: the generated videos' size")
    for sub in (rec, gen):
        sub.add_argument("--i3d-ckpt", type=Path, default=None, help="Kinetics-400 I3D weights, i3d_pretrained_400.pt (see fvd.py)")
    for sub in (rec, codes, flow, probe_cmd, adapt, gen, ceil):
        sub.add_argument("--frames", type=int, default=17)
        sub.add_argument("--fps", type=float, default=4.0)
        sub.add_argument("--batch-size", type=int, default=8)
        sub.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    check_args(args, {name: (positive, ">= 1") for name in ("num", "steps", "frames", "batch_size", "eval_every",
                                                             "registers", "depth")}
               | {"fps": (positive, "> 0"), "lr": (positive, "> 0"), "size": (at_least(8), ">= 8"),
                  "seed": (at_least(0), ">= 0")}, f"{p.prog} {args.command}")
    return args


def run_adherence(args) -> dict:
    paths = sorted(args.dir.rglob("*.mp4"))
    wanted = {p: class_from_prompt(re.sub(r"^sample-\d+-", "", p.stem)) for p in paths}
    skipped = [p.name for p, name in wanted.items() if name is None]
    if skipped:
        print(f"no class in the names of {len(skipped)} files, skipped: {', '.join(skipped[:5])}")
    wanted = {p: name for p, name in wanted.items() if name is not None}
    if not wanted:
        raise ValueError(f"no mp4 under {args.dir} names a class (<color>_<shape>_<motion> or "
                         "'a <color> <shape> moving <motion>')")
    videos = [read_video(p)[0] for p in wanted]
    print(f"{'video':40s} {'requested':22s} detected")
    for path, name, video in zip(wanted, wanted.values(), videos):
        print(f"{path.name[:40]:40s} {name:22s} {class_name(*detect(video))}")
    scores = adherence(videos, list(wanted.values()))
    print(f"\nadherence over {scores['n']} videos")
    for key in ("color", "shape", "motion", "class"):
        print(f"  {key:7s} {100 * scores[key]:5.1f}%")
    # What the shape boundaries (CIRCLE_SQUARE, TRIANGLE_SKEW) are set from: the measures per requested shape.
    print(f"\nshape measures by requested shape (boundaries: fill {CIRCLE_SQUARE}, skewness {TRIANGLE_SKEW})")
    for shape in SHAPES:
        found = [m for m, name in zip(map(measure, videos), wanted.values()) if name.split("_")[1] == shape and m]
        if found:
            fill, skew = np.mean(found, 0)
            print(f"  {shape:8s} fill ratio {fill:.3f}  skewness {skew:+.3f}  ({len(found)} videos)")
    return scores


def load_tokenizer_and_clips(args, device):
    """recon, codes, flow and probe: the tokenizer, its VAE, the --data folder and batches of its clips."""
    from tokenizer import VideoFlexTok
    from vae import load_vae

    tok = VideoFlexTok.from_pretrained(args.tok_ckpt).to(device)
    vae = load_vae(args.vae, args.vae_ckpt, args.vae_version, device)
    return (tok, vae, *clips_for(args, tok, vae, args.data or synthetic_data(), device))


def clips_for(args, tok, vae, root, device):
    """A video folder at the tokenizer's trained size, and batches of its first --num clips on `device`."""
    folder = VideoFolder(root, frames=args.frames, fps=args.fps, size=tok.cfg.latent_size * vae.spatial_factor,
                         train=False)
    return folder, (b.to(device) for b in batches_of(folder, args.num, args.batch_size))


def run_codes(args) -> dict:
    device = pick_device(args.device)
    tok, vae, _, batches = load_tokenizer_and_clips(args, device)
    usage = codebook_usage(tok, vae, batches)
    print(f"{usage['clips']} clips, {usage['tokens']} tokens, codebook {tok.codebook_size}")
    for i, n in enumerate(usage["distinct_by_position"]):
        print(f"  token {i + 1} of every frame: {n} distinct ids")
    print(f"  all tokens: {usage['distinct']} distinct ids")
    print(f"  FSQ inputs with tanh saturated (derivative < 0.05): {100 * usage['saturated']:.1f}%")
    return usage


def run_flow(args) -> dict:
    device = pick_device(args.device)
    tok, vae, _, batches = load_tokenizer_and_clips(args, device)
    batches = list(batches)
    losses = token_reliance(tok, vae, batches, generator=torch.Generator(device).manual_seed(args.seed))
    print("noise level t  flow loss with all tokens  with none (null condition)")
    for t, pair in losses.items():
        print(f"{t:13.1f}  {pair['tokens']:25.4f}  {pair['null']:.4f}")
    print("a decoder that reads its tokens has the first column clearly below the second near t = 1")
    if args.sheet:
        clips = batches[0][:4]
        tokens, null = one_step_predictions(tok, vae, clips, torch.Generator(device).manual_seed(args.seed))
        rows = [to_uint8(v) for clip in zip(clips, tokens, null) for v in clip]
        print(f"wrote {write_png_grid(args.sheet, np.stack(rows))}: per clip, rows = the clip, the one-step "
              "prediction at t = 1 from its tokens, and from none")
    return losses


def run_probe(args) -> dict:
    device = pick_device(args.device)
    tok, vae, *train = load_tokenizer_and_clips(args, device)
    sets = []
    for folder, batches in (train, clips_for(args, tok, vae, args.heldout, device)):
        if not folder.classes:
            raise ValueError(f"{folder.root} has no <class>/<video> layout: the probe needs the synthetic data's classes")
        sets += [torch.cat([tok.encode(vae.encode(b)).cpu() for b in batches]), class_names(folder, args.num)]
    scores = token_probe(*sets, tok.cfg.fsq_levels)
    print(f"held-out accuracy from one token position (a logistic regression of the class on its codes in every "
          f"frame; colour, shape and motion read from the class probabilities), "
          f"{len(sets[0])} training and {len(sets[2])} held-out clips")
    print("position  " + "  ".join(f"{key:>6s}" for key in scores))
    for j in range(len(scores["color"])):
        print(f"{j + 1:8d}  " + "  ".join(f"{100 * scores[key][j]:5.1f}%" for key in scores))
    print("chance    " + "  ".join(f"{100 / n:5.1f}%" for n in (len(COLORS), len(SHAPES), len(MOTIONS),
                                                                  len(SYNTHETIC_CLASSES))))
    return scores


def adaptive_comparison(table, budgets) -> list[dict]:
    """Adaptive against fixed token budgets, from a PSNR table (clips, budgets) (tokenizer.budget_psnr). For every
    fixed k: its mean PSNR; the mean PSNR of adaptive budgets with the same total (`choose_budgets`), and the
    tokens per frame (mean over clips) the adaptive path needs to reach k's mean PSNR (None if it never does)."""
    from tokenizer import choose_budgets, greedy_budgets

    n, path, rows = len(table), list(greedy_budgets(table, budgets)), []
    for j, k in enumerate(budgets):
        fixed = float(table[:, j].mean())
        chosen = choose_budgets(table, budgets, total_tokens=k * n)
        at = torch.tensor([budgets.index(int(c)) for c in chosen])
        reach = [tokens for _, tokens, mean in path if mean >= fixed - 1e-9]
        rows.append({"k": k, "fixed_psnr": fixed, "adaptive_psnr": float(table[torch.arange(n), at].mean()),
                     "adaptive_tokens": float(chosen.float().mean()),
                     "tokens_to_match": reach[0] / n if reach else None})
    return rows


def run_adaptive(args) -> list[dict]:
    from tokenizer import budget_psnr

    device = pick_device(args.device)
    tok, vae, _, batches = load_tokenizer_and_clips(args, device)
    tables = []
    for i, batch in enumerate(batches):
        if args.static:   # every other clip frozen on its first frame: a static scene among moving ones
            batch[1::2] = batch[1::2, :, :1].expand_as(batch[1::2])
        tables.append(budget_psnr(tok, vae, batch, steps=args.steps, seed=args.seed + i)[1])
    table, budgets = torch.cat(tables), token_budgets(tok.cfg.registers)
    rows = adaptive_comparison(table, budgets)
    print(f"{len(table)} clips{' (every other one static)' if args.static else ''}; PSNR is the mean over clips")
    print("fixed k  PSNR (dB)   adaptive at the same tokens: PSNR  k (mean)   adaptive tokens/frame for the same PSNR")
    for r in rows:
        match = f"{r['tokens_to_match']:.2f} ({100 * (1 - r['tokens_to_match'] / r['k']):.0f}% fewer)" \
            if r["tokens_to_match"] is not None else "not reached"
        print(f"{r['k']:7d}  {r['fixed_psnr']:9.2f}   {r['adaptive_psnr']:34.2f}  {r['adaptive_tokens']:8.2f}   "
              f"{match}")
    if args.target_psnr is not None:
        from tokenizer import choose_budgets
        chosen = choose_budgets(table, budgets, target_psnr=args.target_psnr)
        met = table[torch.arange(len(table)), torch.tensor([budgets.index(int(c)) for c in chosen])] >= args.target_psnr
        print(f"target {args.target_psnr} dB: tokens per frame " + ", ".join(
            f"{k}: {int((chosen == k).sum())} clips" for k in budgets) + f"; {int((~met).sum())} clips reach it at no "
            f"budget and get {budgets[-1]}")
    return rows


def run_recon(args) -> dict:
    from fvd import load_i3d

    device = pick_device(args.device)
    i3d = load_i3d(args.i3d_ckpt).to(device) if args.i3d_ckpt is not None else None   # fail before decoding
    tok, vae, folder, batches = load_tokenizer_and_clips(args, device)
    gen = torch.Generator(device).manual_seed(args.seed)
    # A folder of synthetic classes (data.py synthetic): also score what the reconstructions show.
    names = class_names(folder, args.num)
    names = names if names and all(name in SYNTHETIC_CLASSES for name in names) else None
    metrics = reconstruction_metrics(tok, vae, batches, steps=args.steps, generator=gen, i3d=i3d,
                                     batch_size=args.batch_size, names=names)
    print("tokens/frame  PSNR (dB)" + ("  rFVD" if i3d is not None else "")
          + ("  colour  shape  motion  class (adherence)" if names else ""))
    for k, m in metrics.items():
        print(f"{k:12d}  {m['psnr']:9.2f}" + (f"  {m['rfvd']:.1f}" if i3d is not None else "")
              + ("".join(f"  {100 * m['adherence'][key]:5.1f}%" for key in ("color", "shape", "motion", "class"))
                 if names else ""))
    print("PSNR per video frame (dB): the time-causal decoder has seen more tokens by the later frames")
    for k, m in metrics.items():
        print(f"{k:12d}  " + " ".join(f"{p:5.2f}" for p in m["psnr_by_frame"]))
    if i3d is None:
        print("no --i3d-ckpt: rFVD not computed")
    return metrics


def run_ceiling(args) -> list[dict]:
    from tokenizer import TokenizerConfig

    cfg = TokenizerConfig.preset("tiny", dec_depth=args.depth, latent_size=args.size, registers=args.registers,
                                 max_frames=args.frames, repa_dim=0, time_sampling=args.time_sampling)
    if args.size % cfg.patch_size:
        raise ValueError(f"ceiling needs a --size divisible by the patch size {cfg.patch_size}; got {args.size}")
    return decoder_ceiling(cfg, args.steps, args.batch_size, args.lr, args.frames, args.fps, eval_every=args.eval_every,
                           seed=args.seed, sheet=args.sheet, log=lambda line: print(line, flush=True),
                           device=pick_device(args.device))


def run_gfvd(args) -> float:
    from fvd import load_i3d

    if args.i3d_ckpt is None:
        raise ValueError("gfvd needs --i3d-ckpt: the Kinetics-400 I3D weights i3d_pretrained_400.pt "
                         "(the TF-Hub FVD network in the pytorch-i3d layout; see fvd.py)")
    device = pick_device(args.device)
    value = gfvd(args.real, args.fake, load_i3d(args.i3d_ckpt).to(device), args.frames, args.fps, args.size,
                 args.num, args.batch_size)
    print(f"gFVD {value:.1f}")
    return value


def main(argv=None):
    args = parse_args(argv)
    try:
        return {"adherence": run_adherence, "recon": run_recon, "adaptive": run_adaptive, "codes": run_codes,
                "probe": run_probe, "flow": run_flow, "gfvd": run_gfvd, "ceiling": run_ceiling}[args.command](args)
    except (ValueError, FileNotFoundError, BadVideo) as err:
        raise SystemExit(f"eval.py: error: {err}") from err


if __name__ == "__main__":
    main()
