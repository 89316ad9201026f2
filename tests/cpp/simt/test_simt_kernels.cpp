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
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "attention_checks.h"
#include "qlora/ops.h"

// After torch's headers: simt.h defines CUDA's keywords as macros.
#include "simt/simt.h"

#include "cuda/adamw_kernels.cuh"
#include "cuda/attention_kernels.cuh"
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

// --------------------------------------------------------------------------------------------------------------
// AdamW: the kernels against the CPU operators (called by name through the dispatcher, on the scalar ISA, whose
// block kernel is the reference algorithm), over consecutive steps so state written by one step is read by the next.

const int64_t kAdamwSizes[] = {1, 255, 256, 257, 4096, 10000};

struct AdamwHyper {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;
};

// Restores the CPU ISA a test changed.
struct CpuIsaScope {
    std::string saved = qlora::cpu_isa();
    ~CpuIsaScope() { qlora::set_cpu_isa(saved); }
};

void adamw8_cpu(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
    at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, int64_t step, const AdamwHyper& h
) {
    using Sig = void(
        at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t, double, double, double, double, double
    );
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qlora::adamw8bit_step", "").typed<Sig>();
    op.call(
        param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay
    );
}

void adamw32_cpu(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, int64_t step,
    const AdamwHyper& h
) {
    using Sig =
        void(at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, double, double, double, double, double);
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qlora::adamw32bit_step", "").typed<Sig>();
    op.call(param, grad, exp_avg, exp_avg_sq, step, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
}

qlora::core::AdamwScalars adamw_scalars_of(const AdamwHyper& h, int64_t step) {
    return qlora::core::adamw_scalars(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step);
}

// Gradient of step `step` (1-based): normal values, a few NaN/Inf elements (at other places each step), and block 1
// (elements 256-511) all zero, which with zero initial state there makes an all-zero moment block (absmax 0).
at::Tensor adamw_test_grad(int64_t n, at::ScalarType dt, int64_t step) {
    at::manual_seed(1000 * n + step);
    at::Tensor g = at::randn({n}) * 0.1;
    if (n > 2 * qlora::core::kAdamw8BlockSize) {
        g.slice(0, qlora::core::kAdamw8BlockSize, 2 * qlora::core::kAdamw8BlockSize).zero_();
    }
    if (step != 1 || n > 1) { // n = 1: step 1 keeps its one finite element, later steps skip it
        g[(7 * step) % n] = NAN;
    }
    if (n > 3) {
        g[(n / 2 + step) % n] = INFINITY;
        g[n - 1 - step] = -INFINITY;
    }
    return g.to(dt);
}

at::Tensor adamw_test_param(int64_t n, at::ScalarType dt) {
    at::manual_seed(n);
    return at::randn({n}).to(dt);
}

// Raw bytes: NaN and the sign of zero must match too.
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
    return a.scalar_type() == b.scalar_type() &&
           at::equal(a.contiguous().view(at::kByte), b.contiguous().view(at::kByte));
}

