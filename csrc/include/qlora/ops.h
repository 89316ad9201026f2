// qlora/ops.h: the C++ API of qlora's operators, for LibTorch programs (the trainer, examples, users).
//
// Every function calls its operator through the PyTorch dispatcher (so CPU, CUDA, Meta and autograd kernels are
// chosen exactly as for torch.ops.qlora.* in Python). Link the target qlora::ops (find_package(qlora)); it carries
// --no-as-needed so the operator registrations are never dropped by the linker.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace qlora {

// A tensor quantized to NF4 (bitsandbytes' QuantState, spec nf4-and-optimizer.md §1.8).
struct Nf4Tensor {
    at::Tensor packed;        // uint8 [(n + 1) / 2, 1]
    at::Tensor absmax;        // float32 [NB], or uint8 [NB] when double-quantized
    at::Tensor nested_absmax; // float32 [NB2] when double-quantized, else empty
    at::Tensor nested_code;   // float32 [256] when double-quantized, else empty
    at::Tensor offset;        // float32 [] when double-quantized, else empty
    std::vector<int64_t> shape;
    at::ScalarType dtype = at::kFloat; // dtype of the original weight, the default dequantization dtype
    int64_t blocksize = 64;

    bool double_quantized() const { return absmax.defined() && absmax.scalar_type() == at::kByte; }
    int64_t numel() const;
};

// qlora::nf4_quantize: weight (float32, bfloat16 or float16, any shape) -> Nf4Tensor. `nested_code` replaces the
// default signed dynamic map used for double quantization (256 ascending float32 values).
Nf4Tensor nf4_quantize(
    const at::Tensor& weight, int64_t blocksize = 64, bool double_quant = true,
    const std::optional<at::Tensor>& nested_code = std::nullopt
);

// qlora::nf4_dequantize: back to a dense tensor of q.shape, in `dtype` (default: q.dtype).
at::Tensor nf4_dequantize(const Nf4Tensor& q, std::optional<at::ScalarType> dtype = std::nullopt);

// qlora::nf4_dequantize_into: the same into `out` (contiguous, q.shape, dtype out.scalar_type(); never resized), so a
// caller that dequantizes repeatedly reuses one buffer instead of allocating (and page-faulting) a new one.
void nf4_dequantize_into(const Nf4Tensor& q, at::Tensor& out);

// qlora::linear: y = x W^T + bias + lora_scale (lora_input A^T) B^T with `weight` the frozen NF4 W [out, in],
// lora_a = A [r, in], lora_b = B [out, r], lora_input defaulting to x. Differentiable (C++ autograd) in x,
// lora_input, bias, lora_a and lora_b; never in the weight.
at::Tensor linear(
    const at::Tensor& x, const Nf4Tensor& weight, const std::optional<at::Tensor>& bias = std::nullopt,
    const std::optional<at::Tensor>& lora_a = std::nullopt, const std::optional<at::Tensor>& lora_b = std::nullopt,
    double lora_scale = 1.0, const std::optional<at::Tensor>& lora_input = std::nullopt
);

// qlora::causal_attention: causal grouped-query self-attention, q [B, H, T, D], k and v [B, KVH, T, D], optionally
// causal within the segments of segment_ids [B, T] (packed rows); scale defaults to 1/sqrt(D). Returns out
// [B, H, T, D] (stored as [B, T, H, D]) and the float32 log-sum-exp [B, H, T]. Differentiable in q, k and v (C++
// autograd); memory O(B H T) beyond the inputs and output.
std::tuple<at::Tensor, at::Tensor> causal_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& segment_ids = std::nullopt, std::optional<double> scale = std::nullopt
);

// qlora::adamw8bit_step / qlora::adamw32bit_step: one AdamW step of one tensor, in place (shapes and rules:
// csrc/library.cpp, Note [AdamW8 update order]). qlora/optim.h wraps them as a torch::optim::Optimizer.
void adamw8bit_step(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
    at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, int64_t step, double lr, double beta1 = 0.9,
    double beta2 = 0.999, double eps = 1e-8, double weight_decay = 0.0
);
void adamw32bit_step(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, int64_t step, double lr,
    double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8, double weight_decay = 0.0
);
// qlora::paged_zeros / qlora::paged_prefetch: zeroed optimizer state like `like` (CUDA managed memory on a GPU), and
// its prefetch to the GPU before a step (a no-op on the CPU).
at::Tensor paged_zeros(const at::Tensor& like, at::ScalarType dtype);
void paged_prefetch(const at::Tensor& state);

// The 16 NF4 values and the signed/unsigned dynamic 8-bit maps, float32 CPU tensors.
at::Tensor nf4_code();
at::Tensor dynamic8_code(bool is_signed = true);

// SIMD instruction set of the CPU kernels ("avx512", "avx2", "scalar"), and a way to lower it (tests, benchmarks).
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);

} // namespace qlora
