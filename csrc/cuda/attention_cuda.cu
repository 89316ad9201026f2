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
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale
) {
    const char* op = "qlora::causal_attention";
    const double sc = attention_check_args(op, q_in, k_in, v_in, segment_ids, scale);
    check_cuda_args(op, q_in);
    const c10::cuda::CUDAGuard guard(q_in.device());
    const at::Tensor q = attention_rowwise(q_in), k = attention_rowwise(k_in), v = attention_rowwise(v_in);
    const at::Tensor seg = attention_segments32(op, segment_ids);
    auto [out, lse] = attention_empty_outputs(q);
    if (q.numel() == 0) {
        return {out, lse};
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    visit_float_dtype(q.scalar_type(), [&](auto tag) {
        using E = cuda_element_t<decltype(tag)>;
        attention_fwd_launch<E>(attention_fwd_params<E>(q, k, v, seg, out, lse, sc), stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& segment_ids,
    std::optional<double> scale
) {
    const char* op = "qlora::causal_attention_backward";
    const double sc = attention_check_args(op, q_in, k_in, v_in, segment_ids, scale);
    attention_check_backward_args(op, grad_out_in, q_in, out_in, lse_in);
    check_cuda_args(op, q_in);
    const c10::cuda::CUDAGuard guard(q_in.device());
    const at::Tensor q = attention_rowwise(q_in), k = attention_rowwise(k_in), v = attention_rowwise(v_in);
    const at::Tensor g = attention_rowwise(grad_out_in), o = attention_rowwise(out_in), lse = lse_in.contiguous();
    const at::Tensor seg = attention_segments32(op, segment_ids);
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    if (q.numel() == 0) {
        return {dq, dk.zero_(), dv.zero_()};
    }
    at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    visit_float_dtype(q.scalar_type(), [&](auto tag) {
        using E = cuda_element_t<decltype(tag)>;
        const AttentionBwdLaunch<E> a{
            attention_bwd_params<E>(g, q, k, v, o, lse, seg, dq, dk, dv, sc), delta.mutable_data_ptr<float>()};
        attention_bwd_launch<E>(a, stream);
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
