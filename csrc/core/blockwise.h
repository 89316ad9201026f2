// csrc/core/blockwise.h: rules shared by every blockwise format (NF4, dynamic 8-bit).
//
// defines: absmax_update / absmax_merge (running max of |x| that keeps NaN), is_finite, block_scale (the float32
// reciprocal of a block's absmax that every element is multiplied by).
#pragma once

#include "macros.h"

namespace qlora::core {

// Running max of |x| that propagates NaN (fmaxf would drop it): a block holding NaN or Inf ends with a
// non-finite absmax, which the ops report as an error naming the block. absmax_update folds one element in,
// absmax_merge combines two partial maxima (non-negative or NaN). The exact max is taken (no epsilon; spec §1.3).
QLORA_HD QLORA_INLINE float absmax_merge(float m, float a) {
    return (a > m || is_nan(a)) ? a : m;
}
QLORA_HD QLORA_INLINE float absmax_update(float m, float x) {
    return absmax_merge(m, abs_exact(x));
}

QLORA_HD QLORA_INLINE bool is_finite(float x) {
    return (bits_from_float(x) & 0x7f800000u) != 0x7f800000u;
}

// Scale applied to every element of a block: the correctly rounded float32 reciprocal of its absmax. bitsandbytes
// multiplies by 1/absmax rather than dividing (spec §1.3 step 3, §2.3); its CUDA build uses an approximate
// reciprocal, see Note [NF4 reciprocal] in nf4.h. absmax == 0 gives +inf, so every element of an all-zero block
// becomes 0 * inf = NaN, which both encoders map to code 0: bitsandbytes' CUDA behaviour, the bytes found in
// checkpoints (spec §1.3 "All-zero block").
QLORA_HD QLORA_INLINE float block_scale(float absmax) {
    return fdiv_rn(1.0f, absmax);
}

} // namespace qlora::core
