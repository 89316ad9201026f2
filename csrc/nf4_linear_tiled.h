// csrc/nf4_linear_tiled.h: the parts of the NF4 linear that the CPU and CUDA kernels share. Each backend supplies
// only how to dequantize a tile of W; tiling, the GEMMs (at::mm_out: a BLAS library on CPU, cuBLAS on CUDA) and the
// output handling are written once here.
//
//   W [N, K] NF4, x [M, K], y [M, N], grad_out [M, N], grad_x [M, K].
//   dequantize_tile(n0, rows, k0, cols, tile) writes W[n0:n0+rows, k0:k0+cols] into the contiguous `tile`, whose dtype
//   is the activation dtype (float32 for float64 activations; widened exactly before the GEMM).
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

namespace qlora {

inline at::ScalarType nf4_tile_dtype(at::ScalarType activations) {
    return activations == at::kDouble ? at::kFloat : activations;
}

inline std::vector<int64_t> nf4_shape_with_last(at::IntArrayRef sizes, int64_t last) {
    std::vector<int64_t> out = sizes.vec();
    out.back() = last;
    return out;
}

// y = x2 W^T, row tiles of W (about tile_elems weights each) dequantized into one reused buffer.
template <typename DequantizeTile>
void nf4_linear_tiled(
    const at::Tensor& x2, at::Tensor& y, int64_t N, int64_t K, int64_t tile_elems, DequantizeTile&& dq
) {
    const bool widen = x2.scalar_type() == at::kDouble;
    const int64_t rows = std::clamp<int64_t>(tile_elems / K, 16, N);
    at::Tensor tile = at::empty({rows, K}, x2.options().dtype(nf4_tile_dtype(x2.scalar_type())));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t r = std::min(rows, N - n0);
        at::Tensor t = tile.narrow(0, 0, r);
        dq(n0, r, int64_t{0}, K, t);
        at::Tensor yt = y.narrow(1, n0, r);
        at::mm_out(yt, x2, widen ? t.to(at::kDouble).t() : t.t());
    }
}

// grad_x = g2 W, column tiles of W (tiles along the input dimension): each element of grad_x is written once.
template <typename DequantizeTile>
void nf4_grad_input_tiled(
    const at::Tensor& g2, at::Tensor& gx, int64_t N, int64_t K, int64_t tile_elems, DequantizeTile&& dq
) {
    const bool widen = g2.scalar_type() == at::kDouble;
    const int64_t cols = std::clamp<int64_t>(tile_elems / N, 32, K);
    at::Tensor tile = at::empty({N, cols}, g2.options().dtype(nf4_tile_dtype(g2.scalar_type())));
    for (int64_t k0 = 0; k0 < K; k0 += cols) {
        const int64_t c = std::min(cols, K - k0);
        at::Tensor t = c == cols ? tile : at::empty({N, c}, tile.options());
        dq(int64_t{0}, N, k0, c, t);
        at::Tensor gxt = gx.narrow(1, k0, c);
        at::mm_out(gxt, g2, widen ? t.to(at::kDouble) : t);
    }
}

// The fused small-M kernels produce float32 sums: add the bias in float32, then round once to the activation dtype.
inline at::Tensor nf4_finish_fused(at::Tensor y32, const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
    if (bias.has_value()) {
        y32.add_(bias->to(at::kFloat));
    }
    return dtype == at::kFloat ? y32 : y32.to(dtype);
}

} // namespace qlora
