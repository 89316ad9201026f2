// bench/adamw_parts.cpp: where the time of qlora's 8-bit AdamW step goes, on one CPU thread.
//
//   build/bin/bench_adamw_parts [--elements N] [--rounds R]      (bench/bench_adamw.py runs it and keeps its JSON)
//
// Times per element, on data that stays in the L2 cache (32 Ki elements by default) so that memory hides nothing:
//   adamw8_step   the whole 8-bit step (adamw8_blocks on the best ISA of this CPU);
//   adamw32_step  the 32-bit step: the same AdamW arithmetic (moments, correctly rounded sqrt and division, decay)
//                 on float32 states, about what torch's fused AdamW computes;
//   decode        the two 8-bit moments' codes to map values (adamw8_decode_run on both maps);
//   encode        fresh moments (scaled by their block absmax) to codes (adamw8_encode_run on both maps).
// The 8-bit step is the 32-bit step's arithmetic plus the decode and the encode: the README compares the parts with
// torch's step. Each part is checked before it is timed: the vector kernels against the scalar ones bit for bit, the
// decoders against the map, the encoders against core::adamw8_encode_m / _v (bitsandbytes' search). Rounds
// interleave the parts so a slow phase of a shared machine slows all of them; the medians over rounds are printed as
// one JSON object.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/adamw.h"
#include "core/dynamic8.h"
#include "cpu/adamw_simd.h"
#include "cpu/cpu_isa.h"
#include "cpu/dynamic8_lut.h"

namespace {

using qlora::core::AdamwScalars;
using qlora::cpu::CpuIsa;

[[noreturn]] void fail(const std::string& what) {
    std::fprintf(stderr, "bench_adamw_parts: %s\n", what.c_str());
    std::exit(1);
}

int64_t parse_count(const char* flag, const char* text) {
    char* end = nullptr;
    const long long v = std::strtoll(text, &end, 10);
    if (end == text || *end != '\0' || v < 1) {
        fail(std::string(flag) + " takes a whole number >= 1, got '" + text + "'");
    }
    return v;
}

template <typename T> bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// One tensor's 8-bit optimizer state and gradient, after a few steps so that states and absmax are not zero.
struct State8 {
    std::vector<float> p, g, a1, a2;
    std::vector<uint8_t> q1, q2;
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

} // namespace

int main(int argc, char** argv) {
    int64_t blocks = 128; // 32 Ki elements: 512 KiB for the 32-bit step's four arrays
    int64_t rounds = 301;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if ((a == "--elements" || a == "--rounds") && i + 1 < argc) {
            const int64_t v = parse_count(argv[i], argv[i + 1]);
            if (a == "--elements") {
                if (v % qlora::core::kAdamw8BlockSize != 0) {
                    fail("--elements must be a multiple of 256, got " + std::to_string(v));
                }
                blocks = v / qlora::core::kAdamw8BlockSize;
            } else {
                rounds = v;
            }
            ++i;
        } else {
            fail("unknown argument '" + a + "' (usage: bench_adamw_parts [--elements N] [--rounds R])");
        }
    }
    const int64_t n = blocks * qlora::core::kAdamw8BlockSize;
    const CpuIsa isa = qlora::cpu::cpu_isa_supported();

    std::vector<float> map1(256), map2(256);
    for (int c = 0; c < 256; ++c) {
        map1[c] = qlora::core::dynamic8_signed_value(c);
        map2[c] = qlora::core::dynamic8_unsigned_value(c);
    }
    const auto lut1 = qlora::cpu::dynamic8_lut(map1.data(), true);
    const auto lut2 = qlora::cpu::dynamic8_lut(map2.data(), false);
    if (!lut1 || !lut2) {
        fail("the canonical maps have no lookup table");
    }

