#!/usr/bin/env bash
# One device-machine session (see the library's device README): `brushfire bench` beside diffusers
# (tests/python/bench_diffusers.py) on SD 1.5's UNet at 512², batch 1 and 16, every settings column,
# plus CUDA parity of `brushfire generate` on the tiny fixture against diffusers' reference.
#
# The lease is 15 minutes of device time and one command runs at most 10, so this script keeps a
# deadline (BF_DEADLINE seconds after it starts) and gives every part a share of what is left:
# whatever it has measured by then comes back. $OUT takes at most 8 files, so everything is packed:
#   session.log       this script's output
#   summary.md        the two benches side by side (tests/python/compare_bench.py)
#   results.tar.xz    every log, JSON, CSV and markdown table
#   kernels.tar.xz.*  the compiled kernels, for the next session with the same binary (≤ 16 MiB each)
#
# The first CUDA run on a machine is compile-bound (RESULTS.md, 2026-11-26): CubeCL compiles every
# kernel with NVRTC on one thread per process and autotunes ~20 matmul candidates per shape. So:
#   1. warm-up: one short process per (column, batch) at once, sharing one kernel cache (CubeCL's
#      compilation cache re-reads entries other processes wrote), so the compilation runs on as
#      many cores as there are processes; the parity runs go beside them, and the NVRTC shim
#      (tests/python/nvrtc_shim.c: `-pch`, the cubin handed over instead of PTX) is timed there
#      on the same generation against plain NVRTC, each in a cache of its own;
#   2. measured: each (batch, column) alone on the GPU, in its own process, from a copy of the
#      compiled kernels but a fresh autotune cache (tuning measured while sixteen processes share
#      the GPU would be noise), the most telling cells first;
#   3. diffusers on the same card: eager vanilla and SDPA, then torch.compile if time is left.
#
# Needs, carried from the build machine (tests/python/gpu_prepare.sh): .gpu/brushfire.xz (release
# build with the CUDA backend, stripped, xz), .gpu/libnvrtc.so, .whl/ (the diffusers wheel) and
# .gl/ (the Vulkan loader, for the wgpu cells).
#
# Dry run on a machine without a GPU (checks the script, not the numbers):
#   BF_BACKEND=cpu BF_BIN=target/release/brushfire BF_MODEL=tests/fixtures/tiny-sd BF_SIZE=64 \
#     BF_STEPS_B1=3 BF_STEPS_B16=2 BF_B16=2 DIFFUSERS_DEVICE=cpu OUT=/tmp/out tests/python/gpu_session.sh
# (BF_WGPU=yes adds the wgpu cells, on whatever Vulkan adapter the machine has.)
set -u
OUT=${OUT:-/tmp/out}
BACKEND=${BF_BACKEND:-cuda}
SIZE=${BF_SIZE:-512}
STEPS_B1=${BF_STEPS_B1:-50}
STEPS_B16=${BF_STEPS_B16:-10}
B16=${BF_B16:-16}
DTYPE=${BF_DTYPE:-f16}
DDEVICE=${DIFFUSERS_DEVICE:-cuda}
DEADLINE=${BF_DEADLINE:-550}
[ "$BACKEND" = cpu ] && DTYPE=f32
WORK=${BF_WORK:-/tmp/bf}
RES=$WORK/results
mkdir -p "$OUT" "$WORK" "$RES"
exec > >(tee -a "$OUT/session.log") 2>&1
T0=$SECONDS

