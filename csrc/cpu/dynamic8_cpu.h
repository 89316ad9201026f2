// csrc/cpu/dynamic8_cpu.h: blockwise dynamic-8-bit quantization on the CPU (double quantization of NF4 absmax;
// later the 8-bit optimizer states). Arithmetic: csrc/core/dynamic8.h.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace qlora::cpu {

// The 256-entry signed or unsigned dynamic map as a float32 CPU tensor (a fresh copy of the core table).
at::Tensor dynamic8_code_tensor(bool is_signed);

// Quantizes float32 x (contiguous, on CPU) in blocks of `blocksize` with a 256-entry ascending map `code` (float32,
// CPU): absmax per block, then the nearest map entry of x * (1 / absmax). Returns (codes uint8 shaped like x,
// absmax float32 [ceil(n / bs)]).
std::tuple<at::Tensor, at::Tensor>
dynamic8_quantize_blocks_cpu(const at::Tensor& x, int64_t blocksize, const at::Tensor& code);

// Checks that a user-supplied map is strictly ascending (the encoder's binary search needs it); `op` names the caller.
void dynamic8_check_code_sorted(const at::Tensor& code, const char* op);

} // namespace qlora::cpu
