// Argument checks shared by the CPU (vae_tiling.cpp) and CUDA (vae_tiling.cu) versions of the two
// data-movement steps of tiled VAE decoding. The layouts, for n window positions and a batch of B:
//   rows, cols  [n] int64 on the CPU: top-left latent cell of each window
//   gather      h [B, C, H, W] -> tiles [n * B, C, wh, ww], window p of image b at p * B + b
//   blend       tiles [n * B, C, ph, pw] (decoded) into out [B, C, Hs, Ws] and weight_sum [Hs, Ws],
//               with the feathered 1-D weights wy [n, ph] and wx [n, pw] made by the Python side
#pragma once

#include <torch/extension.h>

namespace vae_tiling {

inline void check_starts(const torch::Tensor& rows, const torch::Tensor& cols) {
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && cols.scalar_type() == torch::kInt64, "window starts must be int64");
  TORCH_CHECK(rows.dim() == 1 && rows.sizes() == cols.sizes(), "rows and cols must be 1-D and of one length");
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu(), "window starts must be CPU tensors");
}

inline void check_gather(const torch::Tensor& h, const torch::Tensor& rows, const torch::Tensor& cols, int64_t wh,
                         int64_t ww) {
  check_starts(rows, cols);
  TORCH_CHECK(h.dim() == 4, "h must be [batch, channels, height, width]");
  const auto r = rows.accessor<int64_t, 1>();
  const auto c = cols.accessor<int64_t, 1>();
  for (int64_t p = 0; p < rows.size(0); ++p)
    TORCH_CHECK(r[p] >= 0 && c[p] >= 0 && r[p] + wh <= h.size(2) && c[p] + ww <= h.size(3), "window ", p,
                " leaves the latent");
}

inline void check_blend(const torch::Tensor& out, const torch::Tensor& weight_sum, const torch::Tensor& tiles,
                        const torch::Tensor& rows, const torch::Tensor& cols, const torch::Tensor& wy,
                        const torch::Tensor& wx, int64_t scale) {
  check_starts(rows, cols);
  TORCH_CHECK(out.dim() == 4 && tiles.dim() == 4 && weight_sum.dim() == 2 && wy.dim() == 2 && wx.dim() == 2,
              "bad ranks");
  TORCH_CHECK(out.is_contiguous() && weight_sum.is_contiguous(), "out and weight_sum must be contiguous");
  for (const auto* t : {&weight_sum, &tiles, &wy, &wx}) {
    TORCH_CHECK(t->scalar_type() == out.scalar_type(), "out, weight_sum, tiles and weights must share one dtype");
    TORCH_CHECK(t->device() == out.device(), "out, weight_sum, tiles and weights must be on one device");
  }
  const int64_t n = rows.size(0), B = out.size(0), C = out.size(1), ph = tiles.size(2), pw = tiles.size(3);
  TORCH_CHECK(tiles.size(0) == n * B && tiles.size(1) == C, "tiles must be [windows * batch, channels, h, w]");
  TORCH_CHECK(weight_sum.size(0) == out.size(2) && weight_sum.size(1) == out.size(3), "weight_sum must be [Hs, Ws]");
  TORCH_CHECK(wy.size(0) == n && wy.size(1) == ph && wx.size(0) == n && wx.size(1) == pw,
              "wy and wx must be [windows, tile height] and [windows, tile width]");
  const auto r = rows.accessor<int64_t, 1>();
  const auto c = cols.accessor<int64_t, 1>();
  for (int64_t p = 0; p < n; ++p)
    TORCH_CHECK(r[p] >= 0 && c[p] >= 0 && r[p] * scale + ph <= out.size(2) && c[p] * scale + pw <= out.size(3),
                "window ", p, " leaves the image");
}

}  // namespace vae_tiling
