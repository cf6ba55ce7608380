"""Train the VideoFlexTok tokenizer, on a laptop CPU or under torchrun on many GPUs.

Paper: §3 (method), §4.1 and Appendix F.1 (the two training stages). Stage 1 trains the encoder, the
time-causal flow decoder and the REPA head with L = L_flow + lambda * L_REPA. Stage 2 freezes the
encoder, switches the decoder to full attention and, with probability 0.5, gives it the first latent
frame clean (frame conditioning), which long-video decoding relies on.

    python train_tok.py                                    # tiny model, built-in synthetic data, CPU
    torchrun --nproc_per_node=8 train_tok.py --data k600/ --preset d18-d18 \\
        --vae vidtok --vae-ckpt vidtok_kl_causal_488_16chn.ckpt --dino-ckpt dinov2_vitl14_pretrain.pth
    torchrun --nproc_per_node=8 train_tok.py ... --stage 2 --init runs/tok/ckpt-0400000.pt --run-dir runs/tok2

A run directory holds `config.json`, `log.jsonl` (one record per logged step and per validation),
`ckpt-STEP.pt` checkpoints written atomically, and `val/` (PNG sheets and mp4 reconstructions).
`--resume` continues from the last complete checkpoint with the same model, optimizer, EMA, step,
data position and random state, so an interrupted run ends with the weights of an uninterrupted one.

References: DiT and nanoGPT (training-loop conventions), REPA (Yu et al., 2025).
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from checkpoint import torch_load
from data import VideoFolder
from decoder import TIME_SAMPLING, token_budgets
from dino import load_dinov2, repa_targets
from metrics import psnr
from synthetic import synthetic_data
from tokenizer import TokenizerConfig, VideoFlexTok
from trainer import (COMMON_RULES, NonFiniteGuard, Progress, RunLog, add_common_args, at_least, barrier, batches,
                     build_shards, check_args, check_batch, compile_blocks, lr_at, make_ema, make_optimizer,
                     mean_over_ranks, optimizer_step, positive, prepare_run_dir, resume, save_checkpoint,
                     setup_distributed, training_state, update_ema)
from transformer import Block, use_checkpointing
from vae import load_vae
from video import BadVideo, to_uint8, write_png_grid, write_video


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, batch_size=8, batch_unit="clips", ema=0.999)
    p.add_argument("--run-dir", type=Path, default=Path("runs/tok"))
    p.add_argument("--preset", default="tiny", help="tokenizer preset (tiny, d12-d12, d18-d18, d18-d28)")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2])
    p.add_argument("--init", type=Path, default=None, help="stage 2: the stage-1 checkpoint to start from")
    p.add_argument("--dino-ckpt", type=Path, default=None, help="DINOv2 weights for REPA; REPA is off without them")
    p.add_argument("--repa-weight", type=float, default=0.5)
    p.add_argument("--time-sampling", default=None, choices=TIME_SAMPLING,
                   help="training noise levels t; default: the preset's (logit_normal, as the paper)")
    p.add_argument("--cache", type=Path, default=None, help="encode the clips once (VAE latents, DINOv2 targets) into this directory and train from it")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward: about 1/3 more compute, far less memory")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-clips", type=int, default=4)
    p.add_argument("--val-steps", type=int, default=25, help="Euler steps for validation decoding")
    args = p.parse_args(argv)
    check_args(args, COMMON_RULES | {"val_every": (positive, ">= 1"), "val_clips": (positive, ">= 1"),
                                     "val_steps": (positive, ">= 1"), "repa_weight": (at_least(0), ">= 0")}, "train_tok.py")
    if args.init is not None and args.stage != 2:
        p.error("--init is for --stage 2 (decoder fine-tuning from a stage-1 checkpoint)")
    return args


################################################################################
# Setup: processes, models, data

def build_config(args, dino, vae, init):
    """The preset, with its register table sized for the training clips: a tokenizer covers the
    latent frames of one clip (5 for 17 frames through VidTok) and longer videos go in chunks."""
    latent_frames = (args.frames - 1) // vae.temporal_factor + 1
    if init is not None:  # stage 2 keeps the stage-1 architecture
        if not isinstance(init, dict) or not {"config", "model", "ema"} <= set(init):
            raise ValueError(f"--init {args.init} is not a train_tok.py checkpoint (it needs 'config', 'model', 'ema')")
        cfg = TokenizerConfig.from_dict(init["config"])
        if cfg.max_frames != latent_frames:
            raise SystemExit(f"{args.init} was trained on {cfg.max_frames} latent frames; --frames {args.frames} "
                             f"gives {latent_frames}: use the stage-1 --frames")
    else:
        cfg = TokenizerConfig.preset(args.preset, max_frames=latent_frames)
    return dataclasses.replace(cfg, repa_weight=args.repa_weight,
                               time_sampling=args.time_sampling or cfg.time_sampling,
                               repa_dim=dino.cfg.dim if dino is not None else 0,
                               dec_mask="full" if args.stage == 2 else cfg.dec_mask)


def build_data(args, cfg, vae, rank):
    """(training subset, held-out subset) of the video folder. Rank 0 generates the built-in
    synthetic data if needed and scans the folder first, so the others reuse its metadata cache."""
    if rank == 0:
        root = args.data or synthetic_data()
    barrier()
    if rank != 0:
        root = args.data or synthetic_data()
    size = args.size or cfg.latent_size * vae.spatial_factor
    if rank != 0:
        barrier()  # wait for rank 0's scan
    train = VideoFolder(root, frames=args.frames, fps=args.fps, size=size, train=True, seed=args.seed)
    if rank == 0:
        barrier()
    val = VideoFolder(root, frames=args.frames, fps=args.fps, size=size, train=False, seed=args.seed)
    # A fixed, seeded split: the last val_clips videos of a permutation are held out.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = min(args.val_clips, len(train) // 2)
    return Subset(train, order[n_val:]), Subset(val, order[:n_val]), size


def cache_settings(args, root, size, n_clips):
    """What a latent cache depends on; a cache built with anything else is refused."""
    return {"data": str(root.resolve()), "clips": n_clips, "frames": args.frames,
            "fps": args.fps, "size": size, "seed": args.seed, "val_clips": args.val_clips, "vae": args.vae,
            "vae_ckpt": str(args.vae_ckpt), "vae_version": args.vae_version, "dino_ckpt": str(args.dino_ckpt),
            "clip_start": "eval (fixed)"}


def token_grid(latents, cfg):
    """The decoder's patch-token grid (h, w) for latents (..., H, W): where REPA targets live."""
    return latents.shape[-2] // cfg.patch_size, latents.shape[-1] // cfg.patch_size


