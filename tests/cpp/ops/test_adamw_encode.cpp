// tests/cpp/ops/test_adamw_encode.cpp: the CPU's bucketed nearest-code table (csrc/cpu/dynamic8_lut.h) and the AdamW
// state encoders built on it (csrc/cpu/adamw_simd.h) against bitsandbytes' binary search (core::dynamic8_encode), on
// the values where a lookup can go wrong: every decision point of both maps and its float neighbours, every bucket
// boundary, the map entries themselves, and random values over the whole range.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "core/adamw.h"
#include "core/dynamic8.h"
#include "cpu/adamw_simd.h"
#include "cpu/cpu_isa.h"
#include "cpu/dynamic8_lut.h"

namespace {

using qlora::core::bits_from_float;
using qlora::core::float_from_bits;

std::vector<float> canonical_map(bool is_signed) {
    std::vector<float> map(256);
    for (int i = 0; i < 256; ++i) {
        map[i] = is_signed ? qlora::core::dynamic8_signed_value(i) : qlora::core::dynamic8_unsigned_value(i);
    }
    return map;
}

// Non-negative probe values: each map entry and decision point (float32 midpoint) with 3 floats either side, each
// bucket's first and last float, 0, the smallest subnormal, values above 1, and 200k random magnitudes.
std::vector<float> probes(const std::vector<float>& map) {
    std::vector<float> out = {0.0f, float_from_bits(1u), 1.0f, 1.5f, 1e30f, std::numeric_limits<float>::infinity()};
    const auto around = [&](float x) {
        if (!(x > 0.0f)) {
            return;
        }
        for (int d = -3; d <= 3; ++d) {
            out.push_back(float_from_bits(bits_from_float(x) + static_cast<uint32_t>(d)));
        }
    };
    for (int c = 0; c < 256; ++c) {
        around(std::fabs(map[c]));
        if (c < 255) {
            around(std::fabs(qlora::core::fmul_rn(qlora::core::fadd_rn(map[c], map[c + 1]), 0.5f)));
        }
    }
    for (uint32_t key = qlora::cpu::Dynamic8Lut::kKeyMin; key <= qlora::cpu::Dynamic8Lut::kKeyMax + 1; ++key) {
        out.push_back(float_from_bits(key << 16));
        out.push_back(float_from_bits((key << 16) - 1));
    }
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> exponent(-30.0f, 0.5f);
    for (int i = 0; i < 200000; ++i) {
        out.push_back(std::pow(2.0f, exponent(rng)));
    }
    return out;
}

TEST(Dynamic8LutTest, ScalarLookupEqualsSearchOnBothMapsAndSigns) {
    for (bool is_signed : {true, false}) {
        const std::vector<float> map = canonical_map(is_signed);
        const auto lut = qlora::cpu::dynamic8_lut(map.data(), is_signed);
        ASSERT_NE(lut, nullptr) << "canonical map rejected, signed=" << is_signed;
        int64_t checked = 0;
        for (float a : probes(map)) {
            for (float y : {a, -a}) {
                ASSERT_EQ(qlora::cpu::dynamic8_lut_encode(*lut, y), qlora::core::dynamic8_encode(map.data(), y))
                    << "signed=" << is_signed << " y=" << y << " bits=" << std::hex << bits_from_float(y);
                ++checked;
            }
        }
        EXPECT_GT(checked, 400000);
        const float nan = std::numeric_limits<float>::quiet_NaN();
        EXPECT_EQ(qlora::cpu::dynamic8_lut_encode(*lut, nan), qlora::core::dynamic8_encode(map.data(), nan));
    }
}

// A map one ulp off the canonical one in a few entries (as bitsandbytes generates on a scalar-path machine) still
// gets a table, and a map that is not mirror-symmetric is refused instead of mis-encoded.
TEST(Dynamic8LutTest, OtherMapsAreBuiltOrRefused) {
    std::vector<float> map = canonical_map(false);
    for (int c : {40, 90, 200}) {
        map[c] = float_from_bits(bits_from_float(map[c]) + 1u);
    }
    const auto lut = qlora::cpu::dynamic8_lut(map.data(), false);
    ASSERT_NE(lut, nullptr);
    for (float y : probes(map)) {
        ASSERT_EQ(qlora::cpu::dynamic8_lut_encode(*lut, y), qlora::core::dynamic8_encode(map.data(), y)) << y;
    }
    std::vector<float> lopsided = canonical_map(true);
    lopsided[10] = float_from_bits(bits_from_float(lopsided[10]) + 1u);
    EXPECT_EQ(qlora::cpu::dynamic8_lut(lopsided.data(), true), nullptr);
}

// The encoders adamw8_blocks uses, on every ISA this CPU has: state1 codes equal core::adamw8_encode_m (search plus
// bitsandbytes' sign fix), state2 codes equal core::adamw8_encode_v.
TEST(Dynamic8LutTest, AdamwEncodersEqualCoreOnEveryIsa) {
    using qlora::cpu::CpuIsa;
    for (bool is_signed : {true, false}) {
        const std::vector<float> map = canonical_map(is_signed);
        const auto lut = qlora::cpu::dynamic8_lut(map.data(), is_signed);
        ASSERT_NE(lut, nullptr);
        std::vector<float> x;
        for (float a : probes(map)) {
            if (std::isfinite(a) && a <= 1.0f) {
                x.push_back(a);
                if (is_signed) {
                    x.push_back(-a);
                }
            }
        }
        if (is_signed) {
            x.push_back(-0.0f);
        }
        for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
            if (static_cast<int>(isa) > static_cast<int>(qlora::cpu::cpu_isa_supported())) {
                continue;
            }
            for (float scale : {1.0f, 0.75f}) {
                std::vector<uint8_t> q(x.size());
                qlora::cpu::adamw8_encode_run(isa, *lut, x.data(), scale, static_cast<int64_t>(x.size()), q.data());
                for (size_t i = 0; i < x.size(); ++i) {
                    const uint8_t want = is_signed ? qlora::core::adamw8_encode_m(map.data(), x[i], scale)
                                                   : qlora::core::adamw8_encode_v(map.data(), x[i], scale);
                    ASSERT_EQ(q[i], want) << "isa=" << qlora::cpu::cpu_isa_name(isa) << " signed=" << is_signed
                                          << " x=" << x[i] << " scale=" << scale;
                }
            }
        }
    }
}

} // namespace
