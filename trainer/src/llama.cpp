// trainer/src/llama.cpp: see qlora/trainer/llama.h.
#include "qlora/trainer/llama.h"

#include <cmath>
#include <filesystem>
#include <set>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include "qlora/trainer/atomic_file.h"
#include "qlora/trainer/json.h"

namespace qlora::llama {

// --------------------------------------------------------------------------------------------------------------
// Building blocks

ProjectionImpl::ProjectionImpl(int64_t in_f, int64_t out_f, bool has_bias) : in_features(in_f), out_features(out_f) {
    // transformers' init (initializer_range 0.02); checkpoints overwrite it.
    weight = register_parameter("weight", torch::empty({out_features, in_features}).normal_(0.0, 0.02));
    if (has_bias) {
        bias = register_parameter("bias", torch::zeros({out_features}));
    }
}

torch::Tensor ProjectionImpl::forward(const torch::Tensor& x) {
    const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    if (!quantized()) {
        return at::linear(x, weight, b);
    }
    std::optional<at::Tensor> lora_input;
    if (lora_dropout > 0.0 && is_training()) {
        lora_input = at::dropout(x, lora_dropout, /*train=*/true);
    }
    return qlora::linear(
        x, nf4, b, lora_A->weight.to(x.scalar_type()), lora_B->weight.to(x.scalar_type()), lora_scale, lora_input
    );
}

void ProjectionImpl::quantize(const LoraSpec& spec) {
    TORCH_CHECK(!quantized(), "Projection::quantize: already quantized");
    torch::NoGradGuard no_grad;
    nf4 = qlora::nf4_quantize(weight.detach(), spec.blocksize, spec.double_quant);
    parameters_.erase("weight");
    weight = torch::Tensor();
    lora_A = register_module("lora_A", torch::nn::ModuleHolder<ProjectionImpl>(in_features, spec.r, false));
    lora_B = register_module("lora_B", torch::nn::ModuleHolder<ProjectionImpl>(spec.r, out_features, false));
    // PEFT: A ~ kaiming_uniform(a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0, so training starts at the base.
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    lora_A->weight.uniform_(-bound, bound);
    lora_B->weight.zero_();
    lora_scale = spec.use_rslora ? spec.lora_alpha / std::sqrt(static_cast<double>(spec.r))
                                 : spec.lora_alpha / static_cast<double>(spec.r);
    lora_dropout = spec.lora_dropout;
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
    weight = register_parameter("weight", torch::ones({dim}));
}

// HF LlamaRMSNorm: variance and normalisation in float32, cast back to the input dtype, then times the weight.
torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
    const torch::Tensor h = x.to(at::kFloat);
    const torch::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
    return weight * (h * at::rsqrt(variance + eps)).to(x.scalar_type());
}

namespace {

// rotate_half: [x1, x2] -> [-x2, x1] over the last dimension (HF's split-half convention).
torch::Tensor rotate_half(const torch::Tensor& x) {
    const int64_t half = x.size(-1) / 2;
    return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

} // namespace

torch::Tensor rope_inv_freq(const LlamaConfig& c) {
    const int64_t d = c.head_dim;
    torch::Tensor inv =
        1.0 / at::pow(c.rope_theta, at::arange(0, d, 2, at::kLong).to(at::kFloat) / static_cast<double>(d));
    switch (c.rope_scaling.type) {
    case RopeType::kDefault:
        return inv;
    case RopeType::kLinear:
        return inv / c.rope_scaling.factor;
    case RopeType::kLlama3: {
        const RopeScaling& r = c.rope_scaling;
        const double L = static_cast<double>(r.original_max_position_embeddings);
        const double low_wavelen = L / r.low_freq_factor;
        const double high_wavelen = L / r.high_freq_factor;
        const torch::Tensor wavelen = 2 * M_PI / inv;
        // Low frequencies (long wavelengths) divided by the factor, high ones kept, a smooth blend in between.
        torch::Tensor out = at::where(wavelen > low_wavelen, inv / r.factor, inv);
        const torch::Tensor smooth = (L / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        const torch::Tensor blended = (1 - smooth) * out / r.factor + smooth * out;
        const torch::Tensor medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen);
        return at::where(medium, blended, out);
    }
    }
    return inv;
}

AttentionImpl::AttentionImpl(const LlamaConfig& c)
    : heads(c.num_attention_heads), kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
    const int64_t E = c.hidden_size;
    q_proj = register_module("q_proj", Projection(E, heads * head_dim, c.attention_bias));
    k_proj = register_module("k_proj", Projection(E, kv_heads * head_dim, c.attention_bias));
    v_proj = register_module("v_proj", Projection(E, kv_heads * head_dim, c.attention_bias));
    o_proj = register_module("o_proj", Projection(heads * head_dim, E, c.attention_bias));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
    const int64_t B = x.size(0), T = x.size(1);
    torch::Tensor q = q_proj(x).view({B, T, heads, head_dim}).transpose(1, 2);    // [B, H, T, D]
    torch::Tensor k = k_proj(x).view({B, T, kv_heads, head_dim}).transpose(1, 2); // [B, K, T, D]
    torch::Tensor v = v_proj(x).view({B, T, kv_heads, head_dim}).transpose(1, 2);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    if (kv_heads != heads) { // each key/value head serves heads / kv_heads query heads (HF repeat_kv)
        k = k.repeat_interleave(heads / kv_heads, 1);
        v = v.repeat_interleave(heads / kv_heads, 1);
    }
    const torch::Tensor o = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true);
    return o_proj(o.transpose(1, 2).reshape({B, T, heads * head_dim}));
}

