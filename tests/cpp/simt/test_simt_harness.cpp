// tests/cpp/simt/test_simt_harness.cpp: the CPU SIMT harness itself (tests/simt). Correct kernels must give the
// results computed here on the host under every seed; deliberately broken kernels (a missing barrier, a wrong index,
// divergent barriers and shuffles) must be caught. No LibTorch.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "simt/simt.h"

#include "cuda/launch.cuh"

namespace {

using qlora::simt::Error;

constexpr int kThreads = 256;

// Block sum with a shared-memory tree; `with_barriers` = false drops every __syncthreads (a classic race).
__global__ void block_sum_kernel(const int* in, int* out, bool with_barriers) {
    __shared__ int smem[kThreads];
    const int t = static_cast<int>(threadIdx.x);
    smem[t] = in[blockIdx.x * kThreads + t];
    if (with_barriers) {
        __syncthreads();
    }
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {
        if (t < stride) {
            smem[t] += smem[t + stride];
        }
        if (with_barriers) {
            __syncthreads();
        }
    }
    if (t == 0) {
        out[blockIdx.x] = smem[0];
    }
}

// Each thread writes its value, then reads its neighbour's: needs the barrier between the write and the read.
__global__ void neighbour_kernel(const int* in, int* out, bool with_barrier) {
    __shared__ int smem[kThreads];
    const int t = static_cast<int>(threadIdx.x);
    smem[t] = in[t];
    if (with_barrier) {
        __syncthreads();
    }
    out[t] = smem[(t + 1) % kThreads];
}

__global__ void copy_kernel(const int* in, int* out, int n, int shift) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < n && i + shift < n) {
        out[i + shift] = in[i];
    }
}

std::vector<int> iota_vec(int n, int start = 1) {
    std::vector<int> v(n);
    std::iota(v.begin(), v.end(), start);
    return v;
}

TEST(SimtHarnessTest, BarrierReductionIsCorrectUnderEverySeed) {
    const int blocks = 7;
    const std::vector<int> in = iota_vec(blocks * kThreads);
    for (uint64_t seed : {1, 2, 3, 4, 5}) {
        qlora::simt::set_seed(seed);
        std::vector<int> out(blocks, -1);
        QLORA_LAUNCH(block_sum_kernel, blocks, kThreads, 0, nullptr, in.data(), out.data(), true);
        for (int b = 0; b < blocks; ++b) {
            EXPECT_EQ(out[b], std::accumulate(in.begin() + b * kThreads, in.begin() + (b + 1) * kThreads, 0)) << seed;
        }
    }
}

TEST(SimtHarnessTest, MissingBarrierGivesWrongResults) {
    const std::vector<int> in = iota_vec(kThreads);
    std::vector<int> expected(kThreads);
    for (int t = 0; t < kThreads; ++t) {
        expected[t] = in[(t + 1) % kThreads];
    }
    for (uint64_t seed : {1, 2, 3, 4, 5}) {
        qlora::simt::set_seed(seed);
        std::vector<int> good(kThreads, 0);
        QLORA_LAUNCH(neighbour_kernel, 1, kThreads, 0, nullptr, in.data(), good.data(), true);
        EXPECT_EQ(good, expected) << "correct kernel, seed " << seed;
        // Without the barrier a thread that runs before its neighbour reads the neighbour's stale slot. The static
        // shared array keeps the previous launch's values, so clear it first by running the kernel on zeros.
        const std::vector<int> zeros(kThreads, 0);
        std::vector<int> scratch(kThreads);
        QLORA_LAUNCH(neighbour_kernel, 1, kThreads, 0, nullptr, zeros.data(), scratch.data(), true);
        std::vector<int> bad(kThreads, 0);
        QLORA_LAUNCH(neighbour_kernel, 1, kThreads, 0, nullptr, in.data(), bad.data(), false);
        EXPECT_NE(bad, expected) << "the race must show under seed " << seed;
    }
    // The reduction without barriers is wrong too.
    qlora::simt::set_seed(9);
    std::vector<int> out(1, 0);
    QLORA_LAUNCH(block_sum_kernel, 1, kThreads, 0, nullptr, in.data(), out.data(), false);
    EXPECT_NE(out[0], std::accumulate(in.begin(), in.end(), 0));
}

