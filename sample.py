"""Sample videos from VideoFlexTok tokens: text- or class-to-video with the AR generator, and
reconstructions of a real video from 1, 2, 4, ..., K tokens per frame.

Paper: §3.3 and §4.3 (AR generation over coarse-to-fine tokens, any token budget), §3.4 and
Appendix F.1 (long videos), Appendix C.3 (time-first order), Figures 2 and 13-16 (reconstructions
per token budget). Official release (apple/ml-videoflextok): the sampler settings (guidance 25 with
APG) and its chunk wrapper for long videos.

    python sample.py --ar-ckpt runs/ar/ckpt-0002000.pt --prompt "a red circle moving left" --tokens-per-frame 32
    python sample.py --ar-ckpt runs/ar/ckpt-0002000.pt --class 3 --frames 81 --num-samples 2
    python sample.py --tok-ckpt runs/tok/ckpt-0002000.pt --reconstruct clip.mp4

With no checkpoint, the bundled demo models (assets/demo, made by `make demo-train`) are used: the
text model for --prompt, the class model for --class, the tokenizer alone for --reconstruct.

A video longer than one chunk (one chunk: 17 frames for d18 on VidTok; --frames 81 is 5 chunks) is
tokenized, generated and decoded chunk by chunk, each chunk conditioned on the last decoded frame;
chunks.py says how, and where the design stops. Beyond that:
- Progressive decoding (--progressive): frame by frame, each frame written the moment it is
  decoded, the same videos as joint decoding (the time-causal decoder, no APG).
- Adaptive budgets (--target-psnr, --mean-tokens with --reconstruct): each chunk gets the tokens per
  frame its content needs (tokenizer.choose_budgets), which the coarse-to-fine order allows.

Outputs go to a hidden temporary folder inside --out and are moved into place only once all of
them are written, so a failure leaves nothing half-written behind (except --progressive's frames).
"""
import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import official
from ar import load_ar
from checkpoint import DEMO_ASSETS
from chunks import Chunks, decode_long, decode_pieces, generate_ids, tokenize_long
from decoder import APG, token_budgets
from generate import Sampler
from metrics import psnr
from t5 import T5Encoder
from tokenizer import budget_psnr, choose_budgets
from trainer import at_least, check_args, pick_device, positive
from vae import VAE_KINDS, load_vae
from video import BadVideo, from_uint8, load_clip, probe, start_frames, to_uint8, write_png_grid, write_video

