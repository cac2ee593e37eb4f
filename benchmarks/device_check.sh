#!/usr/bin/env bash
# One prepared GPU check for napari-dense, in at most 8 minutes on one H100/H200.
#
#   benchmarks/device_check.sh [--wheels DIR] [--anchor PATH] [--python PY] [--dry-run] [OUT]
#   benchmarks/device_check.sh --print-deps      # what --wheels DIR must hold (and the project)
#
# Writes everything under OUT (default: $OUT when set, else ./device_check_out):
#   summary.md            every step, its exit code and seconds; the headline tables
#   env.log               GPU name, driver, torch/CUDA/cuDNN and package versions
#   pytest.log/.xml       pytest -m cuda tests/test_cuda.py (oracle in strict fp32, bf16, OOM, store)
#   bench_engine.log/json the engine end to end: 32768² uint8 zarr -> uint8 map, 64x64 net, bf16
#   anchor/               the independent reference (../shared/gpu_anchor/bench_anchor.py)
#   bench_modes.log/json  the three nets at 2048²: strict fp32, bf16 eager, bf16 compiled
#
# On a bare machine (Python 3.12 and torch, nothing else, no network), --wheels DIR installs the
# project's other dependencies and the project itself (--no-deps) from DIR with
# `pip install --no-index --target` a scratch folder, downloading nothing (`make rehearse-device`
# fills device_wheels/ and rehearses this on a CPU). Without --wheels the current Python's
# packages are used.
#
# --dry-run: CPU, tiny sizes, no compilation; every step runs (tests/test_device_check.py runs it
# in `make test`). Each step has a time limit; a step that fails or overruns is recorded and the
# next one runs. Exit code 0 when every step passed, 1 otherwise, 2 on a usage error.
set -uo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "device_check.sh: error: $*" >&2; exit 2; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"

# The project's runtime dependencies (pyproject.toml) except torch (already there) and
# scikit-image and matplotlib (imported only by the demo and the GUI), plus what the checks use.
dependencies() {
    "$PY" - "$REPO/pyproject.toml" <<'EOF'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as pyproject:
    required = tomllib.load(pyproject)["project"]["dependencies"]
skip = {"torch", "scikit-image", "matplotlib"}
for requirement in required:
    if re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower() not in skip:
        print(requirement)
print("filelock", "pytest", "pytest-timeout", "psutil", sep="\n")
EOF
}

DRY=0
PRINT_DEPS=0
WHEELS=""
ANCHOR=""
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) [ $# -ge 2 ] || fail "--wheels needs a folder"; WHEELS="$2"; shift ;;
        --anchor) [ $# -ge 2 ] || fail "--anchor needs the path of bench_anchor.py"; ANCHOR="$2"; shift ;;
        --python) [ $# -ge 2 ] || fail "--python needs an interpreter"; PY="$2"; shift ;;
        --print-deps) PRINT_DEPS=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) fail "unknown option $1; see --help" ;;
        *) OUT_DIR="$1" ;;
    esac
    shift
done

command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter $PY; pass --python"
mapfile -t DEPS < <(dependencies)
[ "${#DEPS[@]}" -gt 4 ] || fail "cannot read the dependencies from $REPO/pyproject.toml with $PY (Python >= 3.11)"
if [ "$PRINT_DEPS" = 1 ]; then
    printf '%s\n' "${DEPS[@]}"
    exit 0
fi
cd "$REPO" || exit 2
OUT_DIR="${OUT_DIR:-device_check_out}"
mkdir -p "$OUT_DIR" || fail "cannot create the output folder $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || fail "wheel folder $WHEELS not found; fill it with make rehearse-device"
    WHEELS="$(cd "$WHEELS" && pwd)"
fi
if [ -z "$ANCHOR" ] && [ -f "$REPO/../shared/gpu_anchor/bench_anchor.py" ]; then
    ANCHOR="$REPO/../shared/gpu_anchor/bench_anchor.py"
fi
# Scratch space outside OUT (installed packages, gigabytes of test images), removed at exit.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/napari-dense-check.XXXXXX")" || fail "cannot create a scratch folder"
trap 'rm -rf "$WORK"' EXIT

# Total budget (seconds) and each step's limit: the steps' limits add up to the budget.
if [ "$DRY" = 1 ]; then BUDGET=300; else BUDGET=470; fi
START=$(date +%s)
SUMMARY="$OUT_DIR/summary.md"
FAILED=0
{
    echo "# napari-dense device check ($( [ "$DRY" = 1 ] && echo "dry run, CPU" || echo GPU ))"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "| step | exit code | seconds | limit s |"
    echo "|---|---:|---:|---:|"
} >"$SUMMARY"

# limited LIMIT LOG COMMAND...: COMMAND (a program or a function of this script) in its own
# process group, killed with its children after LIMIT seconds (exit code 124).
limited() {
    local limit="$1" log="$2" pid waited=0
    shift 2
    set -m
    ("$@") >"$log" 2>&1 &
    pid=$!
    set +m
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$limit" ]; then
            kill -TERM -- "-$pid" 2>/dev/null
            sleep 5
            kill -KILL -- "-$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            return 124
        fi
        sleep 1
        waited=$((waited + 1))
    done
    wait "$pid"
}

