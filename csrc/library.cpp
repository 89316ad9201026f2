// csrc/library.cpp: every qlora operator schema, in one TORCH_LIBRARY block.
//
// Kernels live elsewhere: cpu/*.cpp (CPU), cuda/*.cu (CUDA), meta.cpp (Meta: shapes only, for torch.compile and
// torch.export). The utility ops at the end have a single backend-independent kernel. Shapes use the letters of
// nf4_checks.h (n = numel, B = blocksize, NB = ceil(n / B), NB2 = ceil(NB / 256)).
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "core/nf4.h"
#include "cpu/cpu_isa.h"
#include "cpu/dynamic8_cpu.h"

namespace qlora {
namespace {

at::Tensor nf4_code() {
    at::Tensor code = at::empty({core::kNf4Codes}, at::TensorOptions().dtype(at::kFloat));
    for (int i = 0; i < core::kNf4Codes; ++i) {
        code.data_ptr<float>()[i] = core::nf4_value(i);
    }
    return code;
}

at::Tensor dynamic8_code(bool is_signed) {
    return cpu::dynamic8_code_tensor(is_signed);
}

std::string cpu_isa() {
    return cpu::cpu_isa_name(cpu::cpu_isa());
}

void set_cpu_isa(const std::string& isa) {
    cpu::set_cpu_isa(cpu::cpu_isa_from_name(isa, "qlora::_set_cpu_isa"));
}

} // namespace

TORCH_LIBRARY(qlora, m) {
    // NF4 quantization of a whole tensor, blocks of B over its flattened (row-major) elements; bitsandbytes'
    // quantize_4bit(quant_type="nf4", compress_statistics=double_quant) byte for byte.
    //   weight [*] float32|bfloat16|float16, any numel > 0 -> packed uint8 [(n+1)/2, 1]; absmax float32 [NB] or,
    //   double-quantized, uint8 [NB] with nested_absmax float32 [NB2], nested_code float32 [256], offset float32 []
    //   (the three are [0] when double_quant is false). nested_code (float32 [256], ascending) replaces the default
    //   signed dynamic map for the nested codes, e.g. to reproduce a checkpoint written with another map.
    m.def("nf4_quantize(Tensor weight, int blocksize=64, bool double_quant=True, Tensor? nested_code=None) -> "
          "(Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor nested_code, Tensor offset)");
    // Inverse of nf4_quantize: out[shape] of `dtype` = LUT[code] * absmax, rounded once to dtype. nested_* and
    // offset are required when absmax is uint8 (double-quantized) and ignored otherwise.
    m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
          "SymInt[] shape, ScalarType dtype, int blocksize=64) -> Tensor");
    // The same into a preallocated contiguous `out` of exactly that shape and dtype (never resized). Returns nothing:
    // a custom op that returns a mutated input cannot be functionalized (torch.compile, torch.export).
    m.def("nf4_dequantize_into(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
          "Tensor? offset, SymInt[] shape, ScalarType dtype, int blocksize, Tensor(a!) out) -> ()");