MLPImpl::MLPImpl(const LlamaConfig& c) {
    gate_proj = register_module("gate_proj", Projection(c.hidden_size, c.intermediate_size, c.mlp_bias));
    up_proj = register_module("up_proj", Projection(c.hidden_size, c.intermediate_size, c.mlp_bias));
    down_proj = register_module("down_proj", Projection(c.intermediate_size, c.hidden_size, c.mlp_bias));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
    return down_proj(at::silu(gate_proj(x)) * up_proj(x));
}

DecoderLayerImpl::DecoderLayerImpl(const LlamaConfig& c) {
    input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    self_attn = register_module("self_attn", Attention(c));
    post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    mlp = register_module("mlp", MLP(c));
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
    const torch::Tensor h = x + self_attn(input_layernorm(x), cos, sin);
    return h + mlp(post_attention_layernorm(h));
}

// --------------------------------------------------------------------------------------------------------------
// Model

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& c) : config(c) {
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
        layers->push_back(DecoderLayer(c));
    }
    norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    inv_freq = rope_inv_freq(c);
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& ids) {
    torch::Tensor x = embed_tokens(ids);
    const int64_t T = ids.size(1);
    // cos/sin [T, D]: positions x inverse frequencies in float32, duplicated for both halves, cast to x's dtype.
    const torch::Tensor freqs = at::outer(at::arange(T, at::kFloat), inv_freq.to(x.device()));
    const torch::Tensor emb = at::cat({freqs, freqs}, -1);
    const torch::Tensor cos = (emb.cos() * attention_scaling).to(x.scalar_type());
    const torch::Tensor sin = (emb.sin() * attention_scaling).to(x.scalar_type());
    for (const auto& layer : *layers) {
        x = layer->as<DecoderLayer>()->forward(x, cos, sin);
    }
    return norm(x);
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& c) {
    model = register_module("model", LlamaModel(c));
    if (!c.tie_word_embeddings) {
        lm_head = register_module("lm_head", Projection(c.hidden_size, c.vocab_size, false));
    }
}

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& ids) {
    const torch::Tensor h = model(ids);
    return lm_head ? lm_head(h) : at::linear(h, model->embed_tokens->weight);
}

int64_t apply_qlora(LlamaForCausalLM& m, const LoraSpec& spec) {
    TORCH_CHECK(spec.r > 0, "apply_qlora: r must be positive, got ", spec.r);
    int64_t converted = 0;
    for (auto& item : m->named_modules()) {
        auto* proj = item.value()->as<Projection>();
        if (proj == nullptr || proj->quantized() || item.key().find("lora_") != std::string::npos) {
            continue;
        }
        const std::string& name = item.key();
        const std::string leaf = name.substr(name.find_last_of('.') + 1);
        for (const std::string& t : spec.target_modules) {
            if (leaf == t) {
                proj->quantize(spec);
                ++converted;
                break;
            }
        }
    }
    for (auto& item : m->named_parameters()) {
        item.value().set_requires_grad(item.key().find(".lora_") != std::string::npos);
    }
    m->lora = spec;
    return converted;
}

void save_adapter(const LlamaForCausalLM& m, const std::string& dir, const std::string& base_model_name_or_path) {
    TORCH_CHECK(m->lora.has_value(), "save_adapter: the model has no LoRA layers (call apply_qlora first)");
    const LoraSpec& spec = *m->lora;
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& item : m->named_parameters()) {
        if (item.key().find(".lora_") != std::string::npos) {
            tensors.emplace_back("base_model.model." + item.key(), item.value().detach().to(at::kFloat));
        }
    }
    std::filesystem::create_directories(dir);
    nlohmann::json config = {
        {"alpha_pattern", nlohmann::json::object()},
        {"base_model_name_or_path", base_model_name_or_path},
        {"bias", "none"},
        {"fan_in_fan_out", false},
        {"inference_mode", true},
        {"init_lora_weights", true},
        {"lora_alpha", spec.lora_alpha},
        {"lora_bias", false},
        {"lora_dropout", spec.lora_dropout},
        {"modules_to_save", nullptr},
        {"peft_type", "LORA"},
        {"r", spec.r},
        {"rank_pattern", nlohmann::json::object()},
        {"revision", nullptr},
        {"target_modules", spec.target_modules},
        {"task_type", "CAUSAL_LM"},
        {"use_dora", false},
        {"use_rslora", spec.use_rslora},
    };
    safetensors::save((std::filesystem::path(dir) / "adapter_model.safetensors").string(), tensors);
    const std::string text = config.dump(2) + "\n";
    qlora::trainer::write_file_atomically(
        (std::filesystem::path(dir) / "adapter_config.json").string(),
        [&](qlora::trainer::FileSink& out) { out.write(text.data(), text.size()); }
    );
}

