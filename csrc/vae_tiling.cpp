// Tiled VAE decoding's data movement on the CPU: gathering haloed latent windows into one batch, and
// blending decoded windows back with feathered weights. The PyTorch fallback in
// src/xar_infer/vae_tiling.py defines the results; these loops perform the same float operations in
// the same order (compiled without FMA contraction), so the outputs are equal bit for bit.
#include "vae_tiling.h"

#include <algorithm>

torch::Tensor gather_tiles(const torch::Tensor& h, const torch::Tensor& rows, const torch::Tensor& cols,
                           int64_t wh, int64_t ww) {
  TORCH_CHECK(h.device().is_cpu(), "h must be a CPU tensor");
  vae_tiling::check_gather(h, rows, cols, wh, ww);
  const auto x = h.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), n = rows.size(0);
  const auto r = rows.accessor<int64_t, 1>();
  const auto c = cols.accessor<int64_t, 1>();
  auto out = torch::empty({n * B, C, wh, ww}, x.options());
  const int64_t item = x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // One task per (window, image, channel) plane: a row-by-row copy.
  at::parallel_for(0, n * B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t p = plane / (B * C), bc = plane % (B * C);
      for (int64_t y = 0; y < wh; ++y) {
        const char* from = src + ((bc * H + r[p] + y) * W + c[p]) * item;
        std::copy(from, from + ww * item, dst + ((plane * wh + y) * ww) * item);
      }
    }
  });
  return out;
}

// out[b, ch, top + y, left + x] += tiles[p * B + b, ch, y, x] * (wy[p, y] * wx[p, x]) and
// weight_sum[top + y, left + x] += wy[p, y] * wx[p, x], windows in order, in place. Parallel over
// (image, channel) planes plus one task for the weight sum; each sums its windows sequentially.
void blend_tiles_(torch::Tensor out, torch::Tensor weight_sum, const torch::Tensor& tiles, const torch::Tensor& rows,
                  const torch::Tensor& cols, const torch::Tensor& wy, const torch::Tensor& wx, int64_t scale) {
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor");
  vae_tiling::check_blend(out, weight_sum, tiles, rows, cols, wy, wx, scale);
  const auto t = tiles.contiguous(), fy = wy.contiguous(), fx = wx.contiguous();
  const int64_t B = out.size(0), C = out.size(1), Hs = out.size(2), Ws = out.size(3);
  const int64_t n = rows.size(0), ph = t.size(2), pw = t.size(3);
  const auto r = rows.accessor<int64_t, 1>();
  const auto c = cols.accessor<int64_t, 1>();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "blend_tiles_", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* s = weight_sum.data_ptr<scalar_t>();
    const scalar_t* src = t.data_ptr<scalar_t>();
    const scalar_t* wy_ = fy.data_ptr<scalar_t>();
    const scalar_t* wx_ = fx.data_ptr<scalar_t>();
    at::parallel_for(0, B * C + 1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        for (int64_t p = 0; p < n; ++p) {
          const int64_t top = r[p] * scale, left = c[p] * scale;
          for (int64_t y = 0; y < ph; ++y) {
            for (int64_t x = 0; x < pw; ++x) {
              const scalar_t w = wy_[p * ph + y] * wx_[p * pw + x];
              if (plane == B * C) {  // the extra task: the sum of weights
                s[(top + y) * Ws + left + x] += w;
              } else {
                const scalar_t v = src[((p * B * C + plane) * ph + y) * pw + x];
                o[((plane * Hs) + top + y) * Ws + left + x] += v * w;
              }
            }
          }
        }
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Gather and blend of tiled VAE decoding (CPU)";
  m.def("gather_tiles", &gather_tiles, "haloed latent windows into one batch");
  m.def("blend_tiles_", &blend_tiles_, "add feathered decoded windows into an image, in place");
}
