// csrc/cuda/launch.cuh: the one way qlora launches a CUDA kernel, and the helpers every kernel header shares.
//
// Kernel headers (csrc/cuda/*_kernels.cuh) contain no ATen: kernels take a plain params struct, launchers take that
// struct and a stream. Under nvcc, QLORA_LAUNCH is the triple-chevron launch. When a kernel header is compiled by
// the host compiler for the CPU test harness (tests/simt, which defines QLORA_SIMT_HARNESS and provides the CUDA
// built-ins), QLORA_LAUNCH runs the kernel there instead, so the same kernel source is tested without a GPU.
//
// Note [CUDA kernel rules]
// - Plain SIMT code: shared memory, __syncthreads, warp intrinsics (__shfl_*_sync, __ballot_sync, __any_sync,
//   __all_sync) and atomics. Big GEMMs go to cuBLAS on dequantized tiles. Inline PTX and tensor-core intrinsics
//   only with an emulated equivalent in the harness.
// - Every arithmetic rule comes from csrc/core (bit-exact float32 helpers), never re-derived in a kernel.
// - No ATen, no exceptions and no host allocation inside kernel headers; launchers check nothing (the ATen layer
//   validates arguments before and checks the launch status after, with C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define QLORA_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                                     \
    kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#elif defined(QLORA_SIMT_HARNESS)
#define QLORA_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                                     \
    ::qlora::simt::launch((grid), (block), (smem_bytes), [&] { kernel(__VA_ARGS__); })
#else
#error "csrc/cuda kernel headers need nvcc or the CPU SIMT harness (tests/simt)"
#endif

// Dynamic shared memory of the running block, as an array of `type` named `name`.
#if defined(__CUDACC__)
#define QLORA_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#define QLORA_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::qlora::simt::dynamic_shared())
#endif

namespace qlora::cuda {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

inline constexpr int64_t ceil_div(int64_t a, int64_t b) {
    return (a + b - 1) / b;
}

// Grid size for a grid-stride loop over `work` items with `per_block` items per block, capped so the grid stays
// within CUDA's limit (every kernel loops, so a capped grid still covers all work). `max_blocks` > 0 caps it further:
// the tests use it to make every block run several iterations of its grid-stride loop.
inline unsigned grid_for(int64_t work, int64_t per_block, int64_t max_blocks = 0) {
    const int64_t blocks = ceil_div(work, per_block);
    const int64_t cap = max_blocks > 0 ? max_blocks : int64_t{1} << 20;
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

} // namespace qlora::cuda