void load_adapter(LlamaForCausalLM& m, const std::string& dir) {
    const std::string config_path = (std::filesystem::path(dir) / "adapter_config.json").string();
    const nlohmann::json j = qlora::trainer::read_json_file(config_path);
    const auto fail = [&](const std::string& msg) {
        throw std::runtime_error(config_path + ": " + msg);
    };
    if (!j.is_object() || !j.contains("peft_type") || j["peft_type"] != "LORA") {
        fail("key 'peft_type' must be \"LORA\"");
    }
    LoraSpec spec;
    if (j.contains("r")) {
        if (!j["r"].is_number_integer() || j["r"].get<int64_t>() <= 0) {
            fail("key 'r' must be a positive integer, got " + j["r"].dump());
        }
        spec.r = j["r"].get<int64_t>();
    }
    spec.lora_alpha = 8.0; // PEFT's default
    if (j.contains("lora_alpha")) {
        if (!j["lora_alpha"].is_number()) {
            fail("key 'lora_alpha' must be a number, got " + j["lora_alpha"].dump());
        }
        spec.lora_alpha = j["lora_alpha"].get<double>();
    }
    if (j.contains("lora_dropout") && j["lora_dropout"].is_number()) {
        spec.lora_dropout = j["lora_dropout"].get<double>();
    }
    if (j.contains("use_rslora") && j["use_rslora"].is_boolean()) {
        spec.use_rslora = j["use_rslora"].get<bool>();
    }
    if (!j.contains("target_modules") || !j["target_modules"].is_array()) {
        fail(
            "key 'target_modules' must be a list of module names (regular expressions and \"all-linear\" are not "
            "supported), got " +
            (j.contains("target_modules") ? j["target_modules"].dump() : std::string("nothing"))
        );
    }
    spec.target_modules.clear();
    for (const auto& t : j["target_modules"]) {
        if (!t.is_string()) {
            fail("key 'target_modules' must hold strings, got " + t.dump());
        }
        spec.target_modules.push_back(t.get<std::string>());
    }
    const auto refuse_true = [&](const char* key) {
        if (j.contains(key) && j[key].is_boolean() && j[key].get<bool>()) {
            fail(std::string("key '") + key + "' is true, which qlora does not support");
        }
    };
    refuse_true("use_dora");
    refuse_true("lora_bias");
    refuse_true("fan_in_fan_out");
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
        if (j.contains(key) && j[key].is_object() && !j[key].empty()) {
            fail(std::string("key '") + key + "' is not empty, which qlora does not support");
        }
    }
    if (j.contains("modules_to_save") && !j["modules_to_save"].is_null() && !j["modules_to_save"].empty()) {
        fail("key 'modules_to_save' is not supported, got " + j["modules_to_save"].dump());
    }
    if (j.contains("bias") && j["bias"] != "none") {
        fail("key 'bias' must be \"none\", got " + j["bias"].dump());
    }
    if (!m->lora.has_value()) {
        apply_qlora(m, spec);
    } else {
        const LoraSpec& have = *m->lora;
        if (have.r != spec.r || have.lora_alpha != spec.lora_alpha || have.use_rslora != spec.use_rslora ||
            have.target_modules != spec.target_modules) {
            fail("r, lora_alpha, use_rslora or target_modules differ from the model's LoRA layers");
        }
    }
    const std::string weights = (std::filesystem::path(dir) / "adapter_model.safetensors").string();
    const safetensors::File file = safetensors::File::open(weights);
    std::set<std::string> used;
    torch::NoGradGuard no_grad;
    for (auto& item : m->named_parameters()) {
        if (item.key().find(".lora_") == std::string::npos) {
            continue;
        }
        const std::string key = "base_model.model." + item.key();
        const safetensors::TensorInfo* info = file.find(key);
        const std::string module = item.key().substr(0, item.key().find(".lora_"));
        if (info == nullptr) {
            throw std::runtime_error(weights + ": no " + key + " for module " + module);
        }
        if (info->shape != item.value().sizes().vec()) {
            throw std::runtime_error(
                weights + ": " + key + " has shape " + c10::str(c10::IntArrayRef(info->shape)) + " but module " +
                module + " expects " + c10::str(item.value().sizes()) + " (rank or target modules differ?)"
            );
        }
        item.value().copy_(file.tensor(key));
        used.insert(key);
    }
    for (const safetensors::TensorInfo& t : file.header().tensors) {
        if (used.count(t.name) == 0) {
            throw std::runtime_error(weights + ": " + t.name + " matches no LoRA layer of the model");
        }
    }
}

void load_weights(LlamaForCausalLM& m, const safetensors::Checkpoint& ck, at::ScalarType dtype) {
    check_checkpoint(m->model->config, ck);
    torch::NoGradGuard no_grad;
    for (auto& item : m->named_parameters()) {
        item.value().set_data(ck.tensor(item.key()).to(dtype).clone());
    }
}

} // namespace qlora::llama
