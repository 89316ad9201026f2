// csrc/core/adamw.h: the AdamW element update of bitsandbytes' 8-bit blockwise and 32-bit optimizers.
//
// defines: the 8-bit state layout constants, AdamwScalars (the per-step constants, computed once on the host),
// the moment updates with the non-finite-gradient rule, the parameter delta, the first-moment sign fix, the
// tail-block padding term, and the state encoders. The CPU kernels (csrc/cpu/adamw_cpu.cpp) and the CUDA kernels
// (csrc/cuda/adamw_kernels.cuh) compose these; every rounding is explicit (Note [Exact float32 arithmetic]), so
// both give the same bytes. Facts: shared/spec/nf4-and-optimizer.md §4.2-§4.5.
//
// Note [AdamW8 update order]
// One step of a 256-element block (spec §4.3, bitsandbytes' CUDA kernel):
//   1. m = qmap1[state1]·absmax1, v = qmap2[state2]·absmax2 (old block absmax); if g is finite,
//      v = v·β2 + ((1−β2)·g)·g and m = m·β1 + (1−β1)·g; if g is NaN or ±Inf, m = v = 0 and p is left alone.
//   2. absmax1 = max |m|, absmax2 = max |v| over the block, from these fresh float32 values (for a tail block
//      also over the padding lanes, see adamw8_padding_m).
//   3. p = T(p + step_size·(m / (sqrt(v) + eps_hat))), then, if weight_decay > 0, p = T(p·(1 − lr·wd)): decay
//      after the update, to the already rounded p (the CUDA order of spec §4.4; torch.optim.AdamW decays first,
//      a difference of O(lr²·wd·|update|) per step).
//   4. state1 = sign-fixed nearest(qmap1, m · (1 / absmax1)), state2 = nearest(qmap2, v · (1 / absmax2)).
// Deviations from bitsandbytes' CUDA build, which compiles with --use_fast_math: β^t, sqrt and the division of the
// update are correctly rounded here (spec §4.7), and nothing is contracted into an FMA. The states are scaled by
// the correctly rounded reciprocal of the block absmax (block_scale, as every other blockwise quantizer here and
// bitsandbytes' CPU quantizer do), where the CUDA kernel calls __fdividef(m, absmax), itself a multiply by an
// approximate reciprocal. So codes can differ from a GPU run of bitsandbytes where a value sits within a rounding
// of a decision point; the layout, maps, order and edge rules are the same.
//
// Note [Non-finite gradients]
// The 8-bit rule above (reset that element's moments, leave p alone) is bitsandbytes' documented CUDA behaviour.
// bitsandbytes' 32-bit kernel has no such rule (a NaN gradient turns m, v and p into NaN for good); ours applies
// the same reset there too, so one bad element never poisons the state. Neither variant raises: the optimizer
// cannot know which elements were skipped without a second pass, and a trainer that cares (loss scaling, NaN loss
// guards) checks the loss or gradient norm before stepping.
#pragma once

#include <cmath>

#include "blockwise.h"
#include "dynamic8.h"

namespace qlora::core {

inline constexpr int kAdamw8BlockSize = 256;     // elements per absmax (bitsandbytes >= 0.44, spec §4.2)
inline constexpr int64_t kAdamw8MinNumel = 4096; // smaller tensors keep float32 states (`min_8bit_size`)
inline constexpr uint8_t kAdamw8PadCode1 = 128;  // state1 code a padding lane of a tail block loads (§4.3)

// Per-step constants of one tensor. adamw_scalars computes them in double precision and rounds each once to
// float32, so every backend uses the same bits.
struct AdamwScalars {
    float beta1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float step_size; // -lr · sqrt(1 - β2^t) / (1 - β1^t)
    float eps_hat;   // eps · sqrt(1 - β2^t)
    float decay;     // 1 - lr · weight_decay
    bool has_decay;  // weight_decay != 0
};

// Host only. `step` is t >= 1, the count including this update (bitsandbytes increments before updating).
inline AdamwScalars
adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bias2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
    AdamwScalars s{};
    s.beta1 = static_cast<float>(beta1);
    s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    s.beta2 = static_cast<float>(beta2);
    s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    s.step_size = static_cast<float>(-lr * bias2_sqrt / bias1);
    s.eps_hat = static_cast<float>(eps * bias2_sqrt);
    s.decay = static_cast<float>(1.0 - lr * weight_decay);
    s.has_decay = weight_decay != 0.0;
    return s;
}

// --------------------------------------------------------------------------------------------------------------
// Element update

// m·β1 + (1−β1)·g
QLORA_HD QLORA_INLINE float adamw_first_moment(float m, float g, const AdamwScalars& s) {
    return fadd_rn(fmul_rn(m, s.beta1), fmul_rn(s.one_minus_beta1, g));
}

// v·β2 + ((1−β2)·g)·g
QLORA_HD QLORA_INLINE float adamw_second_moment(float v, float g, const AdamwScalars& s) {
    return fadd_rn(fmul_rn(v, s.beta2), fmul_rn(fmul_rn(s.one_minus_beta2, g), g));
}