################################################################################
# Validation: reconstructions from 1, 2, 4, ..., K tokens per frame

@torch.no_grad()
def validate(model, vae, clips, cfg, args, step, out_dir):
    """PSNR per token budget and codebook usage; writes a PNG sheet (rows = budgets then the input,
    columns = frames) and one mp4 per budget for the first clip.

    Codebook usage is the number of distinct ids among the first tokens of every frame of the
    validation clips. FSQ can collapse: when the encoder's outputs grow, tanh saturates, its
    gradient vanishes and every clip lands on the same corner of the grid. Then PSNR stops rising
    with more tokens and this count stays near 1."""
    budgets = token_budgets(cfg.registers)
    latents = vae.encode(clips)
    ids = model.encode(latents)
    first = ids[..., 0]
    usage = {"distinct_first_ids": len(torch.unique(first)), "first_tokens": first.numel()}
    gen = torch.Generator(clips.device).manual_seed(args.seed)
    results, rows = {}, []
    for k in budgets:
        video = vae.decode(model.decode(ids[..., :k], steps=args.val_steps, generator=gen, size=latents.shape[-2:]))
        results[k] = psnr(video, clips)
        rows.append(to_uint8(video[0]))
        write_video(out_dir / f"step{step:07d}-k{k:03d}.mp4", rows[-1], fps=args.fps)
    rows.append(to_uint8(clips[0]))
    write_png_grid(out_dir / f"step{step:07d}.png", np.stack(rows))
    return results, usage


################################################################################
# Training

def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, BadVideo) as err:
        raise SystemExit(f"train_tok.py: error: {err}") from None


