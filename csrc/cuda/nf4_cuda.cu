// csrc/cuda/nf4_cuda.cu: CUDA kernels of qlora::nf4_quantize and qlora::nf4_dequantize (ATen layer).
//
// Validates arguments (nf4_checks.h, the same messages as the CPU), allocates outputs, and launches the kernels of
// nf4_kernels.cuh on the current stream. Double quantization mirrors the CPU op: offset = at::mean(absmax) (the
// reduction bitsandbytes uses on the device), then dynamic8_quantize_kernel on absmax - offset.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sub.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/dynamic8_cpu.h"
#include "../nf4_checks.h"
#include "cuda_weight.h"
#include "nf4_kernels.cuh"

namespace qlora::cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_quantize_cuda(
    const at::Tensor& weight, int64_t blocksize, bool double_quant, const std::optional<at::Tensor>& nested_code
) {
    nf4_check_quantize_args(weight, blocksize);
    nf4_check_nested_code_arg(nested_code, weight);
    check_cuda(weight, "qlora::nf4_quantize", "weight");
    const c10::cuda::CUDAGuard guard(weight.device());
    const at::Tensor w = weight.contiguous();
    const int64_t n = w.numel();
    const int64_t nblocks = core::nf4_num_blocks(n, blocksize);
    at::Tensor packed = at::empty({core::nf4_packed_bytes(n), 1}, w.options().dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, w.options().dtype(at::kFloat));
    const Nf4QuantizeParams p{w.const_data_ptr(), n, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>()};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (w.scalar_type()) {
    case at::kFloat:
        nf4_quantize_launch<float>(p, stream);
        break;
    case at::kBFloat16:
        nf4_quantize_launch<__nv_bfloat16>(p, stream);
        break;
    default:
        nf4_quantize_launch<__half>(p, stream);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // One device-to-host sync to report NaN/Inf blocks, as the CPU op does.
    const at::Tensor bad = at::logical_not(at::isfinite(absmax));
    const at::Tensor bad_blocks = at::nonzero(bad);
    if (bad_blocks.size(0) > 0) {
        nf4_fail_nonfinite_block(bad_blocks[0][0].item<int64_t>(), blocksize, n);
    }

    const at::TensorOptions f32 = w.options().dtype(at::kFloat);
    if (!double_quant) {
        return {packed, absmax, at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32)};
    }
    at::Tensor offset = at::mean(absmax);
    const at::Tensor centred = at::sub(absmax, offset);
    if (nested_code.has_value()) {
        cpu::dynamic8_check_code_sorted(*nested_code, "qlora::nf4_quantize");
    }
    const at::Tensor code = (nested_code.has_value() ? *nested_code : cpu::dynamic8_code_tensor(/*is_signed=*/true))
                                .to(w.device(), /*non_blocking=*/false, /*copy=*/true) // outputs never alias inputs
                                .contiguous();
    at::Tensor codes = at::empty({nblocks}, w.options().dtype(at::kByte));
    at::Tensor nested_absmax = at::empty({ceil_div(nblocks, kDynamic8Threads)}, f32);
    const Dynamic8QuantizeParams dp{
        centred.const_data_ptr<float>(), nblocks, code.const_data_ptr<float>(), codes.data_ptr<uint8_t>(),
        nested_absmax.data_ptr<float>()};
    dynamic8_quantize_launch(dp, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {packed, codes, nested_absmax, code, offset};
}

namespace {

// Dequantizes into `out` (already checked: contiguous, numel n, dtype, same device as packed).
void dequantize_into(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, int64_t n, int64_t blocksize,
    at::Tensor& out
) {
    check_cuda(packed, "qlora::nf4_dequantize", "packed");
    const c10::cuda::CUDAGuard guard(packed.device());
    const CudaWeight w(packed, absmax, nested_absmax, nested_code, offset, blocksize);
    const Nf4DequantizeParams p{w.view, n, out.data_ptr()};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (out.scalar_type()) {
    case at::kFloat:
        nf4_dequantize_launch<float>(p, stream);
        break;
    case at::kBFloat16:
        nf4_dequantize_launch<__nv_bfloat16>(p, stream);
        break;
    default:
        nf4_dequantize_launch<__half>(p, stream);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

} // namespace

at::Tensor nf4_dequantize_cuda(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape,
    at::ScalarType dtype, int64_t blocksize
) {
    const std::vector<int64_t> sizes = C10_AS_INTARRAYREF_SLOW(shape).vec();
    const int64_t n = nf4_shape_numel(sizes);
    nf4_check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, n, dtype, blocksize);
    at::Tensor out = at::empty(sizes, packed.options().dtype(dtype));
    dequantize_into(packed, absmax, nested_absmax, nested_code, offset, n, blocksize, out);
    return out;
}

void nf4_dequantize_into_cuda(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape,
    at::ScalarType dtype, int64_t blocksize, at::Tensor& out
) {
    const std::vector<int64_t> sizes = C10_AS_INTARRAYREF_SLOW(shape).vec();
    const int64_t n = nf4_shape_numel(sizes);
    nf4_check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, n, dtype, blocksize);
    nf4_check_dequantize_out(out, shape, dtype, packed);
    dequantize_into(packed, absmax, nested_absmax, nested_code, offset, n, blocksize, out);
}

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
    m.impl("nf4_quantize", &nf4_quantize_cuda);
    m.impl("nf4_dequantize", &nf4_dequantize_cuda);
    m.impl("nf4_dequantize_into", &nf4_dequantize_into_cuda);
}

} // namespace qlora::cuda
