#!/usr/bin/env bash
# Everything that needs a GPU, for a machine that already has CUDA torch, triton and nvcc (and may have
# no network): builds the CUDA extension, runs the GPU tests, then the GPU benchmarks. Each stage fits
# in a few minutes, so they can run as separate calls on a time-limited machine:
#
#   tools/gpu_checks.sh build        # editable install without dependencies; builds csrc/ for this GPU
#   tools/gpu_checks.sh tests        # kernels, tiling, backends and pipeline tests on CUDA (after build)
#   tools/gpu_checks.sh kernels      # benchmarks/attention.py (and its --sweep) and benchmarks/vae_tiling.py
#   tools/gpu_checks.sh generation   # benchmarks/run.py, bf16, torch/triton/CUDA graphs (needs diffusers for DiT/SiT)
#   tools/gpu_checks.sh profile      # benchmarks/kernel_profile.py: kernel time by category
#   tools/gpu_checks.sh serving      # the engine and xar-serve under Poisson arrivals, xAR-B, random weights
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
    # pytest-xdist, where installed, spreads the Triton compilations over the CPU cores.
    parallel=$($python -c "import xdist" 2>/dev/null && echo "-n 8" || true)
    $python -m pytest -q -rs $parallel tests/kernels tests/test_vae.py tests/test_backends.py \
      tests/test_pipeline.py tests/test_cuda_graphs.py tests/test_parity.py tests/test_parity_cuda.py \
      2>&1 | tee "$results/$gpu-tests.log"
    copy_out "$results/$gpu-tests.log"
    ;;
  kernels)
    # Batches between 2 and 512 rows: the ragged kernel against the PyTorch path and SDPA alone.
    $python benchmarks/attention.py --device cuda --batch-sizes 2,32,128,512 --cache-lengths 0,128 --repeats 10 --name "$gpu-attention"
    $python benchmarks/attention.py --sweep --batch-sizes 2,512 --repeats 10 --name "$gpu-attention-sweep-bf16"
    $python benchmarks/vae_tiling.py --device cuda --batch 16 --name "$gpu-vae-tiling"
    copy_out "$results/$gpu"-attention* "$results/$gpu"-vae-tiling.*
    ;;
  generation)
    # About 7 minutes on an H100. OFFICIAL_REPO=path/to/xAR adds the official code (it needs timm,
    # and its flash_attn import satisfied). DiT and SiT need diffusers.
    $python benchmarks/run.py --device cuda --dtype bf16 --contenders xar-b --batch-sizes 1,64 \
      --backends torch,triton,triton+graphs --max-steps 4 --paired-rounds 3 --name "$gpu-bf16-xar-b" \
      ${OFFICIAL_REPO:+--official-repo "$OFFICIAL_REPO"}
    $python benchmarks/run.py --device cuda --dtype bf16 --contenders xar-l --batch-sizes 256 \
      --backends triton --max-steps 4 --paired-rounds 1 --name "$gpu-bf16-xar-l-b256"
    $python benchmarks/run.py --device cuda --dtype bf16 --contenders xar-b,dit,sit --backends triton+graphs \
      --batch-sizes 64 --max-steps 4 --paired-rounds 3 --name "$gpu-bf16-dit-sit-b64"
    copy_out "$results/$gpu"-bf16-*
    ;;
  profile)
    # GPU kernel time by category for one generation (where the time goes at large batch).
    $python benchmarks/kernel_profile.py --preset xar-l --batch 256 --steps 2 --backend triton --name "$gpu-profile-xar-l-b256-triton"
    $python benchmarks/kernel_profile.py --preset xar-b --batch 64 --steps 2 --backend triton --name "$gpu-profile-xar-b-b64-triton"
    copy_out "$results/$gpu"-profile-*
    ;;
  serving)
    # Meant to fit one call of under 10 minutes after build (not yet run on a GPU): what a call costs
    # against its rows there and the ceiling of continuous batching (queueing.py), the engine against
    # static batching in process (engine.py parts b and c), then over HTTP (serve.py). xAR-B shapes
    # with random weights, 10 steps per cell, bf16.
    fast="--device cuda --dtype bf16 --backend triton"
    $python benchmarks/queueing.py $fast --models xar-b --images 1,8,32,64 --max-rows 128 --name "$gpu-queueing"
    $python benchmarks/engine.py --parts b,c $fast --cuda-graphs --serve-models xar-b --max-rows 128 \
      --requests 300 --mixed-images 64 --name "$gpu-engine"
    $python benchmarks/serve.py --random-weights xar-b --max-rows 128 --requests 300 --threads 4 \
      --server-args "$fast --cuda-graphs" --name "$gpu-serve-xar-b"
    copy_out "$results/$gpu"-queueing.* "$results/$gpu"-engine.* "$results/$gpu"-serve-xar-b.*
    ;;
  *)
    echo "usage: tools/gpu_checks.sh build|tests|kernels|generation|profile|serving" >&2
    exit 2
    ;;
esac
