"""Benchmarks, one subcommand each: `python bench.py NAME [options]` (`python bench.py -h` lists them).

Every benchmark prints Markdown table rows with the same columns: what was measured, its configuration, device,
dtype, the median wall time of N timed runs after warm-up, and one derived figure. `python bench.py all` runs the
whole suite, one table per benchmark.

Sizes. On CUDA every benchmark runs at the real size, in bf16. On CPU it runs at a reduced size (`--reduced`, the
default there) so that the whole suite finishes in minutes on 2 cores: tokenizers keep their structure (5 latent
frames, masks, patch size, REPA head) at depth / 9, K / 4 and half the latent side; the VAE keeps its layers at a
quarter of the width on 64 px clips; the AR model keeps its sequence lengths at depth 2, with a vocabulary of 4096
rather than 64000 (on CPU sampling from 64000 logits dominates). Every row states the configuration it ran.

Peak memory is the growth over what was allocated before the call: on CUDA of allocated tensors; on CPU of the
process's resident set (Linux only), measured in a fresh process so that memory freed earlier cannot hide the peak.

The file is one piece of many small parts: every benchmark is a `bench_<name>` function that reads on its own,
and they share only the harness at the top (timing, peak memory, one table format). To add a benchmark, write a
`bench_<name>(args)` function that prints rows with `row()`, and register it with its
options in `BENCHMARKS`. Benchmarks that compare against a reference implementation (diffusers) import it lazily
and say how to install it.
"""

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile

from ar import ARConfig, ARModel
from chunks import Chunks, tokenize_stream
from data import VideoFolder
from generate import Sampler
from synthetic import make_synthetic
from tokenizer import TokenizerConfig, VideoFlexTok
from trainer import Progress, batches, compile_blocks, make_ema, make_optimizer, optimizer_step, update_ema
from transformer import HEAD_DIM, Block, Layout, _compiled_flex, block_mask, dense_mask, use_checkpointing
from vae import VidTokVAE

HEADER = "| what | config | device | dtype | median of N (s) | derived |\n|---|---|---|---|---|---|"

# Dense bf16 tensor-core peaks (NVIDIA datasheets), for MFU, by exact device name: the H100 SXM and the H200 both
# 989 TFLOP/s. Other GPUs (the H100 PCIe and NVL are slower) and CPUs need --peak-tflops.
PEAK_BF16_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0}

# Clips per training step on CUDA: an estimate of what fits 80 GB with fp32 weights, AdamW, EMA and bf16
# activations (d18-d18 about 5 GB of activations per clip, d18-d28 about 8), not a measurement.
GPU_BATCH = {"d18-d18": 8, "d18-d28": 2}


def row(what, config, device, dtype, times, derived):
    """One table row; `times` None when the thing cannot run here (the derived column says why)."""
    median = f"{statistics.median(times):.3g} (N={len(times)})" if times else "n/a"
    print(f"| {what} | {config} | {device} | {str(dtype).removeprefix('torch.')} | {median} | {derived} |",
          flush=True)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def setup(args):
    """(device, dtype, reduced) from the common options: bf16 and real sizes on CUDA, fp32 and reduced on CPU."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype, device.type == "cpu" if args.reduced is None else args.reduced


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


################################################################################
# Peak memory

CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure(fn, device, warmup, runs):
    """(seconds of each timed run, peak memory growth in bytes over all calls or None where it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    elif CLEAR_REFS.exists():
        CLEAR_REFS.write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        before = _status_bytes("VmRSS")
    times = [timed(fn, device) for _ in range(warmup + runs)][warmup:]
    if device.type == "cuda":
        return times, torch.cuda.max_memory_allocated(device) - before
    return times, _status_bytes("VmHWM") - before if CLEAR_REFS.exists() else None


def _measure_job(job, args, params):
    return measure(job(args, *params), torch.device(args.device), args.warmup, args.runs)


def measure_job(job, args, *params):
    """`measure` the function that `job(args, *params)` builds. On CPU in a fresh process (see the module doc);
    `job` must then be a module-level function, and args and params picklable."""
    if torch.device(args.device).type != "cpu":
        return _measure_job(job, args, params)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_job, (job, args, params))


def mib(peak):
    return "peak n/a" if peak is None else f"peak +{peak / 2**20:.0f} MiB"


