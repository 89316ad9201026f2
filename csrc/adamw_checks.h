// csrc/adamw_checks.h: argument checks of the optimizer ops, shared by the CPU, CUDA and Meta kernels so every
// backend rejects the same inputs with the same message, and the host-side parameter struct fill.
//
// Shapes (n = param.numel(), NB = ceil(n / 256)):
//   param, grad            float32 | bfloat16 | float16, same dtype, same numel, contiguous
//   state1, state2         uint8 [n]     (adamw8bit_step; any shape with n elements, contiguous)
//   absmax1, absmax2       float32 [NB]
//   qmap1, qmap2           float32 [256] signed / unsigned dynamic map
//   exp_avg, exp_avg_sq    float32 [n]   (adamw32bit_step)
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "core/adamw.h"
#include "dtype_visit.h"

namespace qlora {

inline int64_t adamw8_num_blocks(int64_t n) {
    return (n + core::kAdamw8BlockSize - 1) / core::kAdamw8BlockSize;
}
inline c10::SymInt adamw8_num_blocks(const c10::SymInt& n) {
    return (n + core::kAdamw8BlockSize - 1) / core::kAdamw8BlockSize;
}

// The scalar arguments; every optimizer front end forwards user values here, so these are the user-facing errors.
inline void adamw_check_hyper(
    const char* op, int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay
) {
    TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count including this update), got ", step);
    TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, op, ": lr must be finite and >= 0, got ", lr);
    TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
    TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
    TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
    TORCH_CHECK(
        std::isfinite(weight_decay) && weight_decay >= 0.0, op, ": weight_decay must be finite and >= 0, got ",
        weight_decay
    );
}

// A state tensor: dtype, element count, device and layout. (Sym sizes: the Meta kernels run under torch.compile.)
inline void adamw_check_state(
    const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, const c10::SymInt& numel,
    const at::Tensor& param
) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(
        t.sym_numel() == numel, op, ": ", name, " must have ", numel, " elements, got ", t.sym_numel(), " (shape ",
        t.sym_sizes(), ")"
    );
    TORCH_CHECK(
        t.device() == param.device(), op, ": ", name, " is on ", t.device(), " but param is on ", param.device()
    );
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void adamw_check_param_grad(const char* op, const at::Tensor& param, const at::Tensor& grad) {
    const at::ScalarType t = param.scalar_type();
    TORCH_CHECK(
        t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
        ": param must be float32, bfloat16 or float16, got ", t
    );
    TORCH_CHECK(param.sym_numel() > 0, op, ": param is empty");
    TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous");
    TORCH_CHECK(grad.scalar_type() == t, op, ": grad must have param's dtype ", t, ", got ", grad.scalar_type());
    TORCH_CHECK(
        grad.sym_sizes() == param.sym_sizes(), op, ": grad shape ", grad.sym_sizes(), " differs from param shape ",
        param.sym_sizes()
    );
    TORCH_CHECK(
        grad.device() == param.device(), op, ": grad is on ", grad.device(), " but param is on ", param.device()
    );
    TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous");
}

inline void adamw8_check_args(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1, const at::Tensor& state2,
    const at::Tensor& absmax1, const at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
    int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay
) {
    constexpr const char* op = "qlora::adamw8bit_step";
    adamw_check_param_grad(op, param, grad);
    const c10::SymInt n = param.sym_numel();
    adamw_check_state(op, "state1", state1, at::kByte, n, param);
    adamw_check_state(op, "state2", state2, at::kByte, n, param);
    adamw_check_state(op, "absmax1", absmax1, at::kFloat, adamw8_num_blocks(n), param);
    adamw_check_state(op, "absmax2", absmax2, at::kFloat, adamw8_num_blocks(n), param);
    adamw_check_state(op, "qmap1", qmap1, at::kFloat, core::kDynamic8Codes, param);
    adamw_check_state(op, "qmap2", qmap2, at::kFloat, core::kDynamic8Codes, param);
    adamw_check_hyper(op, step, lr, beta1, beta2, eps, weight_decay);
}

inline void adamw32_check_args(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
    int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay
) {
    constexpr const char* op = "qlora::adamw32bit_step";
    adamw_check_param_grad(op, param, grad);
    adamw_check_state(op, "exp_avg", exp_avg, at::kFloat, param.sym_numel(), param);
    adamw_check_state(op, "exp_avg_sq", exp_avg_sq, at::kFloat, param.sym_numel(), param);
    adamw_check_hyper(op, step, lr, beta1, beta2, eps, weight_decay);
}

// The kernel parameters of checked tensors. T is the kernel's element type for param's dtype: float, c10::BFloat16 /
// c10::Half on the CPU, __nv_bfloat16 / __half on CUDA (same sizes and bits; the dtype was checked by the caller).
template <typename T>
core::Adamw8Params<T> adamw8_params(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
    at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, const core::AdamwScalars& s
) {
    core::Adamw8Params<T> p{};
    p.param = static_cast<T*>(param.data_ptr());
    p.grad = static_cast<const T*>(grad.const_data_ptr());
    p.state1 = state1.data_ptr<uint8_t>();
    p.state2 = state2.data_ptr<uint8_t>();
    p.absmax1 = absmax1.data_ptr<float>();
    p.absmax2 = absmax2.data_ptr<float>();
    p.qmap1 = qmap1.const_data_ptr<float>();
    p.qmap2 = qmap2.const_data_ptr<float>();
    p.n = param.numel();
    p.scalars = s;
    return p;
}

template <typename T>
core::Adamw32Params<T> adamw32_params(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const core::AdamwScalars& s
) {
    core::Adamw32Params<T> p{};
    p.param = static_cast<T*>(param.data_ptr());
    p.grad = static_cast<const T*>(grad.const_data_ptr());
    p.exp_avg = exp_avg.data_ptr<float>();
    p.exp_avg_sq = exp_avg_sq.data_ptr<float>();
    p.n = param.numel();
    p.scalars = s;
    return p;
}

} // namespace qlora