// Updates *m and *v in place from gradient g; returns false (and zeroes both) when g is not finite, in which case
// the caller leaves the parameter untouched (Note [Non-finite gradients]).
QLORA_HD QLORA_INLINE bool adamw_update_moments(float g, float* m, float* v, const AdamwScalars& s) {
    if (!is_finite(g)) {
        *m = 0.0f;
        *v = 0.0f;
        return false;
    }
    *m = adamw_first_moment(*m, g, s);
    *v = adamw_second_moment(*v, g, s);
    return true;
}

// step_size · (m / (sqrt(v) + eps_hat)): the amount added to the parameter (before rounding to its dtype).
QLORA_HD QLORA_INLINE float adamw_delta(float m, float v, const AdamwScalars& s) {
    return fmul_rn(s.step_size, fdiv_rn(m, fadd_rn(fsqrt_rn(v), s.eps_hat)));
}

// The new parameter as a float32 value for the caller to store in the parameter dtype T: p + delta rounded to T
// (`round_to_param(x)` returns T(x) widened back to float32), then, with weight decay, that rounded value times
// (1 − lr·wd), which the caller's store rounds to T again: two roundings, in bitsandbytes' order (Note [AdamW8 update
// order] step 3). Without decay the result is already a T value, so the store is exact.
template <typename RoundToParam>
QLORA_HD QLORA_INLINE float adamw_new_param(float p, float delta, const AdamwScalars& s, RoundToParam round_to_param) {
    const float stepped = round_to_param(fadd_rn(p, delta));
    return s.has_decay ? fmul_rn(stepped, s.decay) : stepped;
}

// --------------------------------------------------------------------------------------------------------------
// 8-bit states

// |m| of a padding lane of a tail block (n % 256 != 0): bitsandbytes' kernel loads g = 0 and state1 code 128 there
// and folds the result into the block's new absmax1 (spec §4.3 step 2). It is about 5e-7 of the old absmax and
// matters only when every real m of the tail block is smaller; the same value keeps our bytes equal to theirs.
// Padding lanes of state2 load code 0 (value 0), so they never change absmax2.
QLORA_HD QLORA_INLINE float adamw8_padding_m(const float* qmap1, float absmax1_old, const AdamwScalars& s) {
    return abs_exact(adamw_first_moment(dynamic8_decode(qmap1, kAdamw8PadCode1, absmax1_old), 0.0f, s));
}

// First-moment code with bitsandbytes' sign fix: if the nearest code's value has the other sign bit than m, move
// one code toward m's sign (code + 1 for m > 0, else code - 1, wrapping like uint8). So a negative m never encodes
// to +0 (code 127), and m = +0 in an all-zero block (absmax 0, y = NaN -> code 0) becomes code 255; both decode to
// a value of m's sign or to 0.
QLORA_HD QLORA_INLINE uint8_t adamw8_sign_fix(const float* qmap1, uint8_t code, float m) {
    const bool code_negative = (bits_from_float(qmap1[code]) >> 31) != 0;
    const bool m_negative = (bits_from_float(m) >> 31) != 0;
    if (code_negative == m_negative) {
        return code;
    }
    return static_cast<uint8_t>(m > 0.0f ? code + 1 : code - 1);
}

// state1 code of m in a block whose absmax has block_scale `scale1` (= 1 / absmax1): sign-fixed
// nearest(qmap1, m · scale1).
QLORA_HD QLORA_INLINE uint8_t adamw8_encode_m(const float* qmap1, float m, float scale1) {
    return adamw8_sign_fix(qmap1, dynamic8_encode(qmap1, fmul_rn(m, scale1)), m);
}

// state2 code of v in a block whose absmax has block_scale `scale2`: nearest(qmap2, v · scale2).
QLORA_HD QLORA_INLINE uint8_t adamw8_encode_v(const float* qmap2, float v, float scale2) {
    return dynamic8_encode(qmap2, fmul_rn(v, scale2));
}

// --------------------------------------------------------------------------------------------------------------
// Kernel interface: raw pointers and sizes only (no ATen), filled by the op and read by the CPU and CUDA kernels.

// One tensor of n elements with 8-bit states; T is the parameter and gradient type (float, bfloat16 or float16).
template <typename T> struct Adamw8Params {
    T* param;           // [n], updated in place
    const T* grad;      // [n]
    uint8_t* state1;    // [n] first-moment codes into qmap1
    uint8_t* state2;    // [n] second-moment codes into qmap2
    float* absmax1;     // [ceil(n / 256)]
    float* absmax2;     // [ceil(n / 256)]
    const float* qmap1; // [256] signed dynamic map
    const float* qmap2; // [256] unsigned dynamic map
    int64_t n;
    AdamwScalars scalars;
};

// One tensor of n elements with float32 states.
template <typename T> struct Adamw32Params {
    T* param;          // [n], updated in place
    const T* grad;     // [n]
    float* exp_avg;    // [n] m
    float* exp_avg_sq; // [n] v
    int64_t n;
    AdamwScalars scalars;
};

} // namespace qlora::core
