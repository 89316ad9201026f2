// csrc/cuda/convert.cuh: element conversions shared by the CUDA kernels (load as float32; store with round to nearest
// even), for float, __nv_bfloat16 and __half. Under the CPU SIMT harness the same names come from tests/simt/simt.h.
#pragma once

#include "../core/macros.h"
#include "launch.cuh"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace qlora::cuda {

__device__ QLORA_INLINE float to_float(float v) {
    return v;
}
__device__ QLORA_INLINE float to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
__device__ QLORA_INLINE float to_float(__half v) {
    return __half2float(v);
}

template <typename T> __device__ QLORA_INLINE T from_float(float v);
template <> __device__ QLORA_INLINE float from_float<float>(float v) {
    return v;
}
template <> __device__ QLORA_INLINE __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ QLORA_INLINE __half from_float<__half>(float v) {
    return __float2half_rn(v);
}

} // namespace qlora::cuda
