"""Training plumbing shared by train_tok.py and train_ar.py.

Processes (plain python or torchrun), the AdamW parameter groups, the warmup + cosine schedule, the
EMA, the data order, and checkpoints that resume exactly: model, optimizer, EMA, step, position in
the epoch and every rank's random state. Nothing here knows about tokenizers or AR models.

References: nanoGPT and DiT (torchrun and checkpoint conventions).
"""
import argparse
import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from checkpoint import check_finite, torch_load
from transformer import allow_recompiles
from vae import VAE_KINDS


def add_common_args(p, batch_size, batch_unit, ema):
    """The flags both training scripts share: videos, the frozen VAE, optimisation, bookkeeping."""
    p.add_argument("--data", type=Path, default=None, help="video folder; default: the built-in synthetic data (generated once)")
    p.add_argument("--vae", default="pixel", choices=VAE_KINDS)
    p.add_argument("--vae-ckpt", type=Path, default=None)
    p.add_argument("--vae-version", default="v1.0", choices=["v1.0", "v1.1"])
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--size", type=int, default=None, help="clip side in pixels; default: the tokenizer's latent size times the VAE's factor")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_unit} per process and step")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at lr * this")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=ema, help="EMA decay (after a warm-up); 0 disables the EMA")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last usable checkpoint in --run-dir")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a --run-dir that holds a run, deleting it")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: on CUDA)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def positive(v):
    return v > 0


def at_least(low):
    return lambda v: v >= low


def in_range(low, high):
    return lambda v: low <= v <= high


# (test, what it must be) for the flags of add_common_args; None values (defaults decided later) pass.
COMMON_RULES = {
    "frames": (positive, ">= 1"), "fps": (positive, "> 0"), "size": (at_least(8), ">= 8"),
    "batch_size": (positive, ">= 1"), "steps": (positive, ">= 1"), "lr": (positive, "> 0"),
    "warmup": (at_least(0), ">= 0"), "min_lr_ratio": (in_range(0, 1), "in [0, 1]"),
    "weight_decay": (at_least(0), ">= 0"), "grad_clip": (positive, "> 0"),
    "ema": (lambda v: 0 <= v < 1, "in [0, 1)"), "log_every": (positive, ">= 1"), "ckpt_every": (positive, ">= 1"),
    "num_workers": (at_least(0), ">= 0"), "seed": (at_least(0), ">= 0"),
}


def check_args(args, rules, prog):
    """The one check of a script's numeric flags, before any work or any file is written: every
    flag in `rules` ({dest: (test, what it must be)}) that fails, and every NaN or infinite float,
    is named in one message."""
    bad = []
    for name, (test, want) in rules.items():
        value = getattr(args, name, None)   # a subcommand may lack some of the flags
        if value is None:
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not test(value):
            bad.append(f"--{name.replace('_', '-')} must be {want}; got {value}")
    if bad:
        raise SystemExit(f"{prog}: error: " + "; ".join(bad))


def check_batch(items, batch_size, world, what, prog):
    """Every step needs batch_size items on every process; fewer would never make a batch."""
    if items < batch_size * world:
        raise SystemExit(f"{prog}: error: --batch-size {batch_size}{f' x {world} processes' if world > 1 else ''} "
                         f"needs at least {batch_size * world} {what}; the data has {items}. Lower --batch-size "
                         f"or add data")


def pick_device(name=None):
    """--device, or cuda when there is one, else cpu; a device this PyTorch cannot use is refused."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this PyTorch ({torch.__version__}) has no usable CUDA. Use --device cpu, "
                         "or install a CUDA build (make setup TORCH=torch)")
    return device


def setup_distributed(device=None):
    """(rank, world size, device). Works under torchrun (NCCL on CUDA, gloo on CPU) and as plain python."""
    try:
        device = pick_device(device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(obj, world):
    """Every rank's `obj`, in rank order (just [obj] without torchrun)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def make_optimizer(model, lr, weight_decay, betas, fused):
    """AdamW with weight decay on matrices only: norms have no weights, and biases, learned tokens
    and per-axis embeddings stay free."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p.shape[0] > 1]
    rest = [p for p in params if not (p.dim() >= 2 and p.shape[0] > 1)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused), params


def lr_at(step, lr, warmup, steps, min_ratio):
    """Linear warmup, then cosine decay to lr * min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def compile_blocks(model, block_type, **options):
    """torch.compile every `block_type` submodule in place (regional compilation), with static shapes.

    Identical blocks share one compiled graph, so compilation does not grow with depth, and parameter
    names (checkpoints) stay as they are. Compiling the whole model instead would trace through the
    per-shape mask cache (Dynamo ignores functools.lru_cache) and rebuild the masks in every step.
    """
    allow_recompiles()
    for module in model.modules():
        if isinstance(module, block_type):
            module.compile(dynamic=False, **options)