SHEET_COLUMNS = 9  # frames shown per row of the contact sheet, evenly spaced, first and last included


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("what to sample")
    what.add_argument("--prompt", action="append", default=[], help="text-to-video prompt (repeatable)")
    what.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME_OR_ID",
                      help="class-to-video: a class name or id (repeatable)")
    what.add_argument("--reconstruct", type=Path, default=None, metavar="VIDEO",
                      help="tokenize this video and decode it from 1, 2, 4, ..., K tokens per frame")
    what.add_argument("--target-psnr", type=float, default=None,
                      help="--reconstruct: also decode with adaptive budgets, the fewest tokens per frame that reach "
                           "this PSNR in every chunk")
    what.add_argument("--mean-tokens", type=float, default=None,
                      help="--reconstruct: also decode with adaptive budgets, this mean of tokens per frame spread "
                           "over the chunks that gain most from it")
    what.add_argument("--num-samples", type=int, default=1, help="videos per prompt or class")
    what.add_argument("--tokens-per-frame", type=int, default=None, help="1..K; default 32, or K if smaller")
    what.add_argument("--frames", type=int, default=None,
                      help="1 + stride * n: one chunk by default (17 frames for d18 on VidTok; 81 = 5 chunks)")
    what.add_argument("--fps", type=float, default=4.0,
                      help="frame rate of the written videos and of --reconstruct's clip")
    what.add_argument("--size", type=int, default=None, help="side in pixels; default: the tokenizer's trained size")
    ckpts = p.add_argument_group("checkpoints")
    ckpts.add_argument("--ar-ckpt", type=Path, default=None,
                       help="AR checkpoint (train_ar.py); default: the bundled demo model for --prompt or --class")
    ckpts.add_argument("--tok-ckpt", type=Path, default=None,
                       help="tokenizer checkpoint (train_tok.py, or an official model.safetensors); default: the AR "
                            "checkpoint's, or the bundled demo tokenizer")
    ckpts.add_argument("--vae", default=None, choices=VAE_KINDS,
                       help="the VAE the tokenizer was trained with; default: demo with the bundled models, else pixel")
    ckpts.add_argument("--vae-ckpt", type=Path, default=None)
    ckpts.add_argument("--vae-version", default="v1.0", choices=["v1.0", "v1.1"])
    ckpts.add_argument("--t5", type=Path, default=None, help="T5 directory, for AR models conditioned on T5 features")
    flow = p.add_argument_group("flow decoder")
    flow.add_argument("--steps", type=int, default=25, help="Euler steps")
    flow.add_argument("--guidance", type=float, default=None,
                      help="guidance scale (1 = off); default 25, the official video setting (1 with the bundled "
                           "demo models)")
    flow.add_argument("--apg", action=argparse.BooleanOptionalAction, default=True,
                      help="adaptive projected guidance (official: on); --no-apg gives plain CFG")
    flow.add_argument("--progressive", action="store_true",
                      help="text/class sampling: decode frame by frame and write each frame as a PNG to --out/frames/ "
                           "as soon as it is decoded (the same videos; time-causal decoder, no APG)")
    gen = p.add_argument_group("AR sampling")
    gen.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance on the logits (1 = off)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the AR decode step and the flow decoder's Euler step (CUDA graphs on CUDA; "
                          "default: on CUDA). Where compilation fails, one line says so and sampling runs eagerly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("out/samples"))
    args = p.parse_args(argv)

    # The one check of the flags, before any work: each on its own, then together. What depends on the
    # models (--tokens-per-frame, --frames, --size, --class) is checked once they are loaded, before any output.
    check_args(args, {"num_samples": (positive, ">= 1"), "fps": (positive, "> 0"), "size": (positive, ">= 1"),
                      "steps": (positive, ">= 1"), "guidance": (at_least(0), ">= 0"), "cfg": (at_least(0), ">= 0"),
                      "temperature": (positive, "> 0"), "top_k": (positive, ">= 1"),
                      "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "seed": (at_least(0), ">= 0"),
                      "target_psnr": (positive, "> 0"), "mean_tokens": (at_least(1), ">= 1")}, "sample.py")
    bundled = not (args.ar_ckpt or args.tok_ckpt)
    if args.guidance is None:   # 1 is the setting of the demo's figures
        args.guidance = 1.0 if bundled else 25.0
    adaptive = args.target_psnr is not None or args.mean_tokens is not None
    conflicts = [
        (args.reconstruct and args.ar_ckpt,
         "give --ar-ckpt (text- or class-to-video) or --reconstruct VIDEO with --tok-ckpt, not both"),
        (not (args.reconstruct or args.prompt or args.classes or args.ar_ckpt),
         "nothing to sample: give --prompt TEXT, --class NAME or --reconstruct VIDEO"),
        (bundled and args.prompt and args.classes,
         "the bundled demo models take --prompt or --class, not both; give --ar-ckpt for a model conditioned on both"),
        (adaptive and not args.reconstruct, "--target-psnr and --mean-tokens choose budgets for --reconstruct"),
        (args.target_psnr is not None and args.mean_tokens is not None,
         "give --target-psnr or --mean-tokens, not both"),
        (args.progressive and args.reconstruct,
         "--progressive is for --prompt / --class sampling; --reconstruct decodes every budget jointly"),
        (args.progressive and args.apg and args.guidance != 1,
         "--progressive cannot use APG (its norms span all frames, so a frame would depend on later ones): add "
         "--no-apg for plain guidance, or drop --progressive"),
    ]
    bad = [message for failed, message in conflicts if failed]
    if bad:
        raise SystemExit("sample.py: error: " + "; ".join(bad))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, BadVideo) as err:
        raise SystemExit(f"sample.py: error: {err}") from err


