// trainer/src/llama_config.cpp: see qlora/trainer/llama_config.h.
#include "qlora/trainer/llama_config.h"

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include "qlora/trainer/bnb_nf4.h"
#include "qlora/trainer/json.h"

namespace qlora::llama {
namespace {

[[noreturn]] void fail(const std::string& what, const std::string& msg) {
    throw std::runtime_error(what + ": " + msg);
}

std::string shown(const nlohmann::json& v) {
    std::string s = v.dump();
    return s.size() > 40 ? s.substr(0, 40) + "..." : s;
}

// Optional positive integer `key` of `j` (null or absent: fallback).
int64_t positive_int(
    const nlohmann::json& j, const char* key, int64_t fallback, const std::string& what, const std::string& prefix = ""
) {
    if (!j.contains(key) || j[key].is_null()) {
        return fallback;
    }
    const nlohmann::json& v = j[key];
    if (!v.is_number_integer() || v.get<int64_t>() <= 0) {
        fail(what, "key '" + prefix + key + "' must be a positive integer, got " + shown(v));
    }
    return v.get<int64_t>();
}

double positive_number(
    const nlohmann::json& j, const char* key, double fallback, const std::string& what, const std::string& prefix = ""
) {
    if (!j.contains(key) || j[key].is_null()) {
        return fallback;
    }
    const nlohmann::json& v = j[key];
    if (!v.is_number() || !(v.get<double>() > 0.0) || !std::isfinite(v.get<double>())) {
        fail(what, "key '" + prefix + key + "' must be a positive number, got " + shown(v));
    }
    return v.get<double>();
}

bool boolean(const nlohmann::json& j, const char* key, bool fallback, const std::string& what) {
    if (!j.contains(key) || j[key].is_null()) {
        return fallback;
    }
    if (!j[key].is_boolean()) {
        fail(what, "key '" + std::string(key) + "' must be true or false, got " + shown(j[key]));
    }
    return j[key].get<bool>();
}

std::optional<int64_t> token_id(const nlohmann::json& j, const char* key, const std::string& what) {
    if (!j.contains(key) || j[key].is_null()) {
        return std::nullopt;
    }
    if (!j[key].is_number_integer() || j[key].get<int64_t>() < 0) {
        fail(what, "key '" + std::string(key) + "' must be a token id (integer >= 0), got " + shown(j[key]));
    }
    return j[key].get<int64_t>();
}

RopeScaling parse_rope(const nlohmann::json& j, const std::string& what) {
    // Scaling block: rope_scaling (older layout) or rope_parameters (transformers v5).
    const bool legacy = j.contains("rope_scaling") && !j["rope_scaling"].is_null();
    const char* block_key = legacy ? "rope_scaling" : "rope_parameters";
    RopeScaling r;
    if (!j.contains(block_key) || j[block_key].is_null()) {
        return r;
    }
    const nlohmann::json& s = j[block_key];
    const std::string prefix = std::string(block_key) + ".";
    if (!s.is_object()) {
        fail(what, "key '" + std::string(block_key) + "' must be an object, got " + shown(s));
    }
    std::string type = "default";
    for (const char* k : {"rope_type", "type"}) {
        if (s.contains(k) && !s[k].is_null()) {
            if (!s[k].is_string()) {
                fail(what, "key '" + prefix + k + "' must be a string, got " + shown(s[k]));
            }
            type = s[k].get<std::string>();
            break;
        }
    }
    if (type == "default") {
        return r;
    }
    if (type == "linear") {
        r.type = RopeType::kLinear;
        r.factor = positive_number(s, "factor", std::numeric_limits<double>::quiet_NaN(), what, prefix);
        if (std::isnan(r.factor)) {
            fail(what, "key '" + prefix + "factor' is required for rope type linear");
        }
        return r;
    }
    if (type == "llama3") {
        r.type = RopeType::kLlama3;
        for (const char* k : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
            if (!s.contains(k) || s[k].is_null()) {
                fail(what, "key '" + prefix + k + "' is required for rope type llama3");
            }
        }
        r.factor = positive_number(s, "factor", 1.0, what, prefix);
        r.low_freq_factor = positive_number(s, "low_freq_factor", 1.0, what, prefix);
        r.high_freq_factor = positive_number(s, "high_freq_factor", 4.0, what, prefix);
        r.original_max_position_embeddings = positive_int(s, "original_max_position_embeddings", 8192, what, prefix);
        if (!(r.high_freq_factor > r.low_freq_factor)) {
            fail(
                what, "key '" + prefix + "high_freq_factor' must exceed low_freq_factor (" +
                          std::to_string(r.low_freq_factor) + ")"
            );
        }
        return r;
    }
    fail(
        what,
        "key '" + prefix + "rope_type' is \"" + type + "\", which qlora does not support (default, linear, llama3)"
    );
}

} // namespace

LlamaConfig parse_config(const nlohmann::json& j, const std::string& what) {
    if (!j.is_object()) {
        fail(what, "expected a JSON object");
    }
    if (j.contains("architectures") && !j["architectures"].is_null()) {
        const nlohmann::json& a = j["architectures"];
        bool llama = false;
        if (a.is_array()) {
            for (const auto& x : a) {
                llama = llama || (x.is_string() && x.get<std::string>() == "LlamaForCausalLM");
            }
        }
        if (!llama) {
            fail(what, "key 'architectures' is " + shown(a) + "; qlora trains LlamaForCausalLM");
        }
    }
    if (j.contains("model_type") && !(j["model_type"].is_string() && j["model_type"].get<std::string>() == "llama")) {
        fail(what, "key 'model_type' is " + shown(j["model_type"]) + "; qlora supports \"llama\"");
    }
    if (j.contains("hidden_act") && !(j["hidden_act"].is_string() && j["hidden_act"].get<std::string>() == "silu")) {
        fail(what, "key 'hidden_act' is " + shown(j["hidden_act"]) + "; Llama uses \"silu\"");
    }
    LlamaConfig c;
    c.vocab_size = positive_int(j, "vocab_size", c.vocab_size, what);
    c.hidden_size = positive_int(j, "hidden_size", c.hidden_size, what);
    c.intermediate_size = positive_int(j, "intermediate_size", c.intermediate_size, what);
    c.num_hidden_layers = positive_int(j, "num_hidden_layers", c.num_hidden_layers, what);
    c.num_attention_heads = positive_int(j, "num_attention_heads", c.num_attention_heads, what);
    c.num_key_value_heads = positive_int(j, "num_key_value_heads", c.num_attention_heads, what);
    if (c.num_attention_heads % c.num_key_value_heads != 0) {
        fail(
            what, "key 'num_key_value_heads' (" + std::to_string(c.num_key_value_heads) +
                      ") must divide num_attention_heads (" + std::to_string(c.num_attention_heads) + ")"
        );
    }
    if (!j.contains("head_dim") || j["head_dim"].is_null()) {
        if (c.hidden_size % c.num_attention_heads != 0) {
            fail(
                what, "key 'hidden_size' (" + std::to_string(c.hidden_size) +
                          ") is not divisible by num_attention_heads (" + std::to_string(c.num_attention_heads) +
                          ") and no head_dim is given"
            );
        }
        c.head_dim = c.hidden_size / c.num_attention_heads;
    } else {
        c.head_dim = positive_int(j, "head_dim", 0, what);
    }
    if (c.head_dim % 2 != 0) {
        fail(what, "key 'head_dim' must be even for rotary embeddings, got " + std::to_string(c.head_dim));
    }
    c.max_position_embeddings = positive_int(j, "max_position_embeddings", c.max_position_embeddings, what);
    c.rms_norm_eps = positive_number(j, "rms_norm_eps", c.rms_norm_eps, what);
    const double theta_v5 = j.contains("rope_parameters") && j["rope_parameters"].is_object()
                                ? positive_number(j["rope_parameters"], "rope_theta", 10000.0, what, "rope_parameters.")
                                : 10000.0;
    c.rope_theta = positive_number(j, "rope_theta", theta_v5, what);
    c.rope_scaling = parse_rope(j, what);
    c.attention_bias = boolean(j, "attention_bias", false, what);
    c.mlp_bias = boolean(j, "mlp_bias", false, what);
    c.tie_word_embeddings = boolean(j, "tie_word_embeddings", false, what);
    c.bos_token_id = token_id(j, "bos_token_id", what);
    c.pad_token_id = token_id(j, "pad_token_id", what);
    if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
        for (const auto& e : j["eos_token_id"]) {
            if (!e.is_number_integer() || e.get<int64_t>() < 0) {
                fail(what, "key 'eos_token_id' must hold token ids, got " + shown(j["eos_token_id"]));
            }
            c.eos_token_ids.push_back(e.get<int64_t>());
        }
    } else if (const auto eos = token_id(j, "eos_token_id", what)) {
        c.eos_token_ids.push_back(*eos);
    }
    for (const char* k : {"torch_dtype", "dtype"}) {
        if (j.contains(k) && j[k].is_string()) {
            c.torch_dtype = j[k].get<std::string>();
            break;
        }
    }
    qlora::bnb::check_quantization_config(j, what);
    c.bnb_nf4 = j.contains("quantization_config") && !j["quantization_config"].is_null();
    c.raw = j;
    return c;
}

