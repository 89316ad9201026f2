// csrc/cpu/adamw_cpu.cpp: CPU kernels of qlora::adamw8bit_step, qlora::adamw32bit_step and the paging ops.
//
// Work is split over 256-element blocks (8-bit) or element ranges (32-bit) with at::parallel_for; each range runs
// the kernel of the ISA chosen at run time (adamw_simd.h). On the CPU "paged" state is ordinary memory: there is no
// device memory to evict it from (spec §5: bitsandbytes also falls back to plain CPU tensors).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../adamw_checks.h"
#include "adamw_simd.h"
#include "cpu_isa.h"
#include "dynamic8_lut.h"

namespace qlora::cpu {
namespace {

constexpr int64_t kBlocksPerTask = 64; // 16 Ki elements per parallel task
constexpr int64_t kElementsPerTask = int64_t{1} << 15;

void adamw8bit_step_cpu(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
    at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, int64_t step, double lr, double beta1,
    double beta2, double eps, double weight_decay
) {
    adamw8_check_args(
        param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1, beta2, eps, weight_decay
    );
    const core::AdamwScalars s = core::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
    const std::shared_ptr<const Dynamic8Lut> lut1 = dynamic8_lut(qmap1.const_data_ptr<float>(), /*is_signed=*/true);
    const std::shared_ptr<const Dynamic8Lut> lut2 = dynamic8_lut(qmap2.const_data_ptr<float>(), /*is_signed=*/false);
    const CpuIsa isa = cpu_isa();
    visit_float_dtype(param.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const core::Adamw8Params<T> p =
            adamw8_params<T>(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, s);
        at::parallel_for(0, adamw8_num_blocks(p.n), kBlocksPerTask, [&](int64_t b0, int64_t b1) {
            adamw8_blocks(isa, p, lut1.get(), lut2.get(), b0, b1);
        });
    });
}

void adamw32bit_step_cpu(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, int64_t step, double lr,
    double beta1, double beta2, double eps, double weight_decay
) {
    adamw32_check_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay);
    const core::AdamwScalars s = core::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
    const CpuIsa isa = cpu_isa();
    visit_float_dtype(param.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const core::Adamw32Params<T> p = adamw32_params<T>(param, grad, exp_avg, exp_avg_sq, s);
        at::parallel_for(0, p.n, kElementsPerTask, [&](int64_t i0, int64_t i1) { adamw32_range(isa, p, i0, i1); });
    });
}

at::Tensor paged_zeros_cpu(const at::Tensor& like, at::ScalarType dtype) {
    return at::zeros(like.sizes(), like.options().dtype(dtype));
}

void paged_prefetch_cpu(const at::Tensor&) {}

} // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
    m.impl("adamw8bit_step", &adamw8bit_step_cpu);
    m.impl("adamw32bit_step", &adamw32bit_step_cpu);
    m.impl("paged_zeros", &paged_zeros_cpu);
    m.impl("paged_prefetch", &paged_prefetch_cpu);
}

} // namespace qlora::cpu