// Per-block max over a grid-stride loop, the block's warps combining partial maxima through shared memory. The
// second barrier (`with_trailing_barrier`) keeps a fast warp from overwriting its slot for the next iteration while
// slower warps still read the current one.
__global__ void strided_block_max_kernel(const int* in, int* out, int nblocks, bool with_trailing_barrier) {
    __shared__ int warp_max[kThreads / 32];
    const int t = static_cast<int>(threadIdx.x);
    for (int b = static_cast<int>(blockIdx.x); b < nblocks; b += static_cast<int>(gridDim.x)) {
        int m = in[b * kThreads + t];
        for (int off = 16; off > 0; off >>= 1) {
            m = std::max(m, __shfl_xor_sync(0xffffffffu, m, off));
        }
        if (t % 32 == 0) {
            warp_max[t / 32] = m;
        }
        __syncthreads();
        int total = warp_max[0];
        for (int w = 1; w < kThreads / 32; ++w) {
            total = std::max(total, warp_max[w]);
        }
        if (t == 0) {
            out[b] = total;
        }
        if (with_trailing_barrier) {
            __syncthreads();
        }
    }
}

TEST(SimtHarnessTest, MissingBarrierBetweenLoopIterationsIsCaughtByWarpPriority) {
    const int nblocks = 64;
    std::vector<int> in(nblocks * kThreads);
    std::mt19937 rng(5);
    for (int& v : in) {
        v = static_cast<int>(rng() % 100000);
    }
    std::vector<int> expected(nblocks);
    for (int b = 0; b < nblocks; ++b) {
        expected[b] = *std::max_element(in.begin() + b * kThreads, in.begin() + (b + 1) * kThreads);
    }
    qlora::simt::set_schedule(qlora::simt::Schedule::kWarpPriority);
    for (uint64_t seed : {1, 2, 3}) {
        qlora::simt::set_seed(seed);
        std::vector<int> good(nblocks), bad(nblocks);
        QLORA_LAUNCH(strided_block_max_kernel, 2, kThreads, 0, nullptr, in.data(), good.data(), nblocks, true);
        QLORA_LAUNCH(strided_block_max_kernel, 2, kThreads, 0, nullptr, in.data(), bad.data(), nblocks, false);
        EXPECT_EQ(good, expected) << seed;
        EXPECT_NE(bad, expected) << "warp-priority scheduling must expose the missing barrier, seed " << seed;
    }
    qlora::simt::set_schedule(qlora::simt::Schedule::kUniform);
}

TEST(SimtHarnessTest, WrongIndexIsVisibleInTheOutput) {
    const int n = 1000;
    const std::vector<int> in = iota_vec(n);
    std::vector<int> ok(n, 0), shifted(n, 0);
    QLORA_LAUNCH(copy_kernel, 4, kThreads, 0, nullptr, in.data(), ok.data(), n, 0);
    QLORA_LAUNCH(copy_kernel, 4, kThreads, 0, nullptr, in.data(), shifted.data(), n, 1);
    EXPECT_EQ(ok, in);
    EXPECT_NE(shifted, in);
}

