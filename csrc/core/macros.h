// csrc/core/macros.h: portability macros for the torch-free core math shared by host and device code.
//
// Everything under csrc/core/ is header-only, includes no torch header, and compiles three ways:
//   - by the host C++ compiler for the CPU kernels and the GoogleTest suite (QLORA_HD empty),
//   - by nvcc for the CUDA kernels (__host__ __device__),
//   - by the host compiler again when a CUDA kernel header is run on the CPU by the test harness.
// Floating-point rounding is spelled out: every multiply and add that must be bit-exact goes through
// fmul_rn / fadd_rn / fdiv_rn, which never contract into an FMA on either side (the host build also passes
// -ffp-contract=off). See Note [Exact float32 arithmetic].
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__
#define QLORA_INLINE __forceinline__
#else
#define QLORA_HD
#define QLORA_INLINE inline
#endif

// One literal list feeds both compilers (the ggml-common.h pattern). QLORA_DEFINE_TABLE(type, name, n, ...)
// defines name##_host (constexpr, host) and, under nvcc, name##_dev in device global memory; QLORA_TABLE_AT
// reads whichever one the current compilation pass can see.
#if defined(__CUDACC__)
#define QLORA_DEFINE_TABLE(type, name, n, ...)                                                                         \
    inline constexpr type name##_host[n] = {__VA_ARGS__};                                                              \
    static __device__ const type name##_dev[n] = {__VA_ARGS__}
#else
#define QLORA_DEFINE_TABLE(type, name, n, ...) inline constexpr type name##_host[n] = {__VA_ARGS__}
#endif

#if defined(__CUDA_ARCH__)
#define QLORA_TABLE_AT(name, i) (name##_dev[(i)])
#else
#define QLORA_TABLE_AT(name, i) (name##_host[(i)])
#endif

namespace qlora::core {

// Note [Exact float32 arithmetic]
// The NF4 and dynamic-8-bit rules are defined on float32 values with round-to-nearest-even after every single
// operation (bitsandbytes' formats are specified that way; see shared/spec/nf4-and-optimizer.md §1.3, §1.7,
// §2.4). nvcc contracts a*b+c into an FMA by default and host compilers may too; the helpers below pin the
// rounding: __fmul_rn/__fadd_rn/__fdiv_rn are never contracted on the device, and host code is built with
// -ffp-contract=off so a plain expression rounds once per operation.
QLORA_HD QLORA_INLINE float fmul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

QLORA_HD QLORA_INLINE float fadd_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

QLORA_HD QLORA_INLINE float fdiv_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

// Correctly rounded square root (IEEE sqrt is exact-rounded on both sides; the device default is not under
// --use_fast_math, hence the explicit intrinsic).
QLORA_HD QLORA_INLINE float fsqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#else
    return __builtin_sqrtf(a);
#endif
}

QLORA_HD QLORA_INLINE float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
#endif
}

QLORA_HD QLORA_INLINE uint32_t bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return u;
#endif
}

QLORA_HD QLORA_INLINE bool is_nan(float x) {
    return x != x;
}

// |x| without relying on libm (identical on host and device; clears the sign bit, keeps NaN payloads).
QLORA_HD QLORA_INLINE float abs_exact(float x) {
    return float_from_bits(bits_from_float(x) & 0x7fffffffu);
}

} // namespace qlora::core