def host_syncs(fn, device):
    """How often one call of `fn` makes the host wait for the GPU (CUDA's sync debug mode); None on CPU, or if
    the counter fails its self-check (a known synchronising call must be seen)."""
    if device.type != "cuda":
        return None

    def count(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    if count(lambda: torch.ones(1, device=device).item()) < 1:
        return None
    return count(fn)


################################################################################
# Tokenizer: FLOPs, training step, torch.compile, attention, decoding

def tok_config(preset, reduced):
    """The preset's tokenizer config; reduced: depth / 9, K / 4, half the latent side, REPA width 128."""
    cfg = TokenizerConfig.preset(preset)
    if not reduced:
        return cfg
    return dataclasses.replace(cfg, enc_depth=cfg.enc_depth // 9, dec_depth=cfg.dec_depth // 9,
                               registers=cfg.registers // 4, latent_size=cfg.latent_size // 2, repa_dim=128)


def tok_batch(args, preset, reduced):
    return args.batch_size or (2 if reduced else GPU_BATCH.get(preset, 1))


def tok_describe(preset, cfg, reduced, batch):
    T, side, P = cfg.max_frames, cfg.latent_size, cfg.max_grid ** 2
    size = f" reduced to d{cfg.enc_depth}-d{cfg.dec_depth}" if reduced else ""
    return (f"{preset}{size}, latents {cfg.latent_channels}x{T}x{side}x{side}, K={cfg.registers}, "
            f"S={T * (P + cfg.registers)}, B={batch}")


def attended_pairs(kind, layout):
    """The (query, key) pairs a mask allows, counted from its one definition in transformer.py."""
    return int(dense_mask(kind, layout).sum())


def tokenizer_flops(cfg, batch, latent_shape, masked=True):
    """FLOPs of one training forward pass (`VideoFlexTok.forward` with a REPA target) on latents (T, H, W).

    A matmul of (m, k) by (k, n) counts 2mkn; norms, activations and other elementwise work are not counted (the
    PaLM convention for MFU). Per clip, with P patches and K registers per frame, S = T(P + K), width D:
    - each transformer block: q, k, v and output projections 4 * 2SD^2; SwiGLU 3 * 2SDH with H = int(8D/3);
      attention 4D per attended (query, key) pair (QK^T and AV); with adaLN, its Linear 2D * 12D, once per clip;
    - encoder: patch embedding, its blocks over S under its mask, the 6-wide code projection of the T*K registers;
    - decoder: code and patch embeddings, the timestep MLP, its blocks, the final adaLN and patch head;
    - REPA head: its blocks over the T*P patch features (no registers), then the projection to the DINOv2 width.
    masked=True counts the pairs the masks allow, the work the model needs (what block-sparse FlexAttention
    computes); masked=False counts every pair, what dense SDPA computes and torch's FLOP counter reports.
    A training step costs 3x the forward (the backward computes gradients for inputs and weights).
    """
    T, H, W = latent_shape
    p, K, codes = cfg.patch_size, cfg.registers, len(cfg.fsq_levels)
    P, c_in = (H // p) * (W // p), p * p * cfg.latent_channels
    De, Dd = cfg.enc_width, cfg.dec_width

    def linear(rows, d_in, d_out):
        return 2 * rows * d_in * d_out

    def blocks(depth, dim, layout, kind, ada_out=0):
        S = layout.length
        pairs = attended_pairs(kind, layout) if masked else S * S
        hidden = int(2 * 4 * dim / 3)
        return depth * (linear(S, dim, 4 * dim) + linear(S, dim, 3 * hidden) + 4 * pairs * dim + linear(1, dim, ada_out))

    seq = Layout(T, P, K)
    encoder = linear(T * P, c_in, De) + blocks(cfg.enc_depth, De, seq, cfg.enc_mask) + linear(T * K, De, codes)
    decoder = (linear(T * K, codes, Dd) + linear(T * P, c_in, Dd) + linear(1, 256, Dd) + linear(1, Dd, Dd)
               + blocks(cfg.dec_depth, Dd, seq, cfg.dec_mask, 2 * 6 * Dd) + linear(1, Dd, 2 * Dd)
               + linear(T * P, Dd, c_in))
    repa = (blocks(cfg.repa_depth, Dd, Layout(T, P, 0), cfg.dec_mask) + linear(T * P, Dd, cfg.repa_dim)
            if cfg.repa_dim else 0)
    return batch * (encoder + decoder + repa)


def peak_tflops(args, device, dtype):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda" and dtype == torch.bfloat16:
        return PEAK_BF16_TFLOPS.get(torch.cuda.get_device_name(device))
    return None


def _tok_step_run(args, preset, compiled):
    """Times of every tokenizer training step, warm-up included, as train_tok.py runs it: forward under autocast,
    backward, gradient clipping, AdamW (fused on CUDA), EMA. Returns (cfg, batch, all times, host syncs per step,
    peak memory: CUDA allocations, or the process RSS on CPU; weights, optimizer state and EMA included)."""
    device, dtype, reduced = setup(args)
    cfg = tok_config(preset, reduced)
    batch = tok_batch(args, preset, reduced)
    torch.manual_seed(0)
    with device:  # initialised on the device: billions of parameters take many seconds on the CPU
        model = VideoFlexTok(cfg)
    opt, params = make_optimizer(model, 1e-4, 0.05, (0.9, 0.99), fused=device.type == "cuda")
    ema = make_ema(model, 0.999)
    use_checkpointing(model, args.checkpointing)
    if compiled:
        compile_blocks(model, Block, backend=args.backend)
    T, side = cfg.max_frames, cfg.latent_size
    latents = torch.randn(batch, cfg.latent_channels, T, side, side, device=device)
    target = torch.randn(batch, T, cfg.max_grid ** 2, cfg.repa_dim, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            losses = model(latents, repa_target=target)
        optimizer_step(opt, params, losses["loss"], 1e-4, 1.0)
        update_ema(ema, model, 0.999, 1000)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        CLEAR_REFS.write_text("5")  # resets VmHWM (peak RSS) to the current RSS: weights are already counted
    times = [timed(step, device) for _ in range(args.warmup + args.runs)]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _status_bytes("VmHWM") if CLEAR_REFS.exists() else None)
    if args.profile:
        profile_table(step, device, args.profile, f"{preset}, {'compiled' if compiled else 'eager'}, B={batch}")
    return cfg, batch, times, host_syncs(step, device), peak


def profile_table(step, device, top, what):
    """Print the `top` operators of two calls of `step` by self time on the device (CUDA kernels) or the CPU,
    as a Markdown table: where a training step's time goes, before deciding what to fuse or batch."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    on = "device" if device.type == "cuda" else "cpu"
    events = [e for e in prof.key_averages() if getattr(e, f"self_{on}_time_total") > 0]
    events.sort(key=lambda e: getattr(e, f"self_{on}_time_total"), reverse=True)
    total = sum(getattr(e, f"self_{on}_time_total") for e in events)
    print(f"\nProfile of two steps ({what}), self {on} time:\n")
    print("| operator | calls | self time per step (ms) | share |\n|---|---|---|---|")
    for e in events[:top]:
        t = getattr(e, f"self_{on}_time_total")
        print(f"| {e.key[:80]} | {e.count // 2} | {t / 2e3:.2f} | {t / total:.1%} |")
    print()


def _tok_step_row(args, preset, compiled, eager_seconds=None):
    """Measure and print one tokenizer-step row, compared with `eager_seconds` if given; returns the median."""
    device, dtype, reduced = setup(args)
    cfg, batch, times, syncs, peak_bytes = _tok_step_run(args, preset, compiled)
    timed_runs = times[args.warmup:]
    seconds = statistics.median(timed_runs)
    T, side = cfg.max_frames, cfg.latent_size
    tokens = T * (cfg.max_grid ** 2 + cfg.registers)  # sequence positions per clip (patches + registers)
    flops = 3 * tokenizer_flops(cfg, batch, (T, side, side))
    peak = peak_tflops(args, device, dtype)
    mfu = f"MFU {flops / seconds / (peak * 1e12):.1%}" if peak else "MFU n/a (no peak FLOP/s: --peak-tflops)"
    sync = "n/a" if syncs is None else syncs
    memory = ("peak n/a" if peak_bytes is None else f"peak {peak_bytes / 2**30:.2f} GiB "
              + ("(weights, AdamW, EMA too)" if device.type == "cuda" else "RSS (the whole process)"))
    versus = (f"; {eager_seconds / seconds:.2f}x the speed of eager, first step {times[0]:.1f} s (compiling)"
              if eager_seconds else "")
    mode = (f"compiled blocks ({args.backend})" if compiled else "eager") + (
        ", activation checkpointing" if args.checkpointing else "")
    row(f"tokenizer training step, {mode}", tok_describe(preset, cfg, reduced, batch), device_name(device),
        "float32" if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')} autocast", timed_runs,
        f"{batch / seconds:.2f} clips/s, {batch * tokens / seconds:.0f} tokens/s, "
        f"{flops / seconds / 1e12:.3f} TFLOP/s, {mfu}, host syncs/step {sync}, {memory}{versus}")
    return seconds


def bench_tok_step(args):
    """Tokenizer training step (encoder + decoder + REPA head, forward, backward, AdamW, EMA): clips/s, tokens/s,
    MFU.

    Random latents and REPA targets on the device (no data loading, no VAE). Tokens are sequence positions,
    T(P + K) per clip. FLOPs come from `tokenizer_flops` (3x the forward, attention over the allowed pairs only);
    MFU divides by the dense bf16 peak of the GPU (see PEAK_BF16_TFLOPS) or --peak-tflops, n/a without one.
    Compiled as train_tok.py does: on CUDA by default (--compile / --no-compile). Host syncs per step are counted
    on CUDA with the sync debug mode, in one extra step."""
    compiled = args.device.startswith("cuda") if args.compile is None else args.compile
    for preset in args.presets:
        _tok_step_row(args, preset, compiled)


def bench_compile(args):
    """`torch.compile` vs eager for the tokenizer training step (see tok-step): compiled blocks, as train_tok.py
    compiles them. The compiled row's first step includes the compilation."""
    for preset in args.presets:
        _tok_step_row(args, preset, True, eager_seconds=_tok_step_row(args, preset, False))


def _tok_options(parser, compile_flag=True):
    parser.add_argument("--presets", nargs="+", default=["d18-d18", "d18-d28"], help="tokenizer presets")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"clips per step; default {GPU_BATCH} on CUDA, 2 reduced")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak FLOP/s for MFU (default: dense bf16 of {sorted(PEAK_BF16_TFLOPS)})")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' checks the plumbing)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing (train_tok.py --activation-checkpointing): larger batches fit")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N operators that take the most time in a step (torch.profiler)")
    if compile_flag:
        parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                            help="compile the blocks (default: on CUDA)")


