// tests/cpp/ops/test_nf4_ops.cpp: qlora::nf4_quantize / nf4_dequantize through the C++ API and the dispatcher.
//
// What is checked against what: every SIMD path against the scalar path (identical bytes and values), the
// dequantized weight against the format's error bound (half the widest gap between NF4 codes times the block
// absmax), double quantization against its definition computed here with ATen ops, and the error messages.
#include <cmath>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "qlora/ops.h"

namespace {

using qlora::Nf4Tensor;

// Restores the CPU ISA a test changed.
struct IsaScope {
    std::string saved = qlora::cpu_isa();
    ~IsaScope() { qlora::set_cpu_isa(saved); }
};

std::vector<std::string> supported_isas() {
    IsaScope scope;
    std::vector<std::string> out = {"scalar"};
    for (const char* isa : {"avx2", "avx512"}) {
        try {
            qlora::set_cpu_isa(isa);
            out.emplace_back(isa);
        } catch (const c10::Error&) {
        }
    }
    return out;
}

void expect_same(const Nf4Tensor& a, const Nf4Tensor& b, const std::string& what) {
    EXPECT_TRUE(at::equal(a.packed, b.packed)) << what << ": packed codes differ";
    EXPECT_TRUE(at::equal(a.absmax, b.absmax)) << what << ": absmax differs";
    if (a.double_quantized()) {
        EXPECT_TRUE(at::equal(a.nested_absmax, b.nested_absmax)) << what;
        EXPECT_TRUE(at::equal(a.offset, b.offset)) << what;
    }
}

TEST(Nf4OpsTest, OperatorsAreRegisteredForEveryBackend) {
    auto& d = c10::Dispatcher::singleton();
    for (const char* name : {"qlora::nf4_quantize", "qlora::nf4_dequantize"}) {
        const auto op = d.findSchemaOrThrow(name, "");
        EXPECT_TRUE(op.hasKernelForDispatchKey(c10::DispatchKey::CPU)) << name;
        EXPECT_TRUE(op.hasKernelForDispatchKey(c10::DispatchKey::Meta)) << name;
#if defined(QLORA_TEST_EXPECT_CUDA)
        EXPECT_TRUE(op.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) << name;
#endif
    }
}

TEST(Nf4OpsTest, EverySimdPathMatchesScalar) {
    IsaScope scope;
    const std::vector<std::string> isas = supported_isas();
    std::cout << "CPU ISAs tested:";
    for (const auto& s : isas) {
        std::cout << " " << s;
    }
    std::cout << "\n";
    at::manual_seed(0);
    // Sizes cover whole vectors, tails shorter than a vector, odd numel and a tail block.
    for (int64_t n : {1, 2, 3, 15, 16, 17, 31, 33, 64, 100, 1023, 4097, 65537, (1 << 20) + 1}) {
        for (int64_t bs : {32, 64, 256, 4096}) {
            for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
                at::Tensor w = (at::randn({n}) * 3).to(dt);
                if (n > 70) {
                    w.slice(0, 32, 64).zero_(); // an all-zero block (for bs = 32)
                }
                qlora::set_cpu_isa("scalar");
                const Nf4Tensor ref = qlora::nf4_quantize(w, bs, n % 2 == 1);
                std::vector<at::Tensor> ref_out;
                for (at::ScalarType out : {at::kFloat, at::kBFloat16, at::kHalf}) {
                    ref_out.push_back(qlora::nf4_dequantize(ref, out));
                }
                for (const std::string& isa : isas) {
                    qlora::set_cpu_isa(isa);
                    const std::string what =
                        isa + " n=" + std::to_string(n) + " bs=" + std::to_string(bs) + " " + c10::toString(dt);
                    const Nf4Tensor q = qlora::nf4_quantize(w, bs, n % 2 == 1);
                    expect_same(q, ref, what);
                    int k = 0;
                    for (at::ScalarType out : {at::kFloat, at::kBFloat16, at::kHalf}) {
                        EXPECT_TRUE(at::equal(qlora::nf4_dequantize(ref, out), ref_out[k++])) << what << " -> " << out;
                    }
                }
            }
        }
    }
}

