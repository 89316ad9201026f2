// qlora/trainer/llama.h: Llama (Hugging Face LlamaForCausalLM) as LibTorch modules whose submodule and parameter names
// are the Hugging Face state-dict keys (spec formats-and-ops.md §2.2-§2.5), so a checkpoint loads by name.
//
//   LlamaForCausalLM
//     model: embed_tokens, layers.N: {input_layernorm, self_attn: {q,k,v,o}_proj, post_attention_layernorm,
//            mlp: {gate,up,down}_proj}, norm
//     lm_head (absent when tie_word_embeddings: the logits use model.embed_tokens.weight)
//
// Math as transformers' eager path: RMSNorm in float32 then cast back and scaled by the weight, rotary embeddings in
// the split-half convention with cos/sin computed in float32 and cast to the activation dtype, grouped-query
// attention through qlora::causal_attention (causal, or causal within segments for packed rows; generation with a
// KV cache uses at::scaled_dot_product_attention), SwiGLU MLP. Shapes: B batch, T tokens,
// E hidden, H heads, K key/value heads, D head_dim, V vocabulary.
#pragma once

#include <optional>
#include <string>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include "qlora/ops.h"
#include "qlora/trainer/checkpoint.h"
#include "qlora/trainer/llama_config.h"

namespace qlora::llama {

// Which projections become NF4 + LoRA, and how (PEFT's LoraConfig names; spec formats-and-ops.md §3).
struct LoraSpec {
    std::vector<std::string> target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};
    int64_t r = 8;
    double lora_alpha = 16.0;
    double lora_dropout = 0.0;
    bool use_rslora = false; // scale alpha / sqrt(r) instead of alpha / r
    int64_t blocksize = 64;
    bool double_quant = true;
    bool load_in_4bit = true; // false: plain LoRA over the dense (frozen) weights
};

// How constructors fill parameters: kRandom as transformers initialises a fresh model; kEmpty allocates them
// without writing (no page is touched, so nothing becomes resident) for loaders that overwrite or drop every one.
enum class Init { kRandom, kEmpty };

// A projection y = x W^T (+ b) with HF's parameter names `weight` [out, in] and `bias` [out]. After quantize(), W is
// frozen NF4 (the dense parameter is gone) and the layer is QLoRA: y = x W^T + b + s (dropout(x) A^T) B^T through
// qlora::linear, with A = lora_A.weight [r, in] (PEFT's Kaiming-uniform init) and B = lora_B.weight [out, r] (zeros),
// the names PEFT uses under the module.
class ProjectionImpl : public torch::nn::Module {
  public:
    ProjectionImpl(int64_t in_features, int64_t out_features, bool bias, Init init = Init::kRandom);
    torch::Tensor forward(const torch::Tensor& x);
    // Replaces the dense weight by the frozen NF4 `q` (shape [out, in]); the dense parameter is dropped.
    void set_nf4(qlora::Nf4Tensor q);
    // Adds lora_A / lora_B (PEFT's init from the global generator); the base weight (NF4 or dense) is frozen.
    void add_lora(const LoraSpec& spec);
    bool quantized() const { return nf4.packed.defined(); }
    bool has_lora() const { return !lora_A.is_empty(); }
    // A LoRA update that is not a parameter of the module (AdapterSet, qlora/trainer/adapters.h): without lora_A /
    // lora_B, forward adds s (x A^T) B^T with these when set; clear_swapped_lora() goes back to the base.
    void set_swapped_lora(torch::Tensor a, torch::Tensor b, double scale);
    void clear_swapped_lora();

    int64_t in_features, out_features;
    torch::Tensor weight, bias;
    qlora::Nf4Tensor nf4; // set by quantize()
    torch::nn::ModuleHolder<ProjectionImpl> lora_A{nullptr}, lora_B{nullptr};
    double lora_scale = 0.0, lora_dropout = 0.0;
    torch::Tensor swapped_a, swapped_b; // [r, in], [out, r] in the compute dtype; undefined: none
    double swapped_scale = 0.0;
};
TORCH_MODULE(Projection);

// Keys and values of the tokens seen so far, per decoder layer [B, K, capacity, D] (after RoPE, before the
// grouped-query repeat), for incremental decoding; `length` positions are filled. make_kv_cache preallocates it.
struct KVCache {
    std::vector<torch::Tensor> k, v;
    int64_t length = 0;
    int64_t capacity() const { return k.empty() ? 0 : k[0].size(2); }
};

