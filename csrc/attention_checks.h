// csrc/attention_checks.h: argument checks and output allocation of qlora::causal_attention and its backward,
// shared by the CPU, CUDA and Meta kernels so every backend rejects the same inputs with the same message, and the
// host-side params fill (Note [Causal attention] in core/attention.h).
//
//   q [B, H, T, D], k and v [B, KVH, T, D]    float32 | bfloat16 | float16, one dtype and device, H % KVH == 0;
//                                             any strides (a last dimension that is not contiguous is copied)
//   segment_ids [B, T] int32 | int64          optional: query i sees key j <= i only within its own segment
//   out [B, H, T, D]                          stored as [B, T, H, D], so out.transpose(1, 2).reshape(B, T, H * D)
//                                             (the attention output projection's input) is a view
//   lse float32 [B, H, T]                     contiguous
#pragma once

#include <cmath>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "core/attention.h"
#include "dtype_visit.h"

namespace qlora {

inline void attention_check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be [batch, heads, tokens, head_dim], got ", t.sym_sizes());
    TORCH_CHECK(
        t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
        t.scalar_type()
    );
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

// q, k, v and segment_ids as described above; returns the scale to use (1/sqrt(D) when not given).
inline double attention_check_args(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale
) {
    const at::ScalarType dt = q.scalar_type();
    TORCH_CHECK(
        dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
        ": q must be float32, bfloat16 or float16, got ", dt
    );
    attention_check_input(op, "q", q, q);
    attention_check_input(op, "k", k, q);
    attention_check_input(op, "v", v, q);
    TORCH_CHECK(
        k.sym_sizes() == v.sym_sizes(), op, ": k and v must have one shape, got ", k.sym_sizes(), " and ", v.sym_sizes()
    );
    TORCH_CHECK(
        k.sym_size(0) == q.sym_size(0) && k.sym_size(2) == q.sym_size(2) && k.sym_size(3) == q.sym_size(3), op,
        ": k must be [batch, kv_heads, tokens, head_dim] with q's batch, tokens and head_dim ", q.sym_sizes(), ", got ",
        k.sym_sizes()
    );
    TORCH_CHECK(k.sym_size(1) >= 1, op, ": k must have at least one head, got ", k.sym_sizes());
    TORCH_CHECK(
        q.sym_size(1) % k.sym_size(1) == 0, op, ": q's heads (", q.sym_size(1), ") must be a multiple of k's (",
        k.sym_size(1), ")"
    );
    if (segment_ids.has_value()) {
        const at::Tensor& s = *segment_ids;
        TORCH_CHECK(
            s.scalar_type() == at::kInt || s.scalar_type() == at::kLong, op,
            ": segment_ids must be int32 or int64, got ", s.scalar_type()
        );
        TORCH_CHECK(
            s.dim() == 2 && s.sym_size(0) == q.sym_size(0) && s.sym_size(1) == q.sym_size(2), op,
            ": segment_ids must be [batch, tokens] = [", q.sym_size(0), ", ", q.sym_size(2), "], got ", s.sym_sizes()
        );
        TORCH_CHECK(s.device() == q.device(), op, ": segment_ids is on ", s.device(), " but q is on ", q.device());
    }
    const double D = static_cast<double>(q.sym_size(3).guard_int(__FILE__, __LINE__));
    const double sc = scale.has_value() ? *scale : (D > 0 ? 1.0 / std::sqrt(D) : 1.0);
    TORCH_CHECK(std::isfinite(sc), op, ": scale must be finite, got ", sc);
    return sc;
}

// out [B, H, T, D] with [B, T, H, D] storage, and lse float32 [B, H, T].
inline std::tuple<at::Tensor, at::Tensor> attention_empty_outputs(const at::Tensor& q) {
    const c10::SymInt B = q.sym_size(0), H = q.sym_size(1), T = q.sym_size(2), D = q.sym_size(3);
    at::Tensor out = at::empty_symint({B, T, H, D}, q.options()).transpose(1, 2);
    at::Tensor lse = at::empty_symint({B, H, T}, q.options().dtype(at::kFloat));
    return {out, lse};
}

inline void attention_check_backward_args(
    const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse
) {
    attention_check_input(op, "grad_out", grad_out, q);
    attention_check_input(op, "out", out, q);
    TORCH_CHECK(
        grad_out.sym_sizes() == q.sym_sizes() && out.sym_sizes() == q.sym_sizes(), op,
        ": grad_out and out must have q's shape ", q.sym_sizes(), ", got ", grad_out.sym_sizes(), " and ",
        out.sym_sizes()
    );
    TORCH_CHECK(
        lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.sym_size(0) == q.sym_size(0) &&
            lse.sym_size(1) == q.sym_size(1) && lse.sym_size(2) == q.sym_size(2),
        op, ": lse must be float32 [batch, heads, tokens] = [", q.sym_size(0), ", ", q.sym_size(1), ", ", q.sym_size(2),
        "], got ", lse.scalar_type(), " ", lse.sym_sizes()
    );
    TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ", q.device());
}

// A tensor the kernels can read: the last dimension contiguous (anything else is copied).
inline at::Tensor attention_rowwise(const at::Tensor& t) {
    return t.sym_size(-1) <= 1 || t.sym_stride(-1) == 1 ? t : t.contiguous();
}

inline core::AttentionStrides attention_strides(const at::Tensor& t) {
    return {t.stride(0), t.stride(1), t.stride(2)};
}

// segment_ids as contiguous int32 (int64 ids that do not fit are an error, never wrapped), or an undefined tensor.
inline at::Tensor attention_segments32(const char* op, const std::optional<at::Tensor>& segment_ids) {
    if (!segment_ids.has_value()) {
        return at::Tensor();
    }
    const at::Tensor& s = *segment_ids;
    if (s.scalar_type() == at::kInt) {
        return s.contiguous();
    }
    at::Tensor s32 = s.to(at::kInt).contiguous();
    TORCH_CHECK(s32.to(at::kLong).equal(s), op, ": segment_ids must fit in int32");
    return s32;
}

// What every backend's op does before its kernel: the checks above, inputs the kernels can read, int32 segments and
// the outputs (forward: out and lse; backward: dq, dk, dv shaped and strided like q, k, v).
struct AttentionArgs {
    at::Tensor q, k, v, segments32;
    at::Tensor grad_out, out, lse; // backward only
    double scale = 0.0;
};

inline AttentionArgs attention_prepare(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale
) {
    AttentionArgs a;
    a.scale = attention_check_args(op, q, k, v, segment_ids, scale);
    a.q = attention_rowwise(q);
    a.k = attention_rowwise(k);
    a.v = attention_rowwise(v);
    a.segments32 = attention_segments32(op, segment_ids);
    return a;
}

inline AttentionArgs attention_prepare_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& segment_ids,
    std::optional<double> scale
) {
    AttentionArgs a = attention_prepare(op, q, k, v, segment_ids, scale);
    attention_check_backward_args(op, grad_out, q, out, lse);
    a.grad_out = attention_rowwise(grad_out);
    a.out = attention_rowwise(out);
    a.lse = lse.contiguous();
    return a;
}

