// csrc/cpu/adamw_simd.h: the CPU AdamW kernels, one range of blocks or elements at a time (the op splits the tensor
// over threads), scalar, AVX2 and AVX-512.
//
// The scalar kernels compose csrc/core/adamw.h element by element and are the reference. The AVX-512 8-bit kernel
// does the same float32 operations in the same order on 16 lanes; it decodes states with VBMI byte permutes (Note
// [Byte-plane decode]) or, without VBMI, float permutes, and encodes them with the segment-affine rule of
// dynamic8_lut.h (Note [Segment-affine nearest code]) or its bucketed lookup, instead of the binary search. The AVX2
// kernels are the same on 8 lanes with gathers for both. Tests require identical bytes from all of them.
#pragma once

#include <cstdint>

#include "../core/adamw.h"
#include "cpu_isa.h"
#include "dynamic8_lut.h"

namespace qlora::cpu {

// Blocks [b0, b1) of 256 elements (the last block of the tensor may be short). lut1 / lut2 are the tables of
// params.qmap1 / qmap2, or nullptr to use the binary search.
template <typename T>
void adamw8_blocks(
    CpuIsa isa, const core::Adamw8Params<T>& params, const Dynamic8Lut* lut1, const Dynamic8Lut* lut2, int64_t b0,
    int64_t b1
);

// Elements [i0, i1).
template <typename T> void adamw32_range(CpuIsa isa, const core::Adamw32Params<T>& params, int64_t i0, int64_t i1);

// The state codes adamw8_blocks writes, for tests: q[i] = core::adamw8_encode_m(map, x[i], scale) for a signed
// table (sign fix included), core::adamw8_encode_v(map, x[i], scale) for an unsigned one, on the ISA's vector path.
// Preconditions of that path (Note [AdamW8 AVX-512 encoding]): scale > 0 and finite, every |x[i] · scale| < 2 (the
// kernel's scaled states are at most 1 + 2^-23), x[i] >= +0 for an unsigned table.
void adamw8_encode_run(CpuIsa isa, const Dynamic8Lut& lut, const float* x, float scale, int64_t n, uint8_t* q);

// The map values adamw8_blocks decodes states to, for tests and benchmarks: out[i] = map[q[i]] for the map `lut` was
// built from, on the ISA's vector path (AVX-512: VBMI byte planes when adamw8_vbmi_decode(), else float permutes;
// AVX2 and scalar: a plain lookup).
void adamw8_decode_run(CpuIsa isa, const Dynamic8Lut& lut, const uint8_t* q, int64_t n, float* out);

// Whether the AVX-512 8-bit kernel decodes states with VBMI byte permutes (Note [Byte-plane decode]); on by default
// where the CPU has VBMI. Tests turn it off to run the VBMI-free decode on the same machine; enabling it on a CPU
// without VBMI throws.
bool adamw8_vbmi_decode();
void set_adamw8_vbmi_decode(bool enabled);

} // namespace qlora::cpu
