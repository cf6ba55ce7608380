"""Sample videos from VideoFlexTok tokens: text- or class-to-video with the AR generator, and
reconstructions of a real video from 1, 2, 4, ..., K tokens per frame.

Paper: §3.3 and §4.3 (AR generation over coarse-to-fine tokens, any token budget), §3.4 and
Appendix F.1 (decoding conditioned on clean frames, long videos), Appendix C.3 (time-first order),
Figures 2 and 13-16 (reconstructions per token budget). Official release (apple/ml-videoflextok, its chunk
wrapper): chunked tokenization and decoding of long videos, and the sampler settings (guidance 25 with APG).

    python sample.py --ar-ckpt runs/ar/ckpt-0002000.pt --prompt "a red circle moving left" --tokens-per-frame 32
    python sample.py --ar-ckpt runs/ar/ckpt-0002000.pt --class 3 --frames 81 --num-samples 2
    python sample.py --tok-ckpt runs/tok/ckpt-0002000.pt --reconstruct clip.mp4

Long videos. A chunk is the longest clip the tokenizer takes, (T'_max - 1) * f + 1 frames for a VAE
with temporal factor f (17 for the tiny preset on pixels and for d18 on VidTok); chunks overlap by
one frame, so a video must have 1 + 16n frames (1 + stride * n in general).
When generating, the AR model's latent frames per sequence (at most T'_max) set the chunk instead:
5 for the AR presets trained on 17-frame clips, so again 17 frames through VidTok.
- Tokenizing: 17-frame windows with stride 16. Every chunk after the first drops its first latent
  frame: it encodes the overlap frame alone, which the previous chunk already covered. So 81 frames
  with a 4x VAE are 1 + 4 * 5 = 21 latent frames, 672 tokens at 32 tokens per frame.
- Decoding runs chunk by chunk. Chunk 1 is decoded from its tokens. For each later chunk the last
  *decoded* frame is re-encoded (VAE, then the tokenizer's encoder) and put in front of the chunk's
  new latent frames; its clean latent is the prefix that `decode` holds fixed (the decoder masks
  that frame's registers), and the re-decoded overlap frame is removed from the output. Content
  stays consistent across chunks even from a single token per frame, because each chunk continues
  from pixels rather than from tokens.
- Generating: the AR model was trained on sequences of T'_max latent frames, and in time-first
  order a frame's tokens are spread over the whole sequence, so it cannot be asked to continue a
  previous chunk's tokens. Each chunk's tokens are therefore sampled independently from the same
  condition, and their first frame is dropped (its place is the re-encoded overlap frame).
  Continuity comes only from the decoder's frame conditioning: motion and content that the AR
  model chooses differently in the next chunk change at the chunk boundary, guided by the same
  prompt. That is the limit of this design; an AR model trained on longer sequences or with frame
  prefixes would remove it.

Beyond batch use (both rest on time causality, frame t never depending on later frames):
- Streaming tokenization (`tokenize_stream`): frames in as they arrive, each latent frame's ids out
  as soon as the causal VAE has produced it, identical to `tokenize_long`.
- Progressive decoding (`--progressive`, `decode_pieces`): frame by frame, each written the moment
  it is decoded, the same video as joint decoding.
- Adaptive budgets (`--target-psnr`, `--mean-tokens` with --reconstruct): each chunk gets the tokens
  per frame its content needs (tokenizer.choose_budgets), which the coarse-to-fine order allows.

Outputs go to a hidden temporary folder inside --out and are moved into place only once all of
them are written, so a failure leaves nothing half-written behind (except --progressive's frames).
"""
import argparse
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ar import ARConfig, ARModel, from_sequence
from checkpoint import build_checked, torch_load
from data import BadVideo, from_uint8, load_clip, probe, start_frames, to_uint8, write_png_grid, write_video
from decoder import APG, token_budgets
from eval import psnr
from generate import Sampler
from tokenizer import VideoFlexTok, budget_psnr, choose_budgets
from trainer import at_least, check_args, pick_device, positive
from vae import VAE_KINDS, checked_frame_stream, load_vae

