"""The demo: bundled models that draw "a red circle moving left", and the figures that show what they learned.

Paper: §4.2-4.3 (reconstruction and generation from any number of tokens per frame), §1 and §4.2 (the first
tokens carry semantics and motion). `make demo-train` trains the four small models of the demo from scratch on
the built-in synthetic data (synthetic.py: 48 classes, 4 colours x 3 shapes x 4 motions, captions like "a red circle
moving left"); `export` then writes them to assets/demo (fp16) with demo.json, the figures they reach:

    vae.pt       DemoVAE, 32x32 frames <-> 8x8x4 latents            (python demo.py train-vae)
    tok.pt       the "demo" tokenizer: 5 latent frames x K = 8 tokens, FSQ (8, 5, 5, 5) = 1000 codes
    ar-class.pt  class-conditional AR model ("demo" preset)
    ar-text.pt   text-conditional AR model (byte-level text encoder trained with it)

    python demo.py                      # make demo: samples, reconstructions and figures -> out/demo
    python demo.py train-vae --data out/demo-data/data --out out/demo-train/vae.pt   # make demo-train's first step
    python demo.py export --work out/demo-train          # make demo-train's last step -> assets/demo
    python demo.py measure                               # the bundled models' figures again -> demo.json

The figures, each at every budget k = 1, 2, 4, ..., K tokens per frame: adherence (synthetic.detect) of 32 samples
for 4 prompts and 4 classes that together cover every colour, shape and motion; PSNR and adherence of held-out
clips reconstructed from their own first k tokens; and the token-position probe (metrics.token_probe).
"""
import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ar import load_ar
from checkpoint import DEMO_ASSETS, check_finite
from data import VideoFolder
from decoder import token_budgets
from generate import generate
from metrics import batches_of, class_names, psnr, token_probe
from synthetic import adherence, class_from_prompt, synthetic_data
from tokenizer import VideoFlexTok
from trainer import at_least, check_args, last_checkpoint, lr_at, pick_device, positive, save_checkpoint
from vae import DemoVAE
from video import to_uint8, write_png_grid, write_video

# Four prompts and four classes that together cover every colour, shape and motion.
PROMPTS = ("a red circle moving left", "a green square moving right", "a blue triangle moving up",
           "a yellow circle moving down")
CLASSES = ("blue_square_up", "yellow_triangle_left", "red_circle_down", "green_square_right")
CLIP = dict(frames=5, fps=4.0, size=32)          # the demo's clips: 5 frames at 4 fps, 32x32
DATA = dict(num=1920, size=32, frames=5, fps=4.0)  # the training videos (make demo-train), 40 per class
HELDOUT = dict(num=96, seed=1, size=32, frames=5, fps=4.0)
DECODE = dict(steps=25, guidance=1.0, apg=None)  # flow decoder settings of every figure
# CFG 2: at 3 and 4 the text model drew the caption's motion less often (tried on other seeds than the figures').
AR_SAMPLING = dict(cfg_scale=2.0, temperature=1.0, top_k=None)
FILES = ("vae.pt", "tok.pt", "ar-class.pt", "ar-text.pt")


################################################################################
# The bundled models

class Bundle:
    """The four demo models of a folder (assets/demo by default), in eval mode."""

    def __init__(self, root=DEMO_ASSETS, device="cpu"):
        root = Path(root)
        missing = [name for name in FILES if not (root / name).is_file()]
        if missing:
            raise SystemExit(f"demo models missing in {root}: {', '.join(missing)}. Run `make demo-train` to train "
                             "them (about an hour on 2 CPU cores), or restore them with git checkout assets/demo")
        try:
            self.vae = DemoVAE.from_checkpoint(root / "vae.pt").to(device)
            self.tok = VideoFlexTok.from_checkpoint(root / "tok.pt").to(device)
            self.ar = {cond: load_ar(root / f"ar-{cond}.pt", device) for cond in ("class", "text")}
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            raise SystemExit(f"a demo model in {root} is corrupt ({err}). Run `make demo-train` to train them "
                             "again, or restore them with git checkout assets/demo") from err
        for ar, _ in self.ar.values():
            ar.check_tokenizer(self.tok)
        self.device = device

    @torch.no_grad()
    def sample(self, cond, what, k, n, seed=0):
        """n videos (n, 3, T, H, W) for a class name (cond "class") or a prompt (cond "text"), k tokens per frame."""
        ar, state = self.ar[cond]
        gen = torch.Generator(self.device).manual_seed(seed)
        if cond == "class":
            kwargs = {"cls": torch.full((n,), state["classes"].index(what), device=self.device)}
        else:
            text, mask = ar.encode_text([what] * n)
            kwargs = {"text": text, "text_mask": mask}
        ids = generate(ar, **kwargs, tokens_per_frame=k, generator=gen, **AR_SAMPLING)
        return self.tok.detokenize(ids, self.vae, generator=gen, **DECODE).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, videos, k, seed=0):
        gen = torch.Generator(self.device).manual_seed(seed)
        ids = self.tok.tokenize(videos, self.vae)
        return self.tok.detokenize(ids[..., :k], self.vae, generator=gen, **DECODE).clamp(-1, 1)


