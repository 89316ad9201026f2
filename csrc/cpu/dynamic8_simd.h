// csrc/cpu/dynamic8_simd.h: dynamic-8-bit encoding of a run of values on the CPU, scalar and SIMD.
//
// The scalar version applies core::dynamic8_encode element by element. The AVX2 and AVX-512 versions run the same
// search on 8 or 16 lanes at once, branch-free (the data-dependent branches of the scalar search mispredict about
// half the time): the same pivots, the same strict comparisons, the same float32 midpoints, so all three return
// identical codes (tests compare them).
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace qlora::cpu {

// q[i] = dynamic8_encode(code, x[i] * scale) for i in [0, n). `code` is a 256-entry ascending map.
void dynamic8_encode_run(CpuIsa isa, const float* code, const float* x, float scale, int64_t n, uint8_t* q);

} // namespace qlora::cpu
