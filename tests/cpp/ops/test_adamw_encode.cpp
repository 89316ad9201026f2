// tests/cpp/ops/test_adamw_encode.cpp: the CPU's bucketed nearest-code table (csrc/cpu/dynamic8_lut.h) and the AdamW
// state encoders built on it (csrc/cpu/adamw_simd.h) against bitsandbytes' binary search (core::dynamic8_encode), on
// the values where a lookup can go wrong: every decision point of both maps and its float neighbours, every bucket
// boundary, the map entries themselves, and random values over the whole range.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <tuple>
#include <utility>
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
    EXPECT_TRUE(lut->has_affine); // one ulp keeps every decision point well inside the affine margin
    // A map whose runs are not evenly spaced keeps its table but loses the affine encoder, and still encodes right.
    std::vector<float> uneven = canonical_map(false);
    uneven[200] += 0.25f * (uneven[201] - uneven[200]);
    const auto uneven_lut = qlora::cpu::dynamic8_lut(uneven.data(), false);
    ASSERT_NE(uneven_lut, nullptr);
    EXPECT_FALSE(uneven_lut->has_affine);
    for (qlora::cpu::CpuIsa isa : {qlora::cpu::CpuIsa::kAvx2, qlora::cpu::CpuIsa::kAvx512}) {
        if (static_cast<int>(isa) > static_cast<int>(qlora::cpu::cpu_isa_supported())) {
            continue;
        }
        std::vector<float> x;
        for (float y : probes(uneven)) {
            if (std::isfinite(y) && y <= 1.0f) {
                x.push_back(y);
            }
        }
        std::vector<uint8_t> q(x.size());
        qlora::cpu::adamw8_encode_run(isa, *uneven_lut, x.data(), 1.0f, static_cast<int64_t>(x.size()), q.data());
        for (size_t i = 0; i < x.size(); ++i) {
            ASSERT_EQ(q[i], qlora::core::adamw8_encode_v(uneven.data(), x[i], 1.0f)) << x[i];
        }
    }
    std::vector<float> lopsided = canonical_map(true);
    lopsided[10] = float_from_bits(bits_from_float(lopsided[10]) + 1u);
    EXPECT_EQ(qlora::cpu::dynamic8_lut(lopsided.data(), true), nullptr);
}