// Kernel params over checked tensors (last dimensions contiguous, segments from attention_segments32). E is the
// kernel's element type for q's dtype: the c10 type on the CPU, the CUDA type (same bits) for the CUDA kernels.
template <typename E>
core::AttentionFwdParams<E> attention_fwd_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& segments32, at::Tensor& out,
    at::Tensor& lse, double scale
) {
    core::AttentionFwdParams<E> p{};
    p.q = static_cast<const E*>(q.const_data_ptr());
    p.k = static_cast<const E*>(k.const_data_ptr());
    p.v = static_cast<const E*>(v.const_data_ptr());
    p.out = static_cast<E*>(out.mutable_data_ptr());
    p.lse = lse.mutable_data_ptr<float>();
    p.segments = segments32.defined() ? segments32.const_data_ptr<int32_t>() : nullptr;
    p.q_stride = attention_strides(q);
    p.k_stride = attention_strides(k);
    p.v_stride = attention_strides(v);
    p.out_stride = attention_strides(out);
    p.batch = q.size(0);
    p.heads = q.size(1);
    p.kv_heads = k.size(1);
    p.tokens = q.size(2);
    p.head_dim = q.size(3);
    p.scale = static_cast<float>(scale);
    return p;
}

template <typename E>
core::AttentionBwdParams<E> attention_bwd_params(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& segments32, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double scale
) {
    core::AttentionBwdParams<E> p{};
    p.grad_out = static_cast<const E*>(grad_out.const_data_ptr());
    p.q = static_cast<const E*>(q.const_data_ptr());
    p.k = static_cast<const E*>(k.const_data_ptr());
    p.v = static_cast<const E*>(v.const_data_ptr());
    p.out = static_cast<const E*>(out.const_data_ptr());
    p.lse = lse.const_data_ptr<float>();
    p.segments = segments32.defined() ? segments32.const_data_ptr<int32_t>() : nullptr;
    p.dq = static_cast<E*>(dq.mutable_data_ptr());
    p.dk = static_cast<E*>(dk.mutable_data_ptr());
    p.dv = static_cast<E*>(dv.mutable_data_ptr());
    p.grad_out_stride = attention_strides(grad_out);
    p.q_stride = attention_strides(q);
    p.k_stride = attention_strides(k);
    p.v_stride = attention_strides(v);
    p.out_stride = attention_strides(out);
    p.dq_stride = attention_strides(dq);
    p.dk_stride = attention_strides(dk);
    p.dv_stride = attention_strides(dv);
    p.batch = q.size(0);
    p.heads = q.size(1);
    p.kv_heads = k.size(1);
    p.tokens = q.size(2);
    p.head_dim = q.size(3);
    p.scale = static_cast<float>(scale);
    return p;
}

} // namespace qlora