def train(args):
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    if master:
        prepare_run_dir(args.run_dir, args.resume, args.overwrite)
    torch.manual_seed(args.seed * world + rank)  # different noise and dropout on every rank
    use_cuda = device.type == "cuda"
    compile_model = use_cuda if args.compile is None else args.compile
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    vae = load_vae(args.vae, args.vae_ckpt, args.vae_version, device)
    dino = None
    if args.dino_ckpt is not None:
        dino = load_dinov2(args.dino_ckpt).to(device)
        if vae.temporal_factor != 4:
            raise SystemExit("REPA targets align 4 RGB frames with each latent frame: use --vae vidtok with --dino-ckpt")
    elif master:
        print("REPA is off: no --dino-ckpt given (training uses the flow loss only)")
    init = torch_load(args.init) if args.init is not None else None  # the stage-1 checkpoint
    cfg = build_config(args, dino, vae, init)
    train_set, val_set, size = build_data(args, cfg, vae, rank)
    check_batch(len(train_set), args.batch_size, world, "training clips", "train_tok.py")

    @torch.no_grad()
    def encode(video):
        """Clips -> VAE latents and, with REPA, their DINOv2 targets (None without)."""
        latents = vae.encode(video)
        return latents, repa_targets(video, dino, grid=token_grid(latents, cfg)) if dino is not None else None

    if args.cache is not None:
        # Encode the training clips once into fp16 shards of (latents, targets), targets empty without REPA.
        # They are read with fixed starts (the held-out split's evaluation-mode folder): a cached clip is always
        # the same clip, so caching gives up random temporal crops.
        def encode_for_cache(batch):
            latents, targets = encode(batch[0].to(device))
            targets = torch.zeros(len(latents), 0) if targets is None else targets
            return {"latents": latents.half().cpu(), "targets": targets.half().cpu()}

        settings = cache_settings(args, train_set.dataset.root, size, len(train_set))
        train_set = build_shards(args.cache, Subset(val_set.dataset, train_set.indices), settings, encode_for_cache,
                                 args.batch_size, args.num_workers, rank, world)

    model = VideoFlexTok(cfg).to(device)
    if init is not None:
        model.load_checkpoint_weights(init, args.init)
    if args.stage == 2:
        model.encoder.requires_grad_(False)
    opt, params = make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.99), fused=use_cuda)
    ema = make_ema(model, args.ema)

    progress = resume(args.run_dir, model, opt, ema, world, rank, device) if args.resume else Progress()

    use_checkpointing(model, args.activation_checkpointing)
    if compile_model:
        compile_blocks(model, Block)
    net = model
    if world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if use_cuda else None)
    if master:
        (args.run_dir / "val").mkdir(parents=True, exist_ok=True)
        (args.run_dir / "config.json").write_text(json.dumps(
            {"tokenizer": dataclasses.asdict(cfg), "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    val_clips = torch.stack([val_set[i][0] for i in range(len(val_set))]).to(device)
    log = RunLog(args.run_dir, master)
    schedule = lambda step: lr_at(step, args.lr, args.warmup, args.steps, args.min_lr_ratio)  # noqa: E731

    bar = tqdm(total=args.steps, initial=progress.step, disable=not master, dynamic_ncols=True)
    guard = NonFiniteGuard(log=bar.write if master else lambda _: None)
    start, clips_seen = time.time(), 0
    for batch in batches(train_set, progress, args.steps, args.batch_size, args.num_workers, args.seed, world, rank):
        if args.cache is not None:
            latents, target = (x.to(device, non_blocking=True).float() for x in batch)
            target = target if dino is not None else None
        else:
            latents, target = encode(batch[0].to(device, non_blocking=True))
        prefix = (torch.rand(latents.shape[0], device=device) < 0.5).long() if args.stage == 2 else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            losses = net(latents, repa_target=target, prefix=prefix)
        grad_norm = optimizer_step(opt, params, losses["loss"], schedule(progress.step), args.grad_clip)
        guard(progress.step + 1, grad_norm, losses["loss"], schedule(progress.step))
        update_ema(ema, model, args.ema, progress.step)
        progress.step += 1
        step = progress.step
        clips_seen += latents.shape[0] * world
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            record = {"step": step, "lr": schedule(step - 1), "grad_norm": grad_norm.item(),
                      "clips_per_s": clips_seen / (time.time() - start)} | mean_over_ranks(losses, world)
            bar.set_postfix(loss=f"{record['loss']:.4f}", clips_s=f"{record['clips_per_s']:.1f}")
            log.write(record)
        if master and (step % args.val_every == 0 or step == args.steps):
            results, usage = validate(ema or model, vae, val_clips, cfg, args, step, args.run_dir / "val")
            log.write({"step": step, "val_psnr": results, "val_codes": usage})
            bar.write(f"step {step}: PSNR by tokens per frame " + ", ".join(f"{k}: {v:.2f}" for k, v in results.items())
                      + f"; {usage['distinct_first_ids']} distinct first-token ids in {usage['first_tokens']}")
        if step % args.ckpt_every == 0 or step == args.steps:
            state = training_state(model, ema, opt, dataclasses.asdict(cfg), progress, world, device)
            if master:
                save_checkpoint(args.run_dir / f"ckpt-{step:07d}.pt", state)
    bar.close()
    log.close(model, progress.step, world)
    if world > 1:
        barrier()   # every rank done (rank 0 validates last) before the process group goes away
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
