// tests/cpp/core/test_nf4_math.cpp: exhaustive checks of csrc/core/nf4.h and blockwise.h (no LibTorch).
//
// Expected values come from shared/spec/nf4-and-optimizer.md (float32 bit patterns of §1.1 and §1.3, the worked
// example of §1.10), from definitions (midpoints, nearest code) or from brute force, never from the code under test.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "core/blockwise.h"
#include "core/nf4.h"

namespace qlora::core {
namespace {

// Spec §1.1, float32 hex of codes 0..15.
constexpr uint32_t kSpecCodeBits[16] = {0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f,
                                        0xbdba7871, 0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a,
                                        0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};
// Spec §1.3, float32 hex of the thresholds between codes j and j+1.
constexpr uint32_t kSpecThresholdBits[15] = {0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec,
                                             0xbe0d38bc, 0xbd3a7871, 0x3d22faff, 0x3df64862, 0x3e5067e0,
                                             0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf, 0x3f5c89da};

// Reference rule by definition: the number of thresholds strictly below y.
int count_thresholds_below(float y) {
    int c = 0;
    for (int j = 0; j < kNf4Codes - 1; ++j) {
        c += (y > nf4_threshold(j)) ? 1 : 0;
    }
    return c;
}

TEST(Nf4MathTest, CodeTableMatchesSpecBits) {
    for (int c = 0; c < kNf4Codes; ++c) {
        EXPECT_EQ(bits_from_float(nf4_value(c)), kSpecCodeBits[c]) << "code " << c;
    }
}

TEST(Nf4MathTest, ThresholdsAreFloat32Midpoints) {
    for (int j = 0; j < kNf4Codes - 1; ++j) {
        const float mid = (nf4_value(j) + nf4_value(j + 1)) * 0.5f;
        EXPECT_EQ(bits_from_float(nf4_threshold(j)), bits_from_float(mid)) << "threshold " << j;
        EXPECT_EQ(bits_from_float(nf4_threshold(j)), kSpecThresholdBits[j]) << "threshold " << j;
    }
    EXPECT_TRUE(std::isinf(nf4_threshold(15)) && nf4_threshold(15) > 0) << "SIMD pad entry must be +inf";
}

TEST(Nf4MathTest, EveryCodeValueEncodesToItself) {
    for (int c = 0; c < kNf4Codes; ++c) {
        EXPECT_EQ(nf4_encode(nf4_value(c)), c);
    }
}

TEST(Nf4MathTest, TiesGoToTheLowerCodeAndNeighboursSplit) {
    for (int j = 0; j < kNf4Codes - 1; ++j) {
        const float t = nf4_threshold(j);
        EXPECT_EQ(nf4_encode(t), j) << "exact midpoint " << j << " must go to the lower code";
        EXPECT_EQ(nf4_encode(std::nextafter(t, 2.0f)), j + 1) << "one ulp above midpoint " << j;
        EXPECT_EQ(nf4_encode(std::nextafter(t, -2.0f)), j) << "one ulp below midpoint " << j;
    }
}

TEST(Nf4MathTest, SearchEqualsThresholdCountNearEveryThreshold) {
    // Every float within 4096 ulps of each threshold, both sides.
    for (int j = 0; j < kNf4Codes - 1; ++j) {
        float y = nf4_threshold(j);
        for (int k = 0; k < 4096; ++k) {
            y = std::nextafter(y, -2.0f);
        }
        for (int k = 0; k < 8193; ++k, y = std::nextafter(y, 2.0f)) {
            ASSERT_EQ(nf4_encode(y), count_thresholds_below(y)) << "y=" << y;
        }
    }
}

TEST(Nf4MathTest, SearchEqualsThresholdCountOnRandomValues) {
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> uni(-1.5f, 1.5f);
    std::normal_distribution<float> normal(0.0f, 0.3f);
    for (int i = 0; i < 2000000; ++i) {
        const float y = (i % 2 == 0) ? uni(rng) : normal(rng);
        ASSERT_EQ(nf4_encode(y), count_thresholds_below(y)) << "y=" << y;
    }
}

TEST(Nf4MathTest, EncodedCodeIsTheNearestValue) {
    // Nearest by brute force in double; the float32 midpoint may sit half an ulp off the exact one, so a value
    // within one ulp of a midpoint may take either neighbour.
    std::mt19937 rng(99);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    for (int i = 0; i < 500000; ++i) {
        const float y = uni(rng);
        const int c = nf4_encode(y);
        double best = 1e9;
        for (int k = 0; k < kNf4Codes; ++k) {
            best = std::min(best, std::fabs(double(y) - nf4_value(k)));
        }
        const double ulp = std::nextafter(std::fabs(y), 2.0f) - std::fabs(y);
        ASSERT_LE(std::fabs(double(y) - nf4_value(c)), best + ulp) << "y=" << y << " code " << c;
    }
}

TEST(Nf4MathTest, SpecialValues) {
    EXPECT_EQ(nf4_encode(std::numeric_limits<float>::quiet_NaN()), 0);
    EXPECT_EQ(nf4_encode(std::numeric_limits<float>::infinity()), 15);
    EXPECT_EQ(nf4_encode(-std::numeric_limits<float>::infinity()), 0);
    EXPECT_EQ(nf4_encode(0.0f), kNf4ZeroCode);
    EXPECT_EQ(nf4_encode(-0.0f), kNf4ZeroCode);
    EXPECT_EQ(nf4_encode(1.0000001f), 15);
    EXPECT_EQ(nf4_encode(-1.0000001f), 0);
}

TEST(Nf4MathTest, AllZeroBlockEncodesToCodeZeroAndDecodesToNegativeZero) {
    // bitsandbytes' CUDA rule (spec §1.3): absmax 0 -> scale inf -> 0 * inf = NaN -> code 0 -> -1.0 * 0 = -0.0.
    const float scale = block_scale(0.0f);
    EXPECT_TRUE(std::isinf(scale));
    EXPECT_EQ(nf4_encode_scaled(0.0f, scale), 0);
    EXPECT_EQ(nf4_encode_scaled(-0.0f, scale), 0);
    EXPECT_EQ(nf4_encode_scaled(kNf4PadValue, scale), 0) << "the pad element of an all-zero block is code 0 too";
    const float v = nf4_decode(0, 0.0f);
    EXPECT_EQ(v, 0.0f);
    EXPECT_TRUE(std::signbit(v));
}

TEST(Nf4MathTest, PadElementOfANonZeroBlockIsTheZeroCode) {
    for (float absmax : {1e-30f, 0.5f, 3.0f, 1e30f}) {
        EXPECT_EQ(nf4_encode_scaled(kNf4PadValue, block_scale(absmax)), kNf4ZeroCode) << absmax;
    }
}

TEST(Nf4MathTest, PackingRoundTripsAll256Bytes) {
    for (int b = 0; b < 256; ++b) {
        const auto byte = static_cast<uint8_t>(b);
        EXPECT_EQ(nf4_pack(nf4_unpack_even(byte), nf4_unpack_odd(byte)), byte);
    }
    for (int hi = 0; hi < 16; ++hi) {
        for (int lo = 0; lo < 16; ++lo) {
            const uint8_t byte = nf4_pack(hi, lo);
            EXPECT_EQ(byte, hi * 16 + lo) << "even element must be the high nibble";
            EXPECT_EQ(nf4_unpack_even(byte), hi);
            EXPECT_EQ(nf4_unpack_odd(byte), lo);
        }
    }
}

TEST(Nf4MathTest, SpecWorkedExample) {
    // Spec §1.10: absmax 1.0, x -> NF4 bytes C0 87 F4 9E.
    const float x[8] = {0.5f, -1.0f, 0.1f, 0.0f, 0.9f, -0.3f, 0.2f, 0.75f};
    const uint8_t expected[4] = {0xC0, 0x87, 0xF4, 0x9E};
    float m = 0.0f;
    for (float v : x) {
        m = absmax_update(m, v);
    }
    ASSERT_EQ(m, 1.0f);
    const float s = block_scale(m);
    for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(nf4_pack(nf4_encode_scaled(x[2 * i], s), nf4_encode_scaled(x[2 * i + 1], s)), expected[i]) << i;
    }
}

TEST(Nf4MathTest, RoundTripErrorIsBoundedByHalfTheWidestGap) {
    // |x / absmax - code| <= max half-gap between adjacent codes, for every element of random blocks.
    double max_half_gap = 0;
    for (int j = 0; j < kNf4Codes - 1; ++j) {
        max_half_gap = std::max(max_half_gap, (double(nf4_value(j + 1)) - nf4_value(j)) / 2);
    }
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> block(64);
    for (int rep = 0; rep < 2000; ++rep) {
        float m = 0;
        for (float& v : block) {
            v = normal(rng);
            m = absmax_update(m, v);
        }
        const float s = block_scale(m);
        for (float v : block) {
            const float back = nf4_decode(nf4_encode_scaled(v, s), m);
            ASSERT_LE(std::fabs(double(v) - back), max_half_gap * m * (1 + 1e-6)) << v << " absmax " << m;
        }
    }
}

TEST(Nf4MathTest, AbsmaxIsExactAndPropagatesNaN) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    EXPECT_EQ(absmax_update(absmax_update(0.0f, -3.5f), 2.0f), 3.5f);
    EXPECT_TRUE(std::isnan(absmax_update(absmax_update(0.0f, nan), 2.0f)));
    EXPECT_TRUE(std::isnan(absmax_update(absmax_update(0.0f, 2.0f), nan)));
    EXPECT_TRUE(std::isnan(absmax_merge(inf, nan)));
    EXPECT_TRUE(std::isnan(absmax_merge(nan, inf)));
    EXPECT_EQ(absmax_update(0.0f, -inf), inf);
    EXPECT_FALSE(is_finite(inf));
    EXPECT_FALSE(is_finite(nan));
    EXPECT_TRUE(is_finite(std::numeric_limits<float>::max()));
    EXPECT_TRUE(is_finite(std::numeric_limits<float>::denorm_min()));
}

TEST(Nf4MathTest, BlocksizeRules) {
    for (int64_t bs : {32, 64, 128, 256, 512, 1024, 2048, 4096}) {
        EXPECT_TRUE(nf4_blocksize_is_valid(bs)) << bs;
    }
    for (int64_t bs : {0, 1, 16, 48, 96, 8192, -64}) {
        EXPECT_FALSE(nf4_blocksize_is_valid(bs)) << bs;
    }
    EXPECT_EQ(nf4_num_blocks(1, 64), 1);
    EXPECT_EQ(nf4_num_blocks(64, 64), 1);
    EXPECT_EQ(nf4_num_blocks(65, 64), 2);
    EXPECT_EQ(nf4_packed_bytes(7), 4);
    EXPECT_EQ(nf4_packed_bytes(8), 4);
}

} // namespace
} // namespace qlora::core
