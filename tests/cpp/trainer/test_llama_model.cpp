// tests/cpp/trainer/test_llama_model.cpp: the LibTorch Llama's structure and QLoRA conversion in pure C++ (logits are
// compared with transformers in tests/python/test_safetensors_interop.py): Hugging Face parameter names and shapes,
// apply_qlora freezing all but the LoRA matrices, gradients reaching exactly those, activation checkpointing giving
// the gradients of the plain backward, and the streaming loader equal to load-then-quantize.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "qlora/trainer/llama.h"
#include "qlora/trainer/safetensors.h"

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

// The autograd nodes named `name` reachable from `t`'s grad_fn.
int count_nodes(const at::Tensor& t, const std::string& name) {
    std::vector<torch::autograd::Node*> todo = {t.grad_fn().get()};
    std::set<torch::autograd::Node*> seen;
    int n = 0;
    while (!todo.empty()) {
        torch::autograd::Node* node = todo.back();
        todo.pop_back();
        if (node == nullptr || !seen.insert(node).second) {
            continue;
        }
        n += node->name() == name;
        for (const auto& edge : node->next_edges()) {
            todo.push_back(edge.function.get());
        }
    }
    return n;
}

// LoRA gradients of one batch, the model in training mode (LoRA dropout active), seeded identically.
std::map<std::string, at::Tensor> lora_grads(bool checkpointing, double dropout, const at::Tensor& ids) {
    torch::manual_seed(0);
    LlamaForCausalLM m(tiny());
    LoraSpec spec;
    spec.r = 4;
    spec.lora_dropout = dropout;
    apply_qlora(m, spec);
    {
        torch::NoGradGuard no_grad;
        for (auto& item : m->named_parameters()) {
            if (item.key().find("lora_B") != std::string::npos) {
                item.value().normal_(0.0, 0.1); // non-zero B so that A gets a gradient too
            }
        }
    }
    m->train();
    m->model->gradient_checkpointing = checkpointing;
    torch::manual_seed(1);
    const at::Tensor logits = m->forward(ids);
    EXPECT_EQ(count_nodes(logits, "qlora::llama::CheckpointBackward"), checkpointing ? 2 : 0); // one per layer
    const at::Tensor loss = at::cross_entropy_loss(logits.flatten(0, 1), ids.flatten());
    loss.backward();
    std::map<std::string, at::Tensor> out;
    for (const auto& item : m->named_parameters()) {
        if (item.value().requires_grad()) {
            out[item.key()] = item.value().grad().clone();
        }
    }
    out["loss"] = loss.detach();
    return out;
}

TEST(LlamaModelTest, ActivationCheckpointingGivesThePlainGradients) {
    const at::Tensor ids = at::randint(0, 50, {2, 9}, at::kLong);
    for (const double dropout : {0.0, 0.25}) { // with dropout, the recomputation must redraw the same masks
        const auto plain = lora_grads(false, dropout, ids);
        const auto ckpt = lora_grads(true, dropout, ids);
        ASSERT_EQ(plain.size(), ckpt.size());
        ASSERT_EQ(plain.size(), 29u); // 28 LoRA matrices and the loss
        for (const auto& [name, g] : plain) {
            // The same kernels on the same values in the same order: bit-identical, not just close.
            EXPECT_TRUE(at::equal(g, ckpt.at(name)))
                << name << " dropout " << dropout << " max diff " << (g - ckpt.at(name)).abs().max().item<float>();
            EXPECT_GT(g.abs().max().item<float>(), 0.0f) << name;
        }
    }
}

TEST(LlamaModelTest, ActivationCheckpointingIsOffInEvalAndUnderNoGrad) {
    torch::manual_seed(0);
    LlamaForCausalLM m(tiny());
    m->model->gradient_checkpointing = true;
    const at::Tensor ids = at::randint(0, 50, {1, 5}, at::kLong);
    m->eval();
    const at::Tensor a = m->forward(ids);
    m->train();
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(at::equal(a, m->forward(ids)));
}

