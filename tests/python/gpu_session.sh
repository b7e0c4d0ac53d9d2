#!/usr/bin/env bash
# One device-machine session (see the library's device README): `brushfire bench` beside diffusers
# (tests/python/bench_diffusers.py) on SD 1.5's UNet at 512², batch 1 and 16, every settings column,
# plus CUDA parity of `brushfire generate` on the tiny fixture. Results land in $OUT, with
# summary.md comparing the two (tests/python/compare_bench.py).
#
# The first CUDA run on a machine is compile-bound (RESULTS.md, 2026-11-26): CubeCL compiles every
# kernel with NVRTC on one thread per process and autotunes ~20 matmul candidates per shape. So:
#   1. warm-up: one short process per (column, batch) at once, sharing one kernel cache, so the
#      compilation runs on as many cores as there are processes; the parity runs go beside them;
#   2. measured: each bench alone on the GPU, from a copy of the compiled kernels but a fresh
#      autotune cache (tuning measured while eight processes share the GPU would be noise);
#   3. diffusers on the same card, eager and compiled.
# `.gpu/libnvrtc.so` (tests/python/nvrtc_shim.c) wraps NVRTC to add `-pch` and hand CubeCL the
# cubin NVRTC already built; it is checked on the tiny fixture first and dropped if it fails.
# The compiled kernels go back in $OUT (kernels.tar.xz.*): carried as .gpu/kernels.tar.xz.* with
# the same binary, the next session skips most of the warm-up.
#
# Needs, carried from the build machine: .gpu/brushfire.xz (release build with the CUDA backend,
# stripped, xz), .gpu/libnvrtc.so (gcc -O2 -shared -fPIC -o .gpu/libnvrtc.so
# tests/python/nvrtc_shim.c -ldl) and .whl/ (the diffusers wheel). Every part has its own time
# limit so one slow part cannot eat the others' time; every log is written to $OUT as it goes.
#
# Dry run on a machine without a GPU (checks the script, not the numbers):
#   BF_BACKEND=cpu BF_BIN=target/release/brushfire BF_MODEL=tests/fixtures/tiny-sd BF_SIZE=64 \
#     BF_STEPS_B1=3 BF_STEPS_B16=2 BF_B16=2 DIFFUSERS_DEVICE=cpu OUT=/tmp/out tests/python/gpu_session.sh
set -u
OUT=${OUT:-/tmp/out}
BACKEND=${BF_BACKEND:-cuda}
SIZE=${BF_SIZE:-512}
STEPS_B1=${BF_STEPS_B1:-50}
STEPS_B16=${BF_STEPS_B16:-10}
B16=${BF_B16:-16}
DTYPE=${BF_DTYPE:-f16}
DDEVICE=${DIFFUSERS_DEVICE:-cuda}
[ "$BACKEND" = cpu ] && DTYPE=f32
WORK=${BF_WORK:-/tmp/bf}
REPO=$(pwd)
mkdir -p "$OUT" "$WORK"
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1
T0=$SECONDS

budget() { # name seconds command...
  local name=$1 secs=$2
  shift 2
  echo "=== $name (limit ${secs}s) at +$((SECONDS - T0))s"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$secs" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  return $rc
}

if [ -n "${BF_BIN:-}" ]; then
  BF=$BF_BIN
else
  xz -dc .gpu/brushfire.xz > "$WORK/brushfire" && chmod +x "$WORK/brushfire"
  BF=$WORK/brushfire
