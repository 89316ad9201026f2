// qlora/trainer/llama_config.h: a Hugging Face Llama config.json (LlamaConfig; spec formats-and-ops.md §2.1, §2.5) and
// the checkpoint tensors it implies (§2.2).
//
// Both config layouts are read: the older top-level `rope_theta` + `rope_scaling` and transformers v5's
// `rope_parameters`. Supported: Llama 2 and 3 style models (GQA, explicit head_dim, tied embeddings, attention/MLP
// bias flags) with RoPE of type default, linear or llama3. Anything else (another architecture or model_type, an
// activation other than silu, dynamic/yarn/longrope scaling, inconsistent sizes) is refused with a one-line error
// naming the file and the key.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/trainer/checkpoint.h"

namespace qlora::llama {

enum class RopeType { kDefault, kLinear, kLlama3 };

struct RopeScaling {
    RopeType type = RopeType::kDefault;
    double factor = 1.0;                             // linear, llama3
    double low_freq_factor = 1.0;                    // llama3
    double high_freq_factor = 4.0;                   // llama3
    int64_t original_max_position_embeddings = 8192; // llama3
};

struct LlamaConfig {
    int64_t vocab_size = 32000;
    int64_t hidden_size = 4096;
    int64_t intermediate_size = 11008;
    int64_t num_hidden_layers = 32;
    int64_t num_attention_heads = 32;
    int64_t num_key_value_heads = 32; // = num_attention_heads when absent
    int64_t head_dim = 128;           // = hidden_size / num_attention_heads when absent
    int64_t max_position_embeddings = 2048;
    double rms_norm_eps = 1e-6;
    double rope_theta = 10000.0;
    RopeScaling rope_scaling;
    bool attention_bias = false;
    bool mlp_bias = false;
    bool tie_word_embeddings = false;
    std::optional<int64_t> bos_token_id;
    std::vector<int64_t> eos_token_ids; // Llama 3 instruct lists several
    std::optional<int64_t> pad_token_id;
    std::string torch_dtype; // "bfloat16", "float32", ... or empty (`torch_dtype`, or `dtype` in transformers v5)
    bool bnb_nf4 = false;    // quantization_config says bitsandbytes 4-bit NF4 (qlora/trainer/bnb_nf4.h)
    nlohmann::json raw;      // the object as read (written back, updated, with saved models); null when built in code
};

// Parses a config object; `what` names the file in errors (std::runtime_error).
LlamaConfig parse_config(const nlohmann::json& j, const std::string& what);
// Reads <dir>/config.json or a config.json path.
LlamaConfig load_config(const std::string& path);

// Every tensor of a LlamaForCausalLM checkpoint with this config, with its shape, in state-dict order.
std::vector<std::pair<std::string, std::vector<int64_t>>> expected_tensors(const LlamaConfig& c);

// Checks that `ck` holds exactly the expected tensors with the expected shapes (an old `rotary_emb.inv_freq` buffer
// is ignored); otherwise throws one error listing the missing, unexpected and wrongly shaped names. A projection
// weight may be stored 4-bit in bitsandbytes' form (its packed shape and quant-state tensors are then expected;
// their contents are validated when read, qlora/trainer/bnb_nf4.h).
void check_checkpoint(const LlamaConfig& c, const safetensors::Checkpoint& ck);

// config.json for a model with this config: `raw` with the fields qlora models updated (or, without raw, every field
// transformers needs), `torch_dtype`/`dtype` set to `dtype`, and `quantization` as quantization_config (removed when
// null).
nlohmann::json config_json(const LlamaConfig& c, const std::string& dtype, const nlohmann::json& quantization);

} // namespace qlora::llama