def make_ema(model, decay):
    return copy.deepcopy(model).requires_grad_(False).eval() if decay > 0 else None


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """Exponential moving average of the weights, with a warm-up: early on the average follows the
    model closely, or a short run would be evaluated on weights still close to their initialisation."""
    if ema is None:
        return
    decay = min(decay, (1 + step) / (10 + step))
    # One multi-tensor kernel for all parameters rather than one launch each (hundreds on the GPU).
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so that a resumed run continues mid-epoch."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def batches(dataset, progress, steps, batch_size, num_workers, seed, world, rank):
    """Training batches, epoch after epoch, from `progress` on until `steps`.

    One DataLoader serves the whole run, so its workers start once and keep their open videos; the
    (epoch, index) keys of `EpochSampler` tell them which epoch an item belongs to. The caller counts
    each finished optimizer step with `progress.step += 1`; the position in the epoch is kept here,
    already counting the batch being used, so a checkpoint taken in the step resumes after it.
    """
    per_epoch = len(dataset) // world // batch_size
    if per_epoch == 0:   # would loop forever (check_batch says why first)
        raise SystemExit(f"{len(dataset)} items make no batch of {batch_size} on each of {world} processes")
    if progress.batch_in_epoch >= per_epoch:   # saved during an epoch's last step
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    if progress.step >= steps:
        return
    sampler = EpochSampler(len(dataset), batch_size, seed, world, rank, progress.epoch, progress.batch_in_epoch)
    # The loader's own generator: it never draws from the global random state, which the training step uses.
    loader = DataLoader(EpochItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(seed + progress.epoch))
    for batch in loader:
        if progress.batch_in_epoch == per_epoch:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        progress.batch_in_epoch += 1
        yield batch
        if progress.step >= steps:
            return


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys for `EpochItems`, epoch after epoch from (epoch, skip_batches) on, without end. Each
    epoch is a seeded DistributedSampler order cut to whole batches, so the same epoch is the same data however
    the run is resumed, and no batch spans two epochs."""

    def __init__(self, n, batch_size, seed, world, rank, epoch, skip_batches):
        self.n, self.batch_size, self.seed, self.world, self.rank = n, batch_size, seed, world, rank
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        while True:
            order = DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True,
                                       seed=self.seed, drop_last=True)
            order.set_epoch(epoch)
            indices = list(order)
            usable = len(indices) - len(indices) % self.batch_size
            yield from ((epoch, i) for i in indices[skip * self.batch_size:usable])
            epoch, skip = epoch + 1, 0


class EpochItems(torch.utils.data.Dataset):
    """A dataset read with (epoch, index) keys. A video folder draws its random clip starts per epoch, so the
    folder (in each worker, its own copy) is moved to an item's epoch before the item is read."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.folder = dataset.dataset if isinstance(dataset, Subset) else dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        if hasattr(self.folder, "set_epoch") and self.folder.epoch != epoch:
            self.folder.set_epoch(epoch)
        return self.dataset[i]