fi
MODEL_ARGS=()
[ -n "${BF_MODEL:-}" ] && MODEL_ARGS=(--model "$BF_MODEL")
DIFFUSERS_MODEL_ARGS=()
[ -n "${BF_MODEL:-}" ] && DIFFUSERS_MODEL_ARGS=(--model "$BF_MODEL")

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
fi
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
NVRTC_DIR=$(python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
[ -z "$NVRTC_DIR" ] && NVRTC_DIR=$(python3 -c 'import nvidia, os, glob; print(next(iter(glob.glob(os.path.join(list(nvidia.__path__)[0], "cu1*", "lib"))), ""))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${NVRTC_DIR}:${LD_LIBRARY_PATH:-}
REAL_NVRTC=$(ls "$CUDA_PATH"/lib64/libnvrtc.so.1[0-9]* "$NVRTC_DIR"/libnvrtc.so.1[0-9]* 2>/dev/null | grep -v builtins | head -1)
echo "nvrtc: ${REAL_NVRTC:-none found}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH=$WORK/site
fi
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee "$OUT/versions.txt"
sha256sum "$BF" | tee "$OUT/binary.sha256"

# Caches: the warm-up's (kernels + autotune), the measured runs' (its kernels only), the driver's
# PTX → SASS JIT cache (default 256 MiB, too small to keep the UNet's kernels).
WARM=$WORK/cache-warm
MEAS=$WORK/cache-measured
export CUDA_CACHE_PATH=$WORK/nv-jit CUDA_CACHE_MAXSIZE=4294967296
# One line per NVRTC compile ("Compiling kernel"), per disk hit ("Using PTX cache"), per tuned key.
export RUST_LOG=${RUST_LOG:-warn,cubecl_cuda=trace,cubecl_runtime=info}
mkdir -p "$WARM" "$MEAS"
if ls .gpu/kernels.tar.xz.* >/dev/null 2>&1; then
  if cat .gpu/kernels.tar.xz.* | xz -dc | tar -x -C "$WORK" && cmp -s "$WORK/carried/binary.sha256" "$OUT/binary.sha256"; then
    cp -r "$WORK/carried/cache-warm/." "$WARM/" && echo "carried kernel cache: used"
    [ -d "$WORK/carried/nv-jit" ] && cp -r "$WORK/carried/nv-jit" "$CUDA_CACHE_PATH"
  else
    echo "carried kernel cache: not for this binary, ignored"
  fi
fi

# The NVRTC shim, checked on one tiny generation: cubin + -pch, else -pch alone, else none.
tiny_generate() { # tag extra-args...
  local tag=$1
  shift
  XDG_CACHE_HOME=$WARM timeout --signal=INT --kill-after=10 "${PARITY_SECS:-200}" \
    $BF generate --model tests/fixtures/tiny-sd --prompt "a photo of an astronaut riding a horse on mars" \
    --negative-prompt blurry --steps 5 --guidance 7.5 --width 128 --height 64 --batch 2 --scheduler pndm \
    --latents tests/fixtures/refs/txt2img_pndm.safetensors --save-array "$WORK/$tag.safetensors" \
    --backend "$BACKEND" "$@" > "$OUT/generate-$tag.log" 2>&1
}
compare_parity() { # tag
  python3 - "$1" "$WORK" <<'EOF2'
import sys
import numpy as np
from safetensors.numpy import load_file
tag, work = sys.argv[1], sys.argv[2]
ours = load_file(f"{work}/{tag}.safetensors")["image"]
ref = load_file("tests/fixtures/refs/txt2img_pndm.safetensors")["image"]
d = float(np.abs(ours.astype(np.float64) - ref).max())
print(f"parity {tag}: max |diff| vs diffusers = {d:.3e}  nan={bool(np.isnan(ours).any())}")
EOF2
}
SHIM=none
BASE_LD=$LD_LIBRARY_PATH
if [ "$BACKEND" = cuda ] && [ -f .gpu/libnvrtc.so ] && [ -n "$REAL_NVRTC" ]; then
  mkdir -p "$WORK/shim" && cp .gpu/libnvrtc.so "$WORK/shim/libnvrtc.so"
  export NVRTC_SHIM_REAL=$REAL_NVRTC
  for mode in cubin pch; do
    export NVRTC_SHIM_CUBIN=$([ $mode = cubin ] && echo 1 || echo 0)
    export LD_LIBRARY_PATH=$WORK/shim:$BASE_LD
    start=$SECONDS
    if PARITY_SECS=90 tiny_generate "shim-$mode" --attention fused --fusion on --dtype f32 \
      && compare_parity "shim-$mode"; then
      SHIM=$mode
      echo "shim $mode: tiny generation in $((SECONDS - start))s"
      break
    fi
    echo "shim $mode failed after $((SECONDS - start))s:"
    tail -5 "$OUT/generate-shim-$mode.log"
    export LD_LIBRARY_PATH=$BASE_LD
    rm -rf "$WARM" "$CUDA_CACHE_PATH" && mkdir -p "$WARM" # nothing half-made by a failed mode
  done
fi
echo "nvrtc shim: $SHIM" | tee "$OUT/shim.txt"

# 1. Warm-up: every (column, batch) at once, a 2-step loop each (the shapes of the measured run),
#    and the CUDA parity runs of the tiny fixture beside them.
WARM_SECS=${BF_WARM_SECS:-240}
warm_one() { # column batch
  XDG_CACHE_HOME=$WARM timeout --signal=INT --kill-after=10 "$WARM_SECS" \
    $BF bench --backend "$BACKEND" --dtype "$DTYPE" --pipelines sd-txt2img --batch "$2" --size "$SIZE" \
    --columns "$1" --steps 2 --runs 1 "${MODEL_ARGS[@]}" --json "$WORK/warm-$1-$2.json" > "$OUT/warm-$1-$2.log" 2>&1
}
PARITY=(
  "f16-fused-fusion --attention fused --fusion on --dtype f16"
  "f32-vanilla-nofusion --attention vanilla --fusion off --dtype f32"
  "f16-vanilla-fusion --attention vanilla --fusion on --dtype f16"
  "f32-sliced-fusion --attention sliced --fusion on --dtype f32"
  "f16-fused-nofusion --attention fused --fusion off --dtype f16"
  "f16-fused-fusion-cl --attention fused --fusion on --dtype f16 --channels-last on"
  "f32-fused-fusion --attention fused --fusion on --dtype f32"
  "f16-fused-fusion-own --attention fused --fusion on --dtype f16"
)
[ "$BACKEND" = cpu ] && PARITY=("f32-fused --attention fused --dtype f32" "f32-fused-cl --attention fused --dtype f32 --channels-last on")
echo "=== warm-up (limit ${WARM_SECS}s per process) at +$((SECONDS - T0))s"
start=$SECONDS
pids=()
for b in 1 "$B16"; do
  for c in baseline fused fusion channels-last; do
    warm_one "$c" "$b" &
    pids+=($!)
  done
done
for p in "${PARITY[@]}"; do
  # shellcheck disable=SC2086
  # "-own": f16 attention on our flash kernel (shaders/) instead of CubeCL's.
  own=burn && [[ ${p%% *} == *-own ]] && own=brushfire
  (export BRUSHFIRE_FLASH_KERNEL=$own; PARITY_SECS=$WARM_SECS tiny_generate $p && compare_parity "${p%% *}") >> "$OUT/parity.txt" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
echo "=== warm-up: done after $((SECONDS - start))s"
cat "$OUT/parity.txt"
for f in "$OUT"/warm-*.log "$OUT"/generate-*.log; do
  echo "$(basename "$f"): $(grep -c 'Compiling kernel' "$f") compiled, $(grep -c 'Using PTX cache' "$f") from the cache, $(grep -c 'Tuning' "$f") tunings; $(grep -o '[0-9.]* it/s.*' "$f" | tail -1)"
done | tee "$OUT/warm-summary.txt"

# 2. Measured, alone on the GPU: compiled kernels copied, autotune fresh.
find "$WARM" -name '*.lock' -delete
mkdir -p "$MEAS/brushfire/kernels"
[ -d "$WARM/brushfire/kernels/cuda" ] && cp -r "$WARM/brushfire/kernels/cuda" "$MEAS/brushfire/kernels/"
measure() { # tag batch steps secs [columns]
  budget "brushfire-$1" "$4" env XDG_CACHE_HOME="$MEAS" $BF bench --backend "$BACKEND" --dtype "$DTYPE" --pipelines sd-txt2img \
    --batch "$2" --size "$SIZE" --columns "${5:-baseline,fused,fusion,channels-last}" --steps "$3" --runs 2 "${MODEL_ARGS[@]}" \
    --markdown "$OUT/brushfire_$1.md" --json "$OUT/brushfire_$1.json" --csv "$OUT/brushfire_$1.csv" 2> "$OUT/brushfire_$1.log"
  echo "brushfire-$1: $(grep -c 'Compiling kernel' "$OUT/brushfire_$1.log") kernels compiled, $(grep -c 'Tuning' "$OUT/brushfire_$1.log") tunings"
}
diffusers() { # tag batch steps columns secs
  budget "diffusers-$1" "$5" python3 tests/python/bench_diffusers.py --device "$DDEVICE" --dtype "$DTYPE" --batch "$2" \
    --size "$SIZE" --columns "$4" --steps "$3" --runs 2 "${DIFFUSERS_MODEL_ARGS[@]}" \
    --markdown "$OUT/diffusers_$1.md" --json "$OUT/diffusers_$1.json"
}
measure b1 1 "$STEPS_B1" "${BF_B1_SECS:-120}"
diffusers b1 1 "$STEPS_B1" "${D_COLUMNS:-baseline,fused,fusion}" "${D_B1_SECS:-130}"
measure b16 "$B16" "$STEPS_B16" "${BF_B16_SECS:-75}"
diffusers b16 "$B16" "$STEPS_B16" "${D_COLUMNS:-baseline,fused,fusion}" "${D_B16_SECS:-100}"

# Our flash kernel in place of CubeCL's for the f16 fused columns (batch 1): which to keep.
BRUSHFIRE_FLASH_KERNEL=brushfire measure b1-own 1 "$STEPS_B16" "${BF_OWN_SECS:-60}" fused,fusion

python3 tests/python/compare_bench.py --brushfire "$OUT"/brushfire_b1.json "$OUT"/brushfire_b16.json --diffusers "$OUT"/diffusers_b*.json \
  --markdown "$OUT/summary.md"

# 3. The compiled kernels for the next session with this binary (≤ 16 MiB per file).
mkdir -p "$WORK/carried"
cp "$OUT/binary.sha256" "$WORK/carried/"
find "$WARM" "$MEAS" -name '*.lock' -delete
rm -rf "$WORK/carried/cache-warm" && cp -r "$WARM" "$WORK/carried/cache-warm"
[ -d "$CUDA_CACHE_PATH" ] && cp -r "$CUDA_CACHE_PATH" "$WORK/carried/nv-jit"
tar -C "$WORK" -c carried | xz -T0 -3 | split -b 16M - "$OUT/kernels.tar.xz."
ls -la "$OUT"
echo "done at +$((SECONDS - T0))s"