def _compile_options(parser):
    _tok_options(parser, compile_flag=False)
    parser.set_defaults(presets=["d18-d18"])


def bench_attention(args):
    """Attention alone, forward and forward+backward: FlexAttention with the cached block mask vs SDPA with the same
    mask dense vs SDPA without a mask (the unmasked upper bound), at the presets' shapes.

    Shapes: encoder (causal registers), decoder (time-causal), REPA head (time-causal over patches only) and the
    stage-2 decoder (full), at the training batch of tok-step; shapes shared by presets run once. FlexAttention is
    compiled on CUDA; on CPU it runs eager and forward only (PyTorch has no FlexAttention backward there), as the
    model would. The derived figure is the speed relative to SDPA with the dense mask."""

    device, dtype, reduced = setup(args)
    shapes = {}  # (mask kind, layout, heads, batch) -> the presets' parts that use it
    for preset in args.presets:
        cfg = tok_config(preset, reduced)
        batch = tok_batch(args, preset, reduced)
        T, P, K = cfg.max_frames, cfg.max_grid ** 2, cfg.registers
        for part, kind, layout, width in (("encoder", cfg.enc_mask, Layout(T, P, K), cfg.enc_width),
                                          ("decoder", cfg.dec_mask, Layout(T, P, K), cfg.dec_width),
                                          ("REPA head", cfg.dec_mask, Layout(T, P, 0), cfg.dec_width),
                                          ("stage-2 decoder", "full", Layout(T, P, K), cfg.dec_width)):
            shapes.setdefault((kind, layout, width // HEAD_DIM, batch), []).append(f"{preset} {part}")
    flex = _compiled_flex() if device.type == "cuda" else flex_attention
    for (kind, layout, heads, batch), users in shapes.items():
        S = layout.length
        blocks = block_mask(kind, layout, device)  # for "full" too, which the model runs as unmasked SDPA
        flex_name = f"FlexAttention, block mask ({'compiled' if device.type == 'cuda' else 'eager'})"
        masks = {flex_name: blocks, "SDPA, dense mask": dense_mask(kind, layout, device), "SDPA, no mask": None}
        q, k, v = (torch.randn(batch, heads, S, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        config = (f"{', '.join(users)}: {kind}, S={S}, {heads} heads, B={batch}, "
                  f"{attended_pairs(kind, layout) / S ** 2:.0%} of pairs attended")
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            # Forward alone on inputs that need no gradient: FlexAttention refuses any other on CPU.
            inputs = (q, k, v) if backward else (q.detach(), k.detach(), v.detach())
            times = {}
            for name, mask in masks.items():
                if backward and device.type == "cpu" and mask is blocks:
                    continue

                def run(mask=mask):
                    if mask is blocks:
                        out = flex(*inputs, block_mask=mask)
                    else:
                        out = F.scaled_dot_product_attention(*inputs, attn_mask=mask)
                    if backward:
                        torch.autograd.grad(out, inputs, grad)

                times[name] = measure(run, device, args.warmup, args.runs)[0]
            dense = statistics.median(times["SDPA, dense mask"])
            for name in masks:
                derived = (f"{dense / statistics.median(times[name]):.2f}x the speed of SDPA with the dense mask"
                           if name in times else "n/a: PyTorch has no FlexAttention backward on CPU")
                row(f"attention {pass_name}, {name}", config, device_name(device), dtype, times.get(name), derived)


def _attention_options(parser):
    parser.add_argument("--presets", nargs="+", default=["d18-d18", "d18-d28"], help="tokenizer presets")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default: tok-step's, {GPU_BATCH} on CUDA, 2 reduced")


def _decode_job(args, k, part="joint"):
    """Build a tokenizer and the ids of one batch; return the call that decodes their first k tokens per frame:
    jointly (`decode`, eager or with the Euler step compiled), or frame by frame (`decode_frames`) up to the first
    frame or to the last."""
    device, dtype, reduced = setup(args)
    torch.manual_seed(0)
    cfg = tok_config(args.preset, reduced)
    with device:  # initialised on the device, as in tok-step
        model = VideoFlexTok(cfg).eval()
    ids = torch.randint(model.codebook_size, (args.batch_size, cfg.max_frames, k), device=device)
    if part == "compiled":
        model.decoder.compile_sampling()

    def decode():
        gen = torch.Generator(device).manual_seed(0)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if part in ("joint", "compiled"):
                model.decode(ids, steps=args.steps, guidance=args.guidance, generator=gen)
            else:
                frames = model.decode_frames(ids, steps=args.steps, guidance=args.guidance, generator=gen)
                next(frames) if part == "first frame" else list(frames)
    return decode


def bench_decode(args):
    """Decoding token ids to latents with the flow decoder (`VideoFlexTok.decode`, guidance --guidance): seconds per
    clip and peak memory, for several tokens per frame, eager and with `Decoder.compile_sampling` (warm-up runs
    include the compilation). Budgets above the config's K (reduced) are clipped to K.

    The decoder's sequence always holds all K register slots (dropped ones become the mask token), so the cost
    does not depend on the budget; the rows show it."""
    device, dtype, reduced = setup(args)
    cfg = tok_config(args.preset, reduced)
    for k in sorted({min(k, cfg.registers) for k in args.budgets}):
        eager = None
        for part in ("joint", "compiled"):
            times, peak = measure_job(_decode_job, args, k, part)
            seconds = statistics.median(times)
            eager = eager or seconds
            name = "compiled Euler step" if part == "compiled" else "eager"
            row(f"decode {k} tokens/frame, {args.steps} Euler steps, guidance {args.guidance}, {name}",
                tok_describe(args.preset, cfg, reduced, args.batch_size), device_name(device), dtype, times,
                f"{seconds / args.batch_size:.3f} s/clip, {mib(peak)}"
                + (f", {eager / seconds:.2f}x eager" if part == "compiled" else ""))
    # Progressive decoding (decode_frames) at the largest budget: when the first frame is ready, and the whole
    # clip, against the joint decoding.
    k = min(max(args.budgets), cfg.registers)
    joint = statistics.median(measure_job(_decode_job, args, k)[0])
    for part in ("first frame", "all frames"):
        times, peak = measure_job(_decode_job, args, k, part)
        row(f"progressive decode {k} tokens/frame, {args.steps} Euler steps: {part}", tok_describe(
            args.preset, cfg, reduced, args.batch_size), device_name(device), dtype, times,
            f"{statistics.median(times) / joint:.2f}x the joint decoding, {mib(peak)}")


def _decode_options(parser):
    parser.add_argument("--preset", default="d18-d18")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 8, 32, 256], help="tokens per frame")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (> 1: conditional + null in one batch)")
    parser.add_argument("--batch-size", type=int, default=1)


def _stream_latencies(args, latent_frames):
    """Tokenize a stream of 1 + 4 (latent_frames - 1) random frames, made one at a time so that the input is not
    held, through VidTok and the encoder's frame cache (chunks.tokenize_stream), warm-up + runs times. Returns
    the seconds each latent frame took to come out (from the previous one) per timed run, and at each latent
    frame of the last run (memory held, its growth since the stream began) in bytes: the process's resident
    set on CPU, allocated tensors on CUDA."""
    device, dtype, reduced = setup(args)
    torch.manual_seed(0)
    cfg = tok_config(args.preset, reduced)
    with device:
        tok = VideoFlexTok(cfg).eval()
    vae = VidTokVAE("v1.0", ch=vae_size(reduced)[0]).to(device, dtype).eval()
    side = cfg.latent_size * vae.spatial_factor
    chunks = Chunks(cfg.max_frames, vae.temporal_factor)
    gaps, memory = [], []
    for _ in range(args.warmup + args.runs):
        gen = torch.Generator(device).manual_seed(0)
        frames = (torch.rand(1, 3, 1, side, side, generator=gen, device=device, dtype=dtype) * 2 - 1
                  for _ in range(1 + 4 * (latent_frames - 1)))
        before = _status_bytes("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated(device)
        times, memory = [time.perf_counter()], []
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for ids in tokenize_stream(tok, vae, frames, chunks):
                ids.cpu()   # waits for the device
                times.append(time.perf_counter())
                now = _status_bytes("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated(device)
                memory.append((now, now - before))
        gaps.append([b - a for a, b in zip(times, times[1:])])
    return gaps[args.warmup:], memory


def bench_stream(args):
    """Streaming tokenization (`chunks.tokenize_stream`): frames fed one at a time through VidTok and the encoder's
    frame cache, in 17-frame chunks. For latent frames 5, 21 and 81 of one stream: the seconds from the latent
    frame before to this one, and the memory held then. Both should stay flat along the stream, since every chunk
    starts a fresh VAE stream and cache (5, 21 and 81 are each the last latent frame of a chunk)."""
    device, dtype, reduced = setup(args)
    cfg = tok_config(args.preset, reduced)
    n = max(args.latent_frames)
    if device.type == "cpu":   # a fresh process, so that memory freed earlier cannot hide the growth
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            gaps, memory = pool.apply(_stream_latencies, (args, n))
    else:
        gaps, memory = _stream_latencies(args, n)
    for t in args.latent_frames:
        row(f"streaming tokenization: latent frame {t} of {n} (frames one at a time)",
            tok_describe(args.preset, cfg, reduced, 1) + f", VidTok ch={vae_size(reduced)[0]}", device_name(device),
            dtype, [run[t - 1] for run in gaps], f"memory {memory[t - 1][0] / 2 ** 20:.0f} MiB "
            f"({memory[t - 1][1] / 2 ** 20:+.0f} MiB since the stream began)")


def _stream_options(parser):
    parser.add_argument("--preset", default="d18-d18")
    parser.add_argument("--latent-frames", type=int, nargs="+", default=[5, 21, 81],
                        help="latent frames to report, in one stream as long as the largest")


################################################################################
# VAE

def _import_diffusers_vidtok():
    try:
        from diffusers import AutoencoderVidTok
    except ImportError as err:
        raise SystemExit(
            "this benchmark compares against diffusers.AutoencoderVidTok: "
            "pip install -r requirements-test.txt (or pip install diffusers)"
        ) from err
    return AutoencoderVidTok


def vae_size(reduced):
    """(channel width `ch`, clip side): VidTok's 128 on 128 px clips, or a quarter of the width on 64 px reduced."""
    return (32, 64) if reduced else (128, 128)


def bench_vae(args):
    """VidTok encode + decode of one clip: our VidTokVAE (v1.1) vs diffusers' AutoencoderVidTok on the same weights.

    v1.1 because that is the semantics diffusers implements (v1.0 runs the same convolutions). Runs alternate
    between the two implementations so that load changes on a shared machine hit both alike."""
    AutoencoderVidTok = _import_diffusers_vidtok()
    device, dtype, reduced = setup(args)
    ch, size = vae_size(reduced)
    torch.manual_seed(0)
    ours = VidTokVAE("v1.1", ch=ch, chunk_latents=args.chunk_latents).to(device, dtype).eval()
    ref = AutoencoderVidTok(ch=ch, z_channels=16).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref = ref.to(device) if dtype == torch.float32 else ref.to(device, dtype)  # diffusers warns on any dtype cast
    video = torch.rand(1, 3, args.frames, size, size, device=device, dtype=dtype) * 2 - 1

    def run_ours():
        ours.decode(ours.encode(video))

    def run_ref():
        with torch.no_grad():
            # diffusers' encode expects the three front copies of frame 0 that our encode adds itself.
            padded = torch.cat([video[:, :, :1].expand(-1, -1, 3, -1, -1), video], dim=2)
            ref.decode(ref.encode(padded).latent_dist.mode())

    times = {"ours": [], "diffusers": []}
    for i in range(args.warmup + args.runs):
        for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
            seconds = timed(fn, device)
            if i >= args.warmup:
                times[name].append(seconds)
    clip = f"{args.frames}x{size}x{size}, B=1, ch={ch}"
    ratio = statistics.median(times["diffusers"]) / statistics.median(times["ours"])
    row("VidTokVAE v1.1 encode+decode (vae.py)", f"{clip}, chunk_latents={args.chunk_latents}", device_name(device),
        dtype, times["ours"], f"{ratio:.2f}x the speed of diffusers")
    row("AutoencoderVidTok encode+decode (diffusers)", f"{clip}, no tiling", device_name(device), dtype,
        times["diffusers"], f"{args.frames / statistics.median(times['diffusers']):.2f} frames/s")


def _vae_job(args, frames, part):
    """Build a VidTokVAE and one batch of its input; return the call that encodes or decodes it."""
    device, dtype, reduced = setup(args)
    ch, size = vae_size(reduced)
    torch.manual_seed(0)
    vae = VidTokVAE(args.version, ch=ch, chunk_latents=args.chunk_latents).to(device, dtype).eval()
    if part == "encode":
        video = torch.rand(args.batch_size, 3, frames, size, size, device=device, dtype=dtype) * 2 - 1
        return lambda: vae.encode(video)
    latents = torch.randn(args.batch_size, 16, (frames - 1) // 4 + 1, size // 8, size // 8, device=device, dtype=dtype)
    return lambda: vae.decode(latents)


def bench_vae_memory(args):
    """VidTok encode and decode (vae.py, random weights): clips/s and peak memory for 17- and 81-frame clips.

    With chunking (chunk_latents) peak memory depends on the chunk, not on the clip length."""
    device, dtype, reduced = setup(args)
    ch, size = vae_size(reduced)
    for part in ("encode", "decode"):
        peaks = {}
        for frames in args.frames:
            times, peaks[frames] = measure_job(_vae_job, args, frames, part)
            ratio = (f" ({peaks[frames] / peaks[args.frames[0]]:.2f}x {args.frames[0]} frames)"
                     if peaks[frames] and peaks[args.frames[0]] else "")
            row(f"VidTokVAE {args.version} {part}", f"{frames}x{size}x{size}, B={args.batch_size}, ch={ch}, "
                f"chunk_latents={args.chunk_latents}", device_name(device), dtype, times,
                f"{args.batch_size / statistics.median(times):.2f} clips/s, {mib(peaks[frames])}{ratio}")


def _chunk_latents(text):
    return None if text == "none" else int(text)


def _vae_options(parser):
    parser.add_argument("--frames", type=int, default=17, help="clip length, 4k+1")
    parser.add_argument("--chunk-latents", type=_chunk_latents, default=4, help="VidTokVAE.chunk_latents, or none")


def _vae_memory_options(parser):
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 81], help="clip lengths, 4k+1")
    parser.add_argument("--chunk-latents", type=_chunk_latents, default=4, help="VidTokVAE.chunk_latents, or none")
    parser.add_argument("--version", default="v1.0", choices=["v1.0", "v1.1"])
    parser.add_argument("--batch-size", type=int, default=1)


################################################################################
# Data loading

def bench_data(args):
    """VideoFolder clip loading: clips/s through a DataLoader, in total and per worker.

    The source is a temporary synthetic folder of mp4 files shaped like Kinetics (10 s at 25 fps by default), so
    each clip seeks and decodes about (frames - 1) / fps seconds of video, then resizes and crops every kept frame.
    Workers 0 means the main process. Each timed run loads `--clips` clips; workers persist across runs. Loading runs
    on the CPU whatever the device."""

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp, num=args.videos, seed=0, size=args.source_size,
                       frames=int(args.seconds * args.source_fps), fps=args.source_fps)
        dataset = VideoFolder(tmp, frames=args.frames, fps=args.fps, size=args.size, index=False)
        for workers in args.workers:
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=args.clips,
                                                     generator=torch.Generator().manual_seed(0))
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                                 num_workers=workers, persistent_workers=workers > 0)
            times = []
            for i in range(args.warmup + args.runs):
                start = time.perf_counter()
                for _ in loader:
                    pass
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            rate = args.clips / statistics.median(times)
            row("VideoFolder clips via DataLoader (data.py)",
                f"{args.frames}x{args.size}x{args.size} at {args.fps:g} fps from {args.source_size}px "
                f"{args.source_fps:g} fps {args.seconds:g} s mp4, batch {args.batch_size}, {workers} workers, "
                f"{args.clips} clips", f"cpu ({os.cpu_count()} cores)", torch.float32, times,
                f"{rate:.1f} clips/s, {rate / max(workers, 1):.1f} per worker")
            del loader