TEST(LlamaModelTest, PackedRowsEqualTheirSamplesRunAlone) {
    // Sample packing: three samples in one row with per-sample positions and segment ids, then padding. Each
    // sample's logits must equal those of the sample alone (the block-diagonal mask hides the others; positions
    // restart). Float32; only the attention kernel differs (masked vs causal SDPA), so the bound is float32
    // summation noise relative to the logits' scale.
    torch::manual_seed(0);
    LlamaForCausalLM m(tiny());
    m->eval();
    torch::NoGradGuard no_grad;
    const std::vector<int64_t> lengths = {5, 3, 6};
    const int64_t T = 16;
    at::Tensor ids = at::zeros({1, T}, at::kLong), pos = at::zeros({1, T}, at::kLong),
               seg = at::zeros({1, T}, at::kLong);
    std::vector<at::Tensor> samples;
    int64_t at_ = 0;
    for (size_t k = 0; k < lengths.size(); ++k) {
        const at::Tensor sample = at::randint(1, 50, {1, lengths[k]}, at::kLong);
        samples.push_back(sample);
        ids.narrow(1, at_, lengths[k]).copy_(sample);
        pos.narrow(1, at_, lengths[k]).copy_(at::arange(lengths[k], at::kLong));
        seg.narrow(1, at_, lengths[k]).fill_(static_cast<int64_t>(k) + 1);
        at_ += lengths[k];
    }
    const at::Tensor packed = m->forward(ids, pos, seg);
    EXPECT_FALSE(packed.isnan().any().item<bool>()); // padding rows are not empty attention rows
    at_ = 0;
    for (size_t k = 0; k < lengths.size(); ++k) {
        const at::Tensor alone = m->forward(samples[k]);
        const at::Tensor got = packed.narrow(1, at_, lengths[k]);
        const float scale = alone.abs().max().item<float>();
        EXPECT_LE((got - alone).abs().max().item<float>(), 1e-5f * scale) << "sample " << k;
        at_ += lengths[k];
    }
    // Without the segment ids the later samples would see the earlier ones: the test can fail.
    const at::Tensor unmasked = m->forward(ids, pos);
    EXPECT_GT((unmasked.narrow(1, 5, 3) - m->forward(samples[1])).abs().max().item<float>(), 1e-3f);
}

class LlamaLoadTest : public ::testing::Test {
  protected:
    void SetUp() override {
        dir_ =
            std::filesystem::temp_directory_path() / ("qlora-load-" + std::to_string(getpid()) + "-" +
                                                      ::testing::UnitTest::GetInstance()->current_test_info()->name());
        std::filesystem::create_directories(dir_);
        // A bfloat16 checkpoint in two shards of the tiny model, and its config.json.
        torch::manual_seed(3);
        LlamaForCausalLM m(tiny());
        std::vector<std::pair<std::string, at::Tensor>> first, second;
        nlohmann::json weight_map = nlohmann::json::object();
        for (const auto& item : m->named_parameters()) {
            const bool in_first = item.key().find("layers.1.") == std::string::npos;
            (in_first ? first : second).emplace_back(item.key(), item.value().detach().to(at::kBFloat16));
            weight_map[item.key()] = in_first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
        }
        qlora::safetensors::save((dir_ / "model-00001-of-00002.safetensors").string(), first);
        qlora::safetensors::save((dir_ / "model-00002-of-00002.safetensors").string(), second);
        std::ofstream(dir_ / "model.safetensors.index.json") << nlohmann::json{{"weight_map", weight_map}}.dump();
        std::ofstream(dir_ / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": false,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "bfloat16"})";
    }
    void TearDown() override { std::filesystem::remove_all(dir_); }
    std::filesystem::path dir_;
};

TEST_F(LlamaLoadTest, StreamingLoadEqualsLoadThenQuantize) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
        LoraSpec spec;
        spec.r = 4;
        spec.target_modules = {"q_proj", "v_proj", "down_proj", "lm_head"};
        LoadOptions opt;
        opt.dtype = dtype;
        opt.lora = spec;
        torch::manual_seed(5);
        LlamaForCausalLM streamed = load_model(dir_.string(), opt);

        LlamaForCausalLM reference(load_config(dir_.string()));
        load_weights(reference, qlora::safetensors::Checkpoint::open(dir_.string()), dtype);
        torch::manual_seed(5);
        EXPECT_EQ(apply_qlora(reference, spec), 7); // 3 per layer and the LM head

        const auto a = streamed->named_parameters(), b = reference->named_parameters();
        ASSERT_EQ(a.size(), b.size());
        for (size_t i = 0; i < a.size(); ++i) {
            EXPECT_EQ(a[i].key(), b[i].key());
            EXPECT_EQ(a[i].value().scalar_type(), b[i].value().scalar_type()) << a[i].key();
            EXPECT_TRUE(at::equal(a[i].value(), b[i].value())) << a[i].key();
            EXPECT_EQ(a[i].value().requires_grad(), b[i].value().requires_grad()) << a[i].key();
        }
        const at::Tensor ids = at::randint(0, 50, {1, 6}, at::kLong);
        torch::NoGradGuard no_grad;
        const at::Tensor la = streamed->forward(ids), lb = reference->forward(ids);
        EXPECT_EQ(la.scalar_type(), dtype);
        EXPECT_TRUE(at::equal(la, lb));
        const auto& q = streamed->model->layers[1]->as<DecoderLayer>()->self_attn->q_proj->nf4;
        EXPECT_EQ(q.dtype, dtype);
        EXPECT_TRUE(q.double_quantized());
    }
}

TEST_F(LlamaLoadTest, LoadWithoutLoraKeepsEveryWeightDense) {
    LoadOptions opt;
    opt.dtype = at::kBFloat16;
    LlamaForCausalLM m = load_model(dir_.string(), opt);
    const auto ck = qlora::safetensors::Checkpoint::open(dir_.string());
    for (const auto& item : m->named_parameters()) {
        EXPECT_TRUE(at::equal(item.value(), ck.tensor(item.key()))) << item.key();
    }
    EXPECT_EQ(m->named_parameters().size(), ck.names().size());
}

} // namespace
