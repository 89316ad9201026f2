// csrc/cuda/nf4_weight.cuh: a read-only view of an NF4 weight for CUDA kernels (raw pointers, no ATen), and the
// per-element decode every NF4 kernel uses: the block absmax (plain or double-quantized, core::double_quant_absmax)
// and core::nf4_decode.
#pragma once

#include "../core/dynamic8.h"
#include "../core/nf4.h"
#include "launch.cuh"

namespace qlora::cuda {

// Where a block's absmax comes from (plain float32, or double-quantized), as in Nf4DequantizeParams.
struct Nf4WeightView {
    const uint8_t* packed;
    const float* absmax_f32;
    const uint8_t* absmax_q;
    const float* nested_absmax;
    const float* nested_code;
    const float* offset;
    int64_t blocksize;
};

__device__ QLORA_INLINE float weight_block_absmax(const Nf4WeightView& w, int64_t b) {
    return (w.absmax_f32 != nullptr)
               ? w.absmax_f32[b]
               : core::double_quant_absmax(
                     w.nested_code, w.absmax_q[b], w.nested_absmax[b / core::kDoubleQuantBlockSize], *w.offset
                 );
}

__device__ QLORA_INLINE float weight_at(const Nf4WeightView& w, int64_t i) {
    const uint8_t v = w.packed[i / 2];
    const int code = (i % 2 == 0) ? core::nf4_unpack_even(v) : core::nf4_unpack_odd(v);
    return core::nf4_decode(code, weight_block_absmax(w, i / w.blocksize));
}

} // namespace qlora::cuda
