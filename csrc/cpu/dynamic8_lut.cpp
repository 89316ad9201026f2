// csrc/cpu/dynamic8_lut.cpp: see dynamic8_lut.h.
#include "dynamic8_lut.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <utility>

#include "../core/dynamic8.h"

namespace qlora::cpu {
namespace {

// Note [Segment-affine nearest code]: fills lut->affine for the non-negative half of `map` (codes first..255) and
// returns whether the map has the structure the note relies on, each fact checked here.
bool build_affine(const float* map, int first, Dynamic8Affine* A) {
    constexpr double kOffset = static_cast<double>(Dynamic8Affine::kBias) + Dynamic8Affine::kMargin;
    const auto midpoint = [&](int c) {
        return core::fmul_rn(core::fadd_rn(map[c], map[c + 1]), 0.5f);
    };
    const auto gap = [&](int c) {
        return static_cast<double>(map[c + 1]) - static_cast<double>(map[c]);
    };
    // Runs of equally spaced codes, found from the top: a code starts a run downward when the two gaps below it are
    // equal (to 0.1 %), and stands alone otherwise (a run of two codes is ambiguous: which of its neighbours' runs
    // would it belong to?), except that the lowest two codes always form one run.
    const auto same = [](double x, double y) {
        return std::fabs(x - y) <= 1e-3 * y;
    };
    int lo[16];
    int hi[16];
    int runs = 0;
    for (int c = 255; c >= first; ++runs) {
        if (runs == 16) {
            return false;
        }
        int s = c;
        if (c == first + 1) {
            s = first;
        } else if (c >= first + 2 && same(gap(c - 1), gap(c - 2))) {
            s = c - 2;
            while (s > first && same(gap(s - 1), gap(c - 1))) {
                --s;
            }
        }
        if (c > first && !(gap(c - 1) > 0.0)) {
            return false;
        }
        lo[runs] = s;
        hi[runs] = c;
        c = s - 1;
    }
    std::reverse(lo, lo + runs);
    std::reverse(hi, hi + runs);
    double run_a[16];
    double run_b[16];
    for (int r = 0; r < runs; ++r) {
        run_a[r] = static_cast<float>(hi[r] > lo[r] ? 1.0 / gap(lo[r]) : 0.0);
        // The tables store b + kBias + kMargin as a float32; every check below uses the b that this rounded value
        // implies.
        const float biased = static_cast<float>(lo[r] + 0.5 - static_cast<double>(map[lo[r]]) * run_a[r] + kOffset);
        run_b[r] = static_cast<double>(biased) - kOffset;
        for (int k = lo[r]; k < hi[r]; ++k) {
            const double t = static_cast<double>(midpoint(k)) * run_a[r] + run_b[r];
            if (!(std::fabs(t - (k + 1)) <= 0.5 * Dynamic8Affine::kMargin)) {
                return false;
            }
        }
    }
    // Run boundaries as "y >= boundary" thresholds, the tie going to the even code like the search's final pivot.
    float boundary[16];
    for (int r = 0; r + 1 < runs; ++r) {
        const int c = hi[r];
        const float mid = midpoint(c);
        const float up = (c & 1) != 0 ? mid : std::nextafter(mid, std::numeric_limits<float>::infinity());
        if (core::dynamic8_encode(map, up) != c + 1 || core::dynamic8_encode(map, std::nextafter(up, 0.0f)) != c) {
            return false;
        }
        boundary[r] = up;
    }
    // The vector encoder raises |y| to 2^-31 first: everything up to it must have the lowest code (the search is
    // monotone, so checking 2^-31 covers 0 .. 2^-31).
    if (core::dynamic8_encode(map, core::float_from_bits(Dynamic8Affine::kExponentBase << 23)) != first) {
        return false;
    }
    // No lower clamp: t at the lowest value of each run (0, or the boundary below it) is above lo.
    for (int r = 0; r < runs; ++r) {
        const double y = r == 0 ? 0.0 : static_cast<double>(boundary[r - 1]);
        if (!(y * run_a[r] + run_b[r] >= lo[r] + 0.5 * Dynamic8Affine::kMargin)) {
            return false;
        }
    }
    int run_of[Dynamic8Affine::kBinades]; // run of each binade's lowest value
    for (int e = 0; e < Dynamic8Affine::kBinades; ++e) {
        const uint32_t exponent = Dynamic8Affine::kExponentBase + static_cast<uint32_t>(e);
        const float bottom = e == 0 ? 0.0f : core::float_from_bits(exponent << 23);
        const float top = e == Dynamic8Affine::kBinades - 1 ? std::numeric_limits<float>::infinity()
                                                            : core::float_from_bits((exponent + 1) << 23);
        int r = 0;
        while (r + 1 < runs && boundary[r] <= bottom) {
            ++r;
        }
        run_of[e] = r;
        A->boundary[e] = std::numeric_limits<float>::infinity();
        if (r + 1 < runs && boundary[r] < top) {
            if (r + 2 < runs && boundary[r + 1] < top) {
                return false; // two boundaries in one binade
            }
            A->boundary[e] = boundary[r];
        }
    }
    for (int e = 0; e < Dynamic8Affine::kBinades; ++e) {
        // Above a boundary the tables continue at e + 1, which must start in the run above it.
        if (A->boundary[e] != std::numeric_limits<float>::infinity() &&
            (e + 1 == Dynamic8Affine::kBinades || run_of[e + 1] != run_of[e] + 1)) {
            return false;
        }
        const int r = run_of[e];
        A->a[e] = static_cast<float>(run_a[r]);
        A->b[e] = static_cast<float>(run_b[r] + kOffset); // exact: run_b was made from this float
        A->hi[e] = Dynamic8Affine::kCodeBias + hi[r];
    }
    return true;
}

std::shared_ptr<Dynamic8Lut> build(const float* map, bool is_signed) {
    if (is_signed) {
        if (core::bits_from_float(map[127]) != 0u) {
            return nullptr;
        }
        for (int i = 1; i <= 127; ++i) {
            if (map[127 - i] != -map[127 + i]) {
                return nullptr;
            }
        }
    }
    auto lut = std::make_shared<Dynamic8Lut>();
    lut->is_signed = is_signed;
    const int lowest_code = is_signed ? 127 : 0;
    for (int k = 0; k < Dynamic8Lut::kBuckets; ++k) {
        const uint32_t key = Dynamic8Lut::kKeyMin + static_cast<uint32_t>(k);
        const bool clamped = k == 0 || k == Dynamic8Lut::kBuckets - 1;
        const float lo = k == 0 ? 0.0f : core::float_from_bits(key << Dynamic8Lut::kShift);
        const float hi = k == Dynamic8Lut::kBuckets - 1 ? std::numeric_limits<float>::infinity()
                                                        : core::float_from_bits(((key + 1) << Dynamic8Lut::kShift) - 1);
        const int c = core::dynamic8_encode(map, lo);
        const int c_hi = core::dynamic8_encode(map, hi);
        if (c < lowest_code || c_hi - c > 1 || (clamped && c_hi != c)) {
            return nullptr;
        }
        uint32_t t = 0xffffu;
        if (c_hi != c) {
            const uint32_t mid = core::bits_from_float(core::fmul_rn(core::fadd_rn(map[c], map[c + 1]), 0.5f));
            if ((mid >> Dynamic8Lut::kShift) != key) {
                return nullptr;
            }
            t = (mid & 0xffffu) - ((c & 1) != 0 ? 1u : 0u); // a tie goes to the even code
            // The split must agree with the search on both sides (t + 1 <= 0xffff: the bucket's top value is c + 1).
            const uint32_t base = key << Dynamic8Lut::kShift;
            if (t > 0xfffeu || core::dynamic8_encode(map, core::float_from_bits(base | t)) != c ||
                core::dynamic8_encode(map, core::float_from_bits(base | (t + 1))) != c + 1) {
                return nullptr;
            }
        }
        lut->entry[k] = static_cast<uint32_t>(c) << 16 | t;
    }
    for (int c = 0; c < 256; ++c) {
        for (int k = 0; k < 4; ++k) {
            lut->value_bytes[k][c] = static_cast<uint8_t>(core::bits_from_float(map[c]) >> (8 * k));
        }
    }
    lut->has_affine = build_affine(map, lowest_code, &lut->affine);
    return lut;
}

struct Cache {
    std::mutex mutex;
    std::deque<std::pair<std::array<float, 256>, std::shared_ptr<const Dynamic8Lut>>> entries[2];
};
constexpr size_t kCacheEntries = 8;

} // namespace

std::shared_ptr<const Dynamic8Lut> dynamic8_lut(const float* map, bool is_signed) {
    static Cache cache;
    std::array<float, 256> key;
    std::memcpy(key.data(), map, sizeof(key));
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto& entries = cache.entries[is_signed ? 1 : 0];
    for (const auto& e : entries) {
        if (std::memcmp(e.first.data(), key.data(), sizeof(key)) == 0) {
            return e.second;
        }
    }
    std::shared_ptr<const Dynamic8Lut> lut = build(key.data(), is_signed);
    if (entries.size() == kCacheEntries) {
        entries.pop_back();
    }
    entries.emplace_front(key, lut);
    return lut;
}

uint8_t dynamic8_lut_encode(const Dynamic8Lut& lut, float y) {
    // Branch-free (selects, not jumps): the sign of an optimizer moment is a coin flip for the branch predictor.
    const uint32_t bits = core::bits_from_float(y);
    const uint32_t abits = bits & 0x7fffffffu;
    const uint32_t key = std::clamp(abits >> Dynamic8Lut::kShift, Dynamic8Lut::kKeyMin, Dynamic8Lut::kKeyMax);
    const uint32_t e = lut.entry[key - Dynamic8Lut::kKeyMin];
    const int r = static_cast<int>(e >> 16) + static_cast<int>((abits & 0xffffu) > (e & 0xffffu));
    const int mirrored = lut.is_signed ? std::max(254 - r, 0) : 0;
    const int code = (bits >> 31) != 0u ? mirrored : r;
    return static_cast<uint8_t>(core::is_nan(y) ? 0 : code);
}

} // namespace qlora::cpu
