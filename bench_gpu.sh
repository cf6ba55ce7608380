#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md: every benchmark of bench.py at the real size, bf16, on one CUDA GPU (written for an
# H100 80GB), in two parts of under 10 minutes each, the longest command a lent GPU machine runs here:
#
#   bash bench_gpu.sh [OUT] [train|rest]   # OUT: the Markdown tables, appended (default bench-gpu.md); warnings go to OUT.log
#                                          # train: tokenizer steps (MFU, profile, activation checkpointing), attention;
#                                          # rest: flow decoding, VAE, AR, data
#                                          # (default: both, about 16 minutes)
#
# Each benchmark runs under its own time limit, so one that compiles for too long or hangs costs only its own rows,
# and a line says which one stopped. The limits come from the H100 runs of 2026-11-22 (BENCHMARKS.md), where
# tok-step and attention took about 150 s together, AR at 1280 tokens about 40 s per generation, and a DataLoader
# worker several seconds to start. Paste the tables into BENCHMARKS.md with the machine line printed at the top.
#
# Python: $PYTHON, default python3. It needs torch with CUDA, numpy and tqdm. `data` also needs PyAV and `vae`
# (the comparison with diffusers) needs diffusers; each is skipped with a line when missing. The lent GPU machines
# reach no package index: carry the wheels (41 MB). Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av diffusers importlib_metadata
# then run there, carrying .whl:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash bench_gpu.sh $OUT/bench-gpu.md train
set -u
out=${1:-bench-gpu.md}
part=${2:-all}
case $part in train | rest | all) ;; *) echo "part must be train, rest or all; got $part" >&2; exit 2 ;; esac
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: >>"$out.log"

run() {  # seconds name [options...]: one benchmark's table, or a line saying why there is none
  local limit=$1 name=$2
  shift 2
  printf '\n### `bench.py %s --device cuda%s`\n\n' "$name" "${*:+ $*}"
  timeout "$limit" "$py" bench.py "$name" --device cuda "$@" 2>>"$out.log"
  local status=$?
  if [ "$status" -eq 124 ]; then
    echo "$name: stopped at its time limit of $limit s; the rows above it are complete"
  elif [ "$status" -ne 0 ]; then
    echo "$name: failed with exit status $status (see $out.log)"
  fi
}

has() { "$py" -c "import $1" 2>/dev/null; }

{
  echo "Machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)," \
    "$(getconf _NPROCESSORS_ONLN) CPU cores, torch $("$py" -c 'import torch; print(torch.__version__)'), $(date -u '+%Y-%m-%d %H:%M UTC')," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  if [ "$part" != rest ]; then
    run 230 compile --profile 15   # eager and compiled steps (MFU), and the 15 costliest kernels of each
    # Activation checkpointing: the batches that do not fit without it (d18-d18 at 16, d18-d28 at 4).
    run 100 tok-step --presets d18-d18 --batch-size 16 --checkpointing
    run 90 tok-step --presets d18-d28 --batch-size 4 --checkpointing
    run 150 attention
  fi
  if [ "$part" != train ]; then
    run 130 decode --budgets 1 256 --guidance 3.0
    run 50 vae-memory
    if has diffusers; then run 50 vae; else echo; echo "vae: not measured (diffusers missing)"; fi
    run 240 ar --runs 1 --lengths 1280   # eager and compiled; 1280 tokens give the early and late spans
    if has av; then run 100 data --workers 0 1 4 8; else echo; echo "data: not measured (PyAV missing)"; fi
  fi
} | tee -a "$out"
