#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one command: every benchmark of bench.py at the real size, bf16, on one CUDA
# GPU (written for an H100 80GB), in under 10 minutes of wall time.
#
#   bash bench_gpu.sh [OUT]     # OUT: the Markdown tables (default bench-gpu.md); warnings go to OUT.log
#
# Each benchmark runs under its own time limit, and the limits add up to 580 s, so a benchmark that compiles for
# too long or hangs costs only its own rows, and a line says which one stopped. The limits were set before any GPU
# run (none was lent when this was written): adjust them to what the first run shows. Paste the tables into
# BENCHMARKS.md with the machine line printed at the top.
#
# Python: $PYTHON, default python3. It needs torch with CUDA, numpy and tqdm. `data` also needs PyAV and `vae`
# (the comparison with diffusers) needs diffusers; each is skipped with a line when missing. The lent GPU machines
# reach no package index and have no PyAV: carry its wheel (35 MB). Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl av
# then run there, carrying .whl:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; bash bench_gpu.sh $OUT/bench-gpu.md
set -u
out=${1:-bench-gpu.md}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: >"$out.log"

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
    "$(getconf _NPROCESSORS_ONLN) CPU cores, torch $("$py" -c 'import torch; print(torch.__version__)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
  run 140 tok-step
  run 100 compile
  run 90 attention
  run 60 decode
  run 40 vae-memory
  run 100 ar --runs 1
  if has av; then run 40 data --workers 0 1 4 8; else echo; echo "data: not measured (PyAV missing)"; fi
  if has diffusers; then run 10 vae; else echo; echo "vae: not measured (diffusers missing)"; fi
} | tee "$out"
