// trainer/src/llama.cpp: see qlora/trainer/llama.h.
#include "qlora/trainer/llama.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include "qlora/trainer/atomic_file.h"
#include "qlora/trainer/bnb_nf4.h"
#include "qlora/trainer/json.h"

namespace qlora::llama {

// --------------------------------------------------------------------------------------------------------------
// Building blocks

ProjectionImpl::ProjectionImpl(int64_t in_f, int64_t out_f, bool has_bias, Init init)
    : in_features(in_f), out_features(out_f) {
    at::Tensor w = torch::empty({out_features, in_features});
    if (init == Init::kRandom) {
        w.normal_(0.0, 0.02); // transformers' init (initializer_range 0.02); checkpoints overwrite it
    }
    weight = register_parameter("weight", w);
    if (has_bias) {
        bias = register_parameter(
            "bias", init == Init::kRandom ? torch::zeros({out_features}) : torch::empty({out_features})
        );
    }
}

torch::Tensor ProjectionImpl::forward(const torch::Tensor& x) {
    const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    // The LoRA update in use: the module's own lora_A / lora_B, else a hot-swapped one (AdapterSet), else none.
    const bool own = has_lora();
    if (!own && !swapped_a.defined()) {
        return quantized() ? qlora::linear(x, nf4, b) : at::linear(x, weight, b);
    }
    const at::Tensor a = (own ? lora_A->weight : swapped_a).to(x.scalar_type());
    const at::Tensor bb = (own ? lora_B->weight : swapped_b).to(x.scalar_type());
    const double scale = own ? lora_scale : swapped_scale;
    std::optional<at::Tensor> lora_input;
    if (own && lora_dropout > 0.0 && is_training()) {
        lora_input = at::dropout(x, lora_dropout, /*train=*/true);
    }
    if (!quantized()) { // plain LoRA: the same sum with a dense base
        return at::linear(x, weight, b) + at::linear(at::linear(lora_input.value_or(x), a), bb) * scale;
    }
    return qlora::linear(x, nf4, b, a, bb, scale, lora_input);
}

void ProjectionImpl::set_nf4(qlora::Nf4Tensor q) {
    TORCH_CHECK(!quantized(), "Projection::set_nf4: already quantized");
    TORCH_CHECK(
        q.shape == std::vector<int64_t>({out_features, in_features}), "Projection::set_nf4: NF4 weight of shape ",
        c10::IntArrayRef(q.shape), " for a [", out_features, ", ", in_features, "] projection"
    );
    nf4 = std::move(q);
    parameters_.erase("weight");
    weight = torch::Tensor();
}

void ProjectionImpl::add_lora(const LoraSpec& spec) {
    TORCH_CHECK(!has_lora(), "Projection::add_lora: the projection already has LoRA");
    if (weight.defined()) {
        weight.set_requires_grad(false);
    }
    torch::NoGradGuard no_grad;
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

void ProjectionImpl::set_swapped_lora(torch::Tensor a, torch::Tensor b, double scale) {
    TORCH_CHECK(!has_lora(), "Projection::set_swapped_lora: the projection has LoRA parameters of its own");
    TORCH_CHECK(
        a.dim() == 2 && b.dim() == 2 && a.size(1) == in_features && b.size(0) == out_features && a.size(0) == b.size(1),
        "Projection::set_swapped_lora: A ", a.sizes(), " and B ", b.sizes(), " do not fit a [", out_features, ", ",
        in_features, "] projection"
    );
    swapped_a = std::move(a);
    swapped_b = std::move(b);
    swapped_scale = scale;
}

void ProjectionImpl::clear_swapped_lora() {
    swapped_a = torch::Tensor();
    swapped_b = torch::Tensor();
    swapped_scale = 0.0;
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

AttentionImpl::AttentionImpl(const LlamaConfig& c, Init init)
    : heads(c.num_attention_heads), kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
    const int64_t E = c.hidden_size;
    q_proj = register_module("q_proj", Projection(E, heads * head_dim, c.attention_bias, init));
    k_proj = register_module("k_proj", Projection(E, kv_heads * head_dim, c.attention_bias, init));
    v_proj = register_module("v_proj", Projection(E, kv_heads * head_dim, c.attention_bias, init));
    o_proj = register_module("o_proj", Projection(heads * head_dim, E, c.attention_bias, init));
}

torch::Tensor AttentionImpl::forward(
    const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& segments
) {
    const int64_t B = x.size(0), T = x.size(1);
    torch::Tensor q = q_proj(x).view({B, T, heads, head_dim}).transpose(1, 2);    // [B, H, T, D]
    torch::Tensor k = k_proj(x).view({B, T, kv_heads, head_dim}).transpose(1, 2); // [B, K, T, D]
    torch::Tensor v = v_proj(x).view({B, T, kv_heads, head_dim}).transpose(1, 2);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    // Key/value head h / (heads / kv_heads) serves query head h (HF repeat_kv) inside the op; o is stored [B, T, H, D].
    const auto [o, lse] =
        qlora::causal_attention(q, k, v, segments.defined() ? std::optional<at::Tensor>(segments) : std::nullopt);
    return o_proj(o.transpose(1, 2).reshape({B, T, heads * head_dim}));
}

torch::Tensor AttentionImpl::forward_cached(
    const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
    torch::Tensor& v_cache, int64_t past
) {
    const int64_t B = x.size(0), T = x.size(1), L = past + T;
    TORCH_CHECK(L <= k_cache.size(2), "KVCache: ", L, " positions do not fit a cache of ", k_cache.size(2));
    torch::Tensor q = q_proj(x).view({B, T, heads, head_dim}).transpose(1, 2);    // [B, H, T, D]
    torch::Tensor k = k_proj(x).view({B, T, kv_heads, head_dim}).transpose(1, 2); // [B, K, T, D]
    torch::Tensor v = v_proj(x).view({B, T, kv_heads, head_dim}).transpose(1, 2);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    k_cache.narrow(2, past, T).copy_(k);
    v_cache.narrow(2, past, T).copy_(v);
    k = k_cache.narrow(2, 0, L);
    v = v_cache.narrow(2, 0, L);
    if (kv_heads != heads) {
        k = k.repeat_interleave(heads / kv_heads, 1);
        v = v.repeat_interleave(heads / kv_heads, 1);
    }
    // Query i (position past + i) sees keys 0 .. past + i: causal for a first chunk, everything for a single token,
    // an explicit mask otherwise (SDPA's is_causal aligns the diagonal to the top left when T < L).
    torch::Tensor o;
    if (past == 0) {
        o = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true);
    } else if (T == 1) {
        o = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/false);
    } else {
        const at::Tensor mask = at::ones({T, L}, at::kBool).tril(past);
        o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/false);
    }
    return o_proj(o.transpose(1, 2).reshape({B, T, heads * head_dim}));
}

