"""Evaluation metrics, the library: reconstruction PSNR per token budget, rFVD and gFVD, FSQ codebook usage, the
token-position probe, the decoder's reliance on its tokens, and adaptive against fixed token budgets.

Paper: §4.1 ("Evaluation metrics": rFVD, gFVD and a classification score for generated videos, here
synthetic.adherence), §4.2-4.3 (reconstruction and generation from a variable number of tokens per frame), §1 and
§4.2 (the first tokens carry semantics and motion: the probe). eval.py is their command line; the training and
sampling scripts and demo.py import them from here.

    psnr(recon, videos)                                              # dB, videos in [-1, 1]
    reconstruction_metrics(tok, vae, batches, i3d=i3d)               # {k: {"psnr", "psnr_by_frame", "rfvd"}}
    gfvd("k600/val", "samples/", i3d)                                # FVD of generated mp4s against real clips
    token_probe(train_ids, train_names, test_ids, test_names, tok.cfg.fsq_levels)

FVD needs the Kinetics-400 I3D weights (fvd.load_i3d of i3d_pretrained_400.pt, see fvd.py); clips need >= 9 frames.

References: Unterthiner et al. 2018 (FVD, via fvd.py).
"""

from pathlib import Path

import numpy as np
import torch

from data import VideoFolder
from decoder import token_budgets
from fvd import FeatureStats, frechet_distance_from_stats, fvd, video_stats
from synthetic import COLORS, MOTIONS, SHAPES, SYNTHETIC_CLASSES, adherence
from tokenizer import choose_budgets, greedy_budgets
from video import probe


################################################################################
# Reconstruction: PSNR per token budget and rFVD

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


def reconstruction_metrics(tokenizer, vae, videos, budgets=None, steps=25, generator=None, i3d=None,
                           batch_size=8, names=None):
    """{k: {"psnr": dB, "psnr_by_frame": [dB per video frame], "rfvd": FVD or None[, "adherence"]}} for
    reconstructions from the first k tokens of every latent frame.

    videos: (N, 3, T, H, W) in [-1, 1] or an iterable of such batches, encoded once each. budgets: default
    1, 2, 4, ..., K. PSNR is over the whole set (the mean squared error of every pixel, as `psnr` on one
    batch; per frame, the same over frame t of every clip: the time-causal decoder knows more at later frames);
    rFVD (real clips against their reconstructions) needs `i3d` (fvd.load_i3d) and >= 9 frames.
    names: the synthetic class of every video, to score the reconstructions' adherence too."""
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


################################################################################
# Generation: gFVD of a folder of samples

def folder_batches(root, frames, fps, size, num=None, batch_size=8, eval_start="center", index=None):
    """Batches (B, 3, frames, size, size) of the fixed evaluation clips of a video folder (data.VideoFolder),
    the first `num` videos (all by default)."""
    yield from batches_of(VideoFolder(root, frames=frames, fps=fps, size=size, train=False, eval_start=eval_start,
                                      index=index), num, batch_size)


def batches_of(ds, num=None, batch_size=8):
    """Batches (B, 3, T, H, W) of the first `num` clips of a VideoFolder (all by default)."""
    n = len(ds) if num is None else min(num, len(ds))
    for start in range(0, n, batch_size):
        yield torch.stack([ds[i][0] for i in range(start, min(start + batch_size, n))])


def class_names(ds, num=None):
    """The class folder names of the first `num` clips of a VideoFolder ([] without the class layout)."""
    return [ds.classes[label] for label in ds.labels[:num]] if ds.classes else []


def gfvd(real_root, fake_root, i3d, frames=17, fps=4.0, size=None, num=None, batch_size=8):
    """gFVD of a folder of generated videos (their first `frames` frames) against clips of a real video folder,
    both at `size` pixels (default: the generated videos' own size)."""
    if size is None:
        first = next(iter(sorted(Path(fake_root).rglob("*.mp4"))), None)
        if first is None:
            raise ValueError(f"no mp4 under {fake_root}")
        size = min(probe(first)["width"], probe(first)["height"])
    real = folder_batches(real_root, frames, fps, size, num, batch_size)
    # index=False: no metadata cache file is left in the folder of samples
    fake = folder_batches(fake_root, frames, fps, size, None, batch_size, eval_start="first", index=False)
    return fvd(real, fake, i3d, batch_size=batch_size)


################################################################################
# What the tokens carry: codebook usage and the token-position probe

@torch.no_grad()
def codebook_usage(tokenizer, vae, videos, positions=4):
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


def class_attributes(names):
    """Class names like red_circle_left -> {"color", "shape", "motion", "class"}: integer labels (N,) each."""
    parts = [name.split("_") for name in names]
    vocab = {"color": list(COLORS), "shape": list(SHAPES), "motion": list(MOTIONS)}
    labels = {key: torch.tensor([values.index(p[i]) for p in parts]) for i, (key, values) in enumerate(vocab.items())}
    labels["class"] = torch.tensor([SYNTHETIC_CLASSES.index(name) for name in names])
    return labels


def one_hot_digits(ids, levels):
    """Token ids (N, T) of one token position -> (N, T * sum(levels)) floats: the one-hot FSQ level of every
    dimension in every frame. A linear model on these can read any per-dimension value, not only a monotone one."""
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels)[:-1]), 0)
    digits = (ids.long()[..., None] // basis) % torch.tensor(levels)                      # (N, T, dims)
    return torch.cat([torch.nn.functional.one_hot(digits[..., i], n) for i, n in enumerate(levels)], -1).flatten(1).float()


def fit_logistic(x, y, classes, steps=200, weight_decay=1e-3):
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
def token_probe(train_ids, train_names, test_ids, test_names, levels):
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


################################################################################
# Does the decoder read its tokens: flow losses with them and without

def token_and_null_registers(decoder, codes):
    """{"tokens", "null"}: the decoder's register tokens for `codes` with every token kept, and with none."""
    none = torch.ones(len(codes), dtype=torch.bool, device=codes.device)
    return {"tokens": decoder.embed_registers(codes), "null": decoder.embed_registers(codes, null=none)}


@torch.no_grad()
def token_reliance(tokenizer, vae, videos, ts=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0), generator=None):
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


def flow_losses(decoder, x, codes, ts, generator=None):
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
def one_step_predictions(tokenizer, vae, videos, generator=None):
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


################################################################################
# Adaptive against fixed token budgets

def adaptive_comparison(table, budgets):
    """Adaptive against fixed token budgets, from a PSNR table (clips, budgets) (tokenizer.budget_psnr). For every
    fixed k: its mean PSNR; the mean PSNR of adaptive budgets with the same total (`choose_budgets`), and the
    tokens per frame (mean over clips) the adaptive path needs to reach k's mean PSNR (None if it never does)."""
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