def bench_epochs(args):
    """Training batches over several epochs (`trainer.batches`, what train_tok.py iterates) from a VideoFolder of
    short synthetic mp4s, with a training step simulated by a sleep: how long the loop waits for the first batch
    of every epoch and for the others, and the seconds per epoch. Loading runs on the CPU whatever the device."""

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp, num=args.videos, seed=0, size=args.size, frames=24, fps=8)
        dataset = VideoFolder(tmp, frames=args.frames, fps=4.0, size=args.size, index=False)
        per_epoch = len(dataset) // args.batch_size
        for workers in args.workers:
            progress = Progress()
            first, inside = [], []
            start = last = time.perf_counter()
            for batch in batches(dataset, progress, per_epoch * args.epochs, args.batch_size, workers, 0, 1, 0):
                (first if progress.batch_in_epoch == 1 else inside).append(time.perf_counter() - last)
                time.sleep(args.step_seconds)   # the training step, during which the workers load ahead
                progress.step += 1
                last = time.perf_counter()
            total = time.perf_counter() - start
            row("training batches over epochs (trainer.batches)",
                f"{len(dataset)} videos, {args.frames}x{args.size}x{args.size} clips, batch {args.batch_size}, "
                f"{workers} workers, {args.epochs} epochs", f"cpu ({os.cpu_count()} cores)", torch.float32,
                first, f"first batch of an epoch {statistics.median(first):.3f} s, other batches "
                f"{statistics.median(inside):.3f} s (waits for data); {total / args.epochs:.3f} s per epoch with a "
                f"{args.step_seconds:g} s step")