LlamaConfig load_config(const std::string& path) {
    const std::filesystem::path p(path);
    const std::string file = std::filesystem::is_directory(p) ? (p / "config.json").string() : path;
    return parse_config(qlora::trainer::read_json_file(file), file);
}

std::vector<std::pair<std::string, std::vector<int64_t>>> expected_tensors(const LlamaConfig& c) {
    const int64_t E = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
    const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
    std::vector<std::pair<std::string, std::vector<int64_t>>> out;
    out.push_back({"model.embed_tokens.weight", {V, E}});
    for (int64_t n = 0; n < c.num_hidden_layers; ++n) {
        const std::string l = "model.layers." + std::to_string(n) + ".";
        out.push_back({l + "input_layernorm.weight", {E}});
        const std::pair<const char*, std::pair<int64_t, int64_t>> attn[] = {
            {"q_proj", {q, E}}, {"k_proj", {kv, E}}, {"v_proj", {kv, E}}, {"o_proj", {E, q}}};
        for (const auto& [name, shape] : attn) {
            out.push_back({l + "self_attn." + name + ".weight", {shape.first, shape.second}});
            if (c.attention_bias) {
                out.push_back({l + "self_attn." + name + ".bias", {shape.first}});
            }
        }
        out.push_back({l + "post_attention_layernorm.weight", {E}});
        const std::pair<const char*, std::pair<int64_t, int64_t>> mlp[] = {
            {"gate_proj", {I, E}}, {"up_proj", {I, E}}, {"down_proj", {E, I}}};
        for (const auto& [name, shape] : mlp) {
            out.push_back({l + "mlp." + name + ".weight", {shape.first, shape.second}});
            if (c.mlp_bias) {
                out.push_back({l + "mlp." + name + ".bias", {shape.first}});
            }
        }
    }
    out.push_back({"model.norm.weight", {E}});
    if (!c.tie_word_embeddings) {
        out.push_back({"lm_head.weight", {V, E}});
    }
    return out;
}

