// tests/cpp/ops/test_linear_ops.cpp: qlora::linear from a pure LibTorch program: forward and every gradient
// through the C++ autograd kernel, against float64 references built from ATen ops on the dequantized weight, plus a
// central finite-difference check of the LoRA gradients (ggml's MODE_GRAD idea).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "qlora/ops.h"

namespace {

struct Case {
    qlora::Nf4Tensor w;
    at::Tensor w64, x, a, b, bias;
};

Case make_case(int64_t out_f, int64_t in_f, int64_t r, at::ScalarType dt) {
    at::manual_seed(11);
    Case c;
    c.w = qlora::nf4_quantize(at::randn({out_f, in_f}), 64, true);
    c.w64 = qlora::nf4_dequantize(c.w, at::kFloat).to(at::kDouble);
    c.x = at::randn({3, 5, in_f}, at::TensorOptions().dtype(dt)).set_requires_grad(true);
    c.a = (at::randn({r, in_f}, at::TensorOptions().dtype(dt)) * 0.1).set_requires_grad(true);
    c.b = (at::randn({out_f, r}, at::TensorOptions().dtype(dt)) * 0.1).set_requires_grad(true);
    c.bias = at::randn({out_f}, at::TensorOptions().dtype(dt)).set_requires_grad(true);
    return c;
}

TEST(LinearOpsTest, GradientsMatchFloat64ReferenceInPureCpp) {
    Case c = make_case(24, 100, 4, at::kDouble);
    const double s = 1.5;
    const at::Tensor y = qlora::linear(c.x, c.w, c.bias, c.a, c.b, s);
    const at::Tensor gy = at::randn_like(y);
    const auto grads = torch::autograd::grad({y}, {c.x, c.a, c.b, c.bias}, {gy});

    std::vector<at::Tensor> leaves;
    for (const at::Tensor& t : {c.x, c.a, c.b, c.bias}) {
        leaves.push_back(t.detach().clone().set_requires_grad(true));
    }
    const at::Tensor ref = at::matmul(leaves[0], c.w64.t()) + leaves[3] +
                           at::matmul(at::matmul(leaves[0], leaves[1].t()), leaves[2].t()) * s;
    const auto ref_grads = torch::autograd::grad({ref}, leaves, {gy});
    EXPECT_TRUE(at::allclose(y, ref, 1e-12, 1e-12));
    const char* names[] = {"x", "lora_a", "lora_b", "bias"};
    for (size_t i = 0; i < 4; ++i) {
        EXPECT_TRUE(at::allclose(grads[i], ref_grads[i], 1e-12, 1e-12)) << names[i];
    }
}

TEST(LinearOpsTest, LoraGradientsMatchCentralDifferences) {
    Case c = make_case(8, 64, 2, at::kDouble);
    auto loss = [&](const at::Tensor& a, const at::Tensor& b) {
        at::NoGradGuard no_grad;
        return qlora::linear(c.x, c.w, c.bias, a, b, 0.7).square().sum().item<double>();
    };
    const at::Tensor y = qlora::linear(c.x, c.w, c.bias, c.a, c.b, 0.7).square().sum();
    const auto grads = torch::autograd::grad({y}, {c.a, c.b});
    const double h = 1e-6;
    for (int which = 0; which < 2; ++which) {
        const at::Tensor p = (which == 0 ? c.a : c.b).detach();
        for (int64_t idx : {int64_t{0}, p.numel() / 2, p.numel() - 1}) {
            at::Tensor plus = p.clone(), minus = p.clone();
            plus.view(-1)[idx] += h;
            minus.view(-1)[idx] -= h;
            const double fd = which == 0 ? (loss(plus, c.b.detach()) - loss(minus, c.b.detach())) / (2 * h)
                                         : (loss(c.a.detach(), plus) - loss(c.a.detach(), minus)) / (2 * h);
            const double an = grads[which].view(-1)[idx].item<double>();
            // Central differences in float64 with h = 1e-6: truncation O(h^2) plus rounding O(eps / h) ~ 1e-10
            // relative.
            EXPECT_NEAR(an, fd, 1e-6 * std::max(1.0, std::abs(fd)))
                << (which == 0 ? "lora_a" : "lora_b") << "[" << idx << "]";
        }
    }
}

TEST(LinearOpsTest, WeightGetsNoGradientAndMismatchedLoraIsAnError) {
    Case c = make_case(16, 64, 4, at::kFloat);
    EXPECT_FALSE(c.w.packed.requires_grad());
    const at::Tensor y = qlora::linear(c.x, c.w);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{3, 5, 16}));
    try {
        qlora::linear(c.x, c.w, std::nullopt, c.a, at::randn({16, 3}));
        FAIL() << "a lora_b of the wrong rank must be rejected";
    } catch (const c10::Error& e) {
        EXPECT_NE(
            std::string(e.what_without_backtrace()).find("lora_b must be [out_features=16, r=4]"), std::string::npos
        );
    }
}

} // namespace
