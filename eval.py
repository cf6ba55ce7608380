"""Evaluation from the command line: reconstruction PSNR per token budget and rFVD, gFVD, the class adherence of
samples on the synthetic data, and checks of a trained tokenizer (codebook usage, token-position probe, reliance
on its tokens, adaptive budgets).

Paper: §4.1 ("Evaluation metrics": rFVD, gFVD and a classification score for generated videos), §4.2-4.3
(reconstruction and generation from a variable number of tokens per frame).

    python eval.py adherence samples/                      # sample-NN-<class or prompt>.mp4 written by sample.py
    python eval.py recon --tok-ckpt runs/tok/ckpt-0002000.pt --data out/synthetic --num 32 [--i3d-ckpt I3D]
    python eval.py codes --tok-ckpt runs/tok/ckpt-0002000.pt --data out/synthetic   # FSQ codebook usage
    python eval.py flow --tok-ckpt runs/tok/ckpt-0002000.pt --data out/synthetic    # does the decoder read its tokens?
    python eval.py probe --tok-ckpt assets/demo/tok.pt --vae demo --vae-ckpt assets/demo/vae.pt \
        --data out/demo-data/data --heldout out/demo-data/heldout --frames 5      # what each token position carries
    python eval.py adaptive --tok-ckpt runs/tok/ckpt-0002000.pt --data out/synthetic [--static]
    python eval.py gfvd --real out/synthetic --fake samples/ --i3d-ckpt i3d_pretrained_400.pt

This file parses the flags, loads the models and prints; the metrics are metrics.py's, the adherence detector is
synthetic.py's. FVD needs the Kinetics-400 I3D weights (`--i3d-ckpt i3d_pretrained_400.pt`, see fvd.py); clips need
>= 9 frames.

References: Unterthiner et al. 2018 (FVD, via fvd.py).
"""

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from data import VideoFolder
from decoder import token_budgets
from fvd import load_i3d
from metrics import (adaptive_comparison, batches_of, class_names, codebook_usage, gfvd, one_step_predictions,
                     reconstruction_metrics, token_probe, token_reliance)
from official import load_tokenizer
from synthetic import (CIRCLE_SQUARE, COLORS, MOTIONS, SHAPES, SYNTHETIC_CLASSES, TRIANGLE_SKEW, adherence,
                       class_from_prompt, class_name, detect, measure, synthetic_data)
from tokenizer import budget_psnr, choose_budgets
from trainer import at_least, check_args, pick_device, positive
from vae import VAE_KINDS, load_vae
from video import BadVideo, read_video, to_uint8, write_png_grid


################################################################################
# Flags

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
    gen = commands.add_parser("gfvd", help="FVD of a folder of generated videos against a real video folder")
    gen.add_argument("--real", type=Path, required=True, help="real video folder (e.g. the training data)")
    gen.add_argument("--fake", type=Path, required=True, help="folder of generated mp4s (sample.py --out)")
    gen.add_argument("--num", type=int, default=None, help="real clips used; default all")
    gen.add_argument("--size", type=int, default=None, help="side in pixels; default: the generated videos' size")
    for sub in (rec, gen):
        sub.add_argument("--i3d-ckpt", type=Path, default=None, help="Kinetics-400 I3D weights, i3d_pretrained_400.pt (see fvd.py)")
    for sub in (rec, codes, flow, probe_cmd, adapt, gen):
        sub.add_argument("--frames", type=int, default=17)
        sub.add_argument("--fps", type=float, default=4.0)
        sub.add_argument("--batch-size", type=int, default=8)
        sub.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    check_args(args, {name: (positive, ">= 1") for name in ("num", "steps", "frames", "batch_size")}
               | {"fps": (positive, "> 0"), "size": (at_least(8), ">= 8"), "seed": (at_least(0), ">= 0")},
               f"{p.prog} {args.command}")
    return args


################################################################################
# The commands

def run_adherence(args):
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
    measures = [measure(video) for video in videos]
    for shape in SHAPES:
        found = [m for m, name in zip(measures, wanted.values()) if name.split("_")[1] == shape and m]
        if found:
            fill, skew = np.mean(found, 0)
            print(f"  {shape:8s} fill ratio {fill:.3f}  skewness {skew:+.3f}  ({len(found)} videos)")
    return scores


def load_tokenizer_and_clips(args, device):
    """recon, codes, flow and probe: the tokenizer, its VAE, the --data folder and batches of its clips."""
    tok = load_tokenizer(args.tok_ckpt).to(device)
    vae = load_vae(args.vae, args.vae_ckpt, args.vae_version, device)
    return (tok, vae, *clips_for(args, tok, vae, args.data or synthetic_data(), device))


def clips_for(args, tok, vae, root, device):
    """A video folder at the tokenizer's trained size, and batches of its first --num clips on `device`."""
    folder = VideoFolder(root, frames=args.frames, fps=args.fps, size=tok.cfg.latent_size * vae.spatial_factor,
                         train=False)
    return folder, (b.to(device) for b in batches_of(folder, args.num, args.batch_size))


def run_codes(args):
    device = pick_device(args.device)
    tok, vae, _, batches = load_tokenizer_and_clips(args, device)
    usage = codebook_usage(tok, vae, batches)
    print(f"{usage['clips']} clips, {usage['tokens']} tokens, codebook {tok.codebook_size}")
    for i, n in enumerate(usage["distinct_by_position"]):
        print(f"  token {i + 1} of every frame: {n} distinct ids")
    print(f"  all tokens: {usage['distinct']} distinct ids")
    print(f"  FSQ inputs with tanh saturated (derivative < 0.05): {100 * usage['saturated']:.1f}%")
    return usage


def run_flow(args):
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


def run_probe(args):
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


def run_adaptive(args):
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
        chosen = choose_budgets(table, budgets, target_psnr=args.target_psnr)
        met = table[torch.arange(len(table)), torch.tensor([budgets.index(int(c)) for c in chosen])] >= args.target_psnr
        print(f"target {args.target_psnr} dB: tokens per frame " + ", ".join(
            f"{k}: {int((chosen == k).sum())} clips" for k in budgets) + f"; {int((~met).sum())} clips reach it at no "
            f"budget and get {budgets[-1]}")
    return rows


def run_recon(args):
    device = pick_device(args.device)
    i3d = load_i3d(args.i3d_ckpt).to(device) if args.i3d_ckpt is not None else None   # fail before decoding
    tok, vae, folder, batches = load_tokenizer_and_clips(args, device)
    gen = torch.Generator(device).manual_seed(args.seed)
    # A folder of synthetic classes (synthetic.py): also score what the reconstructions show.
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


def run_gfvd(args):
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
                "probe": run_probe, "flow": run_flow, "gfvd": run_gfvd}[args.command](args)
    except (ValueError, FileNotFoundError, BadVideo) as err:
        raise SystemExit(f"eval.py: error: {err}") from err


if __name__ == "__main__":
    main()