def demo_clips(root, device="cpu"):
    """The training and held-out synthetic clips under `root` (generated on first use), each as (videos
    (N, 3, T, H, W), class names)."""
    root = Path(root)
    out = []
    for folder in (synthetic_data(root / "data", **DATA), synthetic_data(root / "heldout", **HELDOUT)):
        ds = VideoFolder(folder, train=False, **CLIP)
        out.append((torch.cat(list(batches_of(ds, batch_size=64))).to(device), class_names(ds)))
    return out


################################################################################
# The figures

def sample_adherence(bundle, cond, names, budgets, n=32, seed=0):
    """{k: adherence} of n samples spread evenly over `names` (prompts or classes) at each budget."""
    per = n // len(names)
    out = {}
    for k in budgets:
        videos, wanted = [], []
        for i, name in enumerate(names):
            videos += list(bundle.sample(cond, name, k, per, seed=seed + i))
            wanted += [class_from_prompt(name) if cond == "text" else name] * per
        out[k] = adherence(videos, wanted)
    return out


def reconstruction_figures(bundle, videos, names, budgets, seed=0):
    """{k: {"psnr", "color", "shape", "motion", "class"}} of held-out clips from their first k tokens."""
    out = {}
    for k in budgets:
        recon = torch.cat([bundle.reconstruct(videos[i:i + 32], k, seed) for i in range(0, len(videos), 32)])
        out[k] = {"psnr": psnr(recon, videos)} | adherence(list(recon), names)
    return out


@torch.no_grad()
def probe_figures(bundle, train, heldout):
    """metrics.token_probe on the codes of the training clips, scored on the held-out ones."""
    ids = [torch.cat([bundle.tok.tokenize(v[i:i + 64], bundle.vae) for i in range(0, len(v), 64)]).cpu()
           for v, _ in (train, heldout)]
    return token_probe(ids[0], train[1], ids[1], heldout[1], bundle.tok.cfg.fsq_levels)


def figures(bundle, train, heldout, log=print):
    """Every figure of the demo: sample adherence, held-out reconstructions and the probe, per budget.
    train, heldout: (videos, class names) of the training and held-out clips (demo_clips)."""
    budgets = token_budgets(bundle.tok.cfg.registers)
    start = time.time()
    result = {"text": sample_adherence(bundle, "text", PROMPTS, budgets),
              "class": sample_adherence(bundle, "class", CLASSES, budgets),
              "reconstruction": reconstruction_figures(bundle, *heldout, budgets),
              "probe": probe_figures(bundle, train, heldout),
              "settings": {"prompts": PROMPTS, "classes": CLASSES, "samples_per_budget": 32,
                           "heldout_clips": len(heldout[0]), "decode": DECODE,
                           "ar_sampling": AR_SAMPLING}}
    log(f"figures in {time.time() - start:.0f} s")
    return result


def print_figures(fig, log=print):
    rec = fig["reconstruction"]
    log("\nheld-out reconstructions from the first k tokens of every frame "
        f"({fig['settings']['heldout_clips']} clips):")
    log("    k   PSNR   colour  shape  motion  class")
    for k, r in rec.items():
        log(f"{k:5}  {r['psnr']:5.2f}  " + "  ".join(f"{100 * r[key]:5.1f}%" for key in ("color", "shape", "motion", "class")))
    for cond, names in (("text", fig["settings"]["prompts"]), ("class", fig["settings"]["classes"])):
        log(f"\n{cond}-to-video adherence, 32 samples per budget over: " + "; ".join(names))
        log("    k   colour  shape  motion  class")
        for k, a in fig[cond].items():
            log(f"{k:5}  " + "  ".join(f"{100 * a[key]:5.1f}%" for key in ("color", "shape", "motion", "class")))
    log("\ntoken-position probe: held-out accuracy of a logistic regression on one token position's codes")
    log("  pos   colour  shape  motion  class")
    probe = fig["probe"]
    for j in range(len(probe["color"])):
        log(f"{j + 1:5}  " + "  ".join(f"{100 * probe[key][j]:5.1f}%" for key in ("color", "shape", "motion", "class")))


################################################################################
# make demo