# step NAME LIMIT COMMAND...: run with a time limit (never past the budget), log to NAME.log.
step() {
    local name="$1" limit="$2" left t0 rc seconds
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "| $name | skipped (budget spent) | 0 | 0 |" >>"$SUMMARY"
        FAILED=1
        return
    fi
    echo "== $name (limit ${limit} s)"
    t0=$(date +%s)
    limited "$limit" "$OUT_DIR/$name.log" "$@"
    rc=$?
    seconds=$(($(date +%s) - t0))
    [ "$rc" = 124 ] && rc="124 (time limit)"
    echo "| $name | $rc | $seconds | $limit |" >>"$SUMMARY"
    [ "$rc" = 0 ] || FAILED=1
    tail -n 25 "$OUT_DIR/$name.log"
}

# -- install (bare machine): dependencies and the project from the wheel folder, nothing else.
if [ -n "$WHEELS" ]; then
    SITE="$WORK/site"
    install_from_wheels() {
        "$PY" -m pip install --no-index --find-links "$WHEELS" --target "$SITE" --quiet \
            --disable-pip-version-check "${DEPS[@]}" &&
            "$PY" -m pip install --no-index --no-deps --target "$SITE" --quiet \
                --disable-pip-version-check "$WHEELS"/napari_dense-*.whl
    }
    step install 120 install_from_wheels
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONDONTWRITEBYTECODE=1

# -- versions
env_report() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    "$PY" - <<'EOF'
import importlib.metadata as md, json, platform, sys
import torch
cuda = torch.cuda.is_available()
info = {
    "python": sys.version.split()[0], "platform": platform.platform(),
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpus": torch.cuda.device_count() if cuda else 0,
    "bf16": torch.cuda.is_bf16_supported(including_emulation=False) if cuda else False,
}
for name in ("napari-dense", "numpy", "dask", "distributed", "zarr", "numcodecs", "pytest"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
import napari_dense  # the project imports with these packages alone
print(json.dumps(info, indent=1))
EOF
}
step env 30 env_report

# -- the CUDA tests (each skips without CUDA: the dry run checks that they collect and import)
step pytest 110 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest.xml"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    ENGINE_ARGS=(--net 15x15 --sizes 256 --tile 128 --repeats 1 --skip-deviation)
    MODES_ARGS=(--nets 15x15 --sizes 32 --precisions float32 bfloat16 --repeats 1)
    # On a CPU the anchor checks its own methods against its naive one on small images.
    ANCHOR_ARGS=(--device cpu --nets fdfe-basenet)
else
    DEVICE=cuda
    ENGINE_ARGS=(--net 64x64 --sizes 32768 --tile 2048 --repeats 3)
    MODES_ARGS=(--nets 64x64 32x32 15x15 --sizes 2048 --precisions float32 bfloat16
        bfloat16-compiled --repeats 2 --naive-batch 4096 --memory-limit-gib 100
        --compile-mode "${COMPILE_MODE:-default}")
    # The anchor README's short command, with a deadline that fits this budget.
    ANCHOR_ARGS=(--sizes 2048 --skip-verify --skip-ceilings --methods dil_fp32,dil_bf16cl_maxop
        --compile-list janowczyk-32:dil,vgg-64:dil --compile-size 1024 --deadline 80)
fi

# -- the engine end to end: uint8 zarr -> uint8 OME-Zarr map, bf16, first call apart
ENGINE_WORK="$WORK/engine"
run_engine() {
    "$PY" benchmarks/bench_engine.py --device "$DEVICE" "${ENGINE_ARGS[@]}" --precisions bfloat16 \
        --store-dtype uint8 --workdir "$ENGINE_WORK" --json "$OUT_DIR/bench_engine.json"
    local rc=$?
    rm -rf "$ENGINE_WORK" # gigabytes of images
    return $rc
}
step bench_engine 100 run_engine

# -- the independent reference, in the same run
if [ -n "$ANCHOR" ]; then
    step anchor 110 "$PY" "$ANCHOR" "${ANCHOR_ARGS[@]}" --out "$OUT_DIR/anchor"
else
    echo "| anchor | skipped (no bench_anchor.py: pass --anchor PATH) | 0 | 0 |" >>"$SUMMARY"
    [ "$DRY" = 1 ] || FAILED=1 # the GPU figures need the reference of the same run
fi

# -- the three nets at 2048²: naive (extrapolated from a probe of 4096-patch batches) and advanced,
# the network alone on the device as the anchor times it; compiled in torch.compile's "default"
# mode, as the anchor compiles (COMPILE_MODE=max-autotune-no-cudagraphs: the engine's compile=True)
step bench_modes 140 "$PY" benchmarks/bench_modes.py --device "$DEVICE" "${MODES_ARGS[@]}" \
    --methods naive advanced --on-device --naive-budget 0 --json "$OUT_DIR/bench_modes.json"

# -- headline tables into the summary
{
    echo
    echo "total: $(($(date +%s) - START)) s of a ${BUDGET} s budget"
    for log in bench_engine bench_modes; do
        if [ -f "$OUT_DIR/$log.log" ]; then
            echo
            echo "## $log"
            echo
            grep '^|' "$OUT_DIR/$log.log"
        fi
    done
    if [ -f "$OUT_DIR/pytest.log" ]; then
        echo
        echo "## pytest -m cuda"
        echo
        tail -n 3 "$OUT_DIR/pytest.log"
    fi
} >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
