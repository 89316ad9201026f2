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

template <typename F> void visit_dtype(at::ScalarType dt, const F& f) {
    switch (dt) {
    case at::kFloat:
        f(float{});
        break;
    case at::kBFloat16:
        f(c10::BFloat16{});
        break;
    default:
        f(c10::Half{});
    }
}

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
    visit_dtype(q.scalar_type(), [&](auto tag) {
        using E = cuda_element_t<decltype(tag)>;
        core::AttentionFwdParams<E> p{};
        p.q = static_cast<const E*>(q.const_data_ptr());
        p.k = static_cast<const E*>(k.const_data_ptr());
        p.v = static_cast<const E*>(v.const_data_ptr());
        p.out = static_cast<E*>(out.mutable_data_ptr());
        p.lse = lse.mutable_data_ptr<float>();
        p.segments = seg.defined() ? seg.const_data_ptr<int32_t>() : nullptr;
        p.q_stride = attention_strides(q);
        p.k_stride = attention_strides(k);
        p.v_stride = attention_strides(v);
        p.out_stride = attention_strides(out);
        p.batch = q.size(0);
        p.heads = q.size(1);
        p.kv_heads = k.size(1);
        p.tokens = q.size(2);
        p.head_dim = q.size(3);
        p.scale = static_cast<float>(sc);
        attention_fwd_launch<E>(p, stream);
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
    visit_dtype(q.scalar_type(), [&](auto tag) {
        using E = cuda_element_t<decltype(tag)>;
        AttentionBwdLaunch<E> a{};
        core::AttentionBwdParams<E>& p = a.p;
        p.grad_out = static_cast<const E*>(g.const_data_ptr());
        p.q = static_cast<const E*>(q.const_data_ptr());
        p.k = static_cast<const E*>(k.const_data_ptr());
        p.v = static_cast<const E*>(v.const_data_ptr());
        p.out = static_cast<const E*>(o.const_data_ptr());
        p.lse = lse.const_data_ptr<float>();
        p.segments = seg.defined() ? seg.const_data_ptr<int32_t>() : nullptr;
        p.dq = static_cast<E*>(dq.mutable_data_ptr());
        p.dk = static_cast<E*>(dk.mutable_data_ptr());
        p.dv = static_cast<E*>(dv.mutable_data_ptr());
        p.grad_out_stride = attention_strides(g);
        p.q_stride = attention_strides(q);
        p.k_stride = attention_strides(k);
        p.v_stride = attention_strides(v);
        p.out_stride = attention_strides(o);
        p.dq_stride = attention_strides(dq);
        p.dk_stride = attention_strides(dk);
        p.dv_stride = attention_strides(dv);
        p.batch = q.size(0);
        p.heads = q.size(1);
        p.kv_heads = k.size(1);
        p.tokens = q.size(2);
        p.head_dim = q.size(3);
        p.scale = static_cast<float>(sc);
        a.delta = delta.mutable_data_ptr<float>();
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
