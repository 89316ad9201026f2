// csrc/cpu/cpu_isa.h: which SIMD instruction set the CPU kernels use, chosen at run time.
//
// One binary runs everywhere: every SIMD kernel is compiled with a GCC/Clang `target` attribute and selected by
// cpu_isa(), which reads the CPU's features once. QLORA_CPU_ISA=scalar|avx2|avx512 in the environment, or
// set_cpu_isa() (the op qlora::_set_cpu_isa), lowers the choice so tests can run every path on one machine; asking
// for an ISA the CPU lacks is an error.
#pragma once

#include <string>

namespace qlora::cpu {

enum class CpuIsa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Best ISA this CPU supports: kAvx512 needs AVX-512 F/BW/DQ/VL; kAvx2 needs AVX2, FMA and F16C.
CpuIsa cpu_isa_supported();
// ISA the kernels use now (the supported one unless lowered).
CpuIsa cpu_isa();
// Lowers (or restores) the ISA; throws c10::Error if the CPU does not support it.
void set_cpu_isa(CpuIsa isa);

// Whether the CPU has AVX-512 VBMI (used inside the kAvx512 kernels where it helps, with a VBMI-free twin).
bool cpu_has_avx512_vbmi();
// Whether the CPU has AVX-512 BF16 (VDPBF16PS; used by the kAvx512 bfloat16 attention products).
bool cpu_has_avx512_bf16();

const char* cpu_isa_name(CpuIsa isa);
// Parses "scalar", "avx2" or "avx512"; throws c10::Error naming `what` otherwise.
CpuIsa cpu_isa_from_name(const std::string& name, const char* what);

} // namespace qlora::cpu