MLPImpl::MLPImpl(const LlamaConfig& c, Init init) {
    gate_proj = register_module("gate_proj", Projection(c.hidden_size, c.intermediate_size, c.mlp_bias, init));
    up_proj = register_module("up_proj", Projection(c.hidden_size, c.intermediate_size, c.mlp_bias, init));
    down_proj = register_module("down_proj", Projection(c.intermediate_size, c.hidden_size, c.mlp_bias, init));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
    return down_proj(at::silu(gate_proj(x)) * up_proj(x));
}

DecoderLayerImpl::DecoderLayerImpl(const LlamaConfig& c, Init init) {
    input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    self_attn = register_module("self_attn", Attention(c, init));
    post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    mlp = register_module("mlp", MLP(c, init));
}

torch::Tensor DecoderLayerImpl::forward(
    const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& segments
) {
    const torch::Tensor h = x + self_attn(input_layernorm(x), cos, sin, segments);
    return h + mlp(post_attention_layernorm(h));
}

torch::Tensor DecoderLayerImpl::forward_cached(
    const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
    torch::Tensor& v_cache, int64_t past
) {
    const torch::Tensor h = x + self_attn->forward_cached(input_layernorm(x), cos, sin, k_cache, v_cache, past);
    return h + mlp(post_attention_layernorm(h));
}

// --------------------------------------------------------------------------------------------------------------
// Note [Activation checkpointing]
//
// With gradient_checkpointing, a decoder layer runs its forward without recording a graph and keeps only its input
// (plus the shared cos/sin and the state of the CPU generator). Its output gets a CheckpointBackward node as
// grad_fn; in backward that node restores the generator (so LoRA dropout draws the same masks), reruns the layer
// with a graph, and back-propagates the incoming gradient through it: the layer's LoRA parameters accumulate their
// gradients (a nested backward, as torch.utils.checkpoint's reentrant variant does) and the node returns the
// gradient of its input. Activations therefore live one layer at a time. The node is created whenever the layer has
// trainable parameters, even if its input does not require grad (the first layer's input is a frozen embedding),
// which is why no "enable input grads" hook is needed as with transformers.
namespace {

class CheckpointBackward : public torch::autograd::Node {
  public:
    CheckpointBackward(
        DecoderLayer layer, at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor segments, at::Tensor rng_state,
        bool x_requires_grad
    )
        : layer_(std::move(layer)), x_(std::move(x)), cos_(std::move(cos)), sin_(std::move(sin)),
          segments_(std::move(segments)), rng_state_(std::move(rng_state)), x_requires_grad_(x_requires_grad) {}

