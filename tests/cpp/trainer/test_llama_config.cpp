// tests/cpp/trainer/test_llama_config.cpp: config.json parsing (qlora/trainer/llama_config.h) in both Hugging Face
// layouts, the refusals of unsupported options (one line naming the key), and checkpoint-vs-config checks (S22).
// tests/python/test_safetensors_interop.py checks the same code on configs and checkpoints written by transformers.
#include <unistd.h>

#include <filesystem>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "qlora/trainer/json.h"
#include "qlora/trainer/llama_config.h"

namespace {

namespace fs = std::filesystem;
using qlora::llama::LlamaConfig;
using qlora::llama::parse_config;
using qlora::llama::RopeType;

nlohmann::json base() {
    return nlohmann::json::parse(R"({"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":512,
        "hidden_size":96,"intermediate_size":160,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":[2,3],"torch_dtype":"bfloat16"})"
    );
}

std::string error_of(const nlohmann::json& j) {
    try {
        parse_config(j, "config.json");
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    ADD_FAILURE() << "accepted " << j.dump();
    return "";
}

TEST(LlamaConfigTest, ReadsTheOlderLayout) {
    nlohmann::json j = base();
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", 8.0},
        {"low_freq_factor", 1.0},
        {"high_freq_factor", 4.0},
        {"original_max_position_embeddings", 64}};
    const LlamaConfig c = parse_config(j, "config.json");
    EXPECT_EQ(c.hidden_size, 96);
    EXPECT_EQ(c.num_key_value_heads, 2);
    EXPECT_EQ(c.head_dim, 24);
    EXPECT_EQ(c.rope_theta, 500000.0);
    EXPECT_EQ(c.rope_scaling.type, RopeType::kLlama3);
    EXPECT_EQ(c.rope_scaling.factor, 8.0);
    EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
    EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(c.torch_dtype, "bfloat16");
}

TEST(LlamaConfigTest, ReadsTheTransformersV5Layout) {
    nlohmann::json j = base();
    j.erase("rope_theta");
    j.erase("torch_dtype");
    j["dtype"] = "float32";
    j["rope_parameters"] = {{"rope_type", "linear"}, {"rope_theta", 20000.0}, {"factor", 2.0}};
    j["head_dim"] = 32; // explicit head_dim: q_proj is heads * head_dim wide, not hidden_size
    j["num_key_value_heads"] = nullptr;
    const LlamaConfig c = parse_config(j, "config.json");
    EXPECT_EQ(c.rope_theta, 20000.0);
    EXPECT_EQ(c.rope_scaling.type, RopeType::kLinear);
    EXPECT_EQ(c.rope_scaling.factor, 2.0);
    EXPECT_EQ(c.head_dim, 32);
    EXPECT_EQ(c.num_key_value_heads, 4);
    EXPECT_EQ(c.torch_dtype, "float32");
    const auto t = qlora::llama::expected_tensors(c);
    EXPECT_EQ(t[2].first, "model.layers.0.self_attn.q_proj.weight");
    EXPECT_EQ(t[2].second, (std::vector<int64_t>{128, 96}));
    EXPECT_EQ(t.back().first, "lm_head.weight");
}

TEST(LlamaConfigTest, RefusesWhatItCannotRunNamingTheKey) {
    const auto with = [](const char* key, nlohmann::json v) {
        nlohmann::json j = base();
        j[key] = std::move(v);
        return j;
    };
    EXPECT_NE(error_of(with("model_type", "mistral")).find("key 'model_type' is \"mistral\""), std::string::npos);
    EXPECT_NE(error_of(with("architectures", {"GPT2LMHeadModel"})).find("key 'architectures'"), std::string::npos);
    EXPECT_NE(error_of(with("hidden_act", "gelu")).find("key 'hidden_act'"), std::string::npos);
    EXPECT_NE(
        error_of(with("hidden_size", -4)).find("key 'hidden_size' must be a positive integer, got -4"),
        std::string::npos
    );
    EXPECT_NE(
        error_of(with("vocab_size", "512")).find("key 'vocab_size' must be a positive integer"), std::string::npos
    );
    EXPECT_NE(error_of(with("num_key_value_heads", 3)).find("must divide num_attention_heads"), std::string::npos);
    EXPECT_NE(error_of(with("hidden_size", 98)).find("not divisible by num_attention_heads"), std::string::npos);
    EXPECT_NE(
        error_of(with("rope_scaling", {{"type", "yarn"}, {"factor", 4.0}})
        ).find("key 'rope_scaling.rope_type' is \"yarn\", which qlora does not support"),
        std::string::npos
    );
    EXPECT_NE(
        error_of(with("rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}})
        ).find("key 'rope_scaling.low_freq_factor' is required for rope type llama3"),
        std::string::npos
    );
    EXPECT_NE(
        error_of(with("rms_norm_eps", 0)).find("key 'rms_norm_eps' must be a positive number"), std::string::npos
    );
    EXPECT_NE(
        error_of(with("tie_word_embeddings", "yes")).find("key 'tie_word_embeddings' must be true or false"),
        std::string::npos
    );
    for (const std::string& e : {error_of(with("model_type", "mistral")), error_of(with("hidden_size", -4))}) {
        EXPECT_EQ(e.rfind("config.json: ", 0), 0u);
        EXPECT_EQ(e.find('\n'), std::string::npos);
    }
}

TEST(LlamaConfigTest, S22_CheckpointMustMatchTheConfig) {
    const fs::path dir = fs::temp_directory_path() / ("qlora-cfg-" + std::to_string(getpid()));
    fs::create_directories(dir);
    nlohmann::json j = base();
    j["tie_word_embeddings"] = true;
    const LlamaConfig c = parse_config(j, "config.json");
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& [name, shape] : qlora::llama::expected_tensors(c)) {
        tensors.emplace_back(name, at::zeros(shape, at::kBFloat16));
    }
    const std::string file = (dir / "model.safetensors").string();
    qlora::safetensors::save(file, tensors);
    EXPECT_NO_THROW(qlora::llama::check_checkpoint(c, qlora::safetensors::Checkpoint::open(dir.string())));

    tensors.erase(tensors.begin() + 3);                // a layer-0 projection
    tensors[5].second = at::zeros({7}, at::kBFloat16); // a wrong shape
    tensors.emplace_back("model.layers.9.mlp.up_proj.weight", at::zeros({1}));
    qlora::safetensors::save(file, tensors);
    try {
        qlora::llama::check_checkpoint(c, qlora::safetensors::Checkpoint::open(dir.string()));
        ADD_FAILURE() << "mismatch accepted";
    } catch (const std::runtime_error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("missing model.layers.0.self_attn.k_proj.weight"), std::string::npos) << msg;
        EXPECT_NE(msg.find("wrong shape: " + tensors[5].first + " is [7], expected"), std::string::npos) << msg;
        EXPECT_NE(msg.find("unexpected model.layers.9.mlp.up_proj.weight"), std::string::npos) << msg;
    }
    fs::remove_all(dir);
}

} // namespace
