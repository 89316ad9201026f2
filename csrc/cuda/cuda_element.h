// csrc/cuda/cuda_element.h: the CUDA element type of an ATen element type (same size and bits), for the ATen layers
// (*_cuda.cu) that hand tensor data to the kernels of *_kernels.cuh.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora::cuda {

template <typename T> struct CudaElement { using type = T; };
template <> struct CudaElement<c10::BFloat16> { using type = __nv_bfloat16; };
template <> struct CudaElement<c10::Half> { using type = __half; };
template <typename T> using cuda_element_t = typename CudaElement<T>::type;
static_assert(sizeof(__nv_bfloat16) == sizeof(c10::BFloat16) && sizeof(__half) == sizeof(c10::Half), "same storage");

} // namespace qlora::cuda
