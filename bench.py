"""Benchmarks, one subcommand each: `python bench.py NAME [options]` (`python bench.py -h` lists them).

Every benchmark prints Markdown table rows with the same columns: what was measured, its configuration, device,
dtype, the median wall time of N timed runs after warm-up, and one derived figure. To add a benchmark, write a
`bench_<name>(args)` function that prints rows with `row()`, and register it with its options in `BENCHMARKS`.

Benchmarks that compare against a reference implementation (diffusers) import it lazily and say how to install it.
"""

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

import torch

HEADER = "| what | config | device | dtype | median of N (s) | derived |\n|---|---|---|---|---|---|"


def row(what: str, config: str, device: str, dtype: torch.dtype, times: list[float], derived: str) -> None:
    print(f"| {what} | {config} | {device} | {str(dtype).removeprefix('torch.')} | "
          f"{statistics.median(times):.3f} (N={len(times)}) | {derived} |", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _import_diffusers_vidtok():
    try:
        from diffusers import AutoencoderVidTok
    except ImportError as err:
        raise SystemExit(
            "this benchmark compares against diffusers.AutoencoderVidTok: "
            "pip install -r requirements-test.txt (or pip install diffusers)"
        ) from err
    return AutoencoderVidTok


def bench_vae(args: argparse.Namespace) -> None:
    """VidTok encode + decode of one clip: our VidTokVAE (v1.1) vs diffusers' AutoencoderVidTok on the same weights.

    v1.1 because that is the semantics diffusers implements (v1.0 runs the same convolutions). Runs alternate
    between the two implementations so that load changes on a shared machine hit both alike."""
    from vae import VidTokVAE

    AutoencoderVidTok = _import_diffusers_vidtok()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = VidTokVAE("v1.1", chunk_latents=args.chunk_latents).to(device, dtype).eval()
    ref = AutoencoderVidTok(z_channels=16).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref = ref.to(device) if dtype == torch.float32 else ref.to(device, dtype)  # diffusers warns on any dtype cast
    video = torch.rand(1, 3, args.frames, args.size, args.size, device=device, dtype=dtype) * 2 - 1

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
    clip = f"{args.frames}x{args.size}x{args.size}, B=1"
    ratio = statistics.median(times["diffusers"]) / statistics.median(times["ours"])
    print(HEADER)
    row("VidTokVAE v1.1 encode+decode (vae.py)", f"{clip}, chunk_latents={args.chunk_latents}", device_name(device),
        dtype, times["ours"], f"{ratio:.2f}x the speed of diffusers")
    row("AutoencoderVidTok encode+decode (diffusers)", f"{clip}, no tiling", device_name(device), dtype,
        times["diffusers"], f"{args.frames / statistics.median(times['diffusers']):.2f} frames/s")


def _peak_memory_of_decode(
    version: str, latent_frames: int, size: int, chunk_latents: int | None
) -> tuple[float, float]:
    """Run in a fresh process: (seconds, peak resident-memory growth in bytes) of one decode, Linux only.

    The peak-RSS counter is reset right before decoding, so it covers the decode alone (weights excluded)."""
    from vae import VidTokVAE

    torch.manual_seed(0)
    vae = VidTokVAE(version, chunk_latents=chunk_latents).eval()
    latents = torch.randn(1, 16, latent_frames, size // 8, size // 8)

    def status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} missing from /proc/self/status")

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    vae.decode(latents)
    seconds = time.perf_counter() - start
    return seconds, (status_kib("VmHWM") - before) * 1024.0


def bench_vae_memory(args: argparse.Namespace) -> None:
    """Peak memory of chunked VidTok decoding: 81 frames vs 17 frames (CPU, each in a fresh process)."""
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("vae-memory reads peak RSS from /proc: it runs on Linux only")
    context = multiprocessing.get_context("spawn")
    results = {}
    for frames in (17, 81):
        with context.Pool(1) as pool:
            results[frames] = pool.apply(
                _peak_memory_of_decode, (args.version, (frames - 1) // 4 + 1, args.size, args.chunk_latents)
            )
    print(HEADER)
    for frames, (seconds, peak) in results.items():
        ratio = peak / results[17][1]
        row(f"VidTokVAE {args.version} decode peak RSS growth", f"{frames}x{args.size}x{args.size}, B=1, "
            f"chunk_latents={args.chunk_latents}", device_name(torch.device("cpu")), torch.float32, [seconds],
            f"{peak / 2**20:.0f} MiB ({ratio:.2f}x the 17-frame peak)")


def bench_data(args: argparse.Namespace) -> None:
    """VideoFolder clip loading: clips/s through a DataLoader, in total and per worker.

    The source is a temporary synthetic folder of mp4 files shaped like Kinetics (10 s at 25 fps by default), so
    each clip seeks and decodes about (frames - 1) / fps seconds of video, then resizes and crops every kept frame.
    Workers 0 means the main process. Each timed run loads `--clips` clips; workers persist across runs."""
    import os
    import tempfile

    from data import VideoFolder, make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp, num=args.videos, seed=0, size=args.source_size,
                       frames=int(args.seconds * args.source_fps), fps=args.source_fps)
        dataset = VideoFolder(tmp, frames=args.frames, fps=args.fps, size=args.size, index=False)
        print(HEADER)
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


def _data_options(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)


def _chunk_latents(text: str) -> int | None:
    return None if text == "none" else int(text)


def _vae_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=17, help="clip length, 4k+1")
    parser.add_argument("--size", type=int, default=128, help="height = width, a multiple of 8")
    parser.add_argument("--chunk-latents", type=_chunk_latents, default=4, help="VidTokVAE.chunk_latents, or none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)


def _vae_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=128, help="height = width, a multiple of 8")
    parser.add_argument("--chunk-latents", type=_chunk_latents, default=4, help="VidTokVAE.chunk_latents, or none")
    parser.add_argument("--version", default="v1.0", choices=["v1.0", "v1.1"])


