// csrc/cuda/cuda_weight.h: the ATen side of Nf4WeightView. Makes an NF4 weight's tensors contiguous, keeps them alive
// for the kernels' duration, and fills the raw-pointer view the kernels take. Arguments are validated before
// (nf4_checks.h).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "nf4_weight.cuh"

namespace qlora::cuda {

struct CudaWeight {
    at::Tensor packed, absmax, nested_absmax, nested_code, offset;
    Nf4WeightView view{};

    CudaWeight(
        const at::Tensor& packed_, const at::Tensor& absmax_, const std::optional<at::Tensor>& nested_absmax_,
        const std::optional<at::Tensor>& nested_code_, const std::optional<at::Tensor>& offset_, int64_t blocksize
    )
        : packed(packed_.contiguous()), absmax(absmax_.contiguous()) {
        view.packed = packed.const_data_ptr<uint8_t>();
        view.blocksize = blocksize;
        if (absmax.scalar_type() == at::kFloat) {
            view.absmax_f32 = absmax.const_data_ptr<float>();
        } else {
            nested_absmax = nested_absmax_->contiguous();
            nested_code = nested_code_->contiguous();
            offset = offset_->contiguous();
            view.absmax_q = absmax.const_data_ptr<uint8_t>();
            view.nested_absmax = nested_absmax.const_data_ptr<float>();
            view.nested_code = nested_code.const_data_ptr<float>();
            view.offset = offset.const_data_ptr<float>();
        }
    }
};

} // namespace qlora::cuda