def _epochs_options(parser):
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--step-seconds", type=float, default=0.05, help="the simulated training step")


def _data_options(parser):
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=128, help="clip side")
    parser.add_argument("--source-size", type=int, default=128, help="side of the synthetic mp4 files")
    parser.add_argument("--source-fps", type=float, default=25.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each synthetic video")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--clips", type=int, default=64, help="clips per timed run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to try")


################################################################################
# AR sampling

def bench_ar(args):
    """AR sampling (generate.py): tokens/s for each batch size and sequence length, eager and with the decode step
    compiled (CUDA graphs on CUDA), the time per token early and late in the 1280-token sequence, and, at batch 1,
    full recomputation without the cache.

    Class-conditioned, 5 latent frames, vocabulary 64000, temperature 1; a sequence of n tokens is n / 5 tokens per
    frame (160 = 32 per frame, 1280 = all 256). Each generation's cache holds its own n positions. The time of each
    step comes from `Sampler.stream`, which yields after every token (synchronised on CUDA here); a span's figure
    is its median step time within one run. Every step processes one position over a cache of fixed size, so the
    steps at 1121-1280 should cost what those at 1-160 cost; without the cache every step re-runs the whole prefix
    (measured up to 320 tokens only: it grows with the position). Warm-up runs include the compilation."""
    device, dtype, reduced = setup(args)
    depth = args.depth or (2 if reduced else 28)
    torch.manual_seed(0)
    cfg = ARConfig(depth=depth, dropout=0.0, **({"vocab": 4096} if reduced else {}))  # 5 frames x 256 tokens
    with device:  # initialised on the device, as in tok-step
        model = ARModel(cfg).to(dtype).eval()
    config = f"d{depth} (width {cfg.width}), vocab {cfg.vocab}, cfg {args.cfg_scale}"

    def step_times(sampler, tokens, cache=True, steps=None):
        """Seconds of each of the first `steps` (default all) steps of one `tokens`-token generation."""
        cls = torch.zeros(sampler.batch, dtype=torch.long, device=device)
        stamps = [time.perf_counter()]
        stream = sampler.stream(cls, tokens_per_frame=tokens // cfg.max_frames, use_cache=cache,
                                cfg_scale=args.cfg_scale, generator=torch.Generator(device).manual_seed(0))
        for _ in zip(range(steps or tokens), stream):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def spans(name, runs, config, pairs):
        first = None
        for a, b in pairs:
            per_step = [statistics.median(steps[a - 1:b]) for steps in runs]
            ms = statistics.median(per_step) * 1e3
            first = first or ms
            row(f"AR time per token at positions {a}-{b}, {name}", config, device_name(device), dtype, per_step,
                f"{ms:.2f} ms/token (median step), {ms / first:.2f}x positions {pairs[0][0]}-{pairs[0][1]}")

    for batch in args.batch_sizes:
        for tokens in args.lengths:
            here = f"{config}, B={batch}, {tokens} tokens"
            medians = {}
            for compiled in (False, True):
                sampler = Sampler(model, batch, length=tokens, compile=compiled)
                runs = [step_times(sampler, tokens) for _ in range(args.warmup + args.runs)][args.warmup:]
                totals = [sum(steps) for steps in runs]
                medians[compiled] = statistics.median(totals)
                name = "compiled decode step" if compiled else "eager"
                row(f"AR sampling with KV cache, {name}", here, device_name(device), dtype, totals,
                    f"{batch * tokens / medians[compiled]:.1f} tokens/s"
                    + (f", {medians[False] / medians[True]:.2f}x eager" if compiled else ""))
                if tokens > 2 * 160:
                    spans(f"with KV cache, {name}", runs, here, [(1, 160), (tokens - 159, tokens)])
    sampler = Sampler(model, 1)
    runs = [step_times(sampler, 1280, cache=False, steps=320) for _ in range(args.warmup + args.runs)][args.warmup:]
    here = f"{config}, B=1, first 320 of 1280 tokens"
    row("AR sampling, full recomputation", here, device_name(device), dtype, [sum(s[:160]) for s in runs],
        f"{160 / statistics.median([sum(s[:160]) for s in runs]):.1f} tokens/s over the first 160")
    spans("full recomputation", runs, here, [(1, 160), (161, 320)])


