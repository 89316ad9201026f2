// tests/cpp/simt/test_simt_kernels.cpp: qlora's CUDA kernels, compiled from csrc/cuda/*_kernels.cuh by the host
// compiler and run on the CPU by the SIMT harness, against the CPU operators. The kernels use exactly the CPU's
// float32 arithmetic (csrc/core; no fast-math intrinsics), so every result must be equal bit for bit.
//
// Every __global__ kernel in csrc/cuda must be exercised here; EveryKernelHasAHarnessTest enforces it by name.
#include <array>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "qlora/ops.h"

// After torch's headers: simt.h defines CUDA's keywords as macros.
#include "simt/simt.h"

#include "cuda/nf4_kernels.cuh"
#include "cuda/nf4_linear_kernels.cuh"

namespace {

namespace cuda = qlora::cuda;

const int64_t kSizes[] = {1, 2, 31, 63, 64, 65, 1000, 4097, 20001};
const int64_t kBlocksizes[] = {32, 64, 256, 4096};
// Grid caps: 0 = the launcher's own grid (one loop iteration per block for these sizes), 2 = every block walks its
// grid-stride loop several times (what happens on the GPU for large tensors).
const int64_t kMaxBlocks[] = {0, 2};
const qlora::simt::Schedule kSchedules[] = {qlora::simt::Schedule::kUniform, qlora::simt::Schedule::kWarpPriority};

template <typename T> at::ScalarType scalar_type_of();
template <> at::ScalarType scalar_type_of<float>() {
    return at::kFloat;
}
template <> at::ScalarType scalar_type_of<__nv_bfloat16>() {
    return at::kBFloat16;
}
template <> at::ScalarType scalar_type_of<__half>() {
    return at::kHalf;
}

at::Tensor test_weight(int64_t n, at::ScalarType dt, uint64_t seed) {
    at::manual_seed(static_cast<int64_t>(seed));
    at::Tensor w = at::randn({n}) * 2;
    if (n > 300) {
        w.slice(0, 64, 128).zero_(); // all-zero blocks for bs 32 and 64
    }
    return w.to(dt);
}

template <typename T> void check_quantize_kernel() {
    const at::ScalarType dt = scalar_type_of<T>();
    for (int64_t n : kSizes) {
        for (int64_t bs : kBlocksizes) {
            qlora::simt::set_seed(static_cast<uint64_t>(n * 7 + bs));
            const at::Tensor w = test_weight(n, dt, static_cast<uint64_t>(n + bs));
            const qlora::Nf4Tensor ref = qlora::nf4_quantize(w, bs, /*double_quant=*/false);
            at::Tensor packed = at::full_like(ref.packed, 0xAB);
            at::Tensor absmax = at::full_like(ref.absmax, -1.0f);
            for (int64_t max_blocks : kMaxBlocks) {
                for (qlora::simt::Schedule schedule : kSchedules) {
                    qlora::simt::set_schedule(schedule);
                    packed.fill_(0xAB);
                    absmax.fill_(-1.0f);
                    const cuda::Nf4QuantizeParams p{
                        w.const_data_ptr(), n, bs, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>()};
                    cuda::nf4_quantize_launch<T>(p, nullptr, max_blocks);
                    const std::string what = std::string(c10::toString(dt)) + " n=" + std::to_string(n) +
                                             " bs=" + std::to_string(bs) + " max_blocks=" + std::to_string(max_blocks);
                    EXPECT_TRUE(at::equal(packed, ref.packed)) << what;
                    EXPECT_TRUE(at::equal(absmax, ref.absmax)) << what;
                }
            }
            qlora::simt::set_schedule(qlora::simt::Schedule::kUniform);
        }
    }
}

TEST(SimtKernelsTest, Nf4QuantizeKernelMatchesCpuFloat) {
    check_quantize_kernel<float>();
}
TEST(SimtKernelsTest, Nf4QuantizeKernelMatchesCpuBfloat16) {
    check_quantize_kernel<__nv_bfloat16>();
}
TEST(SimtKernelsTest, Nf4QuantizeKernelMatchesCpuHalf) {
    check_quantize_kernel<__half>();
}

TEST(SimtKernelsTest, Nf4QuantizeKernelFlagsNonFiniteBlocks) {
    at::Tensor w = at::randn({1000});
    w[300] = NAN;
    w[700] = INFINITY;
    at::Tensor packed = at::zeros({500}, at::kByte);
    at::Tensor absmax = at::zeros({16});
    cuda::nf4_quantize_launch<float>(
        {w.const_data_ptr(), 1000, 64, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>()}, nullptr
    );
    for (int64_t b = 0; b < 16; ++b) {
        const float a = absmax[b].item<float>();
        EXPECT_EQ(std::isfinite(a), b != 4 && b != 10) << "block " << b << " absmax " << a;
    }
}

at::Tensor seeded_randn(int64_t seed, int64_t n) {
    at::manual_seed(seed);
    return at::randn({n});
}

// Restores the default schedule when a test ends.
struct ScheduleScope {
    ~ScheduleScope() { qlora::simt::set_schedule(qlora::simt::Schedule::kUniform); }
};

TEST(SimtKernelsTest, Dynamic8QuantizeKernelMatchesCpu) {
    ScheduleScope scope;
    // The nested step of double quantization: absmax - offset in blocks of 256 against the signed map. The last
    // weight (seed 2, 4096 x 4096 normal) holds an exact midpoint tie among its nested values (asserted in
    // tests/python/test_nf4.py::TestNf4Ops::test_nested_midpoint_ties_follow_the_search).
    const std::vector<at::Tensor> weights = {
        test_weight(1000 * 64, at::kFloat, 1), test_weight(65537 * 64, at::kFloat, 3), seeded_randn(2, 4096 * 4096)};
    for (const at::Tensor& w : weights) {
        for (int64_t max_blocks : kMaxBlocks) {
            for (qlora::simt::Schedule schedule : kSchedules) {
                qlora::simt::set_schedule(schedule);
                const int64_t n = w.numel();
                qlora::simt::set_seed(static_cast<uint64_t>(n + max_blocks));
                const qlora::Nf4Tensor plain = qlora::nf4_quantize(w, 64, false);
                const qlora::Nf4Tensor dq = qlora::nf4_quantize(w, 64, true);
                const at::Tensor centred = (plain.absmax - dq.offset).contiguous();
                const int64_t nb = centred.numel();
                at::Tensor q = at::full({nb}, 7, at::kByte);
                at::Tensor nested = at::full_like(dq.nested_absmax, -1.0f);
                const cuda::Dynamic8QuantizeParams p{
                    centred.const_data_ptr<float>(), nb, dq.nested_code.const_data_ptr<float>(), q.data_ptr<uint8_t>(),
                    nested.data_ptr<float>()};
                cuda::dynamic8_quantize_launch(p, nullptr, max_blocks);
                const std::string what = "n=" + std::to_string(n) + " max_blocks=" + std::to_string(max_blocks) +
                                         " schedule=" + std::to_string(static_cast<int>(schedule));
                EXPECT_TRUE(at::equal(q, dq.absmax)) << what;
                EXPECT_TRUE(at::equal(nested, dq.nested_absmax)) << what;
            }
        }
    }
}

cuda::Nf4WeightView weight_view(const qlora::Nf4Tensor& q) {
    cuda::Nf4WeightView v{};
    v.packed = q.packed.const_data_ptr<uint8_t>();
    v.blocksize = q.blocksize;
    if (q.double_quantized()) {
        v.absmax_q = q.absmax.const_data_ptr<uint8_t>();
        v.nested_absmax = q.nested_absmax.const_data_ptr<float>();
        v.nested_code = q.nested_code.const_data_ptr<float>();
        v.offset = q.offset.const_data_ptr<float>();
    } else {
        v.absmax_f32 = q.absmax.const_data_ptr<float>();
    }
    return v;
}

template <typename T> void check_dequantize_kernel(bool double_quant) {
    const at::ScalarType dt = scalar_type_of<T>();
    for (int64_t n : kSizes) {
        for (int64_t bs : kBlocksizes) {
            const at::Tensor w = test_weight(n, at::kFloat, static_cast<uint64_t>(n * 3 + bs));
            const qlora::Nf4Tensor q = qlora::nf4_quantize(w, bs, double_quant);
            const at::Tensor ref = qlora::nf4_dequantize(q, dt);
            for (int64_t max_blocks : kMaxBlocks) {
                at::Tensor out = at::full({n}, 1234.0f).to(dt);
                const cuda::Nf4DequantizeParams p{weight_view(q), n, out.data_ptr()};
                cuda::nf4_dequantize_launch<T>(p, nullptr, max_blocks);
                // Bitwise: compare the raw bytes (an all-zero block dequantizes to -0.0, which == would not tell
                // apart).
                EXPECT_TRUE(at::equal(out.view(at::kByte), ref.view(at::kByte)))
                    << c10::toString(dt) << " n=" << n << " bs=" << bs << " dq=" << double_quant
                    << " max_blocks=" << max_blocks;
            }
        }
    }
}

TEST(SimtKernelsTest, Nf4DequantizeKernelMatchesCpuFloat) {
    check_dequantize_kernel<float>(false);
    check_dequantize_kernel<float>(true);
}
TEST(SimtKernelsTest, Nf4DequantizeKernelMatchesCpuBfloat16) {
    check_dequantize_kernel<__nv_bfloat16>(false);
    check_dequantize_kernel<__nv_bfloat16>(true);
}
TEST(SimtKernelsTest, Nf4DequantizeKernelMatchesCpuHalf) {
    check_dequantize_kernel<__half>(false);
    check_dequantize_kernel<__half>(true);
}

TEST(SimtKernelsTest, DequantizeTileKernelMatchesCpuDequantize) {
    // Tiles of W [N, K] at every kind of offset, K both a multiple of the blocksize and not (blocks straddle rows).
    for (int64_t K : {64, 100, 257}) {
        const int64_t N = 37;
        for (bool dq : {false, true}) {
            const at::Tensor w = test_weight(N * K, at::kFloat, static_cast<uint64_t>(K)).view({N, K});
            const qlora::Nf4Tensor q = qlora::nf4_quantize(w, 32, dq);
            const at::Tensor full = qlora::nf4_dequantize(q);
            for (auto [n0, k0, rows, cols] : {std::array<int64_t, 4>{0, 0, N, K}, {5, 3, 11, 17}, {36, K - 1, 1, 1}}) {
                for (int64_t max_blocks : kMaxBlocks) {
                    at::Tensor out = at::full({rows, cols}, 99.0f);
                    cuda::nf4_dequantize_tile_launch<float>(
                        {weight_view(q), K, n0, k0, rows, cols, out.data_ptr()}, nullptr, max_blocks
                    );
                    const at::Tensor ref = full.slice(0, n0, n0 + rows).slice(1, k0, k0 + cols);
                    EXPECT_TRUE(at::equal(out.view(at::kInt), ref.contiguous().view(at::kInt)))
                        << "K=" << K << " dq=" << dq << " tile " << n0 << "," << k0 << " " << rows << "x" << cols;
                }
            }
        }
    }
}

TEST(SimtKernelsTest, GemvKernelMatchesCpuLinearWithinSummationBound) {
    // The kernel sums in a different order than the CPU (lanes stride over k, then a butterfly), so results agree
    // within the float32 summation bound |error| <= gamma_K * sum_k |x_k w_k|, gamma_K = K u / (1 - K u), u = 2^-24,
    // for both against the float64 product; checked against the float64 reference directly.
    for (int64_t M : {1, 3, 16}) {
        for (int64_t K : {64, 257}) {
            const int64_t N = 45;
            const at::Tensor w = test_weight(N * K, at::kFloat, static_cast<uint64_t>(M * K)).view({N, K});
            const qlora::Nf4Tensor q = qlora::nf4_quantize(w, 64, true);
            const at::Tensor wd = qlora::nf4_dequantize(q).to(at::kDouble);
            for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
                const at::Tensor x = at::randn({M, K}).to(dt);
                const at::Tensor xd = x.to(at::kDouble);
                const at::Tensor ref = at::mm(xd, wd.t());
                const at::Tensor bound = at::mm(xd.abs(), wd.abs().t()) * (K * 0x1p-24 / (1 - K * 0x1p-24));
                for (int64_t max_blocks : kMaxBlocks) {
                    at::Tensor y = at::full({M, N}, NAN);
                    const cuda::Nf4GemvParams p{weight_view(q), x.const_data_ptr(), M, N, K, y.data_ptr<float>()};
                    if (dt == at::kFloat) {
                        cuda::nf4_linear_gemv_launch<float>(p, nullptr, max_blocks);
                    } else if (dt == at::kBFloat16) {
                        cuda::nf4_linear_gemv_launch<__nv_bfloat16>(p, nullptr, max_blocks);
                    } else {
                        cuda::nf4_linear_gemv_launch<__half>(p, nullptr, max_blocks);
                    }
                    const at::Tensor err = (y.to(at::kDouble) - ref).abs();
                    EXPECT_TRUE(at::all(err <= bound).item<bool>())
                        << "M=" << M << " K=" << K << " " << dt << " max err " << err.max().item<double>();
                }
            }
        }
    }
}

