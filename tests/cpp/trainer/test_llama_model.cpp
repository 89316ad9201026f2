// tests/cpp/trainer/test_llama_model.cpp: the LibTorch Llama's structure and QLoRA conversion in pure C++ (logits are
// compared with transformers in tests/python/test_safetensors_interop.py): Hugging Face parameter names and shapes,
// apply_qlora freezing all but the LoRA matrices, and gradients reaching exactly those.
#include <set>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "qlora/trainer/llama.h"

namespace {

using namespace qlora::llama;

LlamaConfig tiny() {
    LlamaConfig c;
    c.vocab_size = 50;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.tie_word_embeddings = false;
    return c;
}

TEST(LlamaModelTest, ParameterNamesAndShapesAreHuggingFaces) {
    const LlamaConfig c = tiny();
    LlamaForCausalLM m(c);
    std::map<std::string, std::vector<int64_t>> got;
    for (const auto& item : m->named_parameters()) {
        got[item.key()] = item.value().sizes().vec();
    }
    std::map<std::string, std::vector<int64_t>> want;
    for (const auto& [name, shape] : expected_tensors(c)) {
        want[name] = shape;
    }
    EXPECT_EQ(got, want);
}

TEST(LlamaModelTest, QloraTrainsOnlyLoraAndGradientsReachThem) {
    torch::manual_seed(0);
    LlamaForCausalLM m(tiny());
    LoraSpec spec;
    spec.r = 4;
    EXPECT_EQ(apply_qlora(m, spec), 14); // 7 projections x 2 layers
    std::set<std::string> trainable;
    for (const auto& item : m->named_parameters()) {
        if (item.value().requires_grad()) {
            trainable.insert(item.key());
        }
        EXPECT_EQ(item.key().find("proj.weight"), std::string::npos) << "dense weight left: " << item.key();
    }
    EXPECT_EQ(trainable.size(), 28u);
    EXPECT_TRUE(trainable.count("model.layers.1.mlp.down_proj.lora_B.weight"));
    EXPECT_EQ(
        m->model->layers[0]->as<DecoderLayer>()->self_attn->q_proj->lora_A->weight.sizes(),
        (std::vector<int64_t>{4, 64})
    );

    const at::Tensor ids = at::randint(0, 50, {2, 7}, at::kLong);
    const at::Tensor loss = m->forward(ids).logsumexp(-1).mean();
    loss.backward();
    for (const auto& item : m->named_parameters()) {
        const at::Tensor& g = item.value().grad();
        if (item.key().find("lora_B") != std::string::npos) {
            ASSERT_TRUE(g.defined()) << item.key();
            EXPECT_GT(g.abs().max().item<float>(), 0.0f) << item.key();
        } else if (item.key().find("lora_A") != std::string::npos) {
            ASSERT_TRUE(g.defined()) << item.key(); // zero at the start: B = 0 (PEFT's init)
            EXPECT_EQ(g.abs().max().item<float>(), 0.0f) << item.key();
        } else {
            EXPECT_FALSE(g.defined()) << "frozen parameter got a gradient: " << item.key();
        }
    }
}

} // namespace
