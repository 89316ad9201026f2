// tests/cpp/ops/test_simd_exp.cpp: simd::exp16 (csrc/cpu/simd_x86.h), the e^x of the CPU attention kernel, against
// the correctly rounded float32 of the float64 std::exp: at most 2 ulp on [-87, 88], and its edge values.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <gtest/gtest.h>

#include "cpu/cpu_isa.h"
#include "cpu/simd_x86.h"

#if defined(QLORA_X86)
namespace {

QLORA_AVX512 void exp16_of(const float* x, float* y) {
    _mm512_storeu_ps(y, qlora::cpu::simd::exp16(_mm512_loadu_ps(x)));
}

// Distance in representable float32 values between two finite non-negative floats.
int64_t ulp_distance(float a, float b) {
    int32_t ia, ib;
    std::memcpy(&ia, &a, 4);
    std::memcpy(&ib, &b, 4);
    return std::abs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

bool has_avx512() {
    return qlora::cpu::cpu_isa_supported() == qlora::cpu::CpuIsa::kAvx512;
}

TEST(SimdExpTest, WithinTwoUlpOnTheNormalRange) {
    if (!has_avx512()) {
        GTEST_SKIP() << "no AVX-512 on this CPU";
    }
    int64_t worst = 0;
    float x[16], y[16];
    // 2^21 points spread over [-87, 88] (every 16 share a vector), plus the neighbourhood of 0.
    const int64_t n = int64_t{1} << 21;
    for (int64_t i = 0; i < n; i += 16) {
        for (int l = 0; l < 16; ++l) {
            x[l] = static_cast<float>(-87.0 + 175.0 * static_cast<double>(i + l) / static_cast<double>(n));
        }
        exp16_of(x, y);
        for (int l = 0; l < 16; ++l) {
            const float want = static_cast<float>(std::exp(static_cast<double>(x[l])));
            worst = std::max(worst, ulp_distance(y[l], want));
        }
    }
    EXPECT_LE(worst, 2);
}

TEST(SimdExpTest, EdgeValues) {
    if (!has_avx512()) {
        GTEST_SKIP() << "no AVX-512 on this CPU";
    }
    const float inf = std::numeric_limits<float>::infinity();
    float x[16] = {0.0f, -0.0f, 1.0f,  -1.0f,  -104.0f, -200.0f, -inf,    89.0f,
                   inf,  NAN,   1e-8f, -1e-8f, 88.5f,   -87.3f,  -103.0f, 0.5f};
    float y[16];
    exp16_of(x, y);
    EXPECT_EQ(y[0], 1.0f);
    EXPECT_EQ(y[1], 1.0f);
    EXPECT_LE(ulp_distance(y[2], std::exp(1.0f)), 2);
    EXPECT_EQ(y[4], 0.0f);
    EXPECT_EQ(y[5], 0.0f);
    EXPECT_EQ(y[6], 0.0f); // masked scores are -inf: they must give exactly 0
    EXPECT_EQ(y[7], inf);
    EXPECT_EQ(y[8], inf);
    EXPECT_TRUE(std::isnan(y[9])); // a NaN score must not turn into a probability of 0
    EXPECT_EQ(y[10], 1.0f);
    EXPECT_LE(ulp_distance(y[12], static_cast<float>(std::exp(static_cast<double>(x[12])))), 2);
    EXPECT_LE(ulp_distance(y[13], static_cast<float>(std::exp(static_cast<double>(x[13])))), 2);
    EXPECT_GE(y[14], 0.0f); // subnormal range: no accuracy promise, but never negative or NaN
    EXPECT_LT(y[14], 1e-44f);
}

} // namespace
#endif
