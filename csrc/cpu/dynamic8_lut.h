// csrc/cpu/dynamic8_lut.h: constant-time nearest-code lookup in a dynamic 8-bit map, the CPU's replacement for the
// 8-step binary search of core::dynamic8_encode, with the same results.
//
// Note [Bucketed nearest code]
// The maps are float-like (a few linear segments per decade), so the top bits of |y| narrow the answer to at most
// two neighbouring codes. key = bits(|y|) >> 16 (exponent and the top 7 mantissa bits) picks one of kBuckets
// buckets (every |y| below 2^-24 shares the first one, every |y| >= 1 the last one). The builder proves for each
// bucket, with the search itself, that its lowest and highest values are at most one code apart; since the search
// is monotone, the answer in the bucket is then c or c + 1 (c = the code of its lowest value), split at the float32
// midpoint fl((map[c] + map[c + 1]) * 0.5) that the search compares with, ties going to the even code (the search's
// final pivot is always even). That midpoint lies in the bucket, so it shares the bucket's top 16 bits and only its
// low 16 bits need storing: entry = c << 16 | t, and the answer is c + ((bits(|y|) & 0xffff) > t). t is the
// midpoint's low bits, minus one when the tie goes up (c odd), or 0xffff when the bucket holds no midpoint (also
// for the two clamped buckets); the builder checks each t against the search on both sides of it. One table lookup
// (one gather for 16 values) then encodes a value; a branch-free walk over a tree of midpoints with in-register
// permutes was measured too and was 30 % slower.
// Signed maps are mirror images around code 127 (map[127 - i] == -map[127 + i]; a mirror keeps code parity and
// negates float32 midpoints exactly), so one half-table serves both signs; code 255 (+1.0) has no mirror, which is
// why a negative y past the last midpoint clamps to code 0. Unsigned maps send every negative y (including -0) to
// code 0, and NaN goes to code 0 in both, as in the search. A table is 12 KiB, so both optimizer tables stay in L1.
#pragma once

#include <cstdint>
#include <memory>

namespace qlora::cpu {

// Note [Segment-affine nearest code]
// Each decade of a dynamic map is a run of equally spaced codes, so inside a run the code of y >= 0 is an affine
// function of y rounded down: t = y · a + b places the decision point between codes k and k + 1 of the run at
// t = k + 1 (a = 1 / spacing, t(map[lo]) = lo + 0.5), and code = min(int(t), hi). Which run y is in follows from its
// binade e (the float exponent of y; 32 binades from 2^-30 up): a binade holds at most one boundary between runs
// (the float32 midpoint of the two codes, moved up one float when the tie goes to the upper code), and the part
// above it is in the run the next binade starts in, so the tables are indexed by e + (y >= boundary[e]). That is four
// in-register permutes for 16 values where the bucketed table needs a gather.
// The vector encoder computes u = y · a + (b + 256 + kMargin) = t + 256 + kMargin with one FMA: u lies in [256, 512),
// where a float has 15 fraction bits, so the low 15 bits of bits(u) are the fraction of t + kMargin, which is below
// 2 · kMargin = 16 · 2^-15 ("near": t within kMargin of an integer) exactly when bits 4-14 are zero, one test; and
// otherwise bits(u) >> 15 is kCodeBias + int(t). The tables hold b + 256 + kMargin (rounded to float32 once; the
// checks below use that rounded value) and kCodeBias + hi, so the code is min(bits(u) >> 15, hi), in the low byte.
// Where t >= 256 the clamp decides alone (int(t) > hi).
// Exactness, each fact checked by the builder: every decision point inside a run sits within kMargin / 2 of its
// integer, |t(midpoint) - (k + 1)| <= kMargin / 2 (in double precision; the canonical maps stay within 2^-13.8);
// every run boundary splits as the search does on both sides of it; t at the lowest value of a run is at least
// lo + kMargin / 2, so int(t) needs no lower clamp. The vector encoder takes the bucketed lookup instead for any 16
// values of which one is near. Elsewhere the computed u (one FMA, error <= 2^-16) and the exact u(y) have the same
// floor, the fraction of the exact t(y) stays at least kMargin - 2^-16 from an integer, so int(t) is that floor
// minus 256 and t(y) lies on the same side of every t(midpoint) as the integer k + 1 does (kMargin - 2^-16 >
// kMargin / 2), so int(t) counts the midpoints below y, which is the search's answer (the bucket proof above shows
// the search is that staircase). Values are |y| < 2 (the vector preconditions), so binades above 1 are the top run;
// values below 2^-31 are raised to 2^-31 first, which lies in binade 0 with them and has the lowest code too. With
// fractions of t spread evenly, 2 · 16 · 2^-12 = 0.8 % of 16-value groups fall back (0.04 % measured on optimizer
// states).
struct Dynamic8Affine {
    static constexpr int kBinades = 32;
    static constexpr uint32_t kExponentBase = 96; // binade 0: float exponents <= 96 (|y| < 2^-30), 31: >= 127
    static constexpr float kMargin = 1.0f / 4096.0f;
    static constexpr float kBias = 256.0f;
    static constexpr int32_t kCodeBias = 0x8700; // bits(256.0f) >> 15

    // Indexed by binade (the float exponent minus kExponentBase, which is also the exponent modulo 32), plus one
    // above the binade's boundary.
    alignas(64) float boundary[kBinades]; // y >= boundary: the next run; +inf where the binade has none
    alignas(64) float a[kBinades];        // u = y · a + b = t + kBias + kMargin of the run
    alignas(64) float b[kBinades];
    alignas(64) int32_t hi[kBinades]; // kCodeBias + the last code of the run
};

struct Dynamic8Lut {
    static constexpr int kShift = 16;
    static constexpr uint32_t kKeyMin = 0x3380u; // key of 2^-24
    static constexpr uint32_t kKeyMax = 0x3f80u; // key of 1.0
    static constexpr int kBuckets = static_cast<int>(kKeyMax - kKeyMin) + 1;

    bool is_signed = false;
    alignas(64) uint32_t entry[kBuckets] = {}; // code << 16 | low bits of the split point
    // The map's float32 bit patterns as four byte planes (byte k of every entry), for decoding 64 codes with
    // byte permutes (AVX-512 VBMI).
    alignas(64) uint8_t value_bytes[4][256] = {};
    // Note [Segment-affine nearest code]; present when the map has that structure (the canonical maps do).
    bool has_affine = false;
    Dynamic8Affine affine = {};
};

// The table of a 256-entry ascending map, or nullptr when the map lacks the structure of Note [Bucketed nearest
// code] (a signed map that is not mirror-symmetric, or a bucket holding two midpoints); callers then use
// core::dynamic8_encode. Tables are built on first use (about 6k searches) and cached, the last 8 maps of each kind:
// the canonical maps and, say, a checkpoint's own qmap that differs in an ulp.
std::shared_ptr<const Dynamic8Lut> dynamic8_lut(const float* map, bool is_signed);

// Scalar lookup: equals core::dynamic8_encode(map, y) for the map the table was built from.
uint8_t dynamic8_lut_encode(const Dynamic8Lut& lut, float y);

} // namespace qlora::cpu
