#!/usr/bin/env bash
# Builds what tests/python/gpu_session.sh carries to the device machine (the device README: no
# Rust toolchain and no registry there; 64 MiB carried in all). Run on the build machine from the
# repository root: a release build (~21 min clean on 2 cores), then
#   tests/python/gpu_slim.sh on     # the tracked fixtures + .gpu + .whl are over 64 MiB
#   run(carry=[".gpu", ".whl", ".gl"], command="bash tests/python/gpu_session.sh", timeout_s=600)
#   tests/python/gpu_slim.sh off
# A `.gpu/kernels.tar.xz.*` left by an earlier session with the same binary is kept (carried).
set -euo pipefail
cargo build --release --workspace
mkdir -p .gpu .whl
strip -o .gpu/brushfire target/release/brushfire
xz -T0 -6 -c .gpu/brushfire > .gpu/brushfire.xz
rm .gpu/brushfire
gcc -O2 -shared -fPIC -o .gpu/libnvrtc.so tests/python/nvrtc_shim.c -ldl
# The Vulkan loader for the wgpu cells (the device README: the image has none).
mkdir -p .gl /tmp/amd64/partial
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
(apt-get $o update -qq && cd .gl && apt-get $o download -qq libvulkan1) || echo "no Vulkan loader: the wgpu cells will be skipped"
python3 -m pip download -q --no-deps -d .whl "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')"
sha256sum target/release/brushfire
du -sh .gpu .whl .gl
