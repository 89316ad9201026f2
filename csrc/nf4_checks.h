// csrc/nf4_checks.h: argument checks and output shapes of the NF4 storage ops, shared by the CPU, CUDA and Meta
// kernels so every backend rejects the same inputs with the same message.
//
// Shapes (n = weight.numel(), B = blocksize, NB = ceil(n / B), NB2 = ceil(NB / 256)):
//   packed        uint8 [(n + 1) / 2, 1]      two codes per byte, even element in the high nibble
//   absmax        float32 [NB]                (double_quant = false)
//                 uint8 [NB]                  (double_quant = true: dynamic-8-bit codes of absmax - offset)
//   nested_absmax float32 [NB2]               (double_quant = true, else [0])
//   nested_code   float32 [256]               signed dynamic map used for the nested codes (else [0])
//   offset        float32 []                  mean of the float32 absmax (else [0])
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include "core/dynamic8.h"
#include "core/nf4.h"

namespace qlora {

inline bool nf4_dtype_is_supported(at::ScalarType t) {
    return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void nf4_check_quantize_args(const at::Tensor& weight, int64_t blocksize) {
    TORCH_CHECK(
        nf4_dtype_is_supported(weight.scalar_type()),
        "qlora::nf4_quantize: weight must be float32, bfloat16 or float16, got ", weight.scalar_type()
    );
    TORCH_CHECK(
        core::nf4_blocksize_is_valid(blocksize), "qlora::nf4_quantize: blocksize must be a power of two in [",
        core::kNf4MinBlockSize, ", ", core::kNf4MaxBlockSize, "], got ", blocksize
    );
    TORCH_CHECK(weight.sym_numel() > 0, "qlora::nf4_quantize: weight is empty (shape ", weight.sym_sizes(), ")");
}

// A caller-supplied map for the nested (double-quantization) codes: 256 ascending float32 values.
inline void nf4_check_nested_code_arg(const std::optional<at::Tensor>& code, const at::Tensor& weight) {
    if (!code.has_value()) {
        return;
    }
    TORCH_CHECK(
        code->scalar_type() == at::kFloat && code->sym_numel() == core::kDynamic8Codes,
        "qlora::nf4_quantize: nested_code must be float32 with 256 entries, got ", code->scalar_type(), " with ",
        code->sym_numel()
    );
    TORCH_CHECK(
        code->device() == weight.device() || code->device().is_cpu(), "qlora::nf4_quantize: nested_code is on ",
        code->device(), " but weight is on ", weight.device()
    );
}

// Element count of a dequantization target shape; rejects negative sizes and overflow of int64.
inline int64_t nf4_shape_numel(at::IntArrayRef sizes) {
    int64_t n = 1;
    for (int64_t s : sizes) {
        TORCH_CHECK(s >= 0, "qlora::nf4_dequantize: shape has a negative size ", s);
        TORCH_CHECK(
            s == 0 || n <= INT64_MAX / s, "qlora::nf4_dequantize: shape ", sizes, " has more elements than int64 holds"
        );
        n *= s;
    }
    return n;
}

// The error for a weight block holding NaN or Inf (its absmax is not finite); the same text on every backend.
[[noreturn]] inline void nf4_fail_nonfinite_block(int64_t block, int64_t blocksize, int64_t numel) {
    const int64_t last = std::min(numel, (block + 1) * blocksize) - 1;
    TORCH_CHECK(
        false, "qlora::nf4_quantize: weight contains NaN or Inf in block ", block, " (flat elements ",
        block * blocksize, " to ", last, "); quantizing it would store garbage"
    );
    __builtin_unreachable();
}

// Validates a quantized state against the element count it claims to hold. Every tensor must be on the device of
// `packed`. Sizes are compared before any kernel reads the data, so a corrupt state is an error, not a bad read.
inline void nf4_check_dequantize_args(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, const c10::SymInt& numel,
    at::ScalarType dtype, int64_t blocksize, const char* op = "qlora::nf4_dequantize"
) {
    TORCH_CHECK(nf4_dtype_is_supported(dtype), op, ": dtype must be float32, bfloat16 or float16, got ", dtype);
    TORCH_CHECK(
        core::nf4_blocksize_is_valid(blocksize), op, ": blocksize must be a power of two in [", core::kNf4MinBlockSize,
        ", ", core::kNf4MaxBlockSize, "], got ", blocksize
    );
    TORCH_CHECK(numel > 0, op, ": shape describes an empty tensor");
    TORCH_CHECK(
        packed.scalar_type() == at::kByte, op, ": packed must be uint8 (bitsandbytes quant_storage other than uint8 ",
        "must be viewed as uint8 first), got ", packed.scalar_type()
    );
    TORCH_CHECK(
        packed.sym_numel() == (numel + 1) / 2, op, ": packed has ", packed.sym_numel(), " bytes but shape needs ",
        (numel + 1) / 2, " (two 4-bit codes per byte)"
    );
    const c10::SymInt nblocks = (numel + blocksize - 1) / blocksize;
    TORCH_CHECK(
        absmax.sym_numel() == nblocks, op, ": absmax has ", absmax.sym_numel(), " entries but shape and blocksize ",
        blocksize, " give ", nblocks, " blocks"
    );
    auto same_device = [&](const at::Tensor& t, const char* name) {
        TORCH_CHECK(
            t.device() == packed.device(), op, ": ", name, " is on ", t.device(), " but packed is on ", packed.device()
        );
    };
    same_device(absmax, "absmax");
    if (absmax.scalar_type() == at::kFloat) {
        return;
    }
    TORCH_CHECK(
        absmax.scalar_type() == at::kByte, op, ": absmax must be float32 (plain) or uint8 (double-quantized), got ",
        absmax.scalar_type()
    );
    TORCH_CHECK(
        nested_absmax.has_value() && nested_code.has_value() && offset.has_value(), op,
        ": absmax is uint8 (double-quantized) so nested_absmax, nested_code and offset are required"
    );
    TORCH_CHECK(
        nested_absmax->scalar_type() == at::kFloat && nested_code->scalar_type() == at::kFloat &&
            offset->scalar_type() == at::kFloat,
        op, ": nested_absmax, nested_code and offset must be float32"
    );
    const c10::SymInt nblocks2 = (nblocks + core::kDoubleQuantBlockSize - 1) / core::kDoubleQuantBlockSize;
    TORCH_CHECK(
        nested_absmax->sym_numel() == nblocks2, op, ": nested_absmax has ", nested_absmax->sym_numel(), " entries but ",
        nblocks, " blocks need ", nblocks2
    );
    TORCH_CHECK(
        nested_code->sym_numel() == core::kDynamic8Codes, op, ": nested_code must have 256 entries, got ",
        nested_code->sym_numel()
    );
    TORCH_CHECK(offset->sym_numel() == 1, op, ": offset must hold one value, got ", offset->sym_numel());
    same_device(*nested_absmax, "nested_absmax");
    same_device(*nested_code, "nested_code");
    same_device(*offset, "offset");
}

// The `out` tensor of nf4_dequantize_into: exactly the requested shape and dtype, contiguous, beside `packed`. It is
// never resized: a preallocated buffer that does not fit is a caller bug worth reporting.
inline void nf4_check_dequantize_out(
    const at::Tensor& out, c10::SymIntArrayRef sizes, at::ScalarType dtype, const at::Tensor& packed
) {
    const char* op = "qlora::nf4_dequantize_into";
    TORCH_CHECK(out.scalar_type() == dtype, op, ": out has dtype ", out.scalar_type(), " but dtype is ", dtype);
    TORCH_CHECK(out.sym_sizes() == sizes, op, ": out has shape ", out.sym_sizes(), " but shape is ", sizes);
    TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
    TORCH_CHECK(
        out.device() == packed.device(), op, ": out is on ", out.device(), " but packed is on ", packed.device()
    );
}

// Activations of qlora::nf4_linear / linear: float32, bfloat16, float16 or float64 (float64 for gradcheck).
inline bool linear_dtype_is_supported(at::ScalarType t) {
    return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// x [*, K] against an NF4 weight [N, K] (N = out_features); bias [N] if given. Returns K.
inline c10::SymInt nf4_check_linear_args(
    const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t out_features, int64_t blocksize,
    const std::optional<at::Tensor>& bias
) {
    TORCH_CHECK(x.dim() >= 1, op, ": input must have at least one dimension, got a scalar");
    TORCH_CHECK(
        linear_dtype_is_supported(x.scalar_type()), op, ": input must be float32, bfloat16, float16 or float64, got ",
        x.scalar_type()
    );
    TORCH_CHECK(out_features > 0, op, ": out_features must be positive, got ", out_features);
    const c10::SymInt in_features = x.sym_size(-1);
    TORCH_CHECK(in_features > 0, op, ": input has 0 features (last dimension)");
    TORCH_CHECK(
        packed.sym_numel() == (in_features * out_features + 1) / 2, op, ": input has ", in_features,
        " features, but the NF4 weight's ", packed.sym_numel(), " bytes do not hold [out_features=", out_features, ", ",
        in_features, "] codes (expected ", (in_features * out_features + 1) / 2, " bytes)"
    );
    nf4_check_dequantize_args(
        packed, absmax, nested_absmax, nested_code, offset, in_features * out_features, at::kFloat, blocksize, op
    );
    TORCH_CHECK(
        x.device() == packed.device(), op, ": input is on ", x.device(), " but the weight is on ", packed.device()
    );
    if (bias.has_value()) {
        TORCH_CHECK(
            bias->dim() == 1 && bias->sym_size(0) == out_features, op, ": bias must have shape [", out_features,
            "], got ", bias->sym_sizes()
        );
        TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but input is on ", x.device());
    }
    return in_features;
}

// grad_out [*, N] against an NF4 weight [N, K] (K = in_features), for qlora::nf4_linear_grad_input.
inline void nf4_check_linear_grad_input_args(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t in_features, int64_t blocksize
) {
    const char* op = "qlora::nf4_linear_grad_input";
    TORCH_CHECK(grad_out.dim() >= 1, op, ": grad_out must have at least one dimension");
    TORCH_CHECK(in_features > 0, op, ": in_features must be positive, got ", in_features);
    TORCH_CHECK(
        linear_dtype_is_supported(grad_out.scalar_type()), op,
        ": grad_out must be float32, bfloat16, float16 or float64, got ", grad_out.scalar_type()
    );
    nf4_check_dequantize_args(
        packed, absmax, nested_absmax, nested_code, offset, grad_out.sym_size(-1) * in_features, at::kFloat, blocksize,
        op
    );
    TORCH_CHECK(
        grad_out.device() == packed.device(), op, ": grad_out is on ", grad_out.device(), " but the weight is on ",
        packed.device()
    );
}

} // namespace qlora