__global__ void warp_ops_kernel(const int* in, int* out) {
    const int t = static_cast<int>(threadIdx.x);
    const int v = in[t];
    int sum = v;
    for (int off = 16; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, off);
    }
    int down = v;
    for (int off = 16; off > 0; off >>= 1) {
        down += __shfl_down_sync(0xffffffffu, down, off);
    }
    int scan = v;
    for (int off = 1; off < 32; off <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, scan, off);
        if (t % 32 >= off) {
            scan += other;
        }
    }
    const int bcast = __shfl_sync(0xffffffffu, v, 5);
    const int seg = __shfl_xor_sync(0xffffffffu, v, 8, 16); // within 16-lane segments
    const unsigned ballot = __ballot_sync(0xffffffffu, v % 3 == 0);
    const int any = __any_sync(0xffffffffu, v == 40);
    const int all = __all_sync(0xffffffffu, v > 0);
    const double wide = __shfl_xor_sync(0xffffffffu, static_cast<double>(v) + 0.5, 1);
    int* o = out + t * 10;
    o[0] = sum;
    o[1] = down;
    o[2] = scan;
    o[3] = bcast;
    o[4] = seg;
    o[5] = static_cast<int>(ballot);
    o[6] = any;
    o[7] = all;
    o[8] = static_cast<int>(wide * 2);
    o[9] = static_cast<int>(blockDim.x);
}

TEST(SimtHarnessTest, WarpIntrinsicsMatchTheirDefinitions) {
    const int n = 64; // two warps
    const std::vector<int> in = iota_vec(n);
    for (uint64_t seed : {1, 7}) {
        qlora::simt::set_seed(seed);
        std::vector<int> out(n * 10, 0);
        QLORA_LAUNCH(warp_ops_kernel, 1, n, 0, nullptr, in.data(), out.data());
        for (int t = 0; t < n; ++t) {
            const int w = t / 32, lane = t % 32;
            const int* o = out.data() + t * 10;
            int warp_sum = 0, down = 0, scan = 0;
            unsigned ballot = 0;
            bool any = false, all = true;
            for (int l = 0; l < 32; ++l) {
                const int v = in[w * 32 + l];
                warp_sum += v;
                ballot |= (v % 3 == 0 ? 1u : 0u) << l;
                any = any || v == 40;
                all = all && v > 0;
                if (l <= lane) {
                    scan += v;
                }
            }
            // shfl_down tree: lane 0 gets the full sum; lane L gets the sum of the lanes its tree covers.
            if (lane == 0) {
                down = warp_sum;
                EXPECT_EQ(o[1], down) << t;
            }
            EXPECT_EQ(o[0], warp_sum) << t;
            EXPECT_EQ(o[2], scan) << t;
            EXPECT_EQ(o[3], in[w * 32 + 5]) << t;
            EXPECT_EQ(o[4], in[w * 32 + (lane ^ 8)]) << t;
            EXPECT_EQ(static_cast<unsigned>(o[5]), ballot) << t;
            EXPECT_EQ(o[6], any ? 1 : 0) << t;
            EXPECT_EQ(o[7], all ? 1 : 0) << t;
            EXPECT_EQ(o[8], 2 * in[w * 32 + (lane ^ 1)] + 1) << t;
            EXPECT_EQ(o[9], n);
        }
    }
}

