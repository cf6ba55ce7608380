"""Train the autoregressive generator over VideoFlexTok tokens (paper §3.3, §4.1, §4.3, Appendix F.2).

Two steps. First tokenize a video folder once with a trained tokenizer; the ids (uint16), class
labels, captions and, given a T5 checkpoint, T5 features go into a cache directory:

    python train_ar.py --tokenize --tok-ckpt runs/tok/ckpt-0002000.pt --cache cache/ar   # built-in synthetic data
    torchrun --nproc_per_node=8 train_ar.py --tokenize --tok-ckpt tok.pt --data k600/train \\
        --vae vidtok --vae-ckpt vidtok_kl_causal_488_16chn.ckpt --cache cache/k600

Then train on it, under torchrun (DDP, or FSDP2 with --fsdp for the multi-billion sizes) or plain
python, on full sequences or on the first --tokens-per-frame tokens of every frame (the paper's
cheaper 32-token models), conditioned on the class or on the caption:

    python train_ar.py --cache cache/ar --cond class --preset tiny
    torchrun --nproc_per_node=8 train_ar.py --cache cache/k600 --cond class --preset d24 --dropout 0.1

Every --sample-every steps a few videos are sampled, decoded by the tokenizer and written as mp4.
A run directory holds config.json, log.jsonl, ckpt-STEP.pt (atomic) and samples/; --resume
continues exactly, as in train_tok.py.

References: LlamaGen (training recipe: AdamW (0.9, 0.95), weight decay, class dropout 0.1),
nanoGPT (training loop).
"""
import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ar import ARConfig, ARModel
from data import VideoFolder
from generate import Sampler
from official import load_tokenizer
from synthetic import synthetic_data
from t5 import T5Encoder
from trainer import (COMMON_RULES, NonFiniteGuard, Progress, RunLog, Shards, add_common_args, at_least, batches,
                     barrier, build_shards, check_args, check_batch, in_range, lr_at, make_ema, make_optimizer,
                     mean_over_ranks, optimizer_step, positive, prepare_run_dir, resume, save_checkpoint,
                     setup_distributed, training_state, update_ema, weight_checksum)