def optimizer_step(opt, params, loss, lr, grad_clip):
    """Backward, clip, step at learning rate `lr`; returns the gradient norm before clipping.

    A step whose gradient norm is not finite (a NaN or inf loss gives one) is not taken: the
    weights and the optimizer state stay as they were. Under DDP every rank sees the same reduced
    gradients, so all ranks skip together. The caller counts skips with a NonFiniteGuard."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if torch.isfinite(grad_norm):
        opt.step()
    return grad_norm


class NonFiniteGuard:
    """Counts the steps optimizer_step skipped for a non-finite loss or gradient. A few in a row
    are tolerated (a rare bad batch, an fp16 overflow); `limit` in a row stop the run with a
    message, before anything non-finite can reach a checkpoint."""

    def __init__(self, limit=5, log=print):
        self.limit, self.log = limit, log
        self.in_a_row = self.skipped = 0

    def __call__(self, step, grad_norm, loss, lr):
        if torch.isfinite(grad_norm):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        loss = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        self.log(f"warning: step {step}: loss {loss:.4g}, gradient norm {grad_norm.item():.4g}; step skipped "
                 f"({self.in_a_row} in a row, {self.skipped} in all)")
        if self.in_a_row >= self.limit:
            raise SystemExit(f"training stopped at step {step}: {self.limit} steps in a row had a non-finite loss or "
                             f"gradient (last loss {loss:.4g} at lr {lr:.3g}). The learning rate is likely too high "
                             f"(lower --lr or --grad-clip, raise --warmup), or the data holds non-finite values. "
                             f"The checkpoints written so far are finite: --resume continues from the last one.")


def mean_over_ranks(values, world):
    """{name: scalar tensor} -> {name: float}, averaged over all processes."""
    values = {k: v.detach().float().clone() for k, v in values.items()}
    if world > 1:
        for v in values.values():
            dist.all_reduce(v, op=dist.ReduceOp.AVG)
    return {k: v.item() for k, v in values.items()}


class RunLog:
    """`log.jsonl` in the run directory: one JSON record per line, written by rank 0 only."""

    def __init__(self, run_dir, master):
        self.file = open(run_dir / "log.jsonl", "a") if master else None

    def write(self, record):
        """Non-finite numbers become null: bare NaN is not JSON."""
        if self.file:
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()

    def close(self, model, step, world):
        """Last record: every rank's weight checksum, equal iff DDP kept the ranks in sync. Every
        rank must call it."""
        self.write({"step": step, "final": True, "rank_weight_checksums": gather(weight_checksum(model), world)})
        if self.file:
            self.file.close()


################################################################################
# Datasets encoded once (tokenizer latents, AR token ids)

class Shards(torch.utils.data.Dataset):
    """Items stored in shard files written by `build_shards`: item i is a tuple of its fields.

    Shards are memory-mapped, so a Kinetics-size cache does not have to fit in RAM.
    """

    SIZE = 256  # items per shard file

    def __init__(self, root, fields):
        self.fields = fields
        self.shards = [torch.load(p, mmap=True, weights_only=True) for p in sorted(root.glob("shard-*.pt"))]
        self.index = [(s, i) for s, shard in enumerate(self.shards) for i in range(len(shard[fields[0]]))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        shard, j = self.index[i]
        return tuple(self.shards[shard][f][j] for f in self.fields)


@torch.no_grad()
def build_shards(root, dataset, settings, encode, batch_size, num_workers, rank, world):
    """Encode `dataset` once into `root` and return it as `Shards`.

    `encode(batch)` maps a loader batch to a dict of per-item tensors or lists; each rank encodes
    its share of the shards. `settings` (JSON) is stored in meta.json: a cache built with other
    settings is refused rather than silently reused. Shards are written atomically and existing
    ones kept, so an interrupted build resumes.
    """
    meta = root / "meta.json"
    settings = json.loads(json.dumps(settings))  # compare as stored (tuples become lists)
    if meta.exists():
        found = json.loads(meta.read_text())
        if found["settings"] != settings:
            diff = {k: (found["settings"].get(k), v) for k, v in settings.items() if found["settings"].get(k) != v}
            raise SystemExit(f"cache {root} was built with other settings (cached, now): {diff}. "
                             "Use another directory or delete this one.")
        return Shards(root, found["fields"])
    root.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(dataset) / Shards.SIZE)
    fields = None
    for n in tqdm(range(rank, n_shards, world), desc=f"encoding {root}", disable=rank != 0):
        path = root / f"shard-{n:05d}.pt"
        if path.exists():  # written by an interrupted build
            fields = list(torch.load(path, mmap=True, weights_only=True))
            continue
        part = Subset(dataset, range(n * Shards.SIZE, min((n + 1) * Shards.SIZE, len(dataset))))
        parts = [encode(batch) for batch in DataLoader(part, batch_size=batch_size, num_workers=num_workers)]
        fields = list(parts[0])
        save_checkpoint(path, {f: torch.cat([p[f] for p in parts]) if torch.is_tensor(parts[0][f])
                               else sum((list(p[f]) for p in parts), []) for f in fields})
    fields = [f for f in gather(fields, world) if f is not None][0]
    barrier()
    if rank == 0:
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": settings, "fields": fields}, indent=2))
        os.replace(tmp, meta)
    barrier()
    return Shards(root, fields)


################################################################################
# Checkpoints

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint. A
    write that fails (full disk, no permission) removes the temporary file and stops the run with
    a message; the checkpoints written before are left as they were."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"could not write {path} ({str(err).splitlines()[0]}): is the disk full, or the folder "
                         f"not writable? The checkpoints written before it are intact") from None


def prepare_run_dir(run_dir, resume, overwrite):
    """Make `run_dir`, refusing to mix two runs: a fresh run (no --resume) in a folder that already
    holds checkpoints stops unless --overwrite is given, which deletes that run's checkpoints, log
    and config. Temporary files left by a run killed while writing are removed. Rank 0 only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for tmp in run_dir.glob("*.tmp"):
        print(f"removing {tmp}, left by a run stopped while writing it")
        tmp.unlink()
    old = sorted(run_dir.glob("ckpt-*.pt"))
    if not old or resume:
        return
    if not overwrite:
        raise SystemExit(f"{run_dir} already holds a run ({len(old)} checkpoints, newest {old[-1].name}). Pass "
                         "--resume to continue it, --overwrite to replace it, or choose another --run-dir")
    for path in old + [run_dir / "log.jsonl", run_dir / "config.json"]:
        path.unlink(missing_ok=True)
    print(f"--overwrite: deleted the previous run's {len(old)} checkpoints, log and config in {run_dir}")


