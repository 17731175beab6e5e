// Tiled VAE decoding's data movement on CUDA: the same gather and blend as vae_tiling.cpp, one kernel
// launch each. The PyTorch fallback in src/xar_infer/vae_tiling.py defines the results. To equal it
// bit for bit, every product and sum is rounded on its own, as PyTorch's separate elementwise kernels
// round them: the _rn intrinsics are never contracted into an FMA, and half types are computed in
// float and rounded back after each operation, as PyTorch does.
#include "vae_tiling.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t total) {
  // Grid-stride loops below cover whatever one launch of this many blocks does not.
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
template <typename half_t>
__device__ __forceinline__ half_t mul_rn(half_t a, half_t b) {
  return static_cast<half_t>(__fmul_rn(static_cast<float>(a), static_cast<float>(b)));
}
template <typename half_t>
__device__ __forceinline__ half_t add_rn(half_t a, half_t b) {
  return static_cast<half_t>(__fadd_rn(static_cast<float>(a), static_cast<float>(b)));
}

// One thread per element of the gathered batch.
template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ h, scalar_t* __restrict__ tiles,
                              const int64_t* __restrict__ rows, const int64_t* __restrict__ cols, int64_t total,
                              int64_t planes_per_window, int64_t H, int64_t W, int64_t wh, int64_t ww) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t x = i % ww, y = (i / ww) % wh, plane = i / (wh * ww);
    const int64_t p = plane / planes_per_window, bc = plane % planes_per_window;
    tiles[i] = h[(bc * H + rows[p] + y) * W + cols[p] + x];
  }
}

// One thread per output pixel of the windows' bounding box, in B * C image planes plus one plane for
// the weight sum. Each thread adds the windows covering its pixel in window order, so overlapping
// windows sum in the fallback's order without atomics.
template <typename scalar_t>
__global__ void blend_kernel(scalar_t* __restrict__ out, scalar_t* __restrict__ weight_sum,
                             const scalar_t* __restrict__ tiles, const int64_t* __restrict__ rows,
                             const int64_t* __restrict__ cols, const scalar_t* __restrict__ wy,
                             const scalar_t* __restrict__ wx, int64_t n, int64_t image_planes, int64_t Hs,
                             int64_t Ws, int64_t ph, int64_t pw, int64_t scale, int64_t top0, int64_t left0,
                             int64_t bh, int64_t bw) {
  const int64_t total = (image_planes + 1) * bh * bw;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t X = left0 + i % bw, Y = top0 + (i / bw) % bh, plane = i / (bh * bw);
    const bool is_weight_sum = plane == image_planes;
    scalar_t* target = is_weight_sum ? weight_sum + Y * Ws + X : out + (plane * Hs + Y) * Ws + X;
    scalar_t acc = *target;
    bool covered = false;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t y = Y - rows[p] * scale, x = X - cols[p] * scale;
      if (y < 0 || y >= ph || x < 0 || x >= pw) continue;
      const scalar_t w = mul_rn(wy[p * ph + y], wx[p * pw + x]);
      const scalar_t term = is_weight_sum ? w : mul_rn(tiles[((p * image_planes + plane) * ph + y) * pw + x], w);
      acc = add_rn(acc, term);
      covered = true;
    }
    if (covered) *target = acc;
  }
}

}  // namespace

torch::Tensor gather_tiles(const torch::Tensor& h, const torch::Tensor& rows, const torch::Tensor& cols,
                           int64_t wh, int64_t ww) {
  TORCH_CHECK(h.is_cuda(), "h must be a CUDA tensor");
  vae_tiling::check_gather(h, rows, cols, wh, ww);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto x = h.contiguous();
  const int64_t B = x.size(0), C = x.size(1), n = rows.size(0);
  auto tiles = torch::empty({n * B, C, wh, ww}, x.options());
  const int64_t total = tiles.numel();
  if (total == 0) return tiles;
  const auto r = rows.to(x.device()), c = cols.to(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tiles_cuda", [&] {
    gather_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), tiles.data_ptr<scalar_t>(), r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), total,
        B * C, x.size(2), x.size(3), wh, ww);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return tiles;
}

void blend_tiles_(torch::Tensor out, torch::Tensor weight_sum, const torch::Tensor& tiles, const torch::Tensor& rows,
                  const torch::Tensor& cols, const torch::Tensor& wy, const torch::Tensor& wx, int64_t scale) {
  TORCH_CHECK(out.is_cuda(), "out must be a CUDA tensor");
  vae_tiling::check_blend(out, weight_sum, tiles, rows, cols, wy, wx, scale);
  const int64_t n = rows.size(0);
  if (n == 0 || out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const auto t = tiles.contiguous(), fy = wy.contiguous(), fx = wx.contiguous();
  const int64_t ph = t.size(2), pw = t.size(3);
  // The bounding box of the windows, in output pixels: the only pixels this call changes.
  const int64_t top0 = rows.min().item<int64_t>() * scale, left0 = cols.min().item<int64_t>() * scale;
  const int64_t bh = rows.max().item<int64_t>() * scale + ph - top0;
  const int64_t bw = cols.max().item<int64_t>() * scale + pw - left0;
  const int64_t image_planes = out.size(0) * out.size(1);
  const auto r = rows.to(out.device()), c = cols.to(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "blend_tiles_cuda", [&] {
    blend_kernel<scalar_t><<<blocks_for((image_planes + 1) * bh * bw), kThreads, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), weight_sum.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), r.data_ptr<int64_t>(),
        c.data_ptr<int64_t>(), fy.data_ptr<scalar_t>(), fx.data_ptr<scalar_t>(), n, image_planes, out.size(2),
        out.size(3), ph, pw, scale, top0, left0, bh, bw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Gather and blend of tiled VAE decoding (CUDA)";
  m.def("gather_tiles", &gather_tiles, "haloed latent windows into one batch");
  m.def("blend_tiles_", &blend_tiles_, "add feathered decoded windows into an image, in place");
}