TEST(Nf4OpsTest, DequantizedErrorIsWithinTheFormatStep) {
    at::manual_seed(1);
    const at::Tensor w = at::randn({333, 517}); // numel odd, rows straddle blocks
    const at::Tensor code = qlora::nf4_code();
    const double half_gap = ((code.slice(0, 1) - code.slice(0, 0, 15)).max().item<float>()) / 2.0;
    for (int64_t bs : {32, 64, 1024}) {
        const Nf4Tensor q = qlora::nf4_quantize(w, bs, /*double_quant=*/false);
        const at::Tensor back = qlora::nf4_dequantize(q);
        ASSERT_EQ(back.sizes(), w.sizes());
        const int64_t n = w.numel();
        const at::Tensor pad = at::zeros({q.absmax.numel() * bs - n});
        const at::Tensor blocks = at::cat({w.flatten(), pad}).view({-1, bs});
        const at::Tensor absmax = blocks.abs().amax(1);
        EXPECT_TRUE(at::equal(absmax, q.absmax)) << "absmax must be the exact block max |x|";
        const at::Tensor err = (at::cat({(w - back).flatten().abs(), pad}).view({-1, bs}) / absmax.unsqueeze(1));
        EXPECT_LE(err.max().item<float>(), half_gap * (1 + 1e-6)) << "bs=" << bs;
    }
}

TEST(Nf4OpsTest, DoubleQuantFollowsItsDefinition) {
    at::manual_seed(2);
    const at::Tensor w = at::randn({4096, 129});
    const Nf4Tensor plain = qlora::nf4_quantize(w, 64, false);
    const Nf4Tensor dq = qlora::nf4_quantize(w, 64, true);
    EXPECT_TRUE(at::equal(plain.packed, dq.packed)) << "codes are computed from the exact absmax";
    ASSERT_EQ(dq.absmax.scalar_type(), at::kByte);
    const at::Tensor offset = plain.absmax.mean();
    EXPECT_TRUE(at::equal(dq.offset, offset));
    EXPECT_EQ(dq.offset.dim(), 0);
    const int64_t nb = plain.absmax.numel();
    const at::Tensor centred = plain.absmax - offset;
    const int64_t nb2 = (nb + 255) / 256;
    EXPECT_EQ(dq.nested_absmax.numel(), nb2);
    EXPECT_TRUE(at::equal(dq.nested_code, qlora::dynamic8_code(true)));
    // nested_absmax is the exact max |absmax - offset| of each group of 256 blocks.
    const at::Tensor padded = at::cat({centred.abs(), at::zeros({nb2 * 256 - nb})}).view({nb2, 256});
    EXPECT_TRUE(at::equal(dq.nested_absmax, padded.amax(1)));
    // Reconstructed absmax is within one map step of the true one, relative to the nested absmax. The widest step
    // of the signed map is at -1: its lowest entry is -0.99296874 (there is no -1.0), so a group's most negative
    // value can be off by 1 - 0.99296874 = 0.00703.
    const at::Tensor a2 = dq.nested_absmax.repeat_interleave(256).slice(0, 0, nb);
    const at::Tensor rebuilt = dq.nested_code.index_select(0, dq.absmax.to(at::kLong)) * a2 + dq.offset;
    const at::Tensor rel = (rebuilt - plain.absmax).abs() / a2;
    EXPECT_LE(rel.max().item<float>(), (1.0 - 0.99296874) * (1 + 1e-5));
    // Dequantizing with the double-quantized state uses the rebuilt absmax: fl(fl(code * a2) + offset).
    const at::Tensor out = qlora::nf4_dequantize(dq);
    Nf4Tensor manual = plain;
    manual.absmax = rebuilt.contiguous();
    EXPECT_TRUE(at::equal(out, qlora::nf4_dequantize(manual)));
}

TEST(Nf4OpsTest, NonContiguousInputGivesTheResultOfItsContiguousCopy) {
    at::manual_seed(3);
    const at::Tensor w = at::randn({96, 160}).t();
    ASSERT_FALSE(w.is_contiguous());
    const Nf4Tensor a = qlora::nf4_quantize(w);
    const Nf4Tensor b = qlora::nf4_quantize(w.contiguous());
    expect_same(a, b, "transposed");
    EXPECT_TRUE(at::equal(qlora::nf4_dequantize(a), qlora::nf4_dequantize(b)));
    EXPECT_EQ(qlora::nf4_dequantize(a).sizes(), w.sizes());
}

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const c10::Error& e) {
        return e.what_without_backtrace();
    }
    return "<no error>";
}