void check_checkpoint(const LlamaConfig& c, const safetensors::Checkpoint& ck) {
    std::vector<std::string> missing, wrong, unexpected;
    std::set<std::string> expected;
    for (const auto& [expected_name, expected_shape] : expected_tensors(c)) {
        const std::string& name = expected_name;
        std::vector<int64_t> shape = expected_shape;
        expected.insert(name);
        if (shape.size() == 2 && qlora::bnb::is_nf4(ck, name)) { // a 4-bit projection: packed codes + quant state
            for (const std::string& s : qlora::bnb::nf4_state_names(ck, name)) {
                expected.insert(s);
            }
            shape = {(shape[0] * shape[1] + 1) / 2, 1};
        }
        if (!ck.contains(name)) {
            missing.push_back(name);
        } else if (ck.info(name).shape != shape) {
            std::ostringstream s;
            s << name << " is [";
            const auto& got = ck.info(name).shape;
            for (size_t i = 0; i < got.size(); ++i) {
                s << (i ? ", " : "") << got[i];
            }
            s << "], expected [";
            for (size_t i = 0; i < shape.size(); ++i) {
                s << (i ? ", " : "") << shape[i];
            }
            s << "]";
            wrong.push_back(s.str());
        }
    }
    for (const std::string& name : ck.names()) {
        const bool inv_freq = name.size() > 20 && name.compare(name.size() - 20, 20, "rotary_emb.inv_freq") == 0;
        if (expected.count(name) == 0 && !inv_freq && !(c.tie_word_embeddings && name == "lm_head.weight")) {
            unexpected.push_back(name);
        }
    }
    if (missing.empty() && wrong.empty() && unexpected.empty()) {
        return;
    }
    const auto list = [](const std::vector<std::string>& v) {
        std::string s;
        for (size_t i = 0; i < v.size() && i < 5; ++i) {
            s += (i ? ", " : "") + v[i];
        }
        return v.size() > 5 ? s + " and " + std::to_string(v.size() - 5) + " more" : s;
    };
    std::string msg = ck.dir() + ": checkpoint does not match config.json:";
    if (!missing.empty()) {
        msg += " missing " + list(missing) + ";";
    }
    if (!wrong.empty()) {
        msg += " wrong shape: " + list(wrong) + ";";
    }
    if (!unexpected.empty()) {
        msg += " unexpected " + list(unexpected) + ";";
    }
    msg.pop_back();
    throw std::runtime_error(msg);
}