DEMO_ASSETS = Path(__file__).resolve().parent / "assets" / "demo"   # the bundled demo models (make demo-train)
SHEET_COLUMNS = 9  # frames shown per row of the contact sheet, evenly spaced, first and last included


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    what.add_argument("--fps", type=float, default=4.0, help="frame rate of the written videos and of --reconstruct's clip")
    what.add_argument("--size", type=int, default=None, help="side in pixels; default: the tokenizer's trained size")
    ckpts = p.add_argument_group("checkpoints")
    ckpts.add_argument("--ar-ckpt", type=Path, default=None,
                       help="AR checkpoint (train_ar.py); default: the bundled demo model for --prompt or --class")
    ckpts.add_argument("--tok-ckpt", type=Path, default=None, help="tokenizer checkpoint (train_tok.py, or an official model.safetensors); default: the AR checkpoint's, or the bundled demo tokenizer")
    ckpts.add_argument("--vae", default=None, choices=VAE_KINDS,
                       help="the VAE the tokenizer was trained with; default: demo with the bundled models, else pixel")
    ckpts.add_argument("--vae-ckpt", type=Path, default=None)
    ckpts.add_argument("--vae-version", default="v1.0", choices=["v1.0", "v1.1"])
    ckpts.add_argument("--t5", type=Path, default=None, help="T5 directory, for AR models conditioned on T5 features")
    flow = p.add_argument_group("flow decoder")
    flow.add_argument("--steps", type=int, default=25, help="Euler steps")
    flow.add_argument("--guidance", type=float, default=None,
                      help="guidance scale (1 = off); default 25, the official video setting (1 with the bundled demo models)")
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
                          "default: on CUDA). "
                          "Where compilation fails, one line says so and sampling runs eagerly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("out/samples"))
    args = p.parse_args(argv)
    # --tokens-per-frame and --frames are checked against the models once they are loaded.
    check_args(args, {"num_samples": (positive, ">= 1"), "fps": (positive, "> 0"), "size": (positive, ">= 1"),
                      "steps": (positive, ">= 1"), "guidance": (at_least(0), ">= 0"), "cfg": (at_least(0), ">= 0"),
                      "temperature": (positive, "> 0"), "top_k": (positive, ">= 1"),
                      "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "seed": (at_least(0), ">= 0"),
                      "target_psnr": (positive, "> 0"), "mean_tokens": (at_least(1), ">= 1")}, "sample.py")
    if (args.target_psnr is not None or args.mean_tokens is not None) and not args.reconstruct:
        p.error("--target-psnr and --mean-tokens choose budgets for --reconstruct")
    if args.target_psnr is not None and args.mean_tokens is not None:
        p.error("give --target-psnr or --mean-tokens, not both")
    return args


################################################################################
# Chunks: long videos as overlapping clips the tokenizer can take