// The encoders adamw8_blocks uses, on every ISA this CPU has: state1 codes equal core::adamw8_encode_m (search plus
// bitsandbytes' sign fix), state2 codes equal core::adamw8_encode_v, for every |x · scale| < 2 (the encoders' range;
// the kernel's scaled states stay at or below 1 + 2^-23).
TEST(Dynamic8LutTest, AdamwEncodersEqualCoreOnEveryIsa) {
    using qlora::cpu::CpuIsa;
    for (bool is_signed : {true, false}) {
        const std::vector<float> map = canonical_map(is_signed);
        const auto lut = qlora::cpu::dynamic8_lut(map.data(), is_signed);
        ASSERT_NE(lut, nullptr);
        std::vector<float> x;
        std::vector<float> values = probes(map);
        values.insert(values.end(), {std::nextafter(1.0f, 2.0f), 1.25f, std::nextafter(2.0f, 0.0f)});
        for (float a : values) {
            if (std::isfinite(a) && a < 2.0f) {
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

// Restores the AVX-512 decode choice (a process-wide switch) when a test ends, however it ends.
struct VbmiDecodeGuard {
    bool saved = qlora::cpu::adamw8_vbmi_decode();
    ~VbmiDecodeGuard() { qlora::cpu::set_adamw8_vbmi_decode(saved); }
};

// The decoders adamw8_blocks uses (VBMI byte planes, float permutes, plain lookups) give map[q] for every code, in
// any order, at any length (tails included) and into an unaligned output, on every ISA this CPU has.
TEST(Dynamic8LutTest, AdamwDecodersEqualMapOnEveryIsa) {
    using qlora::cpu::CpuIsa;
    const VbmiDecodeGuard guard;
    std::mt19937 rng(3);
    std::uniform_int_distribution<int> code(0, 255);
    std::vector<uint8_t> q(1000 + 77);
    for (size_t i = 0; i < q.size(); ++i) {
        q[i] = static_cast<uint8_t>(i < 256 ? i : code(rng)); // every code once, then random ones
    }
    // (ISA, VBMI decode) pairs: the switch only matters on AVX-512.
    std::vector<std::pair<CpuIsa, bool>> paths = {{CpuIsa::kScalar, false}, {CpuIsa::kAvx2, false}};
    if (qlora::cpu::cpu_isa_supported() == CpuIsa::kAvx512) {
        paths.emplace_back(CpuIsa::kAvx512, false);
        if (qlora::cpu::cpu_has_avx512_vbmi()) {
            paths.emplace_back(CpuIsa::kAvx512, true);
        }
    }
    for (bool is_signed : {true, false}) {
        const std::vector<float> map = canonical_map(is_signed);
        const auto lut = qlora::cpu::dynamic8_lut(map.data(), is_signed);
        ASSERT_NE(lut, nullptr);
        for (const auto& [isa, vbmi] : paths) {
            if (static_cast<int>(isa) > static_cast<int>(qlora::cpu::cpu_isa_supported())) {
                continue;
            }
            qlora::cpu::set_adamw8_vbmi_decode(vbmi);
            for (size_t offset : {size_t{0}, size_t{3}}) {
                const int64_t n = static_cast<int64_t>(q.size() - offset);
                std::vector<float> buffer(n + 1, -1.0f);
                float* out = buffer.data() + 1; // 4 bytes past a 64-byte-aligned allocation at best
                qlora::cpu::adamw8_decode_run(isa, *lut, q.data() + offset, n, out);
                for (int64_t i = 0; i < n; ++i) {
                    ASSERT_EQ(bits_from_float(out[i]), bits_from_float(map[q[offset + i]]))
                        << "isa=" << qlora::cpu::cpu_isa_name(isa) << " vbmi=" << vbmi << " i=" << i;
                }
                EXPECT_EQ(buffer[0], -1.0f); // nothing written before out
            }
        }
    }
}

// Note [Segment-affine nearest code] on every float32 value in [0, 1] (and 64 above): the AVX-512 encoder with the
// affine rule gives the same codes as with the bucketed table alone, which the tests above hold to the search.
TEST(Dynamic8LutTest, AffineEncoderEqualsTableOnEveryFloatUpToOne) {
    if (qlora::cpu::cpu_isa_supported() != qlora::cpu::CpuIsa::kAvx512) {
        GTEST_SKIP() << "no AVX-512 on this CPU (the affine encoder is AVX-512 only)";
    }
    for (bool is_signed : {true, false}) {
        const std::vector<float> map = canonical_map(is_signed);
        const auto lut = qlora::cpu::dynamic8_lut(map.data(), is_signed);
        ASSERT_NE(lut, nullptr);
        ASSERT_TRUE(lut->has_affine) << "canonical map without the affine encoder, signed=" << is_signed;
        auto table_only = std::make_unique<qlora::cpu::Dynamic8Lut>(*lut);
        table_only->has_affine = false;
        constexpr uint32_t kChunk = 1u << 20;
        const uint32_t last = bits_from_float(1.0f) + 64u;
        std::vector<float> x(kChunk);
        std::vector<uint8_t> got(kChunk);
        std::vector<uint8_t> want(kChunk);
        for (uint32_t u0 = 0; u0 <= last; u0 += kChunk) {
            const uint32_t n = std::min(kChunk, last + 1 - u0);
            for (uint32_t k = 0; k < n; ++k) {
                x[k] = float_from_bits(u0 + k);
            }
            const auto isa = qlora::cpu::CpuIsa::kAvx512;
            qlora::cpu::adamw8_encode_run(isa, *lut, x.data(), 1.0f, n, got.data());
            qlora::cpu::adamw8_encode_run(isa, *table_only, x.data(), 1.0f, n, want.data());
            const auto diff = std::mismatch(got.begin(), got.begin() + n, want.begin());
            ASSERT_TRUE(diff.first == got.begin() + n)
                << "signed=" << is_signed << " bits=" << std::hex << (u0 + (diff.first - got.begin()))
                << " affine code " << std::dec << int{*diff.first} << ", table code " << int{*diff.second};
        }
    }
}

// The AVX-512 block kernel decodes the states with VBMI byte permutes where the CPU has them and with float permutes
// otherwise, and encodes with or without the affine rule: all four give the scalar kernel's bytes over 8 steps.
TEST(Dynamic8LutTest, AdamwBlocksEqualScalarWithEveryDecodeAndEncode) {
    using qlora::cpu::CpuIsa;
    if (qlora::cpu::cpu_isa_supported() != CpuIsa::kAvx512) {
        GTEST_SKIP() << "no AVX-512 on this CPU";
    }
    const int64_t n = 40 * 256 + 77; // a tail block too
    const int64_t blocks = (n + 255) / 256;
    const std::vector<float> qmap1 = canonical_map(true);
    const std::vector<float> qmap2 = canonical_map(false);
    const auto lut1 = qlora::cpu::dynamic8_lut(qmap1.data(), true);
    const auto lut2 = qlora::cpu::dynamic8_lut(qmap2.data(), false);
    ASSERT_TRUE(lut1 && lut2 && lut1->has_affine && lut2->has_affine);
    struct State {
        std::vector<float> p, g, a1, a2;
        std::vector<uint8_t> s1, s2;
    };
    std::mt19937 rng(11);
    std::normal_distribution<float> normal;
    State init;
    init.p.resize(n);
    init.s1.assign(n, 127);
    init.s2.assign(n, 0);
    init.a1.assign(blocks, 0.0f);
    init.a2.assign(blocks, 0.0f);
    for (float& v : init.p) {
        v = normal(rng);
    }
    std::vector<std::vector<float>> grads(8, std::vector<float>(n));
    for (auto& g : grads) {
        for (int64_t i = 0; i < n; ++i) {
            g[i] = normal(rng) * std::pow(10.0f, static_cast<float>(i % 7) - 4.0f); // a wide spread of magnitudes
        }
    }
    const bool has_vbmi = qlora::cpu::cpu_has_avx512_vbmi();
    const VbmiDecodeGuard guard;
    const auto run = [&](CpuIsa isa, bool vbmi, bool affine) {
        State st = init;
        auto l1 = std::make_unique<qlora::cpu::Dynamic8Lut>(*lut1);
        auto l2 = std::make_unique<qlora::cpu::Dynamic8Lut>(*lut2);
        l1->has_affine = l2->has_affine = affine;
        qlora::cpu::set_adamw8_vbmi_decode(vbmi);
        for (int step = 1; step <= 8; ++step) {
            const qlora::core::Adamw8Params<float> P{
                st.p.data(),
                grads[step - 1].data(),
                st.s1.data(),
                st.s2.data(),
                st.a1.data(),
                st.a2.data(),
                qmap1.data(),
                qmap2.data(),
                n,
                qlora::core::adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, step)};
            qlora::cpu::adamw8_blocks(isa, P, l1.get(), l2.get(), 0, blocks);
        }
        return st;
    };
    const State want = run(CpuIsa::kScalar, false, false);
    for (bool vbmi : {false, true}) {
        if (vbmi && !has_vbmi) {
            continue; // reported below
        }
        for (bool affine : {false, true}) {
            const State got = run(CpuIsa::kAvx512, vbmi, affine);
            EXPECT_EQ(got.s1, want.s1) << "vbmi=" << vbmi << " affine=" << affine;
            EXPECT_EQ(got.s2, want.s2) << "vbmi=" << vbmi << " affine=" << affine;
            EXPECT_EQ(got.a1, want.a1) << "vbmi=" << vbmi << " affine=" << affine;
            EXPECT_EQ(got.a2, want.a2) << "vbmi=" << vbmi << " affine=" << affine;
            EXPECT_EQ(got.p, want.p) << "vbmi=" << vbmi << " affine=" << affine;
        }
    }
    if (!has_vbmi) {
        GTEST_SKIP() << "no AVX-512 VBMI on this CPU: the byte-plane decode did not run (the other three did)";
    }
}

// Blocks the vector kernel must hand to the scalar path: old absmax values that are +inf or NaN (a previous step
// overflowed, or a state was loaded from outside), gradients that overflow the moments, NaN / ±inf gradient lanes,
// and a negative old absmax2. The vector kernel must notice every one of them (a NaN moment from 0 · inf included)
// and leave the block to the scalar kernel, so both write the same bytes (NaN payloads included). A negative old
// absmax1 only flips the decoded m and stays on the vector path, with the same result.
TEST(Dynamic8LutTest, AdamwBlocksEqualScalarOnNonFiniteStates) {
    using qlora::cpu::CpuIsa;
    if (qlora::cpu::cpu_isa_supported() != CpuIsa::kAvx512) {
        GTEST_SKIP() << "no AVX-512 on this CPU";
    }
    const int64_t blocks = 12;
    const int64_t n = blocks * 256;
    const std::vector<float> qmap1 = canonical_map(true);
    const std::vector<float> qmap2 = canonical_map(false);
    const auto lut1 = qlora::cpu::dynamic8_lut(qmap1.data(), true);
    const auto lut2 = qlora::cpu::dynamic8_lut(qmap2.data(), false);
    ASSERT_TRUE(lut1 && lut2);
    std::mt19937 rng(5);
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int> code(0, 255);
    std::vector<float> p(n), g(n), a1(blocks), a2(blocks);
    std::vector<uint8_t> s1(n), s2(n);
    for (int64_t i = 0; i < n; ++i) {
        p[i] = normal(rng);
        g[i] = normal(rng) * 0.01f;
        s1[i] = static_cast<uint8_t>(code(rng));
        s2[i] = static_cast<uint8_t>(code(rng));
    }
    s1[256 + 3] = 127; // a zero code in a block whose absmax is +inf: 0 · inf = NaN
    s2[512 + 9] = 0;
    for (int64_t b = 0; b < blocks; ++b) {
        a1[b] = 0.01f;
        a2[b] = 1e-4f;
    }
    const float inf = std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    a1[1] = inf;                                                // block 1: m = NaN in one lane, ±inf elsewhere
    a2[2] = inf;                                                // block 2: v = NaN in one lane
    a1[3] = nan;                                                // block 3: every m NaN
    a2[4] = -nan;                                               // block 4: every v NaN, sign bit set
    g[5 * 256 + 7] = 3e38f;                                     // block 5: (1 - β2) g² overflows v to +inf
    g[6 * 256 + 1] = -3e38f;                                    // block 6 likewise, negative g
    g[7 * 256 + 100] = nan;                                     // block 7: a NaN gradient lane (reset, parameter kept)
    g[8 * 256 + 0] = -inf;                                      // block 8: an infinite gradient lane
    std::fill(g.begin() + 9 * 256, g.begin() + 10 * 256, 0.0f); // block 9: all-zero gradient and states
    std::fill(s1.begin() + 9 * 256, s1.begin() + 10 * 256, uint8_t{127});
    std::fill(s2.begin() + 9 * 256, s2.begin() + 10 * 256, uint8_t{0});
    a2[10] = -1e-4f; // block 10: every v decodes negative (or -0)
    a1[11] = -0.01f; // block 11: m decodes with flipped signs
    // block 0 is ordinary and takes the vector path
    const auto run = [&](CpuIsa isa) {
        std::vector<float> pp = p, b1 = a1, b2 = a2;
        std::vector<uint8_t> q1 = s1, q2 = s2;
        const qlora::core::Adamw8Params<float> P{pp.data(),
                                                 g.data(),
                                                 q1.data(),
                                                 q2.data(),
                                                 b1.data(),
                                                 b2.data(),
                                                 qmap1.data(),
                                                 qmap2.data(),
                                                 n,
                                                 qlora::core::adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 3)};
        qlora::cpu::adamw8_blocks(isa, P, lut1.get(), lut2.get(), 0, blocks);
        std::vector<uint32_t> bits;
        for (const auto* v : {&pp, &b1, &b2}) {
            for (float x : *v) {
                bits.push_back(bits_from_float(x));
            }
        }
        return std::make_tuple(bits, q1, q2);
    };
    const auto want = run(CpuIsa::kScalar);
    const auto got = run(CpuIsa::kAvx512);
    const auto& want_bits = std::get<0>(want);
    const auto& got_bits = std::get<0>(got);
    for (size_t i = 0; i < want_bits.size(); ++i) {
        ASSERT_EQ(got_bits[i], want_bits[i]) << "float " << i << " (parameters, then absmax1, then absmax2)";
    }
    EXPECT_EQ(std::get<1>(got), std::get<1>(want));
    EXPECT_EQ(std::get<2>(got), std::get<2>(want));
}

} // namespace
