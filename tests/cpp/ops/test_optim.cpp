// tests/cpp/ops/test_optim.cpp: qlora::optim::AdamW8bit (qlora/optim.h) against direct calls of the optimizer ops
// (bit for bit, also under a torch::optim scheduler), against a float64 AdamW for the 32-bit variant, exact resumption
// through state_tensors() / load_state_tensors() (also across paged and non-paged optimizers), and its errors.
#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/optim/schedulers/step_lr.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "qlora/ops.h"
#include "qlora/optim.h"

namespace {

using qlora::optim::AdamW8bit;
using qlora::optim::AdamW8bitConfig;
using qlora::optim::AdamW8bitOptions;
using TensorMap = std::map<std::string, at::Tensor>;
using torch::optim::OptimizerParamGroup;

template <typename Sig> c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// One tensor updated by calling qlora::adamw8bit_step / adamw32bit_step directly: the reference of the optimizer.
struct DirectAdamW {
    at::Tensor param, state1, state2, absmax1, absmax2, qmap1, qmap2;
    int64_t step = 0;

    DirectAdamW(const at::Tensor& p, bool eight_bit) : param(p.detach().clone()) {
        const auto opts = at::TensorOptions().device(p.device());
        if (!eight_bit) {
            state1 = at::zeros(p.sizes(), opts.dtype(at::kFloat));
            state2 = at::zeros(p.sizes(), opts.dtype(at::kFloat));
            return;
        }
        const int64_t nblocks = (p.numel() + 255) / 256;
        state1 = at::zeros(p.sizes(), opts.dtype(at::kByte));
        state2 = at::zeros(p.sizes(), opts.dtype(at::kByte));
        absmax1 = at::zeros({nblocks}, opts.dtype(at::kFloat));
        absmax2 = at::zeros({nblocks}, opts.dtype(at::kFloat));
        qmap1 = qlora::dynamic8_code(true).to(p.device());
        qmap2 = qlora::dynamic8_code(false).to(p.device());
    }

    void update(const at::Tensor& grad, double lr, double beta1, double beta2, double eps, double weight_decay) {
        ++step;
        if (absmax1.defined()) {
            using Sig = void(
                at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                const at::Tensor&, int64_t, double, double, double, double, double
            );
            static const auto op = op_handle<Sig>("qlora::adamw8bit_step");
            op.call(
                param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1, beta2, eps, weight_decay
            );
        } else {
            using Sig = void(
                at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, double, double, double, double,
                double
            );
            static const auto op = op_handle<Sig>("qlora::adamw32bit_step");
            op.call(param, grad, state1, state2, step, lr, beta1, beta2, eps, weight_decay);
        }
    }
};

// The test model: w [64, 128] (8192 elements: 8-bit states), b [100] (below min_8bit_size: float32 states) and
// frozen [10], which never gets a gradient (no state).
struct Model {
    at::Tensor w, b, frozen;
};

Model make_model(at::ScalarType b_dtype = at::kFloat, at::Device device = at::kCPU) {
    at::manual_seed(1);
    Model m;
    m.w = (at::randn({64, 128}) * 0.5).to(device).set_requires_grad(true);
    m.b = at::randn({100}).to(device, b_dtype).set_requires_grad(true);
    m.frozen = at::randn({10}).to(device).set_requires_grad(true);
    return m;
}

// A copy of the model's current values as new leaves (what a resumed run gets from its weight checkpoint).
Model copy_model(const Model& m) {
    return {
        m.w.detach().clone().set_requires_grad(true), m.b.detach().clone().set_requires_grad(true),
        m.frozen.detach().clone().set_requires_grad(true)};
}

// The gradient of parameter `which` at step `step`: the same values whichever run asks.
at::Tensor grad_for(const at::Tensor& p, int step, int which) {
    at::manual_seed(1000 + 10 * step + which);
    return at::randn(p.sizes()).to(p.device(), p.scalar_type());
}

void set_grads(Model& m, int step) {
    m.w.mutable_grad() = grad_for(m.w, step, 0);
    m.b.mutable_grad() = grad_for(m.b, step, 1);
}

// Group 0 = {w, frozen} with the first options, group 1 = {b} with the second.
std::vector<OptimizerParamGroup> two_groups(const Model& m, const AdamW8bitOptions& g0, const AdamW8bitOptions& g1) {
    std::vector<OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<at::Tensor>{m.w, m.frozen}, std::make_unique<AdamW8bitOptions>(g0));
    groups.emplace_back(std::vector<at::Tensor>{m.b}, std::make_unique<AdamW8bitOptions>(g1));
    return groups;
}

