// csrc/cuda/attention_cuda.cu: CUDA kernels of qlora::causal_attention and qlora::causal_attention_backward (ATen
// layer): the checks of attention_checks.h (the CPU's messages), outputs, and the launches of attention_kernels.cuh
// on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../attention_checks.h"
#include "attention_kernels.cuh"
#include "cuda_element.h"

namespace qlora::cuda {
namespace {

void check_cuda_args(const char* op, const at::Tensor& q) {
    TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device()); // the rest are on q's device
    TORCH_CHECK(
        q.size(3) <= kAttentionMaxHeadDim, op, ": the CUDA kernel takes head_dim <= ", kAttentionMaxHeadDim, ", got ",
        q.size(3)
    );
}

std::tuple<at::Tensor, at::Tensor> causal_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& segment_ids,
    std::optional<double> scale
) {
    const char* op = "qlora::causal_attention";
    const c10::cuda::CUDAGuard guard(q.device());
    const AttentionArgs a = attention_prepare(op, q, k, v, segment_ids, scale);
    check_cuda_args(op, a.q);
    auto [out, lse] = attention_empty_outputs(a.q);
    if (a.q.numel() == 0) {
        return {out, lse};
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    visit_float_dtype(a.q.scalar_type(), [&](auto tag) {
        using E = cuda_element_t<decltype(tag)>;
        attention_fwd_launch<E>(attention_fwd_params<E>(a.q, a.k, a.v, a.segments32, out, lse, a.scale), stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& segment_ids, std::optional<double> scale
) {
    const char* op = "qlora::causal_attention_backward";
    const c10::cuda::CUDAGuard guard(q.device());
    const AttentionArgs a = attention_prepare_backward(op, grad_out, q, k, v, out, lse, segment_ids, scale);
    check_cuda_args(op, a.q);
    at::Tensor dq = at::empty_like(a.q), dk = at::empty_like(a.k), dv = at::empty_like(a.v);
    if (a.q.numel() == 0) {
        return {dq, dk.zero_(), dv.zero_()};
    }
    at::Tensor delta = at::empty({a.q.size(0), a.q.size(1), a.q.size(2)}, a.q.options().dtype(at::kFloat));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    visit_float_dtype(a.q.scalar_type(), [&](auto tag) {
        using E = cuda_element_t<decltype(tag)>;
        const AttentionBwdLaunch<E> launch{
            attention_bwd_params<E>(a.grad_out, a.q, a.k, a.v, a.out, a.lse, a.segments32, dq, dk, dv, a.scale),
            delta.mutable_data_ptr<float>()};
        attention_bwd_launch<E>(launch, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dq, dk, dv};
}

} // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
    m.impl("causal_attention", &causal_attention_cuda);
    m.impl("causal_attention_backward", &causal_attention_backward_cuda);
}

} // namespace qlora::cuda