from vae import load_vae
from video import BadVideo, to_uint8, write_video


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, batch_size=16, batch_unit="sequences", ema=0.0)
    p.add_argument("--cache", type=Path, required=True, help="token cache directory (written by --tokenize)")
    # Step 1: tokenize (also uses --data, --vae*, --frames, --fps, --size).
    p.add_argument("--tokenize", action="store_true", help="tokenize --data into --cache, then stop")
    p.add_argument("--tok-ckpt", type=Path, default=None, help="tokenizer checkpoint (train_tok.py, or an official model.safetensors)")
    p.add_argument("--t5", type=Path, default=None, help="T5 directory (config.json, tokenizer.json, safetensors): store caption features")
    # Step 2: train.
    p.add_argument("--run-dir", type=Path, default=Path("runs/ar"))
    p.add_argument("--preset", default="tiny", help="AR preset (tiny, d12, d16, ..., d42)")
    p.add_argument("--cond", default="class", choices=["class", "text"])
    p.add_argument("--text-encoder", default="bytes", choices=["bytes", "t5"],
                   help="text conditioning: our small byte encoder, trained with the model, or the cached T5 features")
    p.add_argument("--tokens-per-frame", type=int, default=None, help="train on the first k tokens of every frame (default: all)")
    p.add_argument("--dropout", type=float, default=None, help="default: the preset's")
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 fully_shard instead of DDP (CUDA)")
    p.add_argument("--sample-every", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance for the periodic samples")
    args = p.parse_args(argv)
    check_args(args, COMMON_RULES | {"dropout": (in_range(0, 0.99), "in [0, 1)"),
                                     "sample_every": (at_least(0), ">= 0"), "num_samples": (positive, ">= 1"),
                                     "cfg_scale": (at_least(0), ">= 0")}, "train_ar.py")
    return args


################################################################################
# Step 1: tokenize a video folder once

def tokenize(args, rank, world, device):
    if args.tok_ckpt is None:
        raise SystemExit("--tokenize needs --tok-ckpt (a train_tok.py checkpoint)")
    tok = load_tokenizer(args.tok_ckpt).to(device)
    vae = load_vae(args.vae, args.vae_ckpt, args.vae_version, device)
    root = args.data or synthetic_data()
    size = args.size or tok.cfg.latent_size * vae.spatial_factor
    videos = VideoFolder(root, frames=args.frames, fps=args.fps, size=size, train=False, seed=args.seed)
    t5 = None
    if args.t5 is not None:
        t5 = T5Encoder.from_pretrained(args.t5, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                       device=device)

    def encode(batch):
        video, label, caption = batch
        ids = tok.encode(vae.encode(video.to(device)))
        out = {"ids": ids.to(torch.uint16).cpu(), "label": label, "caption": list(caption)}
        if t5 is not None:
            features, mask = t5.encode_text(list(caption), max_length=120, padding="max_length")
            out |= {"t5": features.half().cpu(), "t5_mask": mask.cpu()}
        return out

    # The cache belongs to one tokenizer: its weights' checksum and config are part of the settings.
    settings = {"tokenizer": {"config": dataclasses.asdict(tok.cfg), "checksum": weight_checksum(tok)},
                "tok_ckpt": str(args.tok_ckpt.resolve()), "data": str(Path(root).resolve()), "videos": len(videos),
                "frames": args.frames, "fps": args.fps, "size": size, "vae": args.vae,
                "vae_ckpt": args.vae_ckpt and str(args.vae_ckpt), "vae_version": args.vae_version,
                "t5": args.t5 and str(args.t5), "classes": videos.classes}
    shards = build_shards(args.cache, videos, settings, encode, batch_size=8, num_workers=args.num_workers,
                          rank=rank, world=world)
    if rank == 0:
        print(f"{len(shards)} token sequences of {tuple(shards[0][0].shape)} in {args.cache}")


################################################################################
# Step 2: train

class Objective(nn.Module):
    """The AR loss as one module, so DDP/FSDP see the whole computation, text encoder included."""

    def __init__(self, model, cond, text_encoder):
        super().__init__()
        self.model, self.cond, self.text_encoder = model, cond, text_encoder

    def forward(self, ids, label, caption, t5, t5_mask):
        cls = label if self.cond == "class" else None
        text = mask = None
        if self.cond == "text":
            text, mask = self.model.encode_text(caption) if self.text_encoder == "bytes" else (t5.float(), t5_mask)
        return self.model.loss(ids, cls, text, mask)


def build_config(args, meta, data):
    """The AR configuration for a token cache: vocabulary, frames and K from the tokenizer that made
    it, classes or text from the flags."""
    settings, fields = meta["settings"], meta["fields"]
    frames, K = data[0][0].shape
    k = args.tokens_per_frame or K
    if not 1 <= k <= K:
        raise SystemExit(f"--tokens-per-frame must be in [1, {K}] (the tokenizer's registers); got {k}")
    text = "none" if args.cond == "class" else args.text_encoder
    if args.cond == "class" and not settings["classes"]:
        raise SystemExit("--cond class needs class labels: the tokenized folder has no <class>/<video> layout")
    if text == "t5" and "t5" not in fields:
        raise SystemExit("--text-encoder t5 needs T5 features in the cache: tokenize again with --t5 DIR")
    overrides = dict(vocab=math.prod(settings["tokenizer"]["config"]["fsq_levels"]), max_frames=frames,
                     tokens_per_frame=k, num_classes=len(settings["classes"]) if args.cond == "class" else 0, text=text)
    if text == "t5":
        overrides["text_dim"] = data[0][fields.index("t5")].shape[-1]
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    return ARConfig.preset(args.preset, **overrides)


@torch.no_grad()
def write_samples(sampler, tok, vae, classes, captions, args, step, device):
    """Sample a few videos (by class, or from training captions) with a generate.Sampler of the
    model (made once per run, so a compiled decode step compiles once), decode them, write mp4s."""
    model, n = sampler.model, args.num_samples
    gen = torch.Generator(device).manual_seed(args.seed)
    if model.cfg.num_classes:
        cls = torch.arange(n, device=device) % model.cfg.num_classes
        names, kwargs = [classes[c] for c in cls.tolist()], {"cls": cls}
    else:
        prompts = captions[:n]
        text, mask = model.encode_text(prompts) if model.cfg.text == "bytes" else (None, None)
        if text is None:  # T5 features: the cached ones of the first training items
            return
        names, kwargs = prompts, {"text": text, "text_mask": mask}
    model.eval()
    ids = sampler.generate(**kwargs, cfg_scale=args.cfg_scale, generator=gen)
    model.train()
    latents = tok.decode(ids.long(), steps=25, generator=gen)
    videos = vae.decode(latents)
    out = args.run_dir / "samples"
    for i, (video, name) in enumerate(zip(videos, names)):
        write_video(out / f"step{step:07d}-{i}-{name.replace(' ', '_')[:60]}.mp4", to_uint8(video), fps=args.fps)


def train(args, rank, world, device):
    master = rank == 0
    meta_path = args.cache / "meta.json"
    if not meta_path.exists():
        raise SystemExit(f"no token cache in {args.cache}: run train_ar.py --tokenize --tok-ckpt ... --cache {args.cache} first")
    meta = json.loads(meta_path.read_text())
    data = Shards(args.cache, meta["fields"])
    check_batch(len(data), args.batch_size, world, "token sequences", "train_ar.py")
    cfg = build_config(args, meta, data)

    torch.manual_seed(args.seed * world + rank)
    use_cuda = device.type == "cuda"
    model = ARModel(cfg).to(device)
    opt, params = make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), fused=use_cuda)
    ema = make_ema(model, args.ema)
    progress = resume(args.run_dir, model, opt, ema, world, rank, device) if args.resume else Progress()

    objective = Objective(model, args.cond, args.text_encoder)
    compile = use_cuda if args.compile is None else args.compile
    if compile:
        objective = torch.compile(objective)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard   # here: importing FSDP costs 0.6 s, and only --fsdp needs it
        for block in model.blocks:
            fully_shard(block)
        fully_shard(objective)
    elif world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if use_cuda else None)

    tok = vae = None
    if master and args.sample_every:
        tok = load_tokenizer(meta["settings"]["tok_ckpt"]).to(device)
        model.check_tokenizer(tok)
        settings = meta["settings"]
        vae = load_vae(settings["vae"], settings["vae_ckpt"], settings["vae_version"], device)
        (args.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        captions = [data[i][meta["fields"].index("caption")] for i in range(min(len(data), args.num_samples))]
    if master:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        (args.run_dir / "config.json").write_text(json.dumps(
            {"ar": dataclasses.asdict(cfg), "cache": str(args.cache), "args": {k: str(v) for k, v in vars(args).items()}},
            indent=2))
    log = RunLog(args.run_dir, master)
    schedule = lambda s: lr_at(s, args.lr, args.warmup, args.steps, args.min_lr_ratio)  # noqa: E731
    fields = meta["fields"]
    # A text model keeps the captions it was trained on (when they are few, as in the synthetic data), so that
    # sample.py can say when a prompt is unlike all of them.
    trained_captions = None
    if args.cond == "text":
        distinct = {data[i][fields.index("caption")] for i in range(min(len(data), 100_000))}
        trained_captions = sorted(distinct) if len(distinct) <= 1000 else None
    k = cfg.tokens_per_frame

    sampler = None  # made at the first sampling step
    bar = tqdm(total=args.steps, initial=progress.step, disable=not master, dynamic_ncols=True)
    guard = NonFiniteGuard(log=bar.write if master else lambda _: None)
    start, tokens_seen = time.time(), 0
    for batch in batches(data, progress, args.steps, args.batch_size, args.num_workers, args.seed, world, rank):
        item = dict(zip(fields, batch))
        ids = item["ids"].long()[..., :k].to(device)  # uint16 on disk
        label = item["label"].to(device)
        t5, t5_mask = (item["t5"].to(device), item["t5_mask"].to(device)) if "t5" in item else (None, None)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            loss = objective(ids, label, list(item["caption"]), t5, t5_mask)
        grad_norm = optimizer_step(opt, params, loss, schedule(progress.step), args.grad_clip)
        guard(progress.step + 1, grad_norm, loss, schedule(progress.step))
        update_ema(ema, model, args.ema, progress.step)
        progress.step += 1
        step = progress.step
        tokens_seen += ids.numel() * world
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            record = {"step": step, "lr": schedule(step - 1), "grad_norm": grad_norm.item(),
                      "tokens_per_s": tokens_seen / (time.time() - start)} | mean_over_ranks({"loss": loss}, world)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            log.write(record)
        if master and args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            sampler = sampler or Sampler(ema or model, args.num_samples, compile=compile)
            write_samples(sampler, tok, vae, meta["settings"]["classes"], captions, args, step, device)
        if step % args.ckpt_every == 0 or step == args.steps:
            state = training_state(model, ema, opt, dataclasses.asdict(cfg), progress, world, device)
            if master:
                save_checkpoint(args.run_dir / f"ckpt-{step:07d}.pt",
                                state | {"tok_ckpt": meta["settings"]["tok_ckpt"], "classes": meta["settings"]["classes"],
                                         "captions": trained_captions})
    bar.close()
    log.close(model, progress.step, world)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    if rank == 0 and not args.tokenize:
        prepare_run_dir(args.run_dir, args.resume, args.overwrite)
    try:
        if args.tokenize:
            tokenize(args, rank, world, device)
        else:
            train(args, rank, world, device)
    except (ValueError, FileNotFoundError, BadVideo) as err:
        raise SystemExit(f"train_ar.py: error: {err}") from None
    if world > 1:
        barrier()   # every rank done (rank 0 samples last) before the process group goes away
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