def _ar_options(parser):
    parser.add_argument("--depth", type=int, default=None, help="AR depth (width 64 * depth); default 28, 2 reduced")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[160, 1280], help="tokens: 5 frames x 32 or 256")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (doubled batch)")


################################################################################
# Command line

# name -> (function, options, one-line help)
BENCHMARKS = {
    "tok-step": (bench_tok_step, _tok_options, "tokenizer training step: clips/s, tokens/s, MFU"),
    "compile": (bench_compile, _compile_options, "tokenizer training step, torch.compile (blocks) vs eager"),
    "attention": (bench_attention, _attention_options,
                  "attention fwd and fwd+bwd: FlexAttention block masks vs SDPA dense mask vs SDPA no mask"),
    "decode": (bench_decode, _decode_options, "decoding: seconds per clip and peak memory by tokens per frame; "
                                              "progressive decoding's first frame and whole clip"),
    "stream": (bench_stream, _stream_options, "streaming tokenization: seconds and memory of latent frames 5, 21 and "
                                              "81 of one stream"),
    "vae": (bench_vae, _vae_options, "VidTok encode+decode speed, vae.py vs diffusers"),
    "vae-memory": (bench_vae_memory, _vae_memory_options,
                   "VidTok encode and decode: clips/s and peak memory, 17 vs 81 frames"),
    "ar": (bench_ar, _ar_options, "AR sampling tokens/s with the KV cache, batch 1 and 16, 160 and 1280 tokens"),
    "epochs": (bench_epochs, _epochs_options, "training batches over epochs: the first batch of an epoch against "
                                              "the others"),
    "data": (bench_data, _data_options, "VideoFolder clips/s per DataLoader worker, 17x128x128 clips from mp4"),
}


def bench_all(args):
    """Every benchmark with its default options on one device, one Markdown table each."""
    for name, (fn, _, help_text) in BENCHMARKS.items():
        sub = build_parser().parse_args([name, "--device", args.device])
        print(f"\n### `{name}`: {help_text}\n\n{HEADER}", flush=True)
        fn(sub)


def _common_options(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None,
                        help="reduced sizes (default: on CPU only; see the module doc)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, (fn, add_options, help_text) in BENCHMARKS.items():
        sub = commands.add_parser(name, help=help_text, description=fn.__doc__)
        _common_options(sub)
        add_options(sub)
    everything = commands.add_parser("all", help="every benchmark above, defaults, one table each",
                                     description=bench_all.__doc__)
    everything.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.benchmark == "all":
        bench_all(args)
        return
    print(HEADER, flush=True)
    BENCHMARKS[args.benchmark][0](args)


if __name__ == "__main__":
    main()