template <typename T> void check_adamw8_kernel() {
    const at::ScalarType dt = scalar_type_of<T>();
    CpuIsaScope isa_scope;
    ScheduleScope schedule_scope;
    qlora::set_cpu_isa("scalar");
    const at::Tensor qmap1 = qlora::dynamic8_code(/*is_signed=*/true);
    const at::Tensor qmap2 = qlora::dynamic8_code(/*is_signed=*/false);
    for (int64_t n : kAdamwSizes) {
        const int64_t nb = cuda::ceil_div(n, qlora::core::kAdamw8BlockSize);
        for (double wd : {0.0, 0.01}) {
            const AdamwHyper h{.weight_decay = wd};
            for (int64_t max_blocks : kMaxBlocks) {
                for (qlora::simt::Schedule schedule : kSchedules) {
                    qlora::simt::set_schedule(schedule);
                    qlora::simt::set_seed(static_cast<uint64_t>(n * 5 + max_blocks));
                    // Nonzero initial state (random codes, positive absmax) except block 1, which starts at zero.
                    at::manual_seed(n + 1);
                    at::Tensor param = adamw_test_param(n, dt);
                    at::Tensor state1 = at::randint(0, 256, {n}, at::kByte);
                    at::Tensor state2 = at::randint(0, 256, {n}, at::kByte);
                    at::Tensor absmax1 = at::rand({nb}) * 0.05 + 1e-3;
                    at::Tensor absmax2 = at::rand({nb}) * 1e-3 + 1e-6;
                    if (nb > 2) {
                        state1.slice(0, 256, 512).fill_(127); // +0 in the signed map
                        state2.slice(0, 256, 512).zero_();
                        absmax1[1] = 0.0f;
                        absmax2[1] = 0.0f;
                    }
                    at::Tensor k_param = param.clone();
                    at::Tensor k_state1 = state1.clone();
                    at::Tensor k_state2 = state2.clone();
                    at::Tensor k_absmax1 = absmax1.clone();
                    at::Tensor k_absmax2 = absmax2.clone();
                    for (int64_t step = 1; step <= 3; ++step) {
                        const at::Tensor grad = adamw_test_grad(n, dt, step);
                        adamw8_cpu(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, h);
                        qlora::core::Adamw8Params<T> p{};
                        p.param = static_cast<T*>(k_param.data_ptr());
                        p.grad = static_cast<const T*>(grad.const_data_ptr());
                        p.state1 = k_state1.data_ptr<uint8_t>();
                        p.state2 = k_state2.data_ptr<uint8_t>();
                        p.absmax1 = k_absmax1.data_ptr<float>();
                        p.absmax2 = k_absmax2.data_ptr<float>();
                        p.qmap1 = qmap1.const_data_ptr<float>();
                        p.qmap2 = qmap2.const_data_ptr<float>();
                        p.n = n;
                        p.scalars = adamw_scalars_of(h, step);
                        cuda::adamw8_launch<T>(p, nullptr, max_blocks);
                        const std::string what =
                            std::string(c10::toString(dt)) + " n=" + std::to_string(n) + " wd=" + std::to_string(wd) +
                            " max_blocks=" + std::to_string(max_blocks) +
                            " schedule=" + std::to_string(static_cast<int>(schedule)) + " step=" + std::to_string(step);
                        const bool same = same_bits(k_param, param) && same_bits(k_state1, state1) &&
                                          same_bits(k_state2, state2) && same_bits(k_absmax1, absmax1) &&
                                          same_bits(k_absmax2, absmax2);
                        EXPECT_TRUE(same_bits(k_param, param)) << what << ": param";
                        EXPECT_TRUE(same_bits(k_state1, state1)) << what << ": state1";
                        EXPECT_TRUE(same_bits(k_state2, state2)) << what << ": state2";
                        EXPECT_TRUE(same_bits(k_absmax1, absmax1)) << what << ": absmax1";
                        EXPECT_TRUE(same_bits(k_absmax2, absmax2)) << what << ": absmax2";
                        if (!same) {
                            break; // later steps would only repeat the difference
                        }
                    }
                    if (nb > 2) { // the zero block stayed all zero: absmax 0 (codes 255 / 0, see adamw8_sign_fix)
                        EXPECT_EQ(k_absmax1[1].item<float>(), 0.0f) << n;
                        EXPECT_EQ(k_absmax2[1].item<float>(), 0.0f) << n;
                    }
                }
            }
        }
    }
}

TEST(SimtKernelsTest, Adamw8KernelMatchesCpuFloat) {
    check_adamw8_kernel<float>();
}
TEST(SimtKernelsTest, Adamw8KernelMatchesCpuBfloat16) {
    check_adamw8_kernel<__nv_bfloat16>();
}
TEST(SimtKernelsTest, Adamw8KernelMatchesCpuHalf) {
    check_adamw8_kernel<__half>();
}

