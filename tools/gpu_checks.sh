#!/usr/bin/env bash
# Everything that needs a GPU, for a machine that already has CUDA torch, triton and nvcc (and may have
# no network): builds the CUDA extension, runs the GPU tests, then the GPU benchmarks. Each stage fits
# in a few minutes, so they can run as separate calls on a time-limited machine:
#
#   tools/gpu_checks.sh build        # editable install without dependencies; builds csrc/ for this GPU
#   tools/gpu_checks.sh tests        # kernels, tiling, backends and pipeline tests on CUDA (after build)
#   tools/gpu_checks.sh kernels      # benchmarks/attention.py and benchmarks/vae_tiling.py
#   tools/gpu_checks.sh generation   # benchmarks/run.py, bf16, torch/triton/CUDA graphs (needs diffusers for DiT/SiT)
#
# Results go to benchmarks/results/ under names that start with the GPU's name, and to $OUT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
gpu=$($python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")  # e.g. h100
results=benchmarks/results

copy_out() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/; fi; }

case "${1:-}" in
  build)
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      $python -m pip install -q --no-build-isolation --no-deps --no-index -e .
    $python -c "import xar_infer; b = xar_infer.vae_tiling_backend('cuda'); print('vae tiling on cuda:', b); assert b == 'cuda'"
    ;;
  tests)
    $python -m pytest -q -rs tests/test_kernels.py tests/test_vae.py tests/test_backends.py tests/test_pipeline.py \
      tests/test_cuda_graphs.py \
      2>&1 | tee "$results/$gpu-tests.log"
    copy_out "$results/$gpu-tests.log"
    ;;
  kernels)
    $python benchmarks/attention.py --device cuda --name "$gpu-attention"
    $python benchmarks/vae_tiling.py --device cuda --batch 16 --name "$gpu-vae-tiling"
    copy_out "$results/$gpu"-attention.* "$results/$gpu"-vae-tiling.*
    ;;
  generation)
    # OFFICIAL_REPO=path/to/xAR adds the official code (it needs its own dependencies, e.g. timm).
    $python benchmarks/run.py --device cuda --dtype bf16 --batch-sizes 1,8,64,256 \
      --backends torch,triton,triton+graphs --max-steps 50 --paired-rounds 3 --name "$gpu-bf16" \
      ${OFFICIAL_REPO:+--official-repo "$OFFICIAL_REPO"}
    copy_out "$results/$gpu"-bf16.*
    ;;
  *)
    echo "usage: tools/gpu_checks.sh build|tests|kernels|generation" >&2
    exit 2
    ;;
esac
