// csrc/cpu/nf4_weight_cpu.h: an NF4 weight's tensors (made contiguous) and the block-absmax view the CPU kernels
// read, built once per operator call from the operator's arguments (already validated by nf4_checks.h).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "nf4_simd.h"

namespace qlora::cpu {

struct CpuWeight {
    at::Tensor packed, absmax, nested_absmax, nested_code;
    Nf4BlockAbsmax am;

    CpuWeight(
        const at::Tensor& packed_, const at::Tensor& absmax_, const std::optional<at::Tensor>& nested_absmax_,
        const std::optional<at::Tensor>& nested_code_, const std::optional<at::Tensor>& offset
    )
        : packed(packed_.contiguous()), absmax(absmax_.contiguous()) {
        if (absmax.scalar_type() == at::kFloat) {
            am.absmax_f32 = absmax.const_data_ptr<float>();
        } else {
            nested_absmax = nested_absmax_->contiguous();
            nested_code = nested_code_->contiguous();
            am.absmax_q = absmax.const_data_ptr<uint8_t>();
            am.nested_absmax = nested_absmax.const_data_ptr<float>();
            am.nested_code = nested_code.const_data_ptr<float>();
            am.offset = offset->item<float>();
        }
    }
    const uint8_t* bytes() const { return packed.const_data_ptr<uint8_t>(); }
};

} // namespace qlora::cpu
