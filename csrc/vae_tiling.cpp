// Data movement of tiled VAE decoding, on the CPU: gathering haloed latent windows into one batch,
// and blending decoded windows back with feathered weights. The PyTorch fallback in
// src/xar_infer/vae_tiling.py defines the results; these loops perform the same float operations in
// the same order (compiled without FMA contraction), so the outputs are equal bit for bit.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

// Weight of pixel x in a window [start, start + length) of an axis of `size` pixels: a linear ramp
// over `ramp` pixels from each window edge that lies inside the image, 1 elsewhere.
template <typename scalar_t>
scalar_t feather(int64_t x, int64_t start, int64_t length, int64_t size, int64_t ramp) {
  scalar_t w = 1;
  if (ramp > 0) {
    if (start > 0) w = std::min(w, (static_cast<scalar_t>(x) + static_cast<scalar_t>(0.5)) / static_cast<scalar_t>(ramp));
    if (start + length < size)
      w = std::min(w, (static_cast<scalar_t>(length - x) - static_cast<scalar_t>(0.5)) / static_cast<scalar_t>(ramp));
  }
  return w;
}

void check_positions(const torch::Tensor& rows, const torch::Tensor& cols) {
  TORCH_CHECK(rows.dtype() == torch::kInt64 && cols.dtype() == torch::kInt64, "window starts must be int64");
  TORCH_CHECK(rows.dim() == 1 && rows.sizes() == cols.sizes(), "rows and cols must be 1-D and of one length");
  TORCH_CHECK(!rows.is_cuda() && !cols.is_cuda(), "window starts must be CPU tensors");
}

}  // namespace

// h [B, C, H, W] -> [n * B, C, wh, ww]: window p (top-left rows[p], cols[p]) of image b at p * B + b.
torch::Tensor gather_tiles(const torch::Tensor& h, const torch::Tensor& rows, const torch::Tensor& cols,
                           int64_t wh, int64_t ww) {
  check_positions(rows, cols);
  TORCH_CHECK(h.dim() == 4 && !h.is_cuda(), "h must be a 4-D CPU tensor");
  const auto x = h.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), n = rows.size(0);
  const auto r = rows.accessor<int64_t, 1>();
  const auto c = cols.accessor<int64_t, 1>();
  for (int64_t p = 0; p < n; ++p)
    TORCH_CHECK(r[p] >= 0 && c[p] >= 0 && r[p] + wh <= H && c[p] + ww <= W, "window ", p, " leaves the latent");
  auto out = torch::empty({n * B, C, wh, ww}, x.options());
  const int64_t item = x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // One task per (window, image, channel) plane: a row-by-row copy.
  at::parallel_for(0, n * B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t p = plane / (B * C), b = (plane / C) % B, ch = plane % C;
      for (int64_t y = 0; y < wh; ++y) {
        const char* from = src + (((b * C + ch) * H + r[p] + y) * W + c[p]) * item;
        std::copy(from, from + ww * item, dst + ((plane * wh + y) * ww) * item);
      }
    }
  });
  return out;
}

// Adds each decoded window [n * B, C, ph, pw] (window p at latent cell rows[p], cols[p]) times its
// feathered weight into out [B, C, Hs, Ws], and the weight into weight_sum [Hs, Ws]; in place, windows
// in order. Parallel over (image, channel) planes, each of which sums its windows sequentially.
void blend_tiles_(torch::Tensor out, torch::Tensor weight_sum, const torch::Tensor& tiles, const torch::Tensor& rows,
                  const torch::Tensor& cols, int64_t scale, int64_t ramp) {
  check_positions(rows, cols);
  TORCH_CHECK(out.dim() == 4 && tiles.dim() == 4 && weight_sum.dim() == 2, "bad ranks");
  TORCH_CHECK(out.is_contiguous() && weight_sum.is_contiguous(), "out and weight_sum must be contiguous");
  TORCH_CHECK(out.scalar_type() == tiles.scalar_type() && out.scalar_type() == weight_sum.scalar_type(), "one dtype");
  const auto t = tiles.contiguous();
  const int64_t B = out.size(0), C = out.size(1), Hs = out.size(2), Ws = out.size(3);
  const int64_t n = rows.size(0), ph = t.size(2), pw = t.size(3);
  TORCH_CHECK(t.size(0) == n * B && t.size(1) == C, "tiles must be [windows * batch, channels, h, w]");
  const auto r = rows.accessor<int64_t, 1>();
  const auto c = cols.accessor<int64_t, 1>();
  for (int64_t p = 0; p < n; ++p)
    TORCH_CHECK(r[p] * scale + ph <= Hs && c[p] * scale + pw <= Ws, "window ", p, " leaves the image");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "blend_tiles_", [&] {
    // Separable weights of every window, computed once.
    std::vector<scalar_t> wy(n * ph), wx(n * pw);
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t y = 0; y < ph; ++y) wy[p * ph + y] = feather<scalar_t>(y, r[p] * scale, ph, Hs, ramp);
      for (int64_t x = 0; x < pw; ++x) wx[p * pw + x] = feather<scalar_t>(x, c[p] * scale, pw, Ws, ramp);
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* s = weight_sum.data_ptr<scalar_t>();
    const scalar_t* src = t.data_ptr<scalar_t>();
    at::parallel_for(0, B * C + 1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        for (int64_t p = 0; p < n; ++p) {
          const int64_t top = r[p] * scale, left = c[p] * scale;
          for (int64_t y = 0; y < ph; ++y) {
            for (int64_t x = 0; x < pw; ++x) {
              const scalar_t w = wy[p * ph + y] * wx[p * pw + x];
              if (plane == B * C) {  // the extra task: the sum of weights
                s[(top + y) * Ws + left + x] += w;
              } else {
                const int64_t b = plane / C, ch = plane % C;
                const scalar_t v = src[(((p * B + b) * C + ch) * ph + y) * pw + x];
                o[((plane * Hs) + top + y) * Ws + left + x] += v * w;
              }
            }
          }
        }
      }
    });
  });
}

bool has_cuda() { return false; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Gather and blend of tiled VAE decoding (CPU)";
  m.def("gather_tiles", &gather_tiles, "haloed latent windows into one batch");
  m.def("blend_tiles_", &blend_tiles_, "add feathered decoded windows into an image, in place");
  m.def("has_cuda", &has_cuda, "whether CUDA kernels were compiled in");
}