def bench_ar(args: argparse.Namespace) -> None:
    """AR sampling (ar.py) with and without the KV cache: tokens/s, and the time per token early and late.

    One class-conditioned sample, 5 latent frames x 256 tokens (1280), vocabulary 64000, temperature 1. The time
    of each step comes from `ARModel.stream`, which yields after every token; a span's figure is its median step
    time, taken within one run. With the cache every step processes one position, so the steps at 1121-1280 cost
    what those at 1-160 cost; without it every step re-runs the whole prefix, so its steps grow with the position
    (measured up to 320 tokens only: a full 1280-token run without the cache takes minutes)."""
    from ar import ARConfig, ARModel

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = ARConfig.preset("tiny", depth=args.depth, max_frames=5, tokens_per_frame=256)
    model = ARModel(cfg).to(device, dtype).eval()
    cls = torch.zeros(1, dtype=torch.long, device=device)

    def step_times(tokens: int, cache: bool) -> list[float]:
        """Seconds of each of the first `tokens` steps of one run."""
        stamps = [time.perf_counter()]
        steps = model.stream(cls, use_cache=cache, cfg_scale=args.cfg_scale,
                             generator=torch.Generator(device).manual_seed(0))
        for _, seq in zip(range(tokens), steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    config = f"d{args.depth} (width {cfg.width}), B=1, 5x256 tokens, vocab {cfg.vocab}, cfg {args.cfg_scale}"
    print(HEADER)
    for cache, spans in ((True, [(1, 160), (1121, 1280)]), (False, [(1, 160), (161, 320)])):
        name = "with KV cache" if cache else "full recomputation"
        runs = [step_times(spans[-1][1], cache) for _ in range(args.warmup + args.runs)][args.warmup:]
        first = [sum(steps[:160]) for steps in runs]
        row(f"AR sampling, {name} (ar.py)", f"{config}, first 160 tokens", device_name(device), dtype, first,
            f"{160 / statistics.median(first):.1f} tokens/s")
        for a, b in spans:
            per_step = [statistics.median(steps[a - 1:b]) for steps in runs]
            row(f"AR time per token at positions {a}-{b}, {name}", config, device_name(device), dtype,
                per_step, f"{statistics.median(per_step) * 1e3:.2f} ms/token (median step)")


def _ar_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=4, help="AR depth (width 64 * depth)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (doubled batch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)


# name -> (function, options, one-line help)
BENCHMARKS = {
    "vae": (bench_vae, _vae_options, "VidTok encode+decode speed, vae.py vs diffusers"),
    "vae-memory": (bench_vae_memory, _vae_memory_options, "VidTok chunked decode peak memory, 81 vs 17 frames"),
    "data": (bench_data, _data_options, "VideoFolder clips/s per DataLoader worker, 17x128x128 clips from mp4"),
    "ar": (bench_ar, _ar_options, "AR sampling tokens/s with and without the KV cache, cost per token early vs late"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, (fn, add_options, help_text) in BENCHMARKS.items():
        add_options(commands.add_parser(name, help=help_text, description=fn.__doc__))
    args = parser.parse_args()
    BENCHMARKS[args.benchmark][0](args)


if __name__ == "__main__":
    main()