__global__ void divergent_barrier_kernel(int* out) {
    if (threadIdx.x < 128) {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

__global__ void divergent_shuffle_kernel(int* out) {
    int v = static_cast<int>(threadIdx.x);
    if (threadIdx.x % 32 < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

__global__ void bad_mask_kernel(int* out) {
    out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}

TEST(SimtHarnessTest, DivergentBarriersAndShufflesAreErrorsNotHangs) {
    std::vector<int> out(kThreads);
    EXPECT_THROW(QLORA_LAUNCH(divergent_barrier_kernel, 1, kThreads, 0, nullptr, out.data()), Error);
    EXPECT_THROW(QLORA_LAUNCH(divergent_shuffle_kernel, 1, 64, 0, nullptr, out.data()), Error);
    try {
        QLORA_LAUNCH(bad_mask_kernel, 1, 64, 0, nullptr, out.data());
        FAIL() << "a mask that excludes the calling lane must be reported";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("excludes the caller"), std::string::npos) << e.what();
    }
    // The harness is usable again after an error.
    std::vector<int> in = iota_vec(kThreads), sum(1);
    QLORA_LAUNCH(block_sum_kernel, 1, kThreads, 0, nullptr, in.data(), sum.data(), true);
    EXPECT_EQ(sum[0], std::accumulate(in.begin(), in.end(), 0));
}

__global__ void dynamic_shared_kernel(const float* in, float* out) {
    QLORA_DYNAMIC_SHARED(float, buf);
    const unsigned t = threadIdx.x;
    buf[blockDim.x - 1 - t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = buf[t];
}

__global__ void coords_kernel(int* out) {
    const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    out[b * blockDim.x * blockDim.y * blockDim.z + t] = static_cast<int>(b * 1000 + t);
}

TEST(SimtHarnessTest, DynamicSharedMemoryAndMultiDimensionalLaunches) {
    const std::vector<float> in = {1, 2, 3, 4, 5, 6, 7, 8};
    std::vector<float> out(8);
    QLORA_LAUNCH(dynamic_shared_kernel, 2, 4, 4 * sizeof(float), nullptr, in.data(), out.data());
    EXPECT_EQ(out, (std::vector<float>{4, 3, 2, 1, 8, 7, 6, 5}));
    std::vector<int> c(2 * 3 * 2 * 4 * 2 * 1, -1);
    qlora::simt::launch(dim3(2, 3, 2), dim3(4, 2, 1), 0, [&] { coords_kernel(c.data()); });
    for (size_t i = 0; i < c.size(); ++i) {
        EXPECT_EQ(c[i], static_cast<int>((i / 8) * 1000 + i % 8));
    }
}

TEST(SimtHarnessTest, HalfConversionsRoundToNearestEven) {
    // Every half bit pattern converts to float and back unchanged (NaNs stay NaN).
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const __half x{static_cast<uint16_t>(h)};
        const float f = __half2float(x);
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(__half2float(__float2half_rn(f))));
            continue;
        }
        EXPECT_EQ(__float2half_rn(f).bits, h) << std::hex << h;
    }
    // Midpoints between neighbouring halves go to the even one; a hair above goes up.
    for (uint32_t h = 0; h < 0x7bff; ++h) {
        const float lo = __half2float(__half{static_cast<uint16_t>(h)});
        const float hi = __half2float(__half{static_cast<uint16_t>(h + 1)});
        const float mid = static_cast<float>((static_cast<double>(lo) + hi) / 2);
        const uint16_t even = (h % 2 == 0) ? h : h + 1;
        EXPECT_EQ(__float2half_rn(mid).bits, even) << std::hex << h;
        EXPECT_EQ(__float2half_rn(std::nextafter(mid, 1e9f)).bits, h + 1) << std::hex << h;
    }
    EXPECT_EQ(__float2half_rn(65520.0f).bits, 0x7c00); // overflow rounds to infinity
    EXPECT_EQ(__float2half_rn(65519.0f).bits, 0x7bff);
    EXPECT_EQ(__float2half_rn(-1e-9f).bits, 0x8000); // below half the smallest subnormal: -0
}

TEST(SimtHarnessTest, Bfloat16ConversionsRoundToNearestEven) {
    std::mt19937 rng(3);
    for (int i = 0; i < 200000; ++i) {
        const uint32_t u = rng() & 0x7effffffu; // finite, below the top binade (where rounding up reaches inf)
        const float f = __uint_as_float(u | ((rng() & 1u) << 31));
        const __nv_bfloat16 b = __float2bfloat16_rn(f);
        const float lo = __uint_as_float(__float_as_uint(f) & 0xffff0000u);
        const float hi = __uint_as_float((__float_as_uint(f) & 0xffff0000u) + 0x10000u);
        const double dlo = std::fabs(double(f) - lo), dhi = std::fabs(double(f) - hi);
        const float expected = dlo < dhi ? lo : (dhi < dlo ? hi : ((__float_as_uint(lo) >> 16) % 2 == 0 ? lo : hi));
        ASSERT_EQ(__bfloat162float(b), expected) << f;
    }
    EXPECT_TRUE(std::isnan(__bfloat162float(__float2bfloat16_rn(std::nanf("")))));
}

} // namespace