const AdamW8bitOptions kGroup0 = AdamW8bitOptions(1e-3);
const AdamW8bitOptions kGroup1 = AdamW8bitOptions(3e-3).betas(std::make_tuple(0.8, 0.99)).eps(1e-6).weight_decay(0.1);

void expect_same_maps(const TensorMap& a, const TensorMap& b, const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (const auto& [key, t] : a) {
        const auto it = b.find(key);
        ASSERT_NE(it, b.end()) << what << ": no " << key;
        EXPECT_EQ(t.scalar_type(), it->second.scalar_type()) << what << ": " << key;
        EXPECT_TRUE(at::equal(t, it->second)) << what << ": " << key << " differs";
    }
}

void expect_same_params(const Model& a, const Model& b, const std::string& what) {
    EXPECT_TRUE(at::equal(a.w.cpu(), b.w.cpu())) << what << ": w";
    EXPECT_TRUE(at::equal(a.b.cpu(), b.b.cpu())) << what << ": b";
    EXPECT_TRUE(at::equal(a.frozen.cpu(), b.frozen.cpu())) << what << ": frozen";
}

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const c10::Error& e) {
        EXPECT_EQ(e.msg().find('\n'), std::string::npos) << "not one line: " << e.msg();
        return e.msg();
    }
    return "<no error>";
}

bool contains(const std::string& s, const std::string& part) {
    return s.find(part) != std::string::npos;
}

double group_lr(const AdamW8bit& opt, size_t g) {
    return opt.param_groups()[g].options().get_lr();
}

TEST(OptimTest, MatchesDirectOpCallsBitForBit) {
    Model m = make_model(at::kBFloat16);
    // Defaults differ from both groups: a group that silently fell back to them would not match.
    AdamW8bit opt(two_groups(m, kGroup0, kGroup1), AdamW8bitOptions(5e-2).weight_decay(0.0));
    EXPECT_EQ(group_lr(opt, 0), 1e-3);
    EXPECT_EQ(group_lr(opt, 1), 3e-3);
    DirectAdamW w(m.w, /*eight_bit=*/true), b(m.b, /*eight_bit=*/false);
    for (int step = 0; step < 6; ++step) {
        set_grads(m, step);
        opt.step();
        w.update(m.w.grad(), 1e-3, 0.9, 0.999, 1e-8, 1e-2);
        b.update(m.b.grad(), 3e-3, 0.8, 0.99, 1e-6, 0.1);
        const TensorMap s = opt.state_tensors();
        ASSERT_TRUE(at::equal(m.w, w.param)) << "step " << step;
        ASSERT_TRUE(at::equal(m.b, b.param)) << "step " << step;
        EXPECT_EQ(s.at("state.0.step").item<int64_t>(), step + 1);
        EXPECT_TRUE(at::equal(s.at("state.0.state1"), w.state1));
        EXPECT_TRUE(at::equal(s.at("state.0.state2"), w.state2));
        EXPECT_TRUE(at::equal(s.at("state.0.absmax1"), w.absmax1));
        EXPECT_TRUE(at::equal(s.at("state.0.absmax2"), w.absmax2));
        EXPECT_TRUE(at::equal(s.at("state.0.qmap1"), w.qmap1));
        EXPECT_TRUE(at::equal(s.at("state.0.qmap2"), w.qmap2));
        EXPECT_TRUE(at::equal(s.at("state.2.state1"), b.state1));
        EXPECT_TRUE(at::equal(s.at("state.2.state2"), b.state2));
    }
    const TensorMap s = opt.state_tensors();
    EXPECT_EQ(s.at("state.0.state1").scalar_type(), at::kByte);
    EXPECT_EQ(s.at("state.0.state1").sizes(), m.w.sizes());
    EXPECT_EQ(s.at("state.0.absmax1").numel(), 32); // 8192 / 256
    EXPECT_EQ(s.at("state.2.state1").scalar_type(), at::kFloat);
    EXPECT_EQ(s.count("state.2.absmax1"), 0u);
    EXPECT_EQ(s.count("state.1.step"), 0u); // frozen: no gradient, no state
    EXPECT_EQ(s.at("param_groups.1.beta1").item<double>(), 0.8);
    EXPECT_EQ(s.at("param_groups.1.weight_decay").scalar_type(), at::kDouble);
    EXPECT_EQ(s.size(), 2u * 5u + 7u + 3u); // hyperparameters, 8-bit state (step + 6), float32 state (step + 2)
}