    std::string name() const override { return "qlora::llama::CheckpointBackward"; }

    torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
        TORCH_CHECK(x_.defined(), "CheckpointBackward: backward through a checkpointed layer twice");
        const at::Tensor x = x_.detach().requires_grad_(x_requires_grad_);
        at::Generator gen = at::detail::getDefaultCPUGenerator();
        at::Tensor out;
        {
            const at::Tensor now = gen.get_state();
            gen.set_state(rng_state_);
            torch::AutoGradMode grad_mode(true);
            out = layer_->forward(x, cos_, sin_, segments_);
            gen.set_state(now);
        }
        const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(out);
        torch::autograd::backward({out}, {grad});
        at::Tensor dx = x_requires_grad_ ? x.grad() : at::Tensor();
        release_variables();
        return {dx};
    }

    void release_variables() override {
        x_.reset();
        cos_.reset();
        sin_.reset();
        segments_.reset();
    }

  private:
    DecoderLayer layer_;
    at::Tensor x_, cos_, sin_, segments_, rng_state_;
    bool x_requires_grad_;
};

bool has_trainable(const torch::nn::Module& m) {
    for (const at::Tensor& p : m.parameters()) {
        if (p.requires_grad()) {
            return true;
        }
    }
    return false;
}

at::Tensor checkpointed_layer(
    DecoderLayer& layer, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& segments
) {
    if (!torch::GradMode::is_enabled() || !(x.requires_grad() || has_trainable(*layer))) {
        return layer->forward(x, cos, sin, segments);
    }
    const at::Tensor rng_state = at::detail::getDefaultCPUGenerator().get_state();
    at::Tensor out;
    {
        torch::NoGradGuard no_grad;
        out = layer->forward(x, cos, sin, segments);
    }
    auto node =
        c10::make_intrusive<CheckpointBackward>(layer, x.detach(), cos, sin, segments, rng_state, x.requires_grad());
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    torch::autograd::set_history(out, node);
    return out;
}

} // namespace

// --------------------------------------------------------------------------------------------------------------
// Model

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& c, Init init) : config(c) {
    torch::nn::EmbeddingOptions options(c.vocab_size, c.hidden_size);
    // A given weight is used as is: empty (never written) for loaders, N(0, 0.02) as transformers initialises it
    // (torch::nn::Embedding's own default is N(0, 1)).
    at::Tensor w = torch::empty({c.vocab_size, c.hidden_size});
    if (init == Init::kRandom) {
        w.normal_(0.0, 0.02);
    }
    options._weight(w);
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(options));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
        layers->push_back(DecoderLayer(c, init));
    }
    norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    inv_freq = rope_inv_freq(c);
}

torch::Tensor
LlamaModelImpl::forward(const torch::Tensor& ids, const torch::Tensor& position_ids, const torch::Tensor& segment_ids) {
    TORCH_CHECK(ids.dim() == 2, "LlamaModel: ids must be [batch, tokens], got ", ids.sizes());
    torch::Tensor x = embed_tokens(ids);
    const int64_t T = ids.size(1);
    // cos/sin: positions x inverse frequencies in float32, duplicated for both halves, cast to x's dtype; [T, D] for
    // the default positions, [B, 1, T, D] (broadcast over heads) for given ones.
    torch::Tensor freqs;
    if (position_ids.defined()) {
        TORCH_CHECK(position_ids.sizes() == ids.sizes(), "LlamaModel: position_ids must have the shape of ids");
        freqs = (position_ids.to(at::kFloat).unsqueeze(-1) * inv_freq.to(x.device())).unsqueeze(1);
    } else {
        freqs = at::outer(at::arange(T, at::kFloat), inv_freq.to(x.device()));
    }
    const torch::Tensor emb = at::cat({freqs, freqs}, -1);
    const torch::Tensor cos = (emb.cos() * attention_scaling).to(x.scalar_type());
    const torch::Tensor sin = (emb.sin() * attention_scaling).to(x.scalar_type());
    // Packed rows (some row holds a second segment): causal within each segment. Padding (segment 0) attends to
    // earlier padding, so no attention row is empty (every query sees itself). Unpacked rows (segment 1, then
    // padding) need only the causal rule.
    torch::Tensor segments;
    if (segment_ids.defined()) {
        TORCH_CHECK(segment_ids.sizes() == ids.sizes(), "LlamaModel: segment_ids must have the shape of ids");
        if (segment_ids.max().item<int64_t>() > 1) {
            segments = segment_ids.to(at::kInt);
        }
    }
    const bool checkpoint = gradient_checkpointing && is_training();
    for (size_t i = 0; i < layers->size(); ++i) {
        DecoderLayer layer(layers->ptr<DecoderLayerImpl>(i));
        x = checkpoint ? checkpointed_layer(layer, x, cos, sin, segments) : layer->forward(x, cos, sin, segments);
    }
    return norm(x);
}

