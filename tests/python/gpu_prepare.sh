#!/usr/bin/env bash
# Builds what tests/python/gpu_session.sh carries to the device machine (the device README: no
# Rust toolchain and no registry there; 64 MiB carried in all). Run on the build machine from the
# repository root: a release build (~21 min clean on 2 cores), then
#   tests/python/gpu_slim.sh on     # the tracked fixtures + .gpu + .whl are over 64 MiB
#   run(carry=[".gpu", ".whl"], command="bash tests/python/gpu_session.sh", timeout_s=600)
#   tests/python/gpu_slim.sh off
# A `.gpu/kernels.tar.xz.*` left by an earlier session with the same binary is kept (carried).
set -euo pipefail
cargo build --release --workspace
mkdir -p .gpu .whl
strip -o .gpu/brushfire target/release/brushfire
xz -T0 -6 -c .gpu/brushfire > .gpu/brushfire.xz
rm .gpu/brushfire
gcc -O2 -shared -fPIC -o .gpu/libnvrtc.so tests/python/nvrtc_shim.c -ldl
python3 -m pip download -q --no-deps -d .whl "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')"
sha256sum target/release/brushfire
du -sh .gpu .whl