elapsed() { echo $((SECONDS - T0)); }
# share planned reserve: the seconds a part may take, at most `planned`, keeping `reserve` for
# what comes after it before the deadline (0 when nothing is left).
share() {
  local left=$((DEADLINE - $(elapsed) - $2))
  [ "$left" -lt 0 ] && left=0
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
budget() { # name seconds command...
  local name=$1 secs=$2
  shift 2
  if [ "$secs" -lt 5 ]; then
    echo "=== $name: skipped, no time left (+$(elapsed)s)"
    return 124
  fi
  echo "=== $name (limit ${secs}s) at +$(elapsed)s"
  local start=$SECONDS
  timeout --signal=INT --kill-after=5 "$secs" "$@"
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

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RES/gpu.txt"
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
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee "$RES/versions.txt"
# Vulkan for the wgpu backend: the image has the NVIDIA driver's ICD but no loader (the device
# README); .gl/ carries Debian's libvulkan1.
WGPU=${BF_WGPU:-no}
if [ "$BACKEND" = cuda ] && ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$ICD" ] && export VK_DRIVER_FILES=$ICD
  WGPU=yes
fi
echo "wgpu/Vulkan: $WGPU"
sha256sum "$BF" | tee "$RES/binary.sha256"
nproc

# Caches: the warm-up's (kernels + autotune), the measured runs' (its kernels only), the driver's
# PTX → SASS JIT cache (default 256 MiB, too small to keep the UNet's kernels).
WARM=$WORK/cache-warm
MEAS=$WORK/cache-measured
export CUDA_CACHE_PATH=$WORK/nv-jit CUDA_CACHE_MAXSIZE=4294967296
# One line per NVRTC compile ("Compiling kernel"), per disk hit ("Using PTX cache"), per tuned key.
export RUST_LOG=${RUST_LOG:-warn,cubecl_cuda=trace,cubecl_runtime=info}
mkdir -p "$WARM" "$MEAS"
if ls .gpu/kernels.tar.xz.* >/dev/null 2>&1; then
  if cat .gpu/kernels.tar.xz.* | xz -dc | tar -x -C "$WORK" && cmp -s "$WORK/carried/binary.sha256" "$RES/binary.sha256"; then
    cp -r "$WORK/carried/cache-warm/." "$WARM/" && echo "carried kernel cache: used"
    [ -d "$WORK/carried/nv-jit" ] && cp -r "$WORK/carried/nv-jit" "$CUDA_CACHE_PATH"
  else
    echo "carried kernel cache: not for this binary, ignored"
  fi
fi

# The tiny fixture's txt2img against diffusers' reference (tests/fixtures/refs/txt2img_pndm).
tiny_generate() { # secs cache tag extra-args...
  local secs=$1 cache=$2 tag=$3
  shift 3
  XDG_CACHE_HOME=$cache timeout --signal=INT --kill-after=5 "$secs" $BF generate --model tests/fixtures/tiny-sd --prompt "a photo of an astronaut riding a horse on mars" \
    --negative-prompt blurry --steps 5 --guidance 7.5 --width 128 --height 64 --batch 2 --scheduler pndm \
    --latents tests/fixtures/refs/txt2img_pndm.safetensors --save-array "$WORK/$tag.safetensors" \
    --backend "$BACKEND" "$@" > "$RES/generate-$tag.log" 2>&1
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
parity_run() { # cache shim(none|pch|cubin) flash(burn|brushfire) secs tag extra-args...
  local cache=$1 shim=$2 flash=$3 secs=$4 tag=$5
  shift 5
  local start=$SECONDS
  (
    export BRUSHFIRE_FLASH_KERNEL=$flash
    if [ "$shim" != none ]; then
      export NVRTC_SHIM_REAL=$REAL_NVRTC NVRTC_SHIM_CUBIN=$([ "$shim" = cubin ] && echo 1 || echo 0)
      export LD_LIBRARY_PATH=$WORK/shim:$LD_LIBRARY_PATH
    fi
    tiny_generate "$secs" "$cache" "$tag" "$@"
  )
  local rc=$?
  echo "generate $tag (nvrtc shim: $shim, flash: $flash): exit $rc after $((SECONDS - start))s"
  [ $rc -eq 0 ] && compare_parity "$tag"
}

# 1. Warm-up: every (column, batch) at once, a 2-step loop each (the shapes of the measured run);
#    the parity runs and the shim's timing beside them.
WARM_SECS=$(share "${BF_WARM_SECS:-230}" 300)
warm_one() { # column batch
  local tag=warm-$1-$2
  [ "$BACKEND" = wgpu ] && tag=wgpu-$tag
  XDG_CACHE_HOME=$WARM timeout --signal=INT --kill-after=5 "$WARM_SECS" \
    $BF bench --backend "$BACKEND" --dtype "$DTYPE" --pipelines sd-txt2img --batch "$2" --size "$SIZE" \
    --columns "$1" --steps 2 --runs 1 "${MODEL_ARGS[@]}" --json "$RES/$tag.json" > "$RES/$tag.log" 2>&1
}
echo "=== warm-up (limit ${WARM_SECS}s per process) at +$(elapsed)s"
start=$SECONDS
pids=()
for b in 1 "$B16"; do
  for c in fusion baseline fused channels-last; do
    warm_one "$c" "$b" &
    pids+=($!)
  done
done
# wgpu on the same card through Vulkan: its shaders compile in milliseconds, so it is the second
# chance if CUDA's first compilation does not finish.
if [ "$WGPU" = yes ]; then
  BACKEND=wgpu warm_one fusion 1 &
  pids+=($!)
fi
if [ "$BACKEND" = cpu ]; then
  PARITY=("f32-fused --attention fused --dtype f32" "f32-fused-cl --attention fused --dtype f32 --channels-last on")
else
  PARITY=(
    "f16-fused-fusion --attention fused --fusion on --dtype f16"
    "f32-vanilla-nofusion --attention vanilla --fusion off --dtype f32"
    "f16-fused-fusion-cl --attention fused --fusion on --dtype f16 --channels-last on"
    "f32-fused-fusion --attention fused --fusion on --dtype f32"
  )
fi
for p in "${PARITY[@]}"; do
  # shellcheck disable=SC2086
  parity_run "$WARM" none burn "$WARM_SECS" $p >> "$RES/parity.txt" 2>&1 &
  pids+=($!)
done
if [ "$BACKEND" = cuda ]; then
  # f16 attention on our flash kernel (shaders/) instead of CubeCL's.
  parity_run "$WARM" none brushfire "$WARM_SECS" f16-fused-fusion-own --attention fused --fusion on --dtype f16 >> "$RES/parity.txt" 2>&1 &
  pids+=($!)
  # The shim against plain NVRTC: the same generation from an empty cache each.
  if [ -f .gpu/libnvrtc.so ] && [ -n "$REAL_NVRTC" ]; then
    mkdir -p "$WORK/shim" && cp .gpu/libnvrtc.so "$WORK/shim/libnvrtc.so"
    for shim in none pch cubin; do
      parity_run "$WORK/cache-shim-$shim" "$shim" burn "$WARM_SECS" "shim-$shim" --attention fused --fusion on --dtype f32 >> "$RES/parity.txt" 2>&1 &
      pids+=($!)
    done
  fi
fi
wait "${pids[@]}"
echo "=== warm-up: done after $((SECONDS - start))s"
cat "$RES/parity.txt"
summarise() { # log...
  for f in "$@"; do
    [ -f "$f" ] || continue
    echo "$(basename "$f"): $(grep -c 'Compiling kernel' "$f") compiled, $(grep -c 'Using PTX cache' "$f") from the cache, $(grep -c 'Tuning' "$f") tunings; $(tr '\r' '\n' < "$f" | grep -o '[0-9.]* it/s.*' | tail -1)"
  done
}
summarise "$RES"/warm-*.log "$RES"/wgpu-warm-*.log "$RES"/generate-*.log | tee "$RES/warm-summary.txt"

# 2. Measured, alone on the GPU: compiled kernels copied, autotune fresh. One process per cell, so
#    a cell cut off by its limit loses itself only.
find "$WARM" -name '*.lock' -delete
mkdir -p "$MEAS/brushfire/kernels"
[ -d "$WARM/brushfire/kernels/cuda" ] && cp -r "$WARM/brushfire/kernels/cuda" "$MEAS/brushfire/kernels/"
measure() { # tag batch steps column [backend]
  local tag=$1 backend=${5:-$BACKEND}
  shift
  budget "brushfire-$tag" "$(share "${BF_CELL_SECS:-60}" "${RESERVE:-110}")" \
    env XDG_CACHE_HOME="$MEAS" $BF bench --backend "$backend" --dtype "$DTYPE" --pipelines sd-txt2img \
    --batch "$1" --size "$SIZE" --columns "$3" --steps "$2" --runs 2 "${MODEL_ARGS[@]}" \
    --markdown "$RES/brushfire_$tag.md" --json "$RES/brushfire_$tag.json" > /dev/null 2> "$RES/brushfire_$tag.log"
  summarise "$RES/brushfire_$tag.log"
}
RESERVE=110
measure b1-fusion 1 "$STEPS_B1" fusion
measure b1-baseline 1 "$STEPS_B1" baseline
measure b16-fusion "$B16" "$STEPS_B16" fusion
measure b16-baseline "$B16" "$STEPS_B16" baseline
measure b1-fused 1 "$STEPS_B1" fused
measure b16-fused "$B16" "$STEPS_B16" fused
measure b1-channels-last 1 "$STEPS_B1" channels-last
measure b16-channels-last "$B16" "$STEPS_B16" channels-last
# Our flash kernel in place of CubeCL's for the f16 fused+fusion column (batch 1): not in the
# summary's JSON glob (own-*), compared by hand.
[ "$BACKEND" = cuda ] && (export BRUSHFIRE_FLASH_KERNEL=brushfire; measure own-b1-fusion 1 "$STEPS_B1" fusion)
# wgpu through Vulkan on the same card (also not in the summary's glob: wgpu-*).
if [ "$WGPU" = yes ]; then
  measure wgpu-b1-fusion 1 "$STEPS_B1" fusion wgpu
  measure wgpu-b1-baseline 1 "$STEPS_B1" baseline wgpu
  measure wgpu-b16-fusion "$B16" "$STEPS_B16" fusion wgpu
fi

# 3. diffusers on the same card: eager first (a minute), torch.compile only if time is left.
diffusers() { # tag batch steps columns planned
  budget "diffusers-$1" "$(share "$5" 25)" python3 tests/python/bench_diffusers.py --device "$DDEVICE" --dtype "$DTYPE" \
    --batch "$2" --size "$SIZE" --columns "$4" --steps "$3" --runs 2 "${MODEL_ARGS[@]}" \
    --markdown "$RES/diffusers_$1.md" --json "$RES/diffusers_$1.json" > "$RES/diffusers_$1.log" 2>&1
  tail -8 "$RES/diffusers_$1.log"
}
diffusers b1 1 "$STEPS_B1" baseline,fused 45
diffusers b16 "$B16" "$STEPS_B16" baseline,fused 40
diffusers b1-compiled 1 "$STEPS_B1" fusion 120

shopt -s nullglob
python3 tests/python/compare_bench.py --brushfire "$RES"/brushfire_b*.json --diffusers "$RES"/diffusers_b*.json \
  --markdown "$OUT/summary.md" && cat "$OUT/summary.md"

# 4. Pack: the results, and the compiled kernels for the next session with this binary.
find "$WARM" "$MEAS" -name '*.lock' -delete
mkdir -p "$WORK/carried"
cp "$RES/binary.sha256" "$WORK/carried/"
rm -rf "$WORK/carried/cache-warm" && cp -r "$WARM" "$WORK/carried/cache-warm"
[ -d "$CUDA_CACHE_PATH" ] && cp -r "$CUDA_CACHE_PATH" "$WORK/carried/nv-jit"
tar -C "$WORK" -c results | xz -T0 -6 > "$OUT/results.tar.xz"
tar -C "$WORK" -c carried | xz -T0 -3 | split -b 15M - "$OUT/kernels.tar.xz."
ls -la "$OUT"
echo "done at +$(elapsed)s"