TEST(OptimTest, ResumeFromStateTensorsIsBitIdentical) {
    Model full = make_model();
    AdamW8bit full_opt(two_groups(full, kGroup0, kGroup1));
    for (int step = 0; step < 10; ++step) {
        set_grads(full, step);
        full_opt.step();
    }

    Model first = make_model();
    TensorMap saved;
    {
        AdamW8bit opt(two_groups(first, kGroup0, kGroup1));
        for (int step = 0; step < 5; ++step) {
            set_grads(first, step);
            opt.step();
        }
        saved = opt.state_tensors();
    }
    EXPECT_EQ(saved.at("state.0.step").item<int64_t>(), 5);
    Model resumed = copy_model(first);
    AdamW8bit opt(two_groups(resumed, AdamW8bitOptions(0.5), AdamW8bitOptions(0.25).eps(1e-3)));
    opt.load_state_tensors(saved);
    EXPECT_EQ(group_lr(opt, 0), 1e-3);
    EXPECT_EQ(group_lr(opt, 1), 3e-3);
    expect_same_maps(opt.state_tensors(), saved, "right after loading");
    for (int step = 5; step < 10; ++step) {
        set_grads(resumed, step);
        opt.step();
    }
    expect_same_params(resumed, full, "resumed vs uninterrupted");
    expect_same_maps(opt.state_tensors(), full_opt.state_tensors(), "resumed vs uninterrupted");
}

// Paged (w's moments in paged memory) and non-paged optimizers load each other's states and continue exactly as an
// uninterrupted non-paged run; paging itself changes no bit.
void check_paged_round_trip(at::Device device) {
    const AdamW8bitConfig paged = AdamW8bitConfig().paged(true).page_min_size(1000); // w (8192) paged, b (100) not
    Model plain = make_model(at::kFloat, device);
    AdamW8bit plain_opt(two_groups(plain, kGroup0, kGroup1));
    Model paged_run = make_model(at::kFloat, device);
    AdamW8bit paged_opt(two_groups(paged_run, kGroup0, kGroup1), {}, paged);
    EXPECT_EQ(paged_opt.name(), "qlora::optim::PagedAdamW8bit");
    for (int step = 0; step < 3; ++step) {
        set_grads(plain, step);
        plain_opt.step();
        set_grads(paged_run, step);
        paged_opt.step();
    }
    const TensorMap from_plain = plain_opt.state_tensors(), from_paged = paged_opt.state_tensors();
    expect_same_maps(from_paged, from_plain, "paged vs plain after 3 steps");

    Model to_plain = copy_model(paged_run), to_paged = copy_model(plain);
    AdamW8bit to_plain_opt(two_groups(to_plain, kGroup0, kGroup1));
    AdamW8bit to_paged_opt(two_groups(to_paged, kGroup0, kGroup1), {}, paged);
    to_plain_opt.load_state_tensors(from_paged);
    to_paged_opt.load_state_tensors(from_plain);
    for (int step = 3; step < 6; ++step) {
        set_grads(plain, step);
        plain_opt.step();
        set_grads(to_plain, step);
        to_plain_opt.step();
        set_grads(to_paged, step);
        to_paged_opt.step();
    }
    expect_same_params(to_plain, plain, "paged -> plain");
    expect_same_params(to_paged, plain, "plain -> paged");
    expect_same_maps(to_plain_opt.state_tensors(), plain_opt.state_tensors(), "paged -> plain");
    expect_same_maps(to_paged_opt.state_tensors(), plain_opt.state_tensors(), "plain -> paged");
}

TEST(OptimTest, PagedAndPlainStatesLoadIntoEachOther) {
    check_paged_round_trip(at::kCPU);
}

TEST(OptimTest, PagedAndPlainStatesLoadIntoEachOtherOnCuda) {
    if (!at::hasCUDA()) {
        GTEST_SKIP() << "no CUDA device on this machine";
    }
    check_paged_round_trip(at::kCUDA);
}