def run(args):
    # Load the models: the checkpoints given, else the bundled demo models.
    if not (args.ar_ckpt or args.tok_ckpt):
        use_bundled(args)
    device = pick_device(args.device)
    try:
        ar, state = load_ar(args.ar_ckpt, device) if args.ar_ckpt else (None, {})
        tok = official.load_tokenizer(tokenizer_path(args, state)).to(device)
        vae = load_vae(args.vae or "pixel", args.vae_ckpt, args.vae_version, device)
    except (ValueError, FileNotFoundError) as err:
        if str(DEMO_ASSETS) in str(err):
            raise ValueError(f"{err}\nThe bundled demo models are missing or corrupt: run `make demo-train`") from err
        raise

    # Check the request against the models, before anything is written. A chunk is the AR model's clip
    # when sampling, the tokenizer's when reconstructing (chunks.py).
    tok.check_vae(vae)
    if ar is not None:
        ar.check_tokenizer(tok)
        K = ar.cfg.tokens_per_frame
        k = min(32, K) if args.tokens_per_frame is None else args.tokens_per_frame
        if not 1 <= k <= K:
            raise ValueError(f"--tokens-per-frame must be in [1, {K}] (the model's tokens per frame); got {k}")
    chunks = Chunks(tok.cfg.max_frames if ar is None else ar.cfg.max_frames, vae.temporal_factor)
    args.frames = chunks.frames if args.frames is None else args.frames   # default: one chunk
    n_chunks = chunks.check(args.frames)
    f, p, most = vae.spatial_factor, tok.cfg.patch_size, tok.cfg.latent_size
    size = args.size or most * f
    if size % (f * p) or not 0 < size // f <= most:
        raise ValueError(f"--size must be a multiple of {f * p} (VAE factor {f} x patch {p}) and at most {most * f}; "
                         f"got {size}")
    if args.progressive and tok.cfg.dec_mask != "time_causal":
        raise ValueError(f"--progressive needs the time-causal decoder; this tokenizer's has dec_mask="
                         f"{tok.cfg.dec_mask!r} (stage 2: a frame depends on later frames): drop --progressive")
    decode = dict(steps=args.steps, guidance=args.guidance, apg=APG() if args.apg else None,
                  size=(args.size // f,) * 2 if args.size else None)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.compile:
        tok.decoder.compile_sampling()

    # Build the condition, or read the clip to reconstruct: its first --frames frames at --fps, resized and
    # centre-cropped to --size.
    if ar is not None:
        cond, labels = condition(args, ar, state, device)
    else:
        try:
            if not start_frames(probe(args.reconstruct), args.frames, args.fps):
                raise BadVideo(f"too short for {args.frames} frames at {args.fps} fps")
            video = from_uint8(load_clip(args.reconstruct, 0.0, args.frames, args.fps, size))[None].to(device)
        except BadVideo as err:
            raise ValueError(f"cannot read --reconstruct {args.reconstruct}: {err}") from err

    # Generate and decode, or reconstruct at every budget; then write the outputs.
    with Output(args.out) as output:
        if ar is None:
            reconstruct(args, tok, vae, video, chunks, decode, output)
        else:
            gen = torch.Generator(device).manual_seed(args.seed)
            latents = min(chunks.latents, chunks.latent_frames(args.frames))
            sampler = Sampler(ar, len(labels), length=latents * k, compile=args.compile)
            ids = generate_ids(sampler, n_chunks, latents, k, **cond, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, generator=gen,
                               cfg_scale=args.cfg if args.cfg != 1 and "batch" not in cond else None)
            names = [f"sample-{i:02d}-{slug(label)}" for i, label in enumerate(labels)]
            if args.progressive:
                pieces = decode_pieces(tok, vae, ids, chunks, progressive=True, generator=gen, **decode)
                videos = write_frames_as_decoded(pieces, args.out / "frames", names)
            else:
                videos = decode_long(tok, vae, ids, chunks, generator=gen, **decode)
            write_videos(output, "samples.png", videos, names, args.fps)
            torch.save(ids.cpu(), output.path("tokens.pt"))
            print(f"{len(videos)} videos of {videos.shape[2]} frames at {videos.shape[-1]}x{videos.shape[-2]}, "
                  f"{ids.shape[1]} latent frames x {k} tokens = {ids.shape[1] * k} tokens each")
    written = [args.out / name for name in output.files]
    print(f"wrote {len(written)} files to {args.out}:")
    for path in written:
        print(f"  {path}")
    return written


################################################################################
# Models and the condition

def use_bundled(args):
    """No checkpoint given: the bundled demo models (assets/demo, made by `make demo-train`)."""
    if not args.reconstruct:
        args.ar_ckpt = DEMO_ASSETS / ("ar-text.pt" if args.prompt else "ar-class.pt")
    args.tok_ckpt = DEMO_ASSETS / "tok.pt"
    if args.vae in (None, "demo"):
        args.vae, args.vae_ckpt = "demo", args.vae_ckpt or DEMO_ASSETS / "vae.pt"
    for path in (args.ar_ckpt, args.tok_ckpt, args.vae_ckpt):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"the bundled demo model {path} is missing: run `make demo-train` to make it again, or "
                             "give --ar-ckpt / --tok-ckpt")
    print(f"no checkpoint given: using the bundled demo models in {DEMO_ASSETS} (trained on 5-frame 32 px "
          "synthetic clips by `make demo-train`)")


def tokenizer_path(args, state):
    """--tok-ckpt, else the one the AR checkpoint was trained with: as stored, or beside the AR checkpoint when
    the stored path is relative to another working directory."""
    path = args.tok_ckpt or state.get("tok_ckpt")
    if path is None:
        raise ValueError("give --tok-ckpt (a train_tok.py checkpoint or an official model.safetensors)")
    path = Path(path)
    beside = Path(args.ar_ckpt).parent / path.name if args.ar_ckpt else path
    return beside if not path.exists() and beside.exists() else path


def condition(args, ar, state, device):
    """-> (keyword arguments of generate.Sampler.stream, one label per video for the file names). Class names
    are the checkpoint's own, else those of the token cache its train_ar.py run directory points to."""
    cfg, n = ar.cfg, args.num_samples
    wants_class, wants_text = cfg.num_classes > 0, cfg.text != "none"
    names = state.get("classes")
    if not names:
        try:   # config.json -> cache/meta.json
            cache = Path(json.loads((Path(args.ar_ckpt).parent / "config.json").read_text())["cache"])
            names = json.loads((cache / "meta.json").read_text())["settings"]["classes"]
        except (OSError, KeyError, TypeError, ValueError):
            names = None
    names = list(names) if names else None
    if args.prompt and not wants_text:
        raise ValueError(f"--prompt given, but this AR model is class-conditional ({cfg.num_classes} classes): "
                         "use --class")
    if args.classes and not wants_class:
        raise ValueError("--class given, but this AR model has no class conditioning: use --prompt" if wants_text else
                         "--class given, but this AR model is unconditional: leave out --class and --prompt")
    if wants_class and not args.classes:
        raise ValueError(f"this AR model is class-conditional: give --class (ids 0..{cfg.num_classes - 1}"
                         + (f"; names: {', '.join(names)})" if names else ")"))
    if wants_text and not args.prompt:
        raise ValueError("this AR model is text-conditional: give --prompt TEXT")
    if wants_class and wants_text and len(args.classes) != len(args.prompt):
        raise ValueError("this model takes a class and a prompt together: give as many --class as --prompt")
    kwargs, labels = {}, []
    if wants_class:
        ids = []
        for value in args.classes:   # a name, else an id
            if names and value in names:
                ids.append(names.index(value))
            elif re.fullmatch(r"\d+", value) and int(value) < cfg.num_classes:
                ids.append(int(value))
            else:
                known = ", ".join(f"{i}: {name}" for i, name in enumerate(names)) if names else \
                    "none stored with the checkpoint, so give an id"
                raise ValueError(f"unknown class {value!r}; this model has {cfg.num_classes} classes "
                                 f"(ids 0..{cfg.num_classes - 1}; names: {known})")
        kwargs["cls"] = torch.tensor(ids, device=device).repeat_interleave(n)
        labels = [names[i] if names else f"class{i}" for i in ids]
    if wants_text:
        t5 = None
        if cfg.text == "t5":
            if args.t5 is None:
                raise ValueError("this AR model reads T5 features: pass --t5 DIR (the T5 it was trained with)")
            t5 = T5Encoder.from_pretrained(args.t5, device=device)
        kwargs["text"], kwargs["text_mask"] = ar.encode_text([p for p in args.prompt for _ in range(n)], t5)
        labels = args.prompt
        trained = state.get("captions")
        for prompt in args.prompt:
            if trained and prompt not in trained:
                print(f"note: {prompt!r} is none of the {len(trained)} captions this model was trained on (such as "
                      f"{', '.join(repr(c) for c in trained[:3])}); it samples anyway, and may follow it loosely")
    if not kwargs:
        return {"batch": n}, ["sample"] * n
    return kwargs, [label for label in labels for _ in range(n)]


################################################################################
# Reconstruction per token budget

def reconstruct(args, tok, vae, video, chunks, decode, output):
    """The video decoded from its first k tokens per frame for k = 1, 2, 4, ..., K (one seed for all of them),
    and with --target-psnr / --mean-tokens from budgets chosen per chunk, with each one's PSNR."""
    ids = tokenize_long(tok, vae, video, chunks)
    gen = torch.Generator(video.device).manual_seed(args.seed)
    K = tok.cfg.registers
    budgets = token_budgets(K)
    rows, results = [], {}
    for k in tqdm(budgets, desc="token budgets"):
        recon = decode_long(tok, vae, ids[..., :k], chunks, generator=gen, **decode)
        results[k] = psnr(recon, video)
        rows.append(recon[0])
    names = [f"recon-k{k:03d}" for k in budgets]
    tokens = ids.cpu()
    if args.target_psnr is not None or args.mean_tokens is not None:
        # Each chunk decoded alone at every budget (tokenizer.budget_psnr, seed --seed) gives its PSNR table;
        # the budgets chosen from it then decode the video chunk by chunk.
        windows = chunks.split(video)
        n = len(windows)
        _, table = budget_psnr(tok, vae, torch.cat(windows), seed=args.seed, **decode)
        total = None if args.mean_tokens is None else round(args.mean_tokens * n)
        chosen = choose_budgets(table, budgets, target_psnr=args.target_psnr, total_tokens=total).tolist()
        chunk_psnr = [float(table[i, budgets.index(int(k))]) for i, k in enumerate(chosen)]
        if args.target_psnr is not None and min(chunk_psnr) < args.target_psnr:
            missed = [i for i, p in enumerate(chunk_psnr) if p < args.target_psnr]
            print(f"note: no budget reaches {args.target_psnr} dB for chunk(s) {missed}: they get all {K} tokens")
        gen = torch.Generator(video.device).manual_seed(args.seed)
        recon = decode_long(tok, vae, ids, chunks, chunk_budgets=chosen, generator=gen, **decode)
        results["adaptive"] = {"target_psnr": args.target_psnr, "mean_tokens": args.mean_tokens,
                               "tokens_per_frame": chosen, "chunk_psnr": chunk_psnr, "psnr": psnr(recon, video)}
        tokens = {"ids": tokens, "tokens_per_frame": torch.tensor(chosen), "chunk_frames": chunks.frames}
        rows.append(recon[0])
        names.append("recon-adaptive")
    write_videos(output, "reconstruct.png", rows + [video[0]], names + ["input"], args.fps)
    torch.save(tokens, output.path("tokens.pt"))
    output.path("psnr.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print(f"{args.reconstruct}: {args.frames} frames, {ids.shape[1]} latent frames x {K} tokens")
    print("tokens/frame  PSNR (dB)")
    for k in budgets:
        print(f"{k:12d}  {results[k]:.2f}")
    if "adaptive" in results:
        rule = f"target {args.target_psnr} dB" if args.target_psnr is not None else f"mean {args.mean_tokens} tokens"
        print(f"adaptive ({rule}): tokens/frame per chunk {chosen}, PSNR {results['adaptive']['psnr']:.2f} dB")


################################################################################
# Output: a temporary folder, moved into place at the end

class Output:
    """Files are written into a hidden folder inside `out` and moved into `out` only on success;
    on failure that folder, and any folder this run created, are removed."""

    def __init__(self, out):
        self.out, self.files = out, []
        self.created = [d for d in [out, *out.parents] if not d.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=".sample-", dir=out))  # also the writability check
        except OSError as err:
            self.remove_created()
            raise ValueError(f"cannot write to --out {out}: {err.strerror or err}") from err

    def path(self, name):
        self.files.append(name)
        return self.tmp / name

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        for name in self.files if kind is None else []:
            os.replace(self.tmp / name, self.out / name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if kind is not None:
            self.remove_created()

    def remove_created(self):
        for d in self.created:   # the innermost first, up to the first one that is not empty
            try:
                d.rmdir()
            except OSError:
                break


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "sample"


def write_videos(output, sheet, videos, names, fps):
    """Each video as <name>.mp4, and a contact sheet: one row per video, SHEET_COLUMNS evenly spaced frames."""
    for name, video in zip(names, videos):
        write_video(output.path(f"{name}.mp4"), to_uint8(video), fps=fps)
    T = videos[0].shape[1]
    columns = torch.linspace(0, T - 1, min(T, SHEET_COLUMNS)).round().long().unique()
    write_png_grid(output.path(sheet), np.stack([to_uint8(v[:, columns]) for v in videos]))


def write_frames_as_decoded(pieces, folder, names):
    """--progressive: every frame of the video pieces (chunks.decode_pieces) as folder/<name>/frame-NNNN.png the
    moment it is decoded. These files bypass the temporary output folder on purpose, so that a viewer can watch
    them arrive and an interruption keeps them. Returns the whole videos (B, 3, T, H, W)."""
    start, done, t = time.time(), [], 0
    for piece in pieces:
        for video, name in zip(piece, names):
            for j in range(video.shape[1]):
                write_png_grid(folder / name / f"frame-{t + j:04d}.png", to_uint8(video[:, j:j + 1])[None])
        t += piece.shape[2]
        done.append(piece)
        print(f"frames {t - piece.shape[2]}-{t - 1} decoded and written after {time.time() - start:.1f} s", flush=True)
    return torch.cat(done, 2)


if __name__ == "__main__":
    main()