@dataclass(frozen=True)
class Chunks:
    latents: int   # latent frames per chunk
    temporal: int  # video frames per latent frame (the VAE's temporal factor)

    @property
    def frames(self):
        return (self.latents - 1) * self.temporal + 1

    @property
    def stride(self):
        return self.frames - 1  # consecutive chunks share one frame

    def check(self, frames):
        """Refuse a frame count the chunking cannot cover exactly; returns the number of chunks."""
        if frames < 1 or (frames - 1) % max(self.stride, 1) or (self.stride == 0 and frames != 1):
            raise ValueError(f"--frames must be 1 + {self.stride}n (chunks of {self.frames} frames overlapping by one, "
                             f"e.g. {self.frames} or {4 * self.stride + 1}); got {frames}")
        return max(1, (frames - 1) // max(self.stride, 1))

    def latent_frames(self, frames):
        return (frames - 1) // self.temporal + 1


def tokenize_long(tok, vae, video, chunks):
    """Video (B, 3, 1 + stride * n, H, W) -> ids (B, 1 + (latents - 1) * n, K), chunk by chunk."""
    parts = []
    for i in tqdm(range(chunks.check(video.shape[2])), desc="tokenizing chunks", leave=False):
        ids = tok.tokenize(video[:, :, i * chunks.stride:i * chunks.stride + chunks.frames], vae)
        # A later chunk's first latent encodes the overlap frame alone; the previous chunk covered it.
        parts.append(ids if i == 0 else ids[:, 1:])
    return torch.cat(parts, 1)


@torch.no_grad()
def tokenize_stream(tok, vae, frames, chunks):
    """tokenize_long as the video arrives: frames, an iterable of groups (B, 3, n, H, W) of any sizes -> the ids
    (B, 1, K) of each latent frame tokenize_long would give, as soon as the VAE has produced that latent frame
    (vae.encode_stream, then the encoder one frame at a time against its cache, Encoder.encode_frame).

    The chunks are tokenize_long's: a new one starts at the last frame of the previous one, with a fresh VAE
    stream and encoder cache, so a latent frame costs the same however long the stream is; its first latent
    frame, the overlap frame alone, is encoded (the next frames attend to it) but not yielded. The stream may end
    anywhere after a complete latent frame (it need not fill its last chunk); ending inside one is refused once
    everything complete was yielded."""
    tok.check_vae(vae)
    frames = (group[:, :, j:j + 1] for group in checked_frame_stream(frames) for j in range(group.shape[2]))
    head, chunk = next(frames, None), 0   # head: the first frame of the next chunk
    while head is not None:
        last = [head]

        def chunk_frames(head=head):
            yield head
            for frame in itertools.islice(frames, chunks.frames - 1):
                last[0] = frame
                yield frame

        cache = tok.encoder.frame_cache()
        for t, latent in enumerate(vae.encode_stream(chunk_frames())):
            ids = tok.encoder.encode_frame(latent, cache)[1]
            if chunk == 0 or t > 0:
                yield ids
        # The chunk's last frame is the next chunk's first, if the stream goes on.
        following = next(frames, None)
        head = None if following is None else last[0]
        frames = frames if following is None else itertools.chain([following], frames)
        chunk += 1


def decode_long(tok, vae, ids, chunks, **decode_kwargs):
    """Ids (B, L, k) -> video (B, 3, frames, H, W), each chunk conditioned on the last decoded frame."""
    return torch.cat(list(decode_pieces(tok, vae, ids, chunks, **decode_kwargs)), 2)


def decode_pieces(tok, vae, ids, chunks, progressive=False, chunk_budgets=None, **decode_kwargs):
    """decode_long's video, in pieces (B, 3, f, H, W) in frame order: a chunk at a time, or with `progressive`
    the frames of each latent frame as soon as the decoder and the VAE have them (tok.decode_frames, then
    vae.decode_stream; needs the time-causal decoder and no APG). chunk_budgets: tokens per frame of each chunk
    (adaptive budgets), else all of ids' k."""
    k, n = ids.shape[2], chunks.latents - 1
    starts = list(range(chunks.latents, ids.shape[1], n))
    prefix = None
    frame_kwargs = {key: value for key, value in decode_kwargs.items() if key != "apg"}   # decode_frames has no APG
    with flow_progress(tok, (1 + len(starts)) * decode_kwargs.get("steps", 25)):
        for c, start in enumerate(tqdm([0, *starts], desc="decoding chunks", leave=False, disable=not starts)):
            k = k if chunk_budgets is None else int(chunk_budgets[c])
            if prefix is None:
                chunk = ids[:, :chunks.latents, :k]
            else:
                chunk = torch.cat([tok.encode(prefix)[..., :k], ids[:, start:start + n, :k]], 1)
            if progressive:
                pieces = vae.decode_stream(tok.decode_frames(chunk, prefix_latents=prefix, **frame_kwargs),
                                           chunk.shape[1])
            else:
                pieces = [tok.detokenize(chunk, vae, prefix_latents=prefix, **decode_kwargs)]
            skip = 0 if prefix is None else 1   # a later chunk's first frame re-decodes the overlap frame
            for piece in pieces:
                last = piece[:, :, -1:]
                piece, skip = piece[:, :, skip:], max(skip - piece.shape[2], 0)
                if piece.shape[2]:
                    yield piece
            if c < len(starts):
                # The overlap frame is re-encoded as decoded, unclamped (as the official chunk wrapper does; a
                # clamp changes the condition wherever the decoder overshoots [-1, 1]).
                prefix = vae.encode(last, check_range=False)


@contextmanager
def flow_progress(tok, total):
    """A progress bar over Euler steps: every step is one decoder forward pass (CFG halves share one)."""
    bar = tqdm(total=total, desc="flow steps", leave=False)
    def count(*_):  # returns None: a forward hook's return value would replace the output
        bar.update(1)

    hook = tok.decoder.register_forward_hook(count)
    try:
        yield bar
    finally:
        hook.remove()
        bar.close()


def generate_ids(sampler, condition, n_chunks, latents, k, sampling):
    """AR ids (B, 1 + (latents - 1) * (n_chunks - 1), k): each chunk sampled independently (see the
    module docstring), its first latent frame dropped after the first chunk."""
    parts = []
    with tqdm(total=n_chunks * latents * k, desc="AR tokens", leave=False) as bar:
        for i in range(n_chunks):
            for seq in sampler.stream(**condition, frames=latents, tokens_per_frame=k, **sampling):
                bar.update(1)
            ids = from_sequence(seq, latents)
            parts.append(ids if i == 0 else ids[:, 1:])
    return torch.cat(parts, 1)


################################################################################
# Loading, and the condition

def load_ar(path, device):
    """A train_ar.py checkpoint -> (ARModel in eval mode with its EMA weights when present, the raw state)."""
    state = torch_load(path)
    if not isinstance(state, dict) or not {"config", "model"} <= set(state):
        raise ValueError(f"{path} is not a train_ar.py checkpoint (it has no 'config' and 'model')")
    weights = state.get("ema") or state["model"]
    model = build_checked(lambda: ARModel(ARConfig(**state["config"])), weights, path,
                          "Use a checkpoint written by train_ar.py.")
    model.load_state_dict(weights)
    return model.to(device).eval(), state


def class_names(path, state):
    """Class names of an AR checkpoint: its own 'classes' entry, else the token cache's list that
    train_ar.py's run directory points to (config.json -> cache/meta.json); None when neither exists."""
    if state.get("classes"):
        return list(state["classes"])
    try:
        cache = Path(json.loads((Path(path).parent / "config.json").read_text())["cache"])
        return json.loads((cache / "meta.json").read_text())["settings"]["classes"] or None
    except (OSError, KeyError, TypeError, ValueError):
        return None


def class_id(value, names, n):
    """--class NAME_OR_ID -> an id in [0, n)."""
    if names and value in names:
        return names.index(value)
    if re.fullmatch(r"\d+", value) and int(value) < n:
        return int(value)
    known = ", ".join(f"{i}: {name}" for i, name in enumerate(names)) if names else \
        "none stored with the checkpoint, so give an id"
    raise ValueError(f"unknown class {value!r}; this model has {n} classes (ids 0..{n - 1}; names: {known})")


def condition(ar, args, state, names, device):
    """-> (keyword arguments of generate.Sampler.stream, one name per video for the file names)."""
    cfg, n = ar.cfg, args.num_samples
    wants_class, wants_text = cfg.num_classes > 0, cfg.text != "none"
    if args.prompt and not wants_text:
        raise ValueError(f"--prompt given, but this AR model is class-conditional ({cfg.num_classes} classes): use --class")
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
        ids = [class_id(c, names, cfg.num_classes) for c in args.classes]
        kwargs["cls"] = torch.tensor(ids, device=device).repeat_interleave(n)
        labels = [names[i] if names else f"class{i}" for i in ids]
    if wants_text:
        prompts = [p for p in args.prompt for _ in range(n)]
        t5 = None
        if cfg.text == "t5":
            if args.t5 is None:
                raise ValueError("this AR model reads T5 features: pass --t5 DIR (the T5 it was trained with)")
            from t5 import T5Encoder
            t5 = T5Encoder.from_pretrained(args.t5, device=device)
        kwargs["text"], kwargs["text_mask"] = ar.encode_text(prompts, t5)
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
# Output: a temporary folder, moved into place at the end

class Output:
    """Files are written into a hidden folder inside `out` and moved into `out` only on success;
    on failure that folder, and any folder this run created, are removed."""

    def __init__(self, out):
        self.out = out
        self.created = [d for d in [out, *out.parents] if not d.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=".sample-", dir=out))  # also the writability check
        except OSError as err:
            self._remove_created()
            raise ValueError(f"cannot write to --out {out}: {err.strerror or err}") from err
        self.files = []

    def path(self, name):
        self.files.append(name)
        return self.tmp / name

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            for name in self.files:
                os.replace(self.tmp / name, self.out / name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if kind is not None:
            self._remove_created()

    def _remove_created(self):
        for d in self.created:
            try:
                d.rmdir()
            except OSError:
                break

    @property
    def written(self):
        return [self.out / name for name in self.files]


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "sample"


def write_videos(output, videos, names, fps):
    for name, video in zip(names, videos):
        write_video(output.path(f"{name}.mp4"), to_uint8(video), fps=fps)


def write_frames_as_decoded(pieces, folder, names):
    """--progressive: every frame of the video pieces (decode_pieces) as folder/<name>/frame-NNNN.png the moment it
    is decoded. These files bypass the temporary output folder on purpose, so that a viewer can watch them arrive
    and an interruption keeps them. Returns the whole videos (B, 3, T, H, W)."""
    start, done, t = time.time(), [], 0
    for piece in pieces:
        for video, name in zip(piece, names):
            for j in range(video.shape[1]):
                write_png_grid(folder / name / f"frame-{t + j:04d}.png", to_uint8(video[:, j:j + 1])[None])
        t += piece.shape[2]
        done.append(piece)
        print(f"frames {t - piece.shape[2]}-{t - 1} decoded and written after {time.time() - start:.1f} s", flush=True)
    return torch.cat(done, 2)


def write_sheet(output, name, videos):
    """One row per video, SHEET_COLUMNS evenly spaced frames per row."""
    T = videos[0].shape[1]
    columns = torch.linspace(0, T - 1, min(T, SHEET_COLUMNS)).round().long().unique()
    write_png_grid(output.path(name), np.stack([to_uint8(v[:, columns]) for v in videos]))


################################################################################
# The two modes

def prepare_sampling(args, ar, state, tok, vae, device):
    """Check everything about a text- or class-to-video request before any output is written."""
    ar.check_tokenizer(tok)
    k = check_budget(args.tokens_per_frame, ar.cfg.tokens_per_frame)
    chunks = Chunks(ar.cfg.max_frames, vae.temporal_factor)  # the AR model's clip length sets the chunk
    n_chunks = chunks.check(args.frames)
    kwargs, labels = condition(ar, args, state, class_names(args.ar_ckpt, state), device)
    return dict(k=k, chunks=chunks, n_chunks=n_chunks, condition=kwargs, labels=labels)


def sample(args, ar, tok, vae, device, output, k, chunks, n_chunks, condition, labels):
    gen = torch.Generator(device).manual_seed(args.seed)
    cfg = args.cfg if args.cfg != 1 and "batch" not in condition else None
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=cfg, generator=gen)
    latents = min(chunks.latents, chunks.latent_frames(args.frames))
    sampler = Sampler(ar, len(labels), length=latents * k, compile=args.compile)
    ids = generate_ids(sampler, condition, n_chunks, latents, k, sampling)
    names = [f"sample-{i:02d}-{slug(label)}" for i, label in enumerate(labels)]
    if args.progressive:
        pieces = decode_pieces(tok, vae, ids, chunks, progressive=True, **decode_settings(args, vae, gen))
        videos = write_frames_as_decoded(pieces, args.out / "frames", names)
    else:
        videos = decode_long(tok, vae, ids, chunks, **decode_settings(args, vae, gen))
    write_videos(output, videos, names, args.fps)
    write_sheet(output, "samples.png", videos)
    torch.save(ids.cpu(), output.path("tokens.pt"))
    print(f"{len(videos)} videos of {videos.shape[2]} frames at {videos.shape[-1]}x{videos.shape[-2]}, "
          f"{ids.shape[1]} latent frames x {k} tokens = {ids.shape[1] * k} tokens each")