torch::Tensor LlamaModelImpl::forward_cached(const torch::Tensor& ids, KVCache& cache) {
    TORCH_CHECK(ids.dim() == 2, "LlamaModel: ids must be [batch, tokens], got ", ids.sizes());
    TORCH_CHECK(
        cache.k.size() == layers->size() && cache.v.size() == layers->size(), "KVCache: made for ", cache.k.size(),
        " layers, the model has ", layers->size()
    );
    torch::Tensor x = embed_tokens(ids);
    const int64_t T = ids.size(1), past = cache.length;
    const torch::Tensor freqs =
        at::outer(at::arange(past, past + T, at::kLong).to(at::kFloat), inv_freq.to(x.device()));
    const torch::Tensor emb = at::cat({freqs, freqs}, -1);
    const torch::Tensor cos = (emb.cos() * attention_scaling).to(x.scalar_type());
    const torch::Tensor sin = (emb.sin() * attention_scaling).to(x.scalar_type());
    for (size_t i = 0; i < layers->size(); ++i) {
        x = layers->ptr<DecoderLayerImpl>(i)->forward_cached(x, cos, sin, cache.k[i], cache.v[i], past);
    }
    cache.length = past + T;
    return norm(x);
}

KVCache make_kv_cache(const LlamaForCausalLM& m, int64_t batch, int64_t capacity, at::ScalarType dtype) {
    const LlamaConfig& c = m->model->config;
    KVCache cache;
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
        cache.k.push_back(at::zeros({batch, c.num_key_value_heads, capacity, c.head_dim}, at::TensorOptions(dtype)));
        cache.v.push_back(at::zeros({batch, c.num_key_value_heads, capacity, c.head_dim}, at::TensorOptions(dtype)));
    }
    return cache;
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& c, Init init) {
    model = register_module("model", LlamaModel(c, init));
    if (!c.tie_word_embeddings) {
        lm_head = register_module("lm_head", Projection(c.hidden_size, c.vocab_size, false, init));
    }
}

torch::Tensor LlamaForCausalLMImpl::forward(
    const torch::Tensor& ids, const torch::Tensor& position_ids, const torch::Tensor& segment_ids
) {
    const torch::Tensor h = model(ids, position_ids, segment_ids);
    return lm_head ? lm_head(h) : at::linear(h, model->embed_tokens->weight);
}

torch::Tensor LlamaForCausalLMImpl::forward_cached(const torch::Tensor& ids, KVCache& cache) {
    const torch::Tensor h = model->forward_cached(ids, cache);
    return lm_head ? lm_head(h) : at::linear(h, model->embed_tokens->weight);
}

namespace {

// A module name (`model.layers.0.self_attn.q_proj`, `lm_head`) whose last component is one of the targets.
bool is_target(const std::string& module, const LoraSpec& spec) {
    const std::string leaf = module.substr(module.find_last_of('.') + 1);
    return std::find(spec.target_modules.begin(), spec.target_modules.end(), leaf) != spec.target_modules.end();
}

// NF4 of a dense weight (any float dtype: its values are quantized as they are), dequantizing to `dtype` by default.
qlora::Nf4Tensor quantize_weight(const at::Tensor& w, const LoraSpec& spec, at::ScalarType dtype) {
    qlora::Nf4Tensor q = qlora::nf4_quantize(w, spec.blocksize, spec.double_quant);
    q.dtype = dtype;
    return q;
}

} // namespace