class RMSNormImpl : public torch::nn::Module {
  public:
    RMSNormImpl(int64_t dim, double eps);
    torch::Tensor forward(const torch::Tensor& x);
    torch::Tensor weight;
    double eps;
};
TORCH_MODULE(RMSNorm);

class AttentionImpl : public torch::nn::Module {
  public:
    explicit AttentionImpl(const LlamaConfig& c, Init init = Init::kRandom);
    // x [B, T, E]; cos, sin [T, D] or [B, 1, T, D] in x's dtype; segments: undefined (causal) or integer [B, T]
    // segment ids (a query attends to earlier keys of its own segment). Attention is qlora::causal_attention: grouped
    // heads without repeating k and v, and no [T, T] matrix kept for backward.
    torch::Tensor forward(
        const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& segments = {}
    );
    // x [B, T, E] are the tokens at positions past .. past + T - 1 (cos, sin [T, D] for them); their keys and values
    // are written into k_cache, v_cache [B, K, capacity, D] at those positions and each token attends to every cached
    // position up to its own.
    torch::Tensor forward_cached(
        const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
        torch::Tensor& v_cache, int64_t past
    );
    Projection q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
    int64_t heads, kv_heads, head_dim;
};
TORCH_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
  public:
    explicit MLPImpl(const LlamaConfig& c, Init init = Init::kRandom);
    torch::Tensor forward(const torch::Tensor& x);
    Projection gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

class DecoderLayerImpl : public torch::nn::Module {
  public:
    explicit DecoderLayerImpl(const LlamaConfig& c, Init init = Init::kRandom);
    torch::Tensor forward(
        const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& segments = {}
    );
    torch::Tensor forward_cached(
        const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
        torch::Tensor& v_cache, int64_t past
    );
    RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
    Attention self_attn{nullptr};
    MLP mlp{nullptr};
};
TORCH_MODULE(DecoderLayer);

class LlamaModelImpl : public torch::nn::Module {
  public:
    explicit LlamaModelImpl(const LlamaConfig& c, Init init = Init::kRandom);
    // ids [B, T] int64 -> hidden states [B, T, E] after the final norm. Optional, both int64 [B, T]: position_ids
    // (default 0..T-1 in every row) for the rotary embeddings, and segment_ids for packed rows: a token attends only
    // to earlier tokens of its own segment (a block-diagonal causal mask), so packed samples never see each other.
    torch::Tensor
    forward(const torch::Tensor& ids, const torch::Tensor& position_ids = {}, const torch::Tensor& segment_ids = {});
    // ids [B, T] continue the sequences of `cache` (positions cache.length ..); returns their hidden states and
    // advances cache.length by T. Equals forward on the whole sequence up to floating-point summation order.
    torch::Tensor forward_cached(const torch::Tensor& ids, KVCache& cache);
    torch::nn::Embedding embed_tokens{nullptr};
    torch::nn::ModuleList layers{nullptr};
    RMSNorm norm{nullptr};
    LlamaConfig config;
    torch::Tensor inv_freq; // [D / 2] float32, a buffer computed from the config (not in checkpoints)
    double attention_scaling = 1.0;
    // Per-decoder-layer activation checkpointing while training: each layer keeps only its input and recomputes
    // its activations in backward (Note [Activation checkpointing] in llama.cpp).
    bool gradient_checkpointing = false;
};
TORCH_MODULE(LlamaModel);

class LlamaForCausalLMImpl : public torch::nn::Module {
  public:
    explicit LlamaForCausalLMImpl(const LlamaConfig& c, Init init = Init::kRandom);
    // ids [B, T] int64 -> logits [B, T, V]; position_ids and segment_ids as for LlamaModel.
    torch::Tensor
    forward(const torch::Tensor& ids, const torch::Tensor& position_ids = {}, const torch::Tensor& segment_ids = {});
    // Logits [B, T, V] of ids continuing `cache` (LlamaModel::forward_cached).
    torch::Tensor forward_cached(const torch::Tensor& ids, KVCache& cache);
    LlamaModel model{nullptr};
    Projection lm_head{nullptr};  // null when tied
    std::optional<LoraSpec> lora; // set by apply_qlora
};
TORCH_MODULE(LlamaForCausalLM);

// An empty cache for `batch` sequences of up to `capacity` tokens, in the model's compute dtype `dtype`.
KVCache make_kv_cache(const LlamaForCausalLM& m, int64_t batch, int64_t capacity, at::ScalarType dtype);

