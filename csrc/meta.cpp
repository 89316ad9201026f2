// csrc/meta.cpp: Meta kernels (output shapes and dtypes only) for every qlora operator with tensor outputs, so
// torch.compile(fullgraph=True) and torch.export trace the ops without running them. They check what can be
// checked from metadata alone, with the same messages as the real kernels (nf4_checks.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "adamw_checks.h"
#include "attention_checks.h"
#include "nf4_checks.h"

namespace qlora {
namespace {

c10::SymInt shape_numel(c10::SymIntArrayRef shape) {
    c10::SymInt n = 1;
    for (const c10::SymInt& s : shape) {
        n = n * s;
    }
    return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_quantize_meta(
    const at::Tensor& weight, int64_t blocksize, bool double_quant, const std::optional<at::Tensor>& nested_code
) {
    nf4_check_quantize_args(weight, blocksize);
    nf4_check_nested_code_arg(nested_code, weight);
    const c10::SymInt n = weight.sym_numel();
    const c10::SymInt nblocks = (n + blocksize - 1) / blocksize;
    const at::TensorOptions u8 = weight.options().dtype(at::kByte);
    const at::TensorOptions f32 = weight.options().dtype(at::kFloat);
    at::Tensor packed = at::empty_symint({(n + 1) / 2, 1}, u8);
    if (!double_quant) {
        return {
            packed, at::empty_symint({nblocks}, f32), at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32)};
    }
    const c10::SymInt nblocks2 = (nblocks + core::kDoubleQuantBlockSize - 1) / core::kDoubleQuantBlockSize;
    return {
        packed, at::empty_symint({nblocks}, u8), at::empty_symint({nblocks2}, f32),
        at::empty({core::kDynamic8Codes}, f32), at::empty({}, f32)};
}

at::Tensor nf4_dequantize_meta(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape,
    at::ScalarType dtype, int64_t blocksize
) {
    const c10::SymInt n = shape_numel(shape);
    nf4_check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, n, dtype, blocksize);
    return at::empty_symint(shape, packed.options().dtype(dtype));
}

void nf4_dequantize_into_meta(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape,
    at::ScalarType dtype, int64_t blocksize, at::Tensor& out
) {
    const c10::SymInt n = shape_numel(shape);
    nf4_check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, n, dtype, blocksize);
    nf4_check_dequantize_out(out, shape, dtype, packed);
}

at::Tensor nf4_linear_meta(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t out_features, int64_t blocksize,
    const std::optional<at::Tensor>& bias
) {
    nf4_check_linear_args(
        "qlora::nf4_linear", x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias
    );
    std::vector<c10::SymInt> shape = x.sym_sizes().vec();
    shape.back() = out_features;
    return at::empty_symint(shape, x.options());
}

at::Tensor nf4_linear_grad_input_meta(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t in_features, int64_t blocksize
) {
    nf4_check_linear_grad_input_args(
        grad_out, packed, absmax, nested_absmax, nested_code, offset, in_features, blocksize
    );
    std::vector<c10::SymInt> shape = grad_out.sym_sizes().vec();
    shape.back() = in_features;
    return at::empty_symint(shape, grad_out.options());
}

void adamw8bit_step_meta(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
    at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, int64_t step, double lr, double beta1,
    double beta2, double eps, double weight_decay
) {
    adamw8_check_args(
        param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1, beta2, eps, weight_decay
    );
}

void adamw32bit_step_meta(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, int64_t step, double lr,
    double beta1, double beta2, double eps, double weight_decay
) {
    adamw32_check_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay);
}

at::Tensor paged_zeros_meta(const at::Tensor& like, at::ScalarType dtype) {
    return at::empty_symint(like.sym_sizes(), like.options().dtype(dtype));
}

void paged_prefetch_meta(const at::Tensor&) {}

std::tuple<at::Tensor, at::Tensor> causal_attention_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& segment_ids,
    std::optional<double> scale
) {
    attention_check_args("qlora::causal_attention", q, k, v, segment_ids, scale);
    return attention_empty_outputs(q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& segment_ids, std::optional<double> scale
) {
    const char* op = "qlora::causal_attention_backward";
    attention_check_args(op, q, k, v, segment_ids, scale);
    attention_check_backward_args(op, grad_out, q, out, lse);
    return {
        at::empty_like(attention_rowwise(q)), at::empty_like(attention_rowwise(k)),
        at::empty_like(attention_rowwise(v))};
}

} // namespace

TORCH_LIBRARY_IMPL(qlora, Meta, m) {
    m.impl("adamw8bit_step", &adamw8bit_step_meta);
    m.impl("adamw32bit_step", &adamw32bit_step_meta);
    m.impl("paged_zeros", &paged_zeros_meta);
    m.impl("paged_prefetch", &paged_prefetch_meta);
    m.impl("nf4_quantize", &nf4_quantize_meta);
    m.impl("nf4_dequantize", &nf4_dequantize_meta);
    m.impl("nf4_linear", &nf4_linear_meta);
    m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_meta);
    m.impl("nf4_dequantize_into", &nf4_dequantize_into_meta);
    m.impl("causal_attention", &causal_attention_meta);
    m.impl("causal_attention_backward", &causal_attention_backward_meta);
}

} // namespace qlora