int64_t apply_qlora(LlamaForCausalLM& m, const LoraSpec& spec) {
    TORCH_CHECK(spec.r > 0, "apply_qlora: r must be positive, got ", spec.r);
    int64_t converted = 0;
    for (auto& item : m->named_modules()) {
        auto* proj = item.value()->as<Projection>();
        if (proj == nullptr || item.key().find("lora_") != std::string::npos || !is_target(item.key(), spec)) {
            continue;
        }
        if (!proj->quantized() && spec.load_in_4bit) {
            proj->set_nf4(quantize_weight(proj->weight.detach(), spec, proj->weight.scalar_type()));
        }
        if (!proj->has_lora()) {
            proj->add_lora(spec);
            ++converted;
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

LoraSpec read_adapter_config(const std::string& dir) {
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
    return spec;
}

void load_adapter(LlamaForCausalLM& m, const std::string& dir, bool load_in_4bit) {
    const std::string config_path = (std::filesystem::path(dir) / "adapter_config.json").string();
    const auto fail = [&](const std::string& msg) {
        throw std::runtime_error(config_path + ": " + msg);
    };
    LoraSpec spec = read_adapter_config(dir);
    if (!m->lora.has_value()) {
        spec.load_in_4bit = load_in_4bit;
        apply_qlora(m, spec);
    } else {
        const LoraSpec& have = *m->lora;
        if (have.r != spec.r || have.lora_alpha != spec.lora_alpha || have.use_rslora != spec.use_rslora ||
            std::set<std::string>(have.target_modules.begin(), have.target_modules.end()) !=
                std::set<std::string>(spec.target_modules.begin(), spec.target_modules.end())) {
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

namespace {

// The body of load_model and load_weights: streams `ck` (already checked against the config) into `m`, quantizing the
// projections in `targets` ("<module>.weight" -> projection) as they arrive; 4-bit weights in bitsandbytes' form load
// as NF4 whether targeted or not.
void stream_weights(
    LlamaForCausalLM& m, const safetensors::Checkpoint& ck, at::ScalarType dtype, const LoraSpec* spec,
    const std::map<std::string, ProjectionImpl*>& targets
) {
    std::map<std::string, at::Tensor> params;
    for (auto& item : m->named_parameters()) {
        params.emplace(item.key(), item.value());
    }
    std::map<std::string, ProjectionImpl*> projections;
    for (auto& item : m->named_modules()) {
        if (auto* proj = item.value()->as<Projection>()) {
            projections.emplace(item.key() + ".weight", proj);
        }
    }
    torch::NoGradGuard no_grad;
    for (const std::string& name : ck.names_in_storage_order()) {
        const auto param = params.find(name);
        if (param == params.end()) {
            continue; // quant-state tensors (read with their weight), a tied lm_head.weight, an old inv_freq
        }
        const auto proj = projections.find(name);
        if (proj != projections.end() && qlora::bnb::is_nf4(ck, name)) {
            qlora::Nf4Tensor q = qlora::bnb::read_nf4(ck, name, param->second.sizes().vec());
            q.dtype = dtype;
            proj->second->set_nf4(std::move(q));
        } else if (targets.count(name) != 0) {
            proj->second->set_nf4(quantize_weight(ck.read(name), *spec, dtype));
        } else {
            param->second.set_data(ck.read(name).to(dtype));
        }
        params.erase(param); // drop the handle to the never-written initial storage
    }
}

void check_dtype(at::ScalarType dtype) {
    TORCH_CHECK(
        dtype == at::kFloat || dtype == at::kBFloat16, "qlora::llama: compute dtype must be float32 or bfloat16, got ",
        dtype
    );
}

} // namespace

LlamaForCausalLM load_model(const std::string& dir, const LoadOptions& opt) {
    check_dtype(opt.dtype);
    const LlamaConfig config = load_config(dir);
    const safetensors::Checkpoint ck = safetensors::Checkpoint::open(dir);
    check_checkpoint(config, ck);
    LlamaForCausalLM m(config, Init::kEmpty);
    std::map<std::string, ProjectionImpl*> targets;
    if (opt.lora && opt.lora->load_in_4bit) {
        for (auto& item : m->named_modules()) {
            auto* proj = item.value()->as<Projection>();
            if (proj != nullptr && is_target(item.key(), *opt.lora)) {
                targets.emplace(item.key() + ".weight", proj);
            }
        }
    }
    stream_weights(m, ck, opt.dtype, opt.lora ? &*opt.lora : nullptr, targets);
    if (opt.lora && opt.add_lora) {
        apply_qlora(m, *opt.lora);
    }
    return m;
}

void load_weights(LlamaForCausalLM& m, const safetensors::Checkpoint& ck, at::ScalarType dtype) {
    check_dtype(dtype);
    check_checkpoint(m->model->config, ck);
    stream_weights(m, ck, dtype, nullptr, {});
}

void save_model(const LlamaForCausalLM& m, const std::string& dir, uint64_t max_shard_bytes) {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    std::set<std::string> dense_modules;
    bool any_nf4 = false, double_quant = true;
    at::ScalarType dtype = m->model->embed_tokens->weight.scalar_type();
    for (const auto& item : m->named_modules()) {
        const auto* proj = item.value()->as<Projection>();
        if (proj == nullptr || item.key().find("lora_") != std::string::npos) {
            continue;
        }
        const std::string leaf = item.key().substr(item.key().find_last_of('.') + 1);
        if (proj->quantized()) {
            any_nf4 = true;
            double_quant = double_quant && proj->nf4.double_quantized();
            qlora::Nf4Tensor q = proj->nf4;
            q.dtype = dtype;
            for (auto& t : qlora::bnb::nf4_tensors(item.key() + ".weight", q)) {
                tensors.push_back(std::move(t));
            }
        } else {
            dense_modules.insert(leaf);
        }
    }
    for (const auto& item : m->named_parameters()) {
        if (item.key().find(".lora_") == std::string::npos) {
            tensors.emplace_back(item.key(), item.value().detach());
        }
    }
    if (!m->lm_head) {
        dense_modules.insert("lm_head"); // tied: the embedding, never quantized
    }
    // transformers converts every Linear except llm_int8_skip_modules (qlora::bnb::skip_modules).
    const nlohmann::json quantization =
        any_nf4 ? qlora::bnb::quantization_config(dtype, double_quant, qlora::bnb::skip_modules(dense_modules))
                : nlohmann::json(nullptr);
    safetensors::save_checkpoint(dir, tensors, max_shard_bytes);
    const std::string text =
        config_json(m->model->config, dtype == at::kBFloat16 ? "bfloat16" : "float32", quantization).dump(2) + "\n";
    qlora::trainer::write_file_atomically(
        (std::filesystem::path(dir) / "config.json").string(),
        [&](qlora::trainer::FileSink& out) { out.write(text.data(), text.size()); }
    );
}

void save_random_model(
    const LlamaConfig& c, const std::string& dir, uint64_t seed, at::ScalarType dtype, const LoraSpec* nf4
) {
    check_dtype(dtype);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    std::set<std::string> dense_leaves;
    bool any_nf4 = false;
    const auto ends_with = [](const std::string& s, const std::string& tail) {
        return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
    };
    torch::NoGradGuard no_grad;
    for (const auto& [name, shape] : expected_tensors(c)) {
        at::Tensor w;
        if (ends_with(name, "norm.weight")) {
            w = at::ones(shape);
        } else if (ends_with(name, ".bias")) {
            w = at::zeros(shape);
        } else {
            w = at::empty(shape).normal_(0.0, 0.02, gen);
        }
        const std::string module = name.substr(0, name.find_last_of('.'));
        const bool projection = shape.size() == 2 && ends_with(name, ".weight") && name != "model.embed_tokens.weight";
        if (projection && nf4 != nullptr && is_target(module, *nf4)) {
            qlora::Nf4Tensor q = quantize_weight(w, *nf4, dtype);
            for (auto& t : qlora::bnb::nf4_tensors(name, q)) {
                tensors.push_back(std::move(t));
            }
            any_nf4 = true;
        } else {
            if (projection) {
                dense_leaves.insert(module.substr(module.find_last_of('.') + 1));
            }
            tensors.emplace_back(name, w.to(dtype));
        }
    }
    if (c.tie_word_embeddings) {
        dense_leaves.insert("lm_head");
    }
    const nlohmann::json quantization =
        any_nf4 ? qlora::bnb::quantization_config(dtype, nf4->double_quant, qlora::bnb::skip_modules(dense_leaves))
                : nlohmann::json(nullptr);
    safetensors::save_checkpoint(dir, tensors);
    const std::string text =
        config_json(c, dtype == at::kBFloat16 ? "bfloat16" : "float32", quantization).dump(2) + "\n";
    qlora::trainer::write_file_atomically(
        (std::filesystem::path(dir) / "config.json").string(),
        [&](qlora::trainer::FileSink& out) { out.write(text.data(), text.size()); }
    );
}

} // namespace qlora::llama