    // Frozen NF4 linear: y[*, N] = x[*, K] W^T + bias with W the NF4 weight [N, K] (N = out_features). x float32,
    // bfloat16, float16 or float64; accumulation float32 (float64 for float64). No autograd of its own: qlora::linear
    // is the differentiable op.
    m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
          "Tensor? offset, int out_features, int blocksize, Tensor? bias) -> Tensor");
    // Its input gradient: grad_x[*, K] = grad_out[*, N] W (K = in_features).
    m.def("nf4_linear_grad_input(Tensor grad_out, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
          "Tensor? nested_code, Tensor? offset, int in_features, int blocksize) -> Tensor");
    // The QLoRA layer: y = x W^T + bias + lora_scale * (lora_input A^T) B^T, W frozen NF4 [N, K], A = lora_a [r, K],
    // B = lora_b [N, r]; lora_input defaults to x (pass dropout(x) for LoRA dropout). Gradients flow to x, lora_input,
    // bias, lora_a and lora_b; never to the NF4 weight. Only the packed weight is kept for backward.
    m.def("linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
          "Tensor? offset, int out_features, int blocksize=64, Tensor? bias=None, Tensor? lora_a=None, "
          "Tensor? lora_b=None, float lora_scale=1.0, Tensor? lora_input=None) -> Tensor");

    // Causal self-attention with grouped-query heads (Note [Causal attention] in core/attention.h; shapes in
    // attention_checks.h): q [B, H, T, D], k and v [B, KVH, T, D] (H a multiple of KVH, query head h reads key/value
    // head h / (H / KVH)), float32, bfloat16 or float16 with float32 accumulation. Query i sees keys j <= i, and only
    // those of its own segment when segment_ids [B, T] is given (packed rows). scale defaults to 1/sqrt(D). Returns
    // out [B, H, T, D] (stored as [B, T, H, D]) and the float32 log-sum-exp lse [B, H, T] that backward needs;
    // differentiable in q, k and v (lse is not).
    m.def("causal_attention(Tensor q, Tensor k, Tensor v, Tensor? segment_ids=None, float? scale=None) -> "
          "(Tensor out, Tensor lse)");
    // Its gradients (grad_q with q's shape, grad_k and grad_v with k's) from grad_out and the forward's out and lse.
    m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
          "Tensor? segment_ids=None, float? scale=None) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

    // One AdamW step of one tensor with 8-bit blockwise states, bitsandbytes' AdamW8bit layout (spec §4.2; Note
    // [AdamW8 update order] in core/adamw.h): param, state1, state2, absmax1 and absmax2 are updated in place (shapes
    // in adamw_checks.h). `step` is t >= 1, counting this update. Non-finite gradient elements reset their moments
    // and leave their parameter alone (Note [Non-finite gradients]).
    m.def("adamw8bit_step(Tensor(a!) param, Tensor grad, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, "
          "Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, int step, float lr, float beta1=0.9, float beta2=0.999, "
          "float eps=1e-8, float weight_decay=0.0) -> ()");
    // The same with float32 states exp_avg (m) and exp_avg_sq (v) shaped like param: bitsandbytes' 32-bit AdamW
    // (spec §4.5), used for tensors below 4096 elements and by the 32-bit optimizers.
    m.def("adamw32bit_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, int step, "
          "float lr, float beta1=0.9, float beta2=0.999, float eps=1e-8, float weight_decay=0.0) -> ()");
    // Zero-filled optimizer state with like's shape and device and the given dtype. On CUDA it is managed memory
    // (cudaMallocManaged), which the driver may evict to host RAM when the GPU runs out of memory; on the CPU it is
    // ordinary memory.
    m.def("paged_zeros(Tensor like, ScalarType dtype) -> Tensor");
    // Asks the driver to move a paged state to its GPU ahead of the step (cudaMemPrefetchAsync on the current stream;
    // a no-op where the device cannot prefetch, and on the CPU).
    m.def("paged_prefetch(Tensor state) -> ()");

    // Utilities (one kernel for every backend; excluded from opcheck, see tests/python/test_nf4.py).
    // The 16 NF4 code values (bitsandbytes' `quant_map`), float32 [16] on CPU.
    m.def("nf4_code() -> Tensor", &nf4_code);
    // The signed or unsigned dynamic 8-bit map (`nested_quant_map`, optimizer qmap1/qmap2), float32 [256] on CPU.
    m.def("dynamic8_code(bool is_signed=True) -> Tensor", &dynamic8_code);
    // The SIMD instruction set the CPU kernels use now: "avx512", "avx2" or "scalar".
    m.def("cpu_isa() -> str", &cpu_isa);
    // Lowers (or restores) that instruction set for this process; for tests and benchmarks.
    m.def("_set_cpu_isa(str isa) -> ()", &set_cpu_isa);
}

// NF4 storage is not differentiable (integer codes; qlora::linear gives no gradient to the frozen weight either). A
// tensor that requires grad passes through, and backward through these outputs raises instead of silently giving
// no gradient.
TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
    m.impl("nf4_quantize", torch::autograd::autogradNotImplementedFallback());
    m.impl("nf4_dequantize", torch::autograd::autogradNotImplementedFallback());
    m.impl("nf4_dequantize_into", torch::autograd::autogradNotImplementedFallback());
    m.impl("nf4_linear", torch::autograd::autogradNotImplementedFallback());
    m.impl("nf4_linear_grad_input", torch::autograd::autogradNotImplementedFallback());
    m.impl("causal_attention_backward", torch::autograd::autogradNotImplementedFallback()); // no double backward
    // Optimizer steps run under no_grad; the fallback also bumps the version counters of the mutated tensors.
    m.impl("adamw8bit_step", torch::autograd::autogradNotImplementedFallback());
    m.impl("adamw32bit_step", torch::autograd::autogradNotImplementedFallback());
}

} // namespace qlora
