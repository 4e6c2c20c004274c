#!/usr/bin/env bash
# The GPU check of issue 19 in one script: CUDA tests, then the pipeline benchmark at Broden's
# size (ResNet-18 layer4, 63,305 images of 224 px) and layer1-layer4 at a smaller N.
#
# 1. Here, on a machine with pip and the internet, once (wheels of what the GPU machine lacks:
#    dask, distributed and their missing dependencies, captum; into .whl/, ignored by git):
#        bash scripts/gpu_session.sh --prepare
# 2. On the GPU machine (the device tool's `run`, with carry [".whl"], timeout_s 600):
#        bash scripts/gpu_session.sh
#    Everything is printed and the figures land in $OUT (at most 8 files):
#    session.log, pytest.log, bench_layer4.md/.json, bench_blocks.md/.json, run_layer4.json.
# 3. Dry run on a CPU (tiny N, same steps):
#        N=120 N_BLOCKS=60 SIZE=64 BATCH=32 DEVICE=cpu OUT=/tmp/gpu_dry bash scripts/gpu_session.sh
#
# Settings (environment): N (63305), SIZE (224), N_BLOCKS (10000: images of the layer1-4 run),
# BATCH (256), DEVICE (cuda), WORKERS (cores - 1: DataLoader workers), DATA (/tmp/dissect-bench:
# datasets and run directories), BUDGET_S (500: the whole script; later steps shrink or are
# skipped to stay inside it), GEN_S (120: longest the N-image dataset may take to write; N is
# lowered to what the measured rate writes in that time, and the output says so), LOADER_N
# (20000: images of the loader-only pass), SKIP_TESTS=1, SKIP_BLOCKS=1, PYTHON (python3).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/.whl

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # Versions of this project's venv; the GPU machine has Python 3.12, and already holds
    # click, cloudpickle, fsspec, msgpack, packaging, psutil, pyyaml, sortedcontainers, toolz,
    # jinja2, tqdm, matplotlib (KINDS.md).
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" \
        dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 \
        tornado==6.6.1 zict==3.0.0 captum==0.9.0
    ls -la "$WHEELS"
    exit
fi

PY=${PYTHON:-python3}
N=${N:-63305}
SIZE=${SIZE:-224}
N_BLOCKS=${N_BLOCKS:-10000}
BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda}
CORES=$(nproc)
WORKERS=${WORKERS:-$(( CORES > 1 ? CORES - 1 : 1 ))}
DATA=${DATA:-/tmp/dissect-bench}
BUDGET_S=${BUDGET_S:-500}
GEN_S=${GEN_S:-120}
LOADER_N=${LOADER_N:-20000}
OUT=${OUT:-$REPO/reports/gpu_session}
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
START=$SECONDS
exec > >(tee -a "$OUT/session.log") 2>&1

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

# step NAME MAX_SECONDS COMMAND...: run with a timeout of min(MAX_SECONDS, budget left); skipped
# when under 20 s are left. Prints the status and the seconds taken.
step() {
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    (( limit > remaining )) && limit=$remaining
    if (( limit < 20 )); then
        echo "=== $name: SKIPPED (only ${remaining} s of the ${BUDGET_S} s budget left)"
        return 99
    fi
    echo "=== $name (limit ${limit} s, $(date -u +%T))"
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: rc=$rc in $(( SECONDS - begin )) s$( (( rc == 124 )) && echo ' (TIMED OUT)')"
    return $rc
}

echo "=== gpu_session $(date -u +%FT%TZ) at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
echo "N=$N SIZE=$SIZE N_BLOCKS=$N_BLOCKS BATCH=$BATCH DEVICE=$DEVICE WORKERS=$WORKERS CORES=$CORES"
uptime
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
free -g | head -2
df -h "$DATA" | tail -1

# --- Python packages the machine lacks ------------------------------------------------------
export PYTHONPATH=$REPO
if ! "$PY" -c "import dask, distributed" 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$REPO
    else
        echo "dask is missing and $WHEELS holds no wheels: run scripts/gpu_session.sh --prepare"
        echo "here and carry .whl"; exit 1
    fi
