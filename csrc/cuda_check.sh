#!/usr/bin/env bash
# `make cuda-check`: proves every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 without a GPU and without a
# CUDA build of torch in the venv (DESIGN.md §4). It downloads (pip, local mirror) the CUDA torch wheel and the
# cuBLAS/cuSPARSE/cuSOLVER wheels whose headers ATen/cuda includes, unzips only their include/ trees into a
# git-ignored cache, and compiles each .cu with the flags torch's CUDAExtension uses.
# Environment: NVCC (default nvcc), PYTHON (default .venv/bin/python, else python3), CUDA_CHECK_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA_VERSION=2.14.1
CACHE=${CUDA_CHECK_CACHE:-.cache/cuda_check}
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
INCLUDE=$CACHE/include

command -v "$NVCC" >/dev/null || { echo "cuda-check: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; }
if [ ! -f "$INCLUDE/.complete" ]; then
  echo "cuda-check: fetching torch==$TORCH_CUDA_VERSION and CUDA library headers into $CACHE"
  "$PYTHON" -m pip download -q --no-deps -d "$CACHE/wheels" "torch==$TORCH_CUDA_VERSION" \
    nvidia-cublas nvidia-cusparse nvidia-cusolver
  rm -rf "$INCLUDE" && mkdir -p "$INCLUDE"
  unzip -q -o "$CACHE"/wheels/torch-"$TORCH_CUDA_VERSION"-*.whl 'torch/include/*' -d "$INCLUDE"
  for wheel in "$CACHE"/wheels/nvidia_cu*.whl; do
    unzip -q -o "$wheel" 'nvidia/cu13/include/*' -d "$INCLUDE"
  done
  touch "$INCLUDE/.complete"
fi

mkdir -p "$CACHE/obj"
"$NVCC" --version | tail -n 1
for source in csrc/cuda/*.cu; do
  object=$CACHE/obj/$(basename "$source" .cu).o
  log=${object%.o}.ptxas.log
  start=$(date +%s)
  # --resource-usage makes ptxas report every kernel it assembles per target: the evidence that SASS for both
  # architectures was produced (cuobjdump is not part of every nvcc install).
  "$NVCC" -c "$source" -o "$object" --resource-usage \
    -std=c++20 --expt-relaxed-constexpr -O3 -Xcompiler -fPIC,-g0 -DCEP_WITH_CUDA \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Icsrc -isystem "$INCLUDE/torch/include" -isystem "$INCLUDE/torch/include/torch/csrc/api/include" \
    -isystem "$INCLUDE/nvidia/cu13/include" 2>"$log" || { cat "$log" >&2; exit 1; }
  summary=""
  for arch in sm_80 sm_90; do
    kernels=$(grep -c "Compiling entry function .* for '$arch'" "$log" || true)
    [ "$kernels" -gt 0 ] || { echo "cuda-check: $source produced no $arch code" >&2; exit 1; }
    summary="$summary $arch: $kernels kernels"
  done
  echo "cuda-check: $source -> $object ($(( $(date +%s) - start )) s;$summary)"
done
echo "cuda-check: all CUDA sources compile for sm_80 and sm_90"