TEST(OptimTest, StepLRSchedulerDrivesEachGroupLr) {
    Model m = make_model();
    AdamW8bit opt(two_groups(m, kGroup0, kGroup1));
    torch::optim::StepLR scheduler(opt, /*step_size=*/2, /*gamma=*/0.5);
    DirectAdamW w(m.w, /*eight_bit=*/true), b(m.b, /*eight_bit=*/false);
    // LibTorch's StepLR multiplies by gamma on its calls whose 0-based count is a positive multiple of step_size.
    double lr0 = 1e-3, lr1 = 3e-3;
    for (int step = 0; step < 7; ++step) {
        set_grads(m, step);
        opt.step();
        w.update(m.w.grad(), lr0, 0.9, 0.999, 1e-8, 1e-2);
        b.update(m.b.grad(), lr1, 0.8, 0.99, 1e-6, 0.1);
        ASSERT_TRUE(at::equal(m.w, w.param)) << "step " << step;
        ASSERT_TRUE(at::equal(m.b, b.param)) << "step " << step;
        if (step != 0 && step % 2 == 0) {
            lr0 *= 0.5;
            lr1 *= 0.5;
        }
        scheduler.step();
    }
    EXPECT_EQ(lr0, 1e-3 / 8); // the schedule did change the lr used by the steps
    EXPECT_EQ(group_lr(opt, 0), lr0);
    EXPECT_EQ(group_lr(opt, 1), lr1);
}

// AdamW in float64 with bitsandbytes' order (Note [AdamW8 update order] in csrc/core/adamw.h): the Adam step, then
// decoupled decay p *= 1 - lr * wd.
struct Float64AdamW {
    at::Tensor p, m, v;
    int64_t t = 0;
    explicit Float64AdamW(const at::Tensor& param)
        : p(param.detach().to(at::kDouble)), m(at::zeros_like(p)), v(at::zeros_like(p)) {}
    void update(const at::Tensor& grad, double lr, double beta1, double beta2, double eps, double weight_decay) {
        const at::Tensor g = grad.to(at::kDouble);
        ++t;
        m = m * beta1 + g * (1.0 - beta1);
        v = v * beta2 + g * g * (1.0 - beta2);
        const at::Tensor m_hat = m / (1.0 - std::pow(beta1, t)), v_hat = v / (1.0 - std::pow(beta2, t));
        p = (p - lr * m_hat / (v_hat.sqrt() + eps)) * (1.0 - lr * weight_decay);
    }
};

TEST(OptimTest, AdamW32bitTracksFloat64AdamW) {
    Model m = make_model();
    const double lr = 1e-2, wd = 1e-2;
    const int steps = 30;
    qlora::optim::AdamW32bit opt(std::vector<at::Tensor>{m.w, m.b}, AdamW8bitOptions(lr).weight_decay(wd));
    Float64AdamW ref_w(m.w), ref_b(m.b);
    double gmax = 0.0;
    for (int step = 0; step < steps; ++step) {
        // A loss linear in the parameters, so its gradient is exactly G whatever the parameters: both runs see the
        // same gradients and the comparison measures the update alone.
        const at::Tensor gw = grad_for(m.w, step, 0), gb = grad_for(m.b, step, 1);
        gmax = std::max(gmax, gw.abs().max().item<double>());
        const at::Tensor loss = opt.step([&] {
            opt.zero_grad();
            at::Tensor l = (m.w * gw).sum() + (m.b * gb).sum();
            l.backward();
            return l;
        });
        ASSERT_TRUE(loss.defined());
        EXPECT_TRUE(at::equal(m.w.grad(), gw)); // the closure ran with gradients enabled
        ref_w.update(gw, lr, 0.9, 0.999, 1e-8, wd);
        ref_b.update(gb, lr, 0.9, 0.999, 1e-8, wd);
    }
    // Error budget of the float32 update, per step: three roundings of size 2^-24 |p| (p + delta, the float32 decay
    // factor 1 - lr * wd, p * decay) and the error of delta itself (a few roundings of a value of size ~lr, below
    // 1e-6 * lr). Over 30 steps at most 30 * 1.8e-7 = 5.4e-6 relative plus 30 * 1e-6 * lr absolute: rtol 1e-5 and
    // atol 30e-6 * lr hold with margin (the worst element uses about 1/8 of it).
    const double rtol = 1e-5, atol = steps * 1e-6 * lr;
    EXPECT_TRUE(at::allclose(m.w.to(at::kDouble), ref_w.p, rtol, atol));
    EXPECT_TRUE(at::allclose(m.b.to(at::kDouble), ref_b.p, rtol, atol));
    const double max_diff = (m.w.to(at::kDouble) - ref_w.p).abs().max().item<double>();
    EXPECT_GT((m.w.to(at::kDouble) - make_model().w.to(at::kDouble)).abs().max().item<double>(), 100 * max_diff)
        << "the parameters moved far more than the error";
    // The moments: per step m gains at most 3 roundings of 2^-24 * gmax (gmax = max |g|) and keeps them with weight
    // beta1^k (sum <= 10): <= 1.8e-6 gmax; v gains at most 4 roundings of 2^-24 * gmax^2 per step: <= 7.2e-6 gmax^2.
    const TensorMap s = opt.state_tensors();
    EXPECT_EQ(s.at("state.0.state1").scalar_type(), at::kFloat); // 32-bit states even for the 8192-element w
    EXPECT_TRUE(at::allclose(s.at("state.0.state1").to(at::kDouble), ref_w.m, 0.0, 1e-5 * gmax));
    EXPECT_TRUE(at::allclose(s.at("state.0.state2").to(at::kDouble), ref_w.v, 0.0, 1e-5 * gmax * gmax));
}