    // Gradients of spread magnitudes (as in a real model), three scalar steps from zero states.
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    State8 s;
    s.p.resize(n);
    s.g.resize(n);
    s.q1.assign(n, 0);
    s.q2.assign(n, 0);
    s.a1.assign(blocks, 0.0f);
    s.a2.assign(blocks, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
        s.p[i] = normal(rng);
    }
    const auto fill_grad = [&] {
        for (int64_t i = 0; i < n; ++i) {
            s.g[i] = normal(rng) * 0.01f * (1.0f + static_cast<float>(i % 5));
        }
    };
    const auto params8 = [&](State8& st, int64_t step) {
        return qlora::core::Adamw8Params<float>{
            st.p.data(),
            st.g.data(),
            st.q1.data(),
            st.q2.data(),
            st.a1.data(),
            st.a2.data(),
            map1.data(),
            map2.data(),
            n,
            qlora::core::adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, step)};
    };
    for (int64_t step = 1; step <= 3; ++step) {
        fill_grad();
        qlora::cpu::adamw8_blocks(CpuIsa::kScalar, params8(s, step), lut1.get(), lut2.get(), 0, blocks);
    }
    fill_grad();

    // Check: the vector 8-bit step equals the scalar one.
    {
        State8 want = s;
        State8 got = s;
        qlora::cpu::adamw8_blocks(CpuIsa::kScalar, params8(want, 4), lut1.get(), lut2.get(), 0, blocks);
        qlora::cpu::adamw8_blocks(isa, params8(got, 4), lut1.get(), lut2.get(), 0, blocks);
        if (!same_bits(got.p, want.p) || !same_bits(got.q1, want.q1) || !same_bits(got.q2, want.q2) ||
            !same_bits(got.a1, want.a1) || !same_bits(got.a2, want.a2)) {
            fail("the 8-bit step differs from the scalar kernel");
        }
    }

    // The 32-bit step on the moments the 8-bit state holds.
    const AdamwScalars sc = qlora::core::adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 4);
    std::vector<float> m32(n), v32(n), p32 = s.p;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = i / qlora::core::kAdamw8BlockSize;
        m32[i] = qlora::core::dynamic8_decode(map1.data(), s.q1[i], s.a1[b]);
        v32[i] = qlora::core::dynamic8_decode(map2.data(), s.q2[i], s.a2[b]);
    }
    const auto params32 = [&](std::vector<float>& p, std::vector<float>& m, std::vector<float>& v) {
        return qlora::core::Adamw32Params<float>{p.data(), s.g.data(), m.data(), v.data(), n, sc};
    };
    {
        std::vector<float> pw = p32, mw = m32, vw = v32, pg = p32, mg = m32, vg = v32;
        qlora::cpu::adamw32_range(CpuIsa::kScalar, params32(pw, mw, vw), 0, n);
        qlora::cpu::adamw32_range(isa, params32(pg, mg, vg), 0, n);
        if (!same_bits(pg, pw) || !same_bits(mg, mw) || !same_bits(vg, vw)) {
            fail("the 32-bit step differs from the scalar kernel");
        }
    }

    // Encoder inputs: one more moment update, scaled by the new block absmax as the 8-bit step does.
    std::vector<float> y1(n), y2(n);
    for (int64_t b = 0; b < blocks; ++b) {
        float max1 = 0.0f;
        float max2 = 0.0f;
        const int64_t i0 = b * qlora::core::kAdamw8BlockSize;
        for (int64_t i = i0; i < i0 + qlora::core::kAdamw8BlockSize; ++i) {
            float m = m32[i];
            float v = v32[i];
            qlora::core::adamw_update_moments(s.g[i], &m, &v, sc);
            y1[i] = m;
            y2[i] = v;
            max1 = qlora::core::absmax_update(max1, m);
            max2 = qlora::core::absmax_update(max2, v);
        }
        for (int64_t i = i0; i < i0 + qlora::core::kAdamw8BlockSize; ++i) {
            y1[i] = qlora::core::fmul_rn(y1[i], qlora::core::block_scale(max1));
            y2[i] = qlora::core::fmul_rn(y2[i], qlora::core::block_scale(max2));
        }
    }
    std::vector<uint8_t> e1(n), e2(n);
    std::vector<float> d1(n), d2(n);
    qlora::cpu::adamw8_encode_run(isa, *lut1, y1.data(), 1.0f, n, e1.data());
    qlora::cpu::adamw8_encode_run(isa, *lut2, y2.data(), 1.0f, n, e2.data());
    qlora::cpu::adamw8_decode_run(isa, *lut1, s.q1.data(), n, d1.data());
    qlora::cpu::adamw8_decode_run(isa, *lut2, s.q2.data(), n, d2.data());
    for (int64_t i = 0; i < n; ++i) {
        if (e1[i] != qlora::core::adamw8_encode_m(map1.data(), y1[i], 1.0f) ||
            e2[i] != qlora::core::adamw8_encode_v(map2.data(), y2[i], 1.0f)) {
            fail("an encoded code differs from bitsandbytes' search at element " + std::to_string(i));
        }
        if (qlora::core::bits_from_float(d1[i]) != qlora::core::bits_from_float(map1[s.q1[i]]) ||
            qlora::core::bits_from_float(d2[i]) != qlora::core::bits_from_float(map2[s.q2[i]])) {
            fail("a decoded value differs from the map at element " + std::to_string(i));
        }
    }

    // Timing: every part once per round, in a fixed order; the 8-bit and 32-bit steps keep stepping their own state.
    State8 run8 = s;
    int64_t step8 = 4;
    struct Part {
        const char* name;
        std::function<void()> fn;
        std::vector<double> ns;
    };
    std::vector<Part> parts;
    parts.push_back(
        {"adamw8_step",
         [&] { qlora::cpu::adamw8_blocks(isa, params8(run8, ++step8), lut1.get(), lut2.get(), 0, blocks); },
         {}}
    );
    parts.push_back({"adamw32_step", [&] { qlora::cpu::adamw32_range(isa, params32(p32, m32, v32), 0, n); }, {}});
    parts.push_back(
        {"decode",
         [&] {
             qlora::cpu::adamw8_decode_run(isa, *lut1, s.q1.data(), n, d1.data());
             qlora::cpu::adamw8_decode_run(isa, *lut2, s.q2.data(), n, d2.data());
         },
         {}}
    );
    parts.push_back(
        {"encode",
         [&] {
             qlora::cpu::adamw8_encode_run(isa, *lut1, y1.data(), 1.0f, n, e1.data());
             qlora::cpu::adamw8_encode_run(isa, *lut2, y2.data(), 1.0f, n, e2.data());
         },
         {}}
    );
    for (int64_t r = 0; r < rounds; ++r) {
        for (Part& part : parts) {
            const auto t0 = std::chrono::steady_clock::now();
            part.fn();
            const auto t1 = std::chrono::steady_clock::now();
            part.ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(n));
        }
    }
    std::printf(
        "{\"elements\": %lld, \"rounds\": %lld, \"isa\": \"%s\", \"vbmi_decode\": %s, \"ns_per_element\": {",
        static_cast<long long>(n), static_cast<long long>(rounds), qlora::cpu::cpu_isa_name(isa),
        qlora::cpu::adamw8_vbmi_decode() ? "true" : "false"
    );
    for (size_t k = 0; k < parts.size(); ++k) {
        std::printf("%s\"%s\": %.4f", k == 0 ? "" : ", ", parts[k].name, median(parts[k].ns));
    }
    std::printf("}}\n");
    return 0;
}
