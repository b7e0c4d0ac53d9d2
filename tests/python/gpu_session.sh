#!/usr/bin/env bash
# One device-machine session (see the library's device README): CUDA parity of `brushfire generate`
# on the tiny fixture, then `brushfire bench` beside diffusers (tests/python/bench_diffusers.py)
# on SD 1.5's UNet at 512², batch 1 and 16. Results land in $OUT.
#
# Needs, carried from the build machine: .gpu/brushfire.xz (release build, stripped, xz) and
# .whl/ (the diffusers wheel + importlib_metadata). Each part has its own time limit so one slow
# part cannot eat the others' time; every log is written to $OUT as it goes.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/bf
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1

budget() { # name seconds command...
  local name=$1 secs=$2
  shift 2
  echo "=== $name (limit ${secs}s) $(date +%T)"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$secs" "$@"
  echo "=== $name: exit $? after $((SECONDS - start))s"
}

xz -dc .gpu/brushfire.xz > /tmp/bf/brushfire && chmod +x /tmp/bf/brushfire
BF=/tmp/bf/brushfire
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
export CUDA_PATH=/usr/local/cuda
NVRTC_PY=$(python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${NVRTC_PY}:${LD_LIBRARY_PATH:-}
ls /usr/local/cuda/lib64/libnvrtc* 2>/dev/null | head -3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee "$OUT/versions.txt"

# 1. Parity on CUDA: the tiny fixture's PNDM txt2img against diffusers' reference image.
parity() {
  local tag=$1
  shift
  $BF generate --model tests/fixtures/tiny-sd --prompt "a photo of an astronaut riding a horse on mars" \
    --negative-prompt blurry --steps 5 --guidance 7.5 --width 128 --height 64 --batch 2 --scheduler pndm \
    --latents tests/fixtures/refs/txt2img_pndm.safetensors --save-array "/tmp/bf/$tag.safetensors" \
    --backend cuda "$@" || { echo "parity $tag: brushfire failed"; return; }
  python3 - "$tag" <<'EOF'
import sys
import numpy as np
from safetensors.numpy import load_file
tag = sys.argv[1]
ours = load_file(f"/tmp/bf/{tag}.safetensors")["image"]
ref = load_file("tests/fixtures/refs/txt2img_pndm.safetensors")["image"]
d = float(np.abs(ours.astype(np.float64) - ref).max())
print(f"parity {tag}: max |diff| vs diffusers = {d:.3e}  nan={bool(np.isnan(ours).any())}")
EOF
}
run_parity() {
  parity f32-fused-fusion --attention fused --fusion on --dtype f32
  parity f16-fused-fusion --attention fused --fusion on --dtype f16
  parity f32-vanilla-nofusion --attention vanilla --fusion off --dtype f32
  parity f16-vanilla-fusion --attention vanilla --fusion on --dtype f16
  parity f32-sliced-fusion --attention sliced --fusion on --dtype f32
  # The forced flash kernel (f16 fused) through fusion and without, and channels-last.
  parity f16-fused-nofusion --attention fused --fusion off --dtype f16
  parity f16-fused-fusion-cl --attention fused --fusion on --dtype f16 --channels-last on
  parity f32-fused-fusion-cl --attention fused --fusion on --dtype f32 --channels-last on
}
export -f parity run_parity
export BF
budget parity 90 bash -c run_parity | tee "$OUT/parity.txt"

# 2. Batch 1, the seed's 50 steps (51 UNet evaluations), warm run of 2.
budget brushfire-b1 150 $BF bench --backend cuda --dtype f16 --pipelines sd-txt2img --batch 1 --size 512 \
  --columns fusion,fused,baseline,channels-last --steps 50 --runs 2 \
  --markdown "$OUT/brushfire_b1.md" --json "$OUT/brushfire_b1.json"
budget diffusers-b1 140 python3 tests/python/bench_diffusers.py --device cuda --dtype f16 --batch 1 --size 512 \
  --columns fused,fusion,baseline --steps 50 --runs 2 --markdown "$OUT/diffusers_b1.md"

# 3. Batch 16 (CFG batch 32): 10 steps (11 evaluations) per run to fit the lease.
budget brushfire-b16 70 $BF bench --backend cuda --dtype f16 --pipelines sd-txt2img --batch 16 --size 512 \
  --columns fusion,fused,baseline,channels-last --steps 10 --runs 2 \
  --markdown "$OUT/brushfire_b16.md" --json "$OUT/brushfire_b16.json"
budget diffusers-b16 50 python3 tests/python/bench_diffusers.py --device cuda --dtype f16 --batch 16 --size 512 \
  --columns fused,baseline --steps 10 --runs 2 --markdown "$OUT/diffusers_b16.md"
echo "done $(date +%T)"
