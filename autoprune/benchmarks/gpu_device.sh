#!/usr/bin/env bash
# The GPU benchmark (python -m autoprune.benchmarks.gpu) on a lent GPU machine whose image has torch
# but not optuna or torch-pruning (this workplace's 'cuda' image: Python 3.12, x86-64).
#
# 1. Here, in the repository root, before each device call (needs pip and the network; .whl/ is git-ignored,
#    ~6 MB; it also records the commit in .whl/COMMIT, since the copied tree has no .git):
#        bash autoprune/benchmarks/gpu_device.sh fetch
# 2. On the device machine, from the repository root, with .whl carried (device tool: command
#    "bash autoprune/benchmarks/gpu_device.sh run", carry [".whl"], timeout_s 600):
#        bash autoprune/benchmarks/gpu_device.sh run           # --quick: about 3 minutes on an H100
#        bash autoprune/benchmarks/gpu_device.sh run --full    # full sizes: about 7 minutes
#    The tables land in $OUT (gpu.md and gpu_tables.tar.gz with every .md/.csv, plus log.txt);
#    copy them into results/benchmarks/ and commit them with the README's GPU numbers.
set -uo pipefail

WHEELS=(optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3 torch-pruning==1.6.1)
PY=${PYTHON:-python3}

case "${1:-run}" in
fetch)
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 2
    # the copied tree has no .git: record the commit for the tables' header (run fetch before each device call)
    mkdir -p .whl
    echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- || echo +changes)" > .whl/COMMIT
    ;;
run)
    shift
    mode=(--quick)
    limit=300
    if [ "${1:-}" = "--full" ]; then mode=(); limit=540; shift; fi
    mode+=("$@")  # anything else goes to the benchmark (e.g. --dry-run to try this script without a GPU)
    out=${OUT:-/tmp/autoprune_gpu_out}
    mkdir -p "$out"
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: no wheels in .whl/: run 'bash autoprune/benchmarks/gpu_device.sh fetch' here first and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    if [ -f .whl/COMMIT ]; then export AUTOPRUNE_COMMIT="$(cat .whl/COMMIT)"; fi
    { nvidia-smi || true; } > "$out/log.txt" 2>&1
    # SIGINT well inside the device tool's limit: the benchmark rewrites its tables after every part,
    # so a run stopped early still leaves what it measured
    timeout -s INT -k 30 "$limit" "$PY" -m autoprune.benchmarks.gpu "${mode[@]}" --out "$out/tables" 2>&1 \
        | tee -a "$out/log.txt"
    rc=${PIPESTATUS[0]}
    if [ -d "$out/tables" ]; then
        cp "$out"/tables/gpu*.md "$out/" 2>/dev/null
        tar -C "$out/tables" -czf "$out/gpu_tables.tar.gz" .
        rm -rf "$out/tables"  # at most 8 files come back from $OUT
    fi
    echo "benchmark exit code $rc"
    exit "$rc"
    ;;
*)
    echo "usage: bash autoprune/benchmarks/gpu_device.sh fetch | run [--full] [benchmark options]" >&2
    exit 2
    ;;
esac