nlohmann::json config_json(const LlamaConfig& c, const std::string& dtype, const nlohmann::json& quantization) {
    nlohmann::json j = c.raw.is_object() ? c.raw : nlohmann::json::object();
    if (!c.raw.is_object()) {
        j["architectures"] = {"LlamaForCausalLM"};
        j["model_type"] = "llama";
        j["hidden_act"] = "silu";
        j["vocab_size"] = c.vocab_size;
        j["hidden_size"] = c.hidden_size;
        j["intermediate_size"] = c.intermediate_size;
        j["num_hidden_layers"] = c.num_hidden_layers;
        j["num_attention_heads"] = c.num_attention_heads;
        j["num_key_value_heads"] = c.num_key_value_heads;
        j["head_dim"] = c.head_dim;
        j["max_position_embeddings"] = c.max_position_embeddings;
        j["rms_norm_eps"] = c.rms_norm_eps;
        j["rope_theta"] = c.rope_theta;
        j["attention_bias"] = c.attention_bias;
        j["mlp_bias"] = c.mlp_bias;
        j["tie_word_embeddings"] = c.tie_word_embeddings;
        TORCH_CHECK(
            c.rope_scaling.type == RopeType::kDefault, "config_json: a config built in code with rope scaling cannot "
                                                       "be written (load it from a config.json)"
        );
    }
    j["torch_dtype"] = dtype;
    if (j.contains("dtype")) { // transformers v5 writes `dtype`
        j["dtype"] = dtype;
    }
    if (quantization.is_null()) {
        j.erase("quantization_config");
    } else {
        j["quantization_config"] = quantization;
    }
    return j;
}

} // namespace qlora::llama