def run_demo(out, data_root, device):
    bundle = Bundle(device=device)
    budgets = token_budgets(bundle.tok.cfg.registers)
    train, heldout = demo_clips(data_root, device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))   # moved into place at the end
    try:
        prompt, cls = PROMPTS[0], CLASSES[0]
        clip, clip_name = heldout[0][:1], heldout[1][0]
        rows = []
        for k in budgets:
            videos = {f"text-{prompt.replace(' ', '_')}": bundle.sample("text", prompt, k, 1)[0],
                      f"class-{cls}": bundle.sample("class", cls, k, 1)[0],
                      f"reconstruct-{clip_name}": bundle.reconstruct(clip, k)[0]}
            for name, video in videos.items():
                write_video(tmp / f"{name}-k{k}.mp4", to_uint8(video), fps=CLIP["fps"])
            rows.append(np.concatenate([to_uint8(v) for v in videos.values()], axis=0))
        rows.append(np.concatenate([np.full_like(to_uint8(clip[0]), 255)] * 2 + [to_uint8(clip[0])], axis=0))
        write_png_grid(tmp / "demo.png", np.stack(rows))
        print(f"demo.png: rows = k = {', '.join(map(str, budgets))} tokens per frame, then the input clip; "
              f"columns = the frames of {prompt!r}, of class {cls} and of the held-out clip {clip_name} "
              "reconstructed from its first k tokens")
        fig = figures(bundle, train, heldout)
        print_figures(fig)
        (tmp / "figures.json").write_text(json.dumps(fig, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nwrote {out}/: demo.png, one mp4 per budget for the prompt, the class and the reconstruction, figures.json")


################################################################################
# make demo-train's first step: the demo VAE

def train_demo_vae(root, out, frames, fps, size, steps=800, batch_size=32, lr=2e-3, noise=0.1, seed=0, log_every=100,
                   device="cpu"):
    """Train a DemoVAE on every frame of the clips of a video folder; write it (fp16) to `out`.

    Adam with a cosine decay, MSE plus a small L2 on the latents (it keeps their scale from drifting), and
    Gaussian noise of `noise` times the latents' standard deviation added before decoding. Returns the held-out
    PSNR (on a random 5% of the frames, held out), the steps and the seconds it took."""
    torch.manual_seed(seed)
    clips = VideoFolder(root, frames=frames, fps=fps, size=size, train=False, index=False)
    video = torch.stack([clips[i][0] for i in range(len(clips))])                 # (N, 3, T, H, W)
    frames_all = DemoVAE._frames(video)[0][torch.randperm(video.shape[0] * video.shape[2])]
    n_val = max(len(frames_all) // 20, 1)
    val, train = frames_all[:n_val].to(device), frames_all[n_val:].to(device)
    model = DemoVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, 0, steps, 0.05)
        x = train[torch.randint(len(train), (batch_size,)).to(device)]
        z = model.enc(x)
        recon = model.dec(z + noise * z.detach().std() * torch.randn_like(z))
        loss = F.mse_loss(recon, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"demo VAE step {step + 1}/{steps}: loss {loss.item():.5f}", flush=True)
    model.eval()
    with torch.no_grad():
        model.scale.fill_(1 / model.enc(train[:2048]).std().item())
        mse = F.mse_loss(model.decode_frames(model.encode_frames(val)).clamp(-1, 1), val).item()
    report = {"val_psnr": 10 * torch.log10(torch.tensor(4 / mse)).item(), "steps": steps,
              "seconds": time.time() - start, "frames": len(train)}
    weights = {k: v.half().cpu() for k, v in model.state_dict().items()}
    check_finite(weights, f"the demo VAE after {steps} steps", "The run diverged: train again with a lower --lr.")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"config": {"channels": model.latent_channels, "width": model.width}, "model": weights,
                          "report": report})
    return report


################################################################################
# make demo-train's last step: the training checkpoints -> assets/demo

def latest(run_dir):
    """The newest checkpoint of a make demo-train run directory, loaded."""
    path = last_checkpoint(Path(run_dir))
    if path is None:
        raise SystemExit(f"no checkpoint in {run_dir}: run make demo-train")
    return torch.load(path, map_location="cpu", weights_only=True)


def half(weights):
    return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}