template <typename T> void check_adamw32_kernel() {
    const at::ScalarType dt = scalar_type_of<T>();
    CpuIsaScope isa_scope;
    ScheduleScope schedule_scope;
    qlora::set_cpu_isa("scalar");
    for (int64_t n : kAdamwSizes) {
        for (double wd : {0.0, 0.01}) {
            const AdamwHyper h{.weight_decay = wd};
            for (int64_t max_blocks : kMaxBlocks) {
                for (qlora::simt::Schedule schedule : kSchedules) {
                    qlora::simt::set_schedule(schedule);
                    qlora::simt::set_seed(static_cast<uint64_t>(n * 3 + max_blocks));
                    at::manual_seed(n + 2);
                    at::Tensor param = adamw_test_param(n, dt);
                    at::Tensor exp_avg = at::randn({n}) * 0.01;
                    at::Tensor exp_avg_sq = at::rand({n}) * 1e-4;
                    if (n > 2 * qlora::core::kAdamw8BlockSize) {
                        exp_avg.slice(0, 256, 512).zero_();
                        exp_avg_sq.slice(0, 256, 512).zero_();
                    }
                    at::Tensor k_param = param.clone();
                    at::Tensor k_exp_avg = exp_avg.clone();
                    at::Tensor k_exp_avg_sq = exp_avg_sq.clone();
                    for (int64_t step = 1; step <= 3; ++step) {
                        const at::Tensor grad = adamw_test_grad(n, dt, step);
                        adamw32_cpu(param, grad, exp_avg, exp_avg_sq, step, h);
                        qlora::core::Adamw32Params<T> p{};
                        p.param = static_cast<T*>(k_param.data_ptr());
                        p.grad = static_cast<const T*>(grad.const_data_ptr());
                        p.exp_avg = k_exp_avg.data_ptr<float>();
                        p.exp_avg_sq = k_exp_avg_sq.data_ptr<float>();
                        p.n = n;
                        p.scalars = adamw_scalars_of(h, step);
                        cuda::adamw32_launch<T>(p, nullptr, max_blocks);
                        const std::string what =
                            std::string(c10::toString(dt)) + " n=" + std::to_string(n) + " wd=" + std::to_string(wd) +
                            " max_blocks=" + std::to_string(max_blocks) +
                            " schedule=" + std::to_string(static_cast<int>(schedule)) + " step=" + std::to_string(step);
                        const bool same = same_bits(k_param, param) && same_bits(k_exp_avg, exp_avg) &&
                                          same_bits(k_exp_avg_sq, exp_avg_sq);
                        EXPECT_TRUE(same_bits(k_param, param)) << what << ": param";
                        EXPECT_TRUE(same_bits(k_exp_avg, exp_avg)) << what << ": exp_avg";
                        EXPECT_TRUE(same_bits(k_exp_avg_sq, exp_avg_sq)) << what << ": exp_avg_sq";
                        if (!same) {
                            break;
                        }
                    }
                }
            }
        }
    }
}

TEST(SimtKernelsTest, Adamw32KernelMatchesCpuFloat) {
    check_adamw32_kernel<float>();
}
TEST(SimtKernelsTest, Adamw32KernelMatchesCpuBfloat16) {
    check_adamw32_kernel<__nv_bfloat16>();
}
TEST(SimtKernelsTest, Adamw32KernelMatchesCpuHalf) {
    check_adamw32_kernel<__half>();
}

// --------------------------------------------------------------------------------------------------------------
// Causal attention: the kernels against a float64 evaluation of Note [Causal attention] (core/attention.h). The
// kernels round differently from any reference (summation order, expf), so the bound is PyTorch's own attention in
// the same dtype: each result's largest error may be at most twice that of at::scaled_dot_product_attention on the
// same inputs (plus 1e-6 for float32, whose SDPA error can be near 0 on tiny cases).

struct AttentionCase {
    int64_t B, H, KVH, T, D;
    bool segments;
};

// Segment ids [B, T] int32 with three cuts per row (a packed row of four documents), or undefined.
at::Tensor attention_segments(int64_t B, int64_t T, bool on) {
    if (!on) {
        return at::Tensor();
    }
    at::Tensor seg = at::zeros({B, T}, at::kInt);
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t cut : {T / 5 + b, T / 2, T - 3}) {
            seg[b].slice(0, cut).add_(1);
        }
    }
    return seg;
}

// [B, 1, T, T] boolean mask of the visible keys.
at::Tensor attention_mask(int64_t B, int64_t T, const at::Tensor& seg) {
    at::Tensor mask = at::ones({T, T}, at::kBool).tril().expand({B, 1, T, T});
    if (seg.defined()) {
        mask = mask.logical_and(seg.unsqueeze(2).eq(seg.unsqueeze(1)).unsqueeze(1));
    }
    return mask;
}

struct AttentionResult {
    at::Tensor out, lse, dq, dk, dv;
};

// Reference (float64 math, or SDPA in the input dtype) with gradients for grad_out g.
AttentionResult attention_reference(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& mask,
    at::ScalarType dt
) {
    const int64_t G = q.size(1) / k.size(1);
    at::Tensor qr = q.to(dt).detach().set_requires_grad(true), kr = k.to(dt).detach().set_requires_grad(true),
               vr = v.to(dt).detach().set_requires_grad(true);
    const at::Tensor ke = kr.repeat_interleave(G, 1), ve = vr.repeat_interleave(G, 1);
    AttentionResult r;
    if (dt == at::kDouble) {
        const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
        const at::Tensor s = at::matmul(qr, ke.transpose(-1, -2)).mul(scale).masked_fill(mask.logical_not(), -INFINITY);
        r.lse = at::logsumexp(s, -1);
        r.out = at::matmul(at::softmax(s, -1), ve);
    } else {
        r.out = at::scaled_dot_product_attention(qr, ke, ve, mask);
    }
    r.out.backward(g.to(dt));
    r.dq = qr.grad();
    r.dk = kr.grad();
    r.dv = vr.grad();
    return r;
}

