// csrc/cpu/nf4_simd.h: the NF4 block kernels for the CPU, one scalar reference and two SIMD versions.
//
// Each kernel handles a range of quantization blocks [b0, b1) of the flattened tensor and is called from
// at::parallel_for by nf4_cpu.cpp. The scalar versions are the reference: they are the core functions of
// csrc/core/nf4.h applied element by element. The AVX2 and AVX-512 versions load the same core tables and apply
// the same float32 rules (one multiply by the block scale, strict `>` against the thresholds, one multiply on
// decode, round-to-nearest-even on output), so all three produce identical bytes and values; the tests check
// that on every ISA. SIMD functions carry GCC/Clang `target` attributes, so the file builds without -mavx* flags
// and the right path is picked at run time (cpu_isa.h).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../core/dynamic8.h"
#include "../core/nf4.h"
#include "cpu_isa.h"

namespace qlora::cpu {

// Where a block's float32 absmax comes from: stored directly, or rebuilt from double-quantized codes.
struct Nf4BlockAbsmax {
    const float* absmax_f32 = nullptr;    // [NB] when not double-quantized
    const uint8_t* absmax_q = nullptr;    // [NB] nested codes when double-quantized
    const float* nested_absmax = nullptr; // [NB2]
    const float* nested_code = nullptr;   // [256]
    float offset = 0.0f;

    float at(int64_t block) const {
        if (absmax_f32 != nullptr) {
            return absmax_f32[block];
        }
        return core::double_quant_absmax(
            nested_code, absmax_q[block], nested_absmax[block / core::kDoubleQuantBlockSize], offset
        );
    }
};

// Quantize blocks [b0, b1) of x (numel n, blocksize bs) with the kernel for `isa`: writes absmax[b] and the packed
// bytes of each block. A block with a non-finite absmax gets its absmax written (so the caller can report it) and
// no codes. T is float, c10::BFloat16 or c10::Half.
template <typename T>
void nf4_quantize_blocks(
    CpuIsa isa, const T* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, uint8_t* packed, float* absmax
);

// Dequantize flat elements [start, start + count) (any alignment) into out[0, count) with the kernel for `isa`.
template <typename T>
void nf4_dequantize_range(
    CpuIsa isa, const uint8_t* packed, const Nf4BlockAbsmax& am, int64_t bs, int64_t start, int64_t count, T* out
);

// Dequantize blocks [b0, b1) into out (numel n) with the kernel for `isa`.
template <typename T>
void nf4_dequantize_blocks(
    CpuIsa isa, const uint8_t* packed, const Nf4BlockAbsmax& am, int64_t n, int64_t bs, int64_t b0, int64_t b1, T* out
);

} // namespace qlora::cpu