def reconstruct(args, tok, vae, output, video):
    chunks = Chunks(tok.cfg.max_frames, vae.temporal_factor)
    ids = tokenize_long(tok, vae, video, chunks)
    gen = torch.Generator(video.device).manual_seed(args.seed)
    K = tok.cfg.registers
    budgets = token_budgets(K)
    rows, results = [], {}
    for k in tqdm(budgets, desc="token budgets"):
        recon = decode_long(tok, vae, ids[..., :k], chunks, **decode_settings(args, vae, gen))
        results[k] = psnr(recon, video)
        rows.append(recon[0])
    names = [f"recon-k{k:03d}" for k in budgets]
    tokens = ids.cpu()
    if args.target_psnr is not None or args.mean_tokens is not None:
        recon, per_chunk, chunk_psnr = adaptive_reconstruction(args, tok, vae, video, ids, chunks, budgets)
        results["adaptive"] = {"target_psnr": args.target_psnr, "mean_tokens": args.mean_tokens,
                               "tokens_per_frame": per_chunk, "chunk_psnr": chunk_psnr, "psnr": psnr(recon, video)}
        tokens = {"ids": tokens, "tokens_per_frame": torch.tensor(per_chunk), "chunk_frames": chunks.frames}
        rows.append(recon[0])
        names.append("recon-adaptive")
    write_videos(output, rows + [video[0]], names + ["input"], args.fps)
    write_sheet(output, "reconstruct.png", rows + [video[0]])
    torch.save(tokens, output.path("tokens.pt"))
    output.path("psnr.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print(f"{args.reconstruct}: {args.frames} frames, {ids.shape[1]} latent frames x {K} tokens")
    print("tokens/frame  PSNR (dB)")
    for k, value in results.items():
        if k != "adaptive":
            print(f"{k:12d}  {value:.2f}")
    if "adaptive" in results:
        a = results["adaptive"]
        rule = f"target {args.target_psnr} dB" if args.target_psnr is not None else f"mean {args.mean_tokens} tokens"
        print(f"adaptive ({rule}): tokens/frame per chunk {a['tokens_per_frame']}, PSNR {a['psnr']:.2f} dB")


def adaptive_reconstruction(args, tok, vae, video, ids, chunks, budgets):
    """--target-psnr / --mean-tokens: tokens per frame for every chunk of the video, chosen from that chunk's own
    reconstructions (tokenizer.budget_psnr: the chunk decoded alone, seed --seed), then the video decoded chunk by
    chunk with them. Returns (video, tokens per frame per chunk, each chunk's PSNR at its budget)."""
    n = chunks.check(video.shape[2])
    windows = torch.cat([video[:, :, i * chunks.stride:i * chunks.stride + chunks.frames] for i in range(n)])
    settings = decode_settings(args, vae, None)
    settings.pop("generator")
    _, table = budget_psnr(tok, vae, windows, seed=args.seed, **settings)
    total = None if args.mean_tokens is None else round(args.mean_tokens * n)
    chosen = choose_budgets(table, budgets, target_psnr=args.target_psnr, total_tokens=total)
    at = [budgets.index(int(k)) for k in chosen]
    chunk_psnr = [float(table[i, j]) for i, j in enumerate(at)]
    if args.target_psnr is not None and min(chunk_psnr) < args.target_psnr:
        missed = [i for i, p in enumerate(chunk_psnr) if p < args.target_psnr]
        print(f"note: no budget reaches {args.target_psnr} dB for chunk(s) {missed}: they get all {budgets[-1]} tokens")
    gen = torch.Generator(video.device).manual_seed(args.seed)
    recon = decode_long(tok, vae, ids, chunks, chunk_budgets=chosen.tolist(), **decode_settings(args, vae, gen))
    return recon, chosen.tolist(), chunk_psnr


def read_clip(path, frames, fps, size):
    """The first `frames` frames at `fps` of a video file, resized and centre-cropped -> (1, 3, T, S, S) in [-1, 1]."""
    try:
        if not start_frames(probe(path), frames, fps):
            raise BadVideo(f"too short for {frames} frames at {fps} fps")
        clip = load_clip(path, 0.0, frames, fps, size)
    except BadVideo as err:
        raise ValueError(f"cannot read --reconstruct {path}: {err}") from err
    return from_uint8(clip)[None]


def check_budget(k, K):
    k = min(32, K) if k is None else k
    if not 1 <= k <= K:
        raise ValueError(f"--tokens-per-frame must be in [1, {K}] (the model's tokens per frame); got {k}")
    return k


def image_size(args, tok, vae):
    """--size in pixels, checked against the tokenizer's patch size and trained grid."""
    f, p, most = vae.spatial_factor, tok.cfg.patch_size, tok.cfg.latent_size
    size = args.size or most * f
    if size % (f * p) or not 0 < size // f <= most:
        raise ValueError(f"--size must be a multiple of {f * p} (VAE factor {f} x patch {p}) and at most {most * f}; got {size}")
    return size


def check_progressive(args, tok):
    """Frame-by-frame decoding gives the joint result only where frame t depends on frames <= t alone."""
    if args.reconstruct:
        raise ValueError("--progressive is for --prompt / --class sampling; --reconstruct decodes every budget jointly")
    if tok.cfg.dec_mask != "time_causal":
        raise ValueError(f"--progressive needs the time-causal decoder; this tokenizer's has dec_mask="
                         f"{tok.cfg.dec_mask!r} (stage 2: a frame depends on later frames): drop --progressive")
    if args.apg and args.guidance != 1:
        raise ValueError("--progressive cannot use APG (its norms span all frames, so a frame would depend on later "
                         "ones): add --no-apg for plain guidance, or drop --progressive")


def decode_settings(args, vae, gen):
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    latent = args.size // vae.spatial_factor if args.size else None
    return dict(steps=args.steps, guidance=args.guidance, apg=APG() if args.apg else None, generator=gen,
                size=(latent, latent) if latent else None)


def use_bundled(args):
    """No checkpoint given: the bundled demo models (assets/demo, made by `make demo-train`) are the defaults,
    the text model for --prompt, the class model for --class, the tokenizer alone for --reconstruct."""
    if args.ar_ckpt or args.tok_ckpt:
        args.vae = args.vae or "pixel"
        args.guidance = 25.0 if args.guidance is None else args.guidance
        return
    args.guidance = 1.0 if args.guidance is None else args.guidance   # the setting of the demo's figures
    if args.prompt and args.classes:
        raise ValueError("the bundled demo models take --prompt or --class, not both; give --ar-ckpt for a model "
                         "conditioned on both")
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


def run(args):
    if args.reconstruct and args.ar_ckpt:
        raise ValueError("give --ar-ckpt (text- or class-to-video) or --reconstruct VIDEO with --tok-ckpt, not both")
    if not (args.reconstruct or args.prompt or args.classes or args.ar_ckpt):
        raise ValueError("nothing to sample: give --prompt TEXT, --class NAME or --reconstruct VIDEO")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1; got {args.num_samples}")
    use_bundled(args)
    device = pick_device(args.device)
    try:
        ar, state = load_ar(args.ar_ckpt, device) if args.ar_ckpt else (None, {})
        tok = VideoFlexTok.from_pretrained(tokenizer_path(args, state)).to(device)
        vae = load_vae(args.vae, args.vae_ckpt, args.vae_version, device)
    except (ValueError, FileNotFoundError) as err:
        if str(DEMO_ASSETS) in str(err):
            raise ValueError(f"{err}\nThe bundled demo models are missing or corrupt: run `make demo-train`") from err
        raise
    tok.check_vae(vae)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.compile:
        tok.decoder.compile_sampling()
    if args.frames is None:   # one chunk: the AR model's clip, or the tokenizer's
        args.frames = Chunks(ar.cfg.max_frames if ar else tok.cfg.max_frames, vae.temporal_factor).frames
    size = image_size(args, tok, vae)
    decode_settings(args, vae, None)  # checks --steps before anything runs
    if args.progressive:
        check_progressive(args, tok)
    if ar is not None:
        plan = prepare_sampling(args, ar, state, tok, vae, device)
    else:
        Chunks(tok.cfg.max_frames, vae.temporal_factor).check(args.frames)
        video = read_clip(args.reconstruct, args.frames, args.fps, size).to(device)
    with Output(args.out) as output:
        if ar is not None:
            sample(args, ar, tok, vae, device, output, **plan)
        else:
            reconstruct(args, tok, vae, output, video)
    print(f"wrote {len(output.files)} files to {args.out}:")
    for path in output.written:
        print(f"  {path}")
    return output.written


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, BadVideo) as err:
        raise SystemExit(f"sample.py: error: {err}") from err


if __name__ == "__main__":
    main()