def export(work, out, data_root, command):
    """Write the demo models of a make demo-train work folder to `out` (fp16, inference weights only, the EMA
    where there is one), measure their figures, and write demo.json: commit, command, machine, figures."""
    work, out = Path(work), Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-export-", dir=out.parent if out.parent.exists() else None))
    try:
        shutil.copy(work / "vae.pt", tmp / "vae.pt")
        tok = latest(work / "tok")
        torch.save({"config": tok["config"], "model": None, "ema": half(tok["ema"] or tok["model"]),
                    "step": tok["step"]}, tmp / "tok.pt")
        steps = {"tok.pt": tok["step"]}
        for cond in ("class", "text"):
            ar = latest(work / f"ar-{cond}")
            torch.save({"config": ar["config"], "model": half(ar["ema"] or ar["model"]), "step": ar["step"],
                        "tok_ckpt": "tok.pt", "classes": ar["classes"], "captions": ar.get("captions")},
                       tmp / f"ar-{cond}.pt")
            steps[f"ar-{cond}.pt"] = ar["step"]
        fig = figures(Bundle(tmp), *demo_clips(data_root))
        print_figures(fig)
        (tmp / "demo.json").write_text(json.dumps({
            "commit": commit(), "command": command, "machine": machine(), "training_steps": steps,
            "bytes": {name: (tmp / name).stat().st_size for name in FILES}, "figures": fig,
            "measured": {"commit": commit(), "machine": machine()}}, indent=1) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for path in tmp.iterdir():
            path.replace(out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {', '.join(FILES)} and demo.json to {out}")


def measure(folder, data_root):
    """Measure the figures of the models in `folder` again, after a change to the detector or to the sampling
    settings, and rewrite its demo.json: new figures and the commit that measured them; the record of how the
    models were trained stays."""
    folder = Path(folder)
    record = json.loads((folder / "demo.json").read_text())
    fig = figures(Bundle(folder), *demo_clips(data_root))
    print_figures(fig)
    record |= {"figures": fig, "measured": {"commit": commit(), "machine": machine()}}
    tmp = folder / "demo.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(folder / "demo.json")
    print(f"wrote {folder / 'demo.json'}")


def commit():
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or "unknown"


def machine():
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


################################################################################
# Command line

def parse_args(argv=None):
    """The flags of every command; `python demo.py [flags]` is `python demo.py run [flags]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    defaults = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=defaults)
    commands = p.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", formatter_class=defaults,
                                  help="make demo (the default): samples, reconstructions and figures")
    export_cmd = commands.add_parser("export", formatter_class=defaults,
                                     help="make demo-train's last step: the training checkpoints -> --out")
    measure_cmd = commands.add_parser("measure", formatter_class=defaults,
                                      help="the figures of the models in --out again, into its demo.json")
    for sub in (run_cmd, export_cmd, measure_cmd):
        sub.add_argument("--out", type=Path, default=None,
                         help="default: out/demo (run) or assets/demo (export, measure)")
        sub.add_argument("--data", type=Path, default=Path("out/demo-data"),
                         help="where the synthetic training and held-out clips are (generated if missing)")
        sub.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    export_cmd.add_argument("--work", type=Path, default=Path("out/demo-train"), help="make demo-train's work folder")
    export_cmd.add_argument("--command-line", default="make demo-train", help="the command recorded in demo.json")
    train_cmd = commands.add_parser("train-vae", formatter_class=defaults,
                                    help="make demo-train's first step: train a DemoVAE on every frame of a folder's clips")
    train_cmd.add_argument("--data", type=Path, required=True, help="video folder")
    train_cmd.add_argument("--out", type=Path, required=True, help="checkpoint to write (fp16)")
    train_cmd.add_argument("--frames", type=int, default=5, help="frames per clip read from each video")
    train_cmd.add_argument("--fps", type=float, default=4.0)
    train_cmd.add_argument("--size", type=int, default=32, help="frame side in pixels (a multiple of 4)")
    train_cmd.add_argument("--steps", type=int, default=800)
    train_cmd.add_argument("--batch-size", type=int, default=32, help="frames per step")
    train_cmd.add_argument("--lr", type=float, default=2e-3)
    train_cmd.add_argument("--seed", type=int, default=0)
    train_cmd.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.prog = f"{p.prog} {args.command}"
    check_args(args, {"frames": (positive, ">= 1"), "fps": (positive, "> 0"), "steps": (positive, ">= 1"),
                      "batch_size": (positive, ">= 1"), "lr": (positive, "> 0"), "seed": (at_least(0), ">= 0"),
                      "size": (lambda v: v >= 4 and v % 4 == 0, "a positive multiple of 4")}, args.prog)
    return args


def run_train_vae(args):
    try:
        report = train_demo_vae(args.data, args.out, args.frames, args.fps, args.size, args.steps, args.batch_size,
                                args.lr, seed=args.seed, device=pick_device(args.device))
    except (ValueError, FileNotFoundError) as err:   # an empty or missing folder, a device this build lacks
        raise SystemExit(f"{args.prog}: error: {err}") from None
    print(f"wrote {args.out}: held-out PSNR {report['val_psnr']:.2f} dB after {args.steps} steps "
          f"({report['seconds']:.0f} s, {report['frames']} training frames)")


def main(argv=None):
    args = parse_args(argv)
    if args.command == "train-vae":
        return run_train_vae(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.command == "run":
        run_demo(args.out or Path("out/demo"), args.data, device)
    elif args.command == "export":
        export(args.work, args.out or DEMO_ASSETS, args.data, args.command_line)
    else:
        measure(args.out or DEMO_ASSETS, args.data)


if __name__ == "__main__":
    main()
