// csrc/cuda/nf4_linear_cuda.cu: CUDA kernels of qlora::nf4_linear and qlora::nf4_linear_grad_input (ATen layer).
//
// Small M (<= kGemvMaxM): nf4_linear_gemv_kernel. Otherwise, and for the input gradient: NF4 tiles dequantized by
// nf4_dequantize_tile_kernel into one scratch buffer in the activation dtype, multiplied by cuBLAS through at::mm_out
// into the matching columns of the output (row tiles of W for the forward, column tiles for grad_input).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../nf4_checks.h"
#include "../nf4_linear_tiled.h"
#include "cuda_weight.h"
#include "nf4_linear_kernels.cuh"

namespace qlora::cuda {
namespace {

constexpr int64_t kTileElems = int64_t{1} << 22; // weights per scratch tile (16 MiB as float32)

void launch_tile(const Nf4TileParams& p, at::ScalarType dt, cudaStream_t stream) {
    switch (dt) {
    case at::kBFloat16:
        nf4_dequantize_tile_launch<__nv_bfloat16>(p, stream);
        break;
    case at::kHalf:
        nf4_dequantize_tile_launch<__half>(p, stream);
        break;
    default:
        nf4_dequantize_tile_launch<float>(p, stream);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

} // namespace

at::Tensor nf4_linear_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t out_features, int64_t blocksize,
    const std::optional<at::Tensor>& bias
) {
    const int64_t K =
        nf4_check_linear_args(
            "qlora::nf4_linear", x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias
        )
            .expect_int();
    TORCH_CHECK(x.is_cuda(), "qlora::nf4_linear: input must be a CUDA tensor here, got ", x.device());
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t N = out_features;
    const std::vector<int64_t> out_shape = nf4_shape_with_last(x.sizes(), N);
    const at::Tensor x2 = x.reshape({-1, K}).contiguous();
    const int64_t M = x2.size(0);
    if (M == 0) {
        return at::empty(out_shape, x.options());
    }
    const CudaWeight w(packed, absmax, nested_absmax, nested_code, offset, blocksize);
    at::Tensor y;
    if (M <= kGemvMaxM && x.scalar_type() != at::kDouble) {
        at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
        const Nf4GemvParams p{w.view, x2.const_data_ptr(), M, N, K, y32.data_ptr<float>()};
        switch (x.scalar_type()) {
        case at::kBFloat16:
            nf4_linear_gemv_launch<__nv_bfloat16>(p, stream);
            break;
        case at::kHalf:
            nf4_linear_gemv_launch<__half>(p, stream);
            break;
        default:
            nf4_linear_gemv_launch<float>(p, stream);
            break;
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        y = nf4_finish_fused(y32, bias, x.scalar_type());
    } else {
        y = at::empty({M, N}, x.options());
        nf4_linear_tiled(
            x2, y, N, K, kTileElems,
            [&](int64_t n0, int64_t rows, int64_t k0, int64_t cols, at::Tensor& t) {
                launch_tile({w.view, K, n0, k0, rows, cols, t.data_ptr()}, t.scalar_type(), stream);
            }
        );
        if (bias.has_value()) {
            y.add_(*bias);
        }
    }
    return y.view(out_shape);
}

at::Tensor nf4_linear_grad_input_cuda(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t in_features, int64_t blocksize
) {
    const int64_t N = grad_out.size(-1);
    const int64_t K = in_features;
    nf4_check_linear_grad_input_args(grad_out, packed, absmax, nested_absmax, nested_code, offset, K, blocksize);
    const c10::cuda::CUDAGuard guard(grad_out.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const std::vector<int64_t> out_shape = nf4_shape_with_last(grad_out.sizes(), K);
    const at::Tensor g2 = grad_out.reshape({-1, N}).contiguous();
    at::Tensor gx = at::empty({g2.size(0), K}, grad_out.options());
    if (g2.size(0) > 0) {
        const CudaWeight w(packed, absmax, nested_absmax, nested_code, offset, blocksize);
        nf4_grad_input_tiled(
            g2, gx, N, K, kTileElems,
            [&](int64_t n0, int64_t rows, int64_t k0, int64_t cols, at::Tensor& t) {
                launch_tile({w.view, K, n0, k0, rows, cols, t.data_ptr()}, t.scalar_type(), stream);
            }
        );
    }
    return gx.view(out_shape);
}

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
    m.impl("nf4_linear", &nf4_linear_cuda);
    m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

} // namespace qlora::cuda