TEST(OptimTest, OptionsVariantsAndSchedulerHooks) {
    AdamW8bitOptions o(1e-3);
    o.set_lr(2e-3);
    EXPECT_EQ(o.get_lr(), 2e-3);
    EXPECT_TRUE(o == AdamW8bitOptions(2e-3));
    EXPECT_FALSE(o == AdamW8bitOptions(2e-3).betas(std::make_tuple(0.9, 0.99)));
    Model m = make_model();
    qlora::optim::PagedAdamW paged32({m.b});
    EXPECT_EQ(paged32.name(), "qlora::optim::PagedAdamW32bit");
    EXPECT_EQ(paged32.config().optim_bits(), 32);
    EXPECT_TRUE(paged32.config().paged());
    qlora::optim::PagedAdamW8bit paged8({m.w}, {}, AdamW8bitConfig().optim_bits(32).min_8bit_size(16));
    EXPECT_EQ(paged8.config().optim_bits(), 8); // fixed by the class
    EXPECT_EQ(paged8.config().min_8bit_size(), 16);
    EXPECT_EQ(qlora::optim::AdamW32bit({m.w}).name(), "qlora::optim::AdamW32bit");
}

TEST(OptimTest, ClearErrors) {
    Model m = make_model();
    AdamW8bit opt(two_groups(m, kGroup0, kGroup1));
    set_grads(m, 0);
    opt.step();
    const TensorMap good = opt.state_tensors();
    const auto load_with = [&](const std::function<void(TensorMap&)>& edit) {
        TensorMap t = good;
        edit(t);
        return error_of([&] { opt.load_state_tensors(t); });
    };
    EXPECT_TRUE(contains(
        load_with([](TensorMap& t) { t.erase("state.0.absmax1"); }),
        "AdamW8bit::load_state_tensors: missing key 'state.0.absmax1' (expected float32 with 32 elements)"
    ));
    EXPECT_TRUE(
        contains(load_with([](TensorMap& t) { t.erase("param_groups.1.eps"); }), "missing key 'param_groups.1.eps'")
    );
    EXPECT_TRUE(contains(
        load_with([](TensorMap& t) { t["state.0.state1"] = t["state.0.state1"].to(at::kFloat); }),
        "'state.0.state1' is float32, expected uint8"
    ));
    EXPECT_TRUE(contains(
        load_with([](TensorMap& t) { t["param_groups.0.lr"] = t["param_groups.0.lr"].to(at::kFloat); }),
        "'param_groups.0.lr' is float32, expected float64"
    ));
    EXPECT_TRUE(contains(
        load_with([](TensorMap& t) { t["state.2.state2"] = at::zeros({99}); }),
        "'state.2.state2' has 99 elements (shape [99]), expected 100"
    ));
    EXPECT_TRUE(contains(
        load_with([](TensorMap& t) { t["param_groups.1.beta2"] = at::scalar_tensor(1.0, at::kDouble); }),
        "'param_groups.1.beta2' must be in [0, 1), got 1"
    ));
    EXPECT_TRUE(contains(
        load_with([](TensorMap& t) { t["state.7.step"] = at::scalar_tensor(1, at::kLong); }),
        "unexpected key 'state.7.step'"
    ));
    try {
        TensorMap t = good;
        t["state.0.state1"] = at::zeros({3});
        opt.load_state_tensors(t);
        ADD_FAILURE() << "a wrong dtype must be rejected";
    } catch (const c10::TypeError&) {
    }
    expect_same_maps(opt.state_tensors(), good, "after the failed loads"); // nothing changed

    // An 8-bit checkpoint into a 32-bit optimizer: the message says why.
    Model m32 = copy_model(m);
    qlora::optim::AdamW32bit opt32(two_groups(m32, kGroup0, kGroup1));
    EXPECT_TRUE(contains(
        error_of([&] { opt32.load_state_tensors(good); }),
        "'state.0.state1' is uint8, expected float32; this optimizer keeps float32 states for parameter 0 of param "
        "group 0 (optim_bits or min_8bit_size differ?)"
    ));

    // Hyperparameters and settings, at construction and when changed before a step.
    const std::vector<at::Tensor> w = {m.w};
    EXPECT_TRUE(contains(
        error_of([&] { AdamW8bit(w, AdamW8bitOptions().betas(std::make_tuple(1.0, 0.999))); }),
        "qlora::optim::AdamW8bit: betas[0] of the defaults must be in [0, 1), got 1"
    ));
    EXPECT_TRUE(contains(
        error_of([&] { AdamW8bit(w, AdamW8bitOptions(-1.0)); }), "lr of the defaults must be finite and >= 0, got -1"
    ));
    EXPECT_TRUE(contains(
        error_of([&] { AdamW8bit(two_groups(m, kGroup0, AdamW8bitOptions().weight_decay(-0.1))); }),
        "weight_decay of param group 1 must be finite and >= 0, got -0.1"
    ));
    EXPECT_TRUE(contains(
        error_of([&] { AdamW8bit(w, {}, AdamW8bitConfig().optim_bits(4)); }), "optim_bits must be 8 or 32, got 4"
    ));
    try {
        AdamW8bit(w, AdamW8bitOptions().betas(std::make_tuple(0.9, 1.5)));
        ADD_FAILURE() << "beta2 >= 1 must be rejected";
    } catch (const c10::ValueError& e) {
        EXPECT_TRUE(contains(e.msg(), "betas[1]"));
    }
    EXPECT_TRUE(contains(
        error_of([&] { AdamW8bit(two_groups(m, kGroup0, kGroup1)).add_param_group({{m.w}}); }),
        "parameter 0 of param group 2 is already in param group 0"
    ));
    EXPECT_TRUE(contains(
        error_of([&] {
            AdamW8bit(std::vector<at::Tensor>{m.b, m.w, m.b});
        }),
        "parameter 2 of param group 0 is already in param group 0"
    ));
    opt.param_groups()[1].options().set_lr(-2.0);
    EXPECT_TRUE(contains(error_of([&] { opt.step(); }), "lr of param group 1 must be finite and >= 0, got -2"));

    // Parameters and gradients.
    const at::Tensor p64 = at::randn({8}, at::kDouble).set_requires_grad(true);
    p64.mutable_grad() = at::randn({8}, at::kDouble);
    EXPECT_TRUE(contains(
        error_of([&] { AdamW8bit(std::vector<at::Tensor>{p64}).step(); }),
        "parameter 0 of param group 0 is float64; float32, bfloat16 or float16 expected"
    ));
    const at::Tensor p = at::randn({8}).set_requires_grad(true);
    p.mutable_grad() = at::randn({8}, at::kBFloat16);
    EXPECT_TRUE(contains(
        error_of([&] { AdamW8bit(std::vector<at::Tensor>{p}).step(); }),
        "parameter 0 of param group 0 is float32 but its gradient is bfloat16"
    ));
    const at::Tensor strided = at::randn({16, 8}).t().set_requires_grad(true);
    strided.mutable_grad() = at::randn({8, 16});
    EXPECT_TRUE(contains(
        error_of([&] {
            AdamW8bit(std::vector<at::Tensor>{m.b, strided}).step();
        }),
        "parameter 1 of param group 0 (shape [8, 16]) must be contiguous"
    ));

    // No pickle: torch::serialize archives point to the tensor API.
    torch::serialize::OutputArchive archive;
    EXPECT_TRUE(contains(error_of([&] { opt.save(archive); }), "save qlora::optim::AdamW8bit::state_tensors()"));
    torch::serialize::InputArchive in;
    EXPECT_TRUE(contains(error_of([&] { opt.load(in); }), "not supported"));
}

} // namespace
