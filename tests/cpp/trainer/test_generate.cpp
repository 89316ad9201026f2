// tests/cpp/trainer/test_generate.cpp: generation (qlora/trainer/generate.h) on a random tiny Llama: greedy equals
// the argmax of a full forward at every step, stop ids end it, top-k 1 and a tiny top-p reduce sampling to greedy,
// sampling is reproducible from its seed and leaves the global generator alone.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include "qlora/trainer/generate.h"

namespace {

using namespace qlora::llama;

LlamaForCausalLM tiny_model() {
    LlamaConfig c;
    c.vocab_size = 40;
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 8;
    torch::manual_seed(0);
    LlamaForCausalLM m(c);
    torch::NoGradGuard no_grad;
    for (auto& p : m->parameters()) {
        if (p.dim() == 2) {
            p.normal_(0.0, 0.5); // confident, varied predictions
        }
    }
    return m;
}

TEST(GenerateTest, GreedyIsTheArgmaxOfEachStep) {
    LlamaForCausalLM m = tiny_model();
    GenerateOptions opt;
    opt.max_new_tokens = 8;
    const std::vector<int64_t> prompt = {3, 14, 15};
    const std::vector<int64_t> got = generate(m, prompt, opt);
    ASSERT_EQ(got.size(), 8u);
    std::vector<int64_t> ids = prompt;
    torch::NoGradGuard no_grad;
    for (const int64_t g : got) {
        const at::Tensor logits = m->forward(torch::tensor(ids).view({1, -1}))[0][-1];
        EXPECT_EQ(g, logits.argmax().item<int64_t>());
        ids.push_back(g);
    }
}

TEST(GenerateTest, StopsAtAStopId) {
    LlamaForCausalLM m = tiny_model();
    GenerateOptions opt;
    opt.max_new_tokens = 8;
    const std::vector<int64_t> full = generate(m, {5, 6}, opt);
    opt.stop_ids = {full[3]};
    const std::vector<int64_t> stopped = generate(m, {5, 6}, opt);
    const auto first = std::find(full.begin(), full.end(), full[3]) - full.begin();
    ASSERT_EQ(static_cast<int64_t>(stopped.size()), first + 1);
    EXPECT_EQ(stopped.back(), full[3]);
}

TEST(GenerateTest, SamplingIsSeededAndCutsWork) {
    LlamaForCausalLM m = tiny_model();
    GenerateOptions greedy;
    greedy.max_new_tokens = 10;
    const auto g = generate(m, {1, 2, 3}, greedy);
    GenerateOptions s = greedy;
    s.temperature = 1.0;
    s.top_k = 1;
    EXPECT_EQ(generate(m, {1, 2, 3}, s), g);
    s.top_k = 0;
    s.top_p = 1e-6;
    EXPECT_EQ(generate(m, {1, 2, 3}, s), g);
    s.top_p = 1.0;
    s.temperature = 5.0; // flat: sampling differs from greedy, and equals itself for the same seed
    s.seed = 11;
    const at::Tensor before = at::detail::getDefaultCPUGenerator().get_state();
    const auto a = generate(m, {1, 2, 3}, s);
    EXPECT_TRUE(at::equal(before, at::detail::getDefaultCPUGenerator().get_state()));
    EXPECT_EQ(generate(m, {1, 2, 3}, s), a);
    EXPECT_NE(a, g);
    s.seed = 12;
    EXPECT_NE(generate(m, {1, 2, 3}, s), a);
}

} // namespace