double max_error(const at::Tensor& a, const at::Tensor& ref) {
    return (a.to(at::kDouble) - ref).abs().max().item<double>();
}

template <typename T> void check_attention_kernels() {
    const at::ScalarType dt = scalar_type_of<T>();
    ScheduleScope schedule_scope;
    const AttentionCase cases[] = {
        {1, 2, 1, 5, 8, false}, {2, 4, 2, 37, 24, true}, {1, 3, 3, 45, 40, false}, {1, 2, 2, 33, 64, true}};
    for (const AttentionCase& c : cases) {
        at::manual_seed(c.T * 31 + c.D);
        // q in the trainer's layout: a [B, T, H, D] projection viewed as [B, H, T, D].
        const at::Tensor q = at::randn({c.B, c.T, c.H, c.D}).to(dt).transpose(1, 2);
        const at::Tensor k = at::randn({c.B, c.KVH, c.T, c.D}).to(dt);
        const at::Tensor v = at::randn({c.B, c.KVH, c.T, c.D}).to(dt);
        const at::Tensor g = at::randn({c.B, c.H, c.T, c.D}).to(dt);
        const at::Tensor seg = attention_segments(c.B, c.T, c.segments);
        const at::Tensor mask = attention_mask(c.B, c.T, seg);
        const AttentionResult ref = attention_reference(q, k, v, g, mask, at::kDouble);
        const AttentionResult low = attention_reference(q, k, v, g, mask, dt);
        const double slack = dt == at::kFloat ? 1e-6 : 0.0;
        const auto bound = [&](const at::Tensor& t, const at::Tensor& r) {
            return 2 * max_error(t, r) + slack;
        };
        for (int64_t max_blocks : kMaxBlocks) {
            for (qlora::simt::Schedule schedule : kSchedules) {
                qlora::simt::set_schedule(schedule);
                qlora::simt::set_seed(static_cast<uint64_t>(c.T + max_blocks));
                at::Tensor out = at::full({c.B, c.T, c.H, c.D}, NAN).to(dt).transpose(1, 2);
                at::Tensor lse = at::full({c.B, c.H, c.T}, NAN);
                const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
                const qlora::core::AttentionFwdParams<T> p =
                    qlora::attention_fwd_params<T>(q, k, v, seg, out, lse, scale);
                cuda::attention_fwd_launch<T>(p, nullptr, max_blocks);
                const std::string what = std::string(c10::toString(dt)) + " T=" + std::to_string(c.T) +
                                         " D=" + std::to_string(c.D) + " max_blocks=" + std::to_string(max_blocks) +
                                         " schedule=" + std::to_string(static_cast<int>(schedule));
                EXPECT_LE(max_error(out, ref.out), bound(low.out, ref.out)) << what << ": out";
                // lse is float32 for every dtype: within float32 rounding of log-sum-exp of the dtype's products.
                EXPECT_LE(max_error(lse, ref.lse), 2 * max_error(low.out, ref.out) + 1e-5) << what << ": lse";

                at::Tensor dq = at::full_like(q, NAN), dk = at::full_like(k, NAN), dv = at::full_like(v, NAN);
                at::Tensor delta = at::full({c.B, c.H, c.T}, NAN);
                const cuda::AttentionBwdLaunch<T> a{
                    qlora::attention_bwd_params<T>(g, q, k, v, out, lse, seg, dq, dk, dv, scale),
                    delta.data_ptr<float>()};
                cuda::attention_bwd_dq_launch<T>(a, nullptr, max_blocks);
                cuda::attention_bwd_dkv_launch<T>(a, nullptr, max_blocks);
                EXPECT_LE(max_error(dq, ref.dq), bound(low.dq, ref.dq)) << what << ": dq";
                EXPECT_LE(max_error(dk, ref.dk), bound(low.dk, ref.dk)) << what << ": dk";
                EXPECT_LE(max_error(dv, ref.dv), bound(low.dv, ref.dv)) << what << ": dv";
            }
        }
    }
}

TEST(SimtKernelsTest, AttentionKernelsMatchReferenceFloat) {
    check_attention_kernels<float>();
}
TEST(SimtKernelsTest, AttentionKernelsMatchReferenceBfloat16) {
    check_attention_kernels<__nv_bfloat16>();
}
TEST(SimtKernelsTest, AttentionKernelsMatchReferenceHalf) {
    check_attention_kernels<__half>();
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