def last_checkpoint(run_dir):
    ckpts = sorted(run_dir.glob("ckpt-*.pt"))
    return ckpts[-1] if ckpts else None


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def training_state(model, ema, opt, config, progress, world, device):
    """Everything `resume` needs. Every rank must call it: it gathers their random states."""
    return {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "opt": opt.state_dict(), "config": config, "rng": gather(rng_state(device), world)} | asdict(progress)


def load_resumable(run_dir, rank=0):
    """(path, state) of the newest checkpoint in `run_dir` that loads and holds finite weights, or
    (None, None). Newer ones that do not (truncated by a crash or a full disk, or written by a run
    that diverged) are skipped, each with the reason."""
    for path in sorted(run_dir.glob("ckpt-*.pt"), reverse=True):
        try:
            state = torch_load(path)
            for part in ("model", "ema"):
                if state.get(part) is not None:
                    check_finite(state[part], f"{path} ({part})", "")
            return path, state
        except (ValueError, RuntimeError, EOFError, OSError, KeyError, AttributeError) as err:
            if rank == 0:
                print(f"--resume: skipping {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return None, None


def resume(run_dir, model, opt, ema, world, rank, device):
    """Continue from the last complete checkpoint in `run_dir`: model, optimizer, EMA, random state.
    Returns its Progress (a fresh one when there is no usable checkpoint yet)."""
    path, state = load_resumable(run_dir, rank)
    if path is None:
        if rank == 0:
            print(f"--resume: no usable checkpoint in {run_dir}, starting from scratch")
        return Progress()
    if len(state["rng"]) != world:
        raise SystemExit(f"{path} was written by {len(state['rng'])} processes; resume with as many")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise SystemExit(f"{path} does not fit this run's model and settings ({str(err).splitlines()[0]}). "
                         "Resume with the settings it was trained with (see config.json), or start a fresh "
                         "run in another --run-dir") from None
    torch.set_rng_state(state["rng"][rank]["cpu"])
    if device.type == "cuda" and state["rng"][rank]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
    if rank == 0:
        print(f"resumed from {path} at step {state['step']}")
    return Progress(state["step"], state["epoch"], state["batch_in_epoch"])


def weight_checksum(model):
    """A position-weighted sum of all weights: equal across ranks iff DDP kept them in sync (as far
    as a checksum can tell)."""
    return sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters()))