fi
"$PY" - <<'EOF' || exit 1
import dask, distributed, h5py, numpy, torch, torchvision
print(f"python ok: torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}), torchvision {torchvision.__version__}, "
      f"numpy {numpy.__version__}, h5py {h5py.__version__}, dask {dask.__version__}, "
      f"distributed {distributed.__version__}")
if torch.cuda.is_available():
    print(f"gpu: {torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

# bench_pipeline with the common settings; add --n-images N --dataset D --out O --label L ...
BENCH=("$PY" scripts/bench_pipeline.py --size "$SIZE" --device "$DEVICE" --batch-size "$BATCH"
       --workers "$WORKERS" --gen-workers "$CORES")

# --- the small dataset first: it gives the writing rate -------------------------------------
gen_begin=$SECONDS
step "dataset $N_BLOCKS images" 120 "${BENCH[@]}" --n-images "$N_BLOCKS" \
    --dataset "$DATA/toy-$N_BLOCKS-$SIZE" --out "$DATA/gen" --generate-only
gen_s=$(( SECONDS - gen_begin ))

# --- CUDA tests -----------------------------------------------------------------------------
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    step "pytest -m cuda" 240 "$PY" -m pytest -m cuda tests/test_cuda.py -q -rs \
        -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
fi

# --- ResNet-18 layer4 at Broden's size (or what the writing rate allows) ---------------------
n_main=$N
if [[ ! -f "$DATA/toy-$N-$SIZE/toy.json" ]] && (( gen_s > 0 )); then
    fits=$(( N_BLOCKS * GEN_S / gen_s ))
    if (( fits < N )); then
        n_main=$fits
        echo "=== the dataset was written at $(( N_BLOCKS / gen_s )) images/s: $N images would" \
             "take about $(( N * gen_s / N_BLOCKS )) s > GEN_S=$GEN_S s; benchmarking" \
             "$n_main images instead (bench.md states the linear scaling to $N)"
    fi
fi
step "dataset $n_main images" $(( GEN_S + 60 )) "${BENCH[@]}" --n-images "$n_main" \
    --dataset "$DATA/toy-$n_main-$SIZE" --out "$DATA/gen" --generate-only
step "bench layer4 ($n_main images)" 360 "${BENCH[@]}" --n-images "$n_main" \
    --dataset "$DATA/toy-$n_main-$SIZE" --out "$DATA/bench-layer4" --label "resnet18 layer4" \
    --layers layer4 --loader-images "$LOADER_N"
cp "$DATA/bench-layer4/bench.md" "$OUT/bench_layer4.md" 2>/dev/null
cp "$DATA/bench-layer4/bench.json" "$OUT/bench_layer4.json" 2>/dev/null
cp "$DATA/bench-layer4/run/run.json" "$OUT/run_layer4.json" 2>/dev/null

# --- the four blocks at N_BLOCKS --------------------------------------------------------------
if [[ "${SKIP_BLOCKS:-0}" != 1 ]]; then
    step "bench layer1-4 ($N_BLOCKS images)" 300 "${BENCH[@]}" --n-images "$N_BLOCKS" \
        --dataset "$DATA/toy-$N_BLOCKS-$SIZE" --out "$DATA/bench-blocks" \
        --label "resnet18 layer1-4" --layers layer1 layer2 layer3 layer4 \
        --loader-images "$LOADER_N"
    cp "$DATA/bench-blocks/bench.md" "$OUT/bench_blocks.md" 2>/dev/null
    cp "$DATA/bench-blocks/bench.json" "$OUT/bench_blocks.json" 2>/dev/null
fi

echo "=== results ($(( SECONDS - START )) s in all)"
cat "$OUT"/bench_*.md 2>/dev/null
tail -3 "$OUT/pytest.log" 2>/dev/null
du -sh "$DATA"/* 2>/dev/null
ls -la "$OUT"