// RoPE inverse frequencies with the config's scaling (default, linear, llama3; §2.5), float32 [D / 2].
torch::Tensor rope_inv_freq(const LlamaConfig& c);

// Turns the target projections of every layer into NF4 + LoRA (quantizing their current weights; with
// spec.load_in_4bit false they stay dense) and freezes every other parameter, so only lora_A / lora_B require grad.
// Returns the number of projections given LoRA.
int64_t apply_qlora(LlamaForCausalLM& m, const LoraSpec& spec);

// PEFT-format adapter directory: adapter_config.json (PEFT's LoraConfig keys, sorted, indent 2) and
// adapter_model.safetensors (`base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r], float32),
// both written atomically, loadable by peft.PeftModel.from_pretrained on the transformers model of the same checkpoint.
void save_adapter(const LlamaForCausalLM& m, const std::string& dir, const std::string& base_model_name_or_path);

// The LoraSpec of a PEFT adapter directory's adapter_config.json (r, lora_alpha (PEFT's default 8), lora_dropout,
// use_rslora, target_modules as a list of names), with the refusals load_adapter describes.
LoraSpec read_adapter_config(const std::string& dir);

// Loads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, written by PEFT or by
// save_adapter). A model without LoRA layers gets them first (apply_qlora with the adapter's r, lora_alpha,
// lora_dropout, use_rslora and target_modules); a model with LoRA layers must have been converted with the same
// settings. Every adapter tensor must match a LoRA parameter of the model by name and shape and every LoRA parameter
// must be present; otherwise a one-line error names the module. Unsupported PEFT options (DoRA, LoRA bias,
// rank/alpha patterns, modules_to_save, fan_in_fan_out) are refused naming the key.
// `load_in_4bit` decides, for a model without LoRA layers, whether the targets become NF4 (QLoRA) or stay dense.
void load_adapter(LlamaForCausalLM& m, const std::string& dir, bool load_in_4bit = true);

// Loading a checkpoint directory (config.json + safetensors weights) into a new model.
struct LoadOptions {
    at::ScalarType dtype = at::kFloat; // compute dtype: dense weights and activations (float32 or bfloat16)
    std::optional<LoraSpec> lora;      // NF4 + LoRA on these targets
    bool add_lora = true;              // false: only quantize lora's targets (a base for AdapterSet)
};

// Streams the checkpoint tensor by tensor (each read with pread, file order): dense tensors are converted to
// opt.dtype, each target projection is quantized to NF4 as soon as it is read, so the peak memory of a load is the
// NF4 model plus its dense parts plus about the largest tensor. Names and shapes are checked against config.json
// before anything is read. With opt.lora the LoRA matrices are then added in module order (the result equals
// load_weights + apply_qlora bit for bit). Projections stored 4-bit by bitsandbytes load as they are (never
// re-quantized), whether targeted or not.
LlamaForCausalLM load_model(const std::string& dir, const LoadOptions& opt);

// Copies every parameter from the checkpoint (names and shapes checked first with check_checkpoint), converted to
// `dtype` (4-bit weights in bitsandbytes' form become NF4 projections). Throws std::runtime_error naming the problem.
void load_weights(LlamaForCausalLM& m, const safetensors::Checkpoint& ck, at::ScalarType dtype);

// Writes the model as a Hugging Face checkpoint directory (config.json and safetensors weights, sharded above
// max_shard_bytes; qlora/trainer/checkpoint.h): dense weights in their dtype, NF4 projections in bitsandbytes' form
// with a matching quantization_config (qlora/trainer/bnb_nf4.h), so transformers' from_pretrained loads it and qlora's
// load_model reloads it without re-quantizing. LoRA matrices are not part of it (save_adapter writes them).
void save_model(const LlamaForCausalLM& m, const std::string& dir, uint64_t max_shard_bytes = uint64_t{5} << 30);

// Writes a randomly initialised model (transformers' init: N(0, 0.02) weights, unit norms, zero biases) for config
// `c` without ever holding it dense: tensors are drawn one at a time from a generator seeded with `seed`; with
// `nf4`, its target projections are quantized as they are drawn and stored in bitsandbytes' 4-bit form (with the
// quantization_config), everything else in `dtype`. So a 7B-shaped NF4 model needs about its NF4 size in memory.
void save_random_model(
    const LlamaConfig& c, const std::string& dir, uint64_t seed, at::ScalarType dtype, const LoraSpec* nf4
);

} // namespace qlora::llama
