// csrc/cpu/dynamic8_lut.cpp: see dynamic8_lut.h.
#include "dynamic8_lut.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <utility>

#include "../core/dynamic8.h"

namespace qlora::cpu {
namespace {

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