// Every `__global__` function declared under csrc/cuda must be named in this file (so it has a harness test).
TEST(SimtKernelsTest, EveryKernelHasAHarnessTest) {
    const std::filesystem::path root = QLORA_SOURCE_DIR;
    const std::filesystem::path here = root / "tests" / "cpp" / "simt" / "test_simt_kernels.cpp";
    const std::filesystem::path cuda_dir = root / "csrc" / "cuda";
    ASSERT_TRUE(std::filesystem::is_directory(cuda_dir)) << cuda_dir;
    std::ifstream self(here);
    std::stringstream self_text;
    self_text << self.rdbuf();
    const std::regex kernel_decl(R"(__global__\s+void\s+(\w+))");
    std::set<std::string> kernels;
    for (const auto& entry : std::filesystem::directory_iterator(cuda_dir)) {
        std::ifstream f(entry.path());
        std::stringstream text;
        text << f.rdbuf();
        const std::string s = text.str();
        for (auto it = std::sregex_iterator(s.begin(), s.end(), kernel_decl); it != std::sregex_iterator(); ++it) {
            kernels.insert((*it)[1]);
        }
    }
    EXPECT_GE(kernels.size(), 3u);
    for (const std::string& k : kernels) {
        // A kernel counts as tested when this file calls its launcher (<name without _kernel>_launch).
        const std::string launcher = k.substr(0, k.rfind("_kernel")) + "_launch";
        EXPECT_NE(self_text.str().find("cuda::" + launcher), std::string::npos) << k << " has no harness test";
    }
}

} // namespace