TEST(Nf4OpsTest, BadInputsGiveClearErrors) {
    EXPECT_NE(
        error_of([] { qlora::nf4_quantize(at::ones({64}, at::kInt)); }).find("float32, bfloat16 or float16"),
        std::string::npos
    );
    EXPECT_NE(
        error_of([] { qlora::nf4_quantize(at::ones({64}), 48); }).find("blocksize must be a power of two"),
        std::string::npos
    );
    EXPECT_NE(error_of([] { qlora::nf4_quantize(at::ones({64}), 8192); }).find("got 8192"), std::string::npos);
    EXPECT_NE(error_of([] { qlora::nf4_quantize(at::ones({0, 5})); }).find("empty"), std::string::npos);
    at::Tensor w = at::randn({1000});
    w[300] = std::nanf("");
    EXPECT_NE(
        error_of([&] { qlora::nf4_quantize(w); }).find("NaN or Inf in block 4 (flat elements 256 to 319)"),
        std::string::npos
    ) << error_of([&] { qlora::nf4_quantize(w); });
    w[300] = 1;
    w[999] = -INFINITY;
    EXPECT_NE(error_of([&] { qlora::nf4_quantize(w); }).find("block 15"), std::string::npos);

    Nf4Tensor q = qlora::nf4_quantize(at::randn({10, 64}));
    Nf4Tensor bad = q;
    bad.shape = {11, 64};
    EXPECT_NE(
        error_of([&] { qlora::nf4_dequantize(bad); }).find("packed has 320 bytes but shape needs 352"),
        std::string::npos
    );
    bad = q;
    bad.absmax = q.absmax.slice(0, 0, 5);
    EXPECT_NE(error_of([&] { qlora::nf4_dequantize(bad); }).find("absmax has 5 entries"), std::string::npos);
    bad = q;
    bad.nested_code = at::Tensor();
    EXPECT_NE(
        error_of([&] { qlora::nf4_dequantize(bad); }).find("nested_absmax, nested_code and offset are required"),
        std::string::npos
    );
    EXPECT_NE(error_of([&] { qlora::nf4_dequantize(q, at::kInt); }).find("dtype must be float32"), std::string::npos);
}

TEST(Nf4OpsTest, DequantizeOutWritesIntoTheGivenBuffer) {
    const Nf4Tensor q = qlora::nf4_quantize(at::randn({100, 70}), 64, true);
    at::Tensor out = at::full({100, 70}, NAN, at::kBFloat16);
    const void* before = out.data_ptr();
    qlora::nf4_dequantize_into(q, out);
    EXPECT_EQ(out.data_ptr(), before);
    EXPECT_TRUE(at::equal(out, qlora::nf4_dequantize(q, at::kBFloat16)));
    at::Tensor wrong = at::empty({70, 100});
    EXPECT_NE(
        error_of([&] { qlora::nf4_dequantize_into(q, wrong); }).find("out has shape [70, 100] but shape is [100, 70]"),
        std::string::npos
    );
}

TEST(Nf4OpsTest, MetaKernelsGiveShapesWithoutData) {
    const at::Tensor w = at::empty({300, 7}, at::TensorOptions().device(at::kMeta).dtype(at::kBFloat16));
    const Nf4Tensor q = qlora::nf4_quantize(w, 64, true);
    EXPECT_TRUE(q.packed.is_meta());
    EXPECT_EQ(q.packed.sizes(), (std::vector<int64_t>{1050, 1}));
    EXPECT_EQ(q.absmax.sizes(), (std::vector<int64_t>{33}));
    EXPECT_EQ(q.absmax.scalar_type(), at::kByte);
    EXPECT_EQ(q.nested_absmax.sizes(), (std::vector<int64_t>{1}));
    EXPECT_EQ(q.nested_code.sizes(), (std::vector<int64_t>{256}));
    const at::Tensor out = qlora::nf4_dequantize(q);
    EXPECT_TRUE(out.is_meta());
    EXPECT_EQ(out.sizes(), w.sizes());
    EXPECT_EQ(out.scalar_type(), at::kBFloat16);
}

TEST(Nf4OpsTest, CudaMatchesCpu) {
    if (!at::hasCUDA()) {
        GTEST_SKIP() << "no CUDA device on this machine";
    }
    at::manual_seed(4);
    for (int64_t n : {1, 63, 4097, 1 << 20}) {
        for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
            const at::Tensor w = at::randn({n}).to(dt);
            const Nf4Tensor c = qlora::nf4_quantize(w, 64, true);
            const Nf4Tensor g = qlora::nf4_quantize(w.cuda(), 64, true);
            EXPECT_TRUE(at::equal(c.packed, g.packed.cpu()));
            EXPECT_TRUE(at::equal(c.nested_absmax, g.nested_absmax.cpu()));
            EXPECT_TRUE(at::equal(qlora::nf4_dequantize(c), qlora::nf4_dequantize(g).cpu()));
        }
    }
}

} // namespace
