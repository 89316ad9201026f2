// csrc/cpu/nf4_cpu.cpp: CPU kernels of qlora::nf4_quantize and qlora::nf4_dequantize.
//
// Work is split over quantization blocks with at::parallel_for; each range runs the block kernel of the ISA chosen
// at run time (cpu_isa.h, nf4_simd.h). Double quantization follows bitsandbytes (spec §2.1): offset = mean of the
// float32 absmax computed by at::mean (the same reduction bitsandbytes calls, so the offset bits agree on the same
// machine), then the centred absmax is quantized in blocks of 256 with the signed dynamic 8-bit map.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/sub.h>
#include <torch/library.h>

#include "../nf4_checks.h"
#include "cpu_isa.h"
#include "dynamic8_cpu.h"
#include "nf4_simd.h"
#include "nf4_weight_cpu.h"

namespace qlora::cpu {
namespace {

// Blocks per parallel task: about 32 Ki elements, enough to amortise scheduling.
int64_t grain_in_blocks(int64_t blocksize) {
    return std::max<int64_t>(1, (int64_t{1} << 15) / blocksize);
}

template <typename T> void quantize_dispatch(const T* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax) {
    const int64_t nblocks = core::nf4_num_blocks(n, bs);
    const CpuIsa isa = cpu_isa();
    at::parallel_for(0, nblocks, grain_in_blocks(bs), [&](int64_t b0, int64_t b1) {
        nf4_quantize_blocks(isa, x, n, bs, b0, b1, packed, absmax);
    });
}

template <typename T>
void dequantize_dispatch(const uint8_t* packed, const Nf4BlockAbsmax& am, int64_t n, int64_t bs, T* out) {
    const int64_t nblocks = core::nf4_num_blocks(n, bs);
    const CpuIsa isa = cpu_isa();
    at::parallel_for(0, nblocks, grain_in_blocks(bs), [&](int64_t b0, int64_t b1) {
        nf4_dequantize_blocks(isa, packed, am, n, bs, b0, b1, out);
    });
}

// Error naming the first block whose absmax is not finite (the block holds NaN or Inf).
void check_blocks_finite(const float* absmax, int64_t nblocks, int64_t bs, int64_t n) {
    for (int64_t b = 0; b < nblocks; ++b) {
        if (!core::is_finite(absmax[b])) {
            nf4_fail_nonfinite_block(b, bs, n);
        }
    }
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_quantize_cpu(
    const at::Tensor& weight, int64_t blocksize, bool double_quant, const std::optional<at::Tensor>& nested_code
) {
    nf4_check_quantize_args(weight, blocksize);
    nf4_check_nested_code_arg(nested_code, weight);
    const at::Tensor w = weight.contiguous();
    const int64_t n = w.numel();
    const int64_t nblocks = core::nf4_num_blocks(n, blocksize);
    at::Tensor packed = at::empty({core::nf4_packed_bytes(n), 1}, w.options().dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, w.options().dtype(at::kFloat));
    uint8_t* packed_ptr = packed.data_ptr<uint8_t>();
    float* absmax_ptr = absmax.data_ptr<float>();
    switch (w.scalar_type()) {
    case at::kFloat:
        quantize_dispatch(w.const_data_ptr<float>(), n, blocksize, packed_ptr, absmax_ptr);
        break;
    case at::kBFloat16:
        quantize_dispatch(w.const_data_ptr<c10::BFloat16>(), n, blocksize, packed_ptr, absmax_ptr);
        break;
    default:
        quantize_dispatch(w.const_data_ptr<c10::Half>(), n, blocksize, packed_ptr, absmax_ptr);
        break;
    }
    check_blocks_finite(absmax_ptr, nblocks, blocksize, n);

    const at::TensorOptions f32 = w.options().dtype(at::kFloat);
    if (!double_quant) {
        return {packed, absmax, at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32)};
    }
    // A fresh copy: an output must never alias an input (the schema declares no alias).
    at::Tensor code = nested_code.has_value() ? nested_code->clone(at::MemoryFormat::Contiguous)
                                              : dynamic8_code_tensor(/*is_signed=*/true);
    if (nested_code.has_value()) {
        dynamic8_check_code_sorted(code, "qlora::nf4_quantize");
    }
    at::Tensor offset = at::mean(absmax);
    const at::Tensor centred = at::sub(absmax, offset);
    auto [codes, nested_absmax] = dynamic8_quantize_blocks_cpu(centred, core::kDoubleQuantBlockSize, code);
    return {packed, codes, nested_absmax, code, offset};
}

namespace {

// Dequantizes into `out` (already checked: contiguous, numel n, dtype, on CPU).
void dequantize_into(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, int64_t n, int64_t blocksize,
    at::Tensor& out
) {
    const CpuWeight w(packed, absmax, nested_absmax, nested_code, offset);
    const Nf4BlockAbsmax& am = w.am;
    const uint8_t* p = w.bytes();
    switch (out.scalar_type()) {
    case at::kFloat:
        dequantize_dispatch(p, am, n, blocksize, out.data_ptr<float>());
        break;
    case at::kBFloat16:
        dequantize_dispatch(p, am, n, blocksize, out.data_ptr<c10::BFloat16>());
        break;
    default:
        dequantize_dispatch(p, am, n, blocksize, out.data_ptr<c10::Half>());
        break;
    }
}

} // namespace

at::Tensor nf4_dequantize_cpu(
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

void nf4_dequantize_into_cpu(
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

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
    m.impl("nf4_quantize", &nf4_quantize_cpu);
    m.impl("nf4_dequantize", &nf4_dequantize_cpu);
    m.impl("nf4_dequantize_into", &nf4_dequantize_into_cpu);
}

} // namespace qlora::cpu
