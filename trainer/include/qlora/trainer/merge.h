// qlora/trainer/merge.h: folding a LoRA adapter into its base model (`qlora merge`) and exporting the merged model
// (`qlora export`).
//
// merge_tensors streams the base checkpoint tensor by tensor (file order). Each target projection's weight becomes
// W + s · B · A computed in float32, where W is, by default, what the adapter was trained on: the weight quantized to
// NF4 with the adapter's blocksize and double quantization and dequantized again (bit for bit the weight qlora's
// training saw), or the stored 4-bit weight of a bitsandbytes checkpoint dequantized; with `dense_dir`, the weight
// of that dense checkpoint instead (same shapes required). Other 4-bit weights are dequantized, every tensor is cast
// to the output dtype. The result is a dense Hugging Face checkpoint; merging back into 4-bit (kNf4) re-quantizes the
// merged weights, which loses part of the update, and is refused unless forced.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qlora/trainer/llama.h"

namespace qlora::llama {

struct MergeOptions {
    std::string base_dir;    // the base model the adapter was trained on (dense or bitsandbytes 4-bit)
    std::string adapter_dir; // PEFT adapter directory
    std::string dense_dir;   // optional: merge into this dense checkpoint's weights instead
    bool dense_base = false; // the adapter was trained on dense weights (adapter: lora): W is the stored weight
    std::string dtype = "";  // "bfloat16", "float16", "float32", "nf4"; empty: the base's torch_dtype (else float32)
    bool force = false;      // allow "nf4"
    std::string tokenizer;   // optional sentencepiece model, written as tokenizer.model when the base has none
};

struct MergedModel {
    LlamaConfig config;
    std::string dtype;                                       // output dtype name
    std::vector<std::pair<std::string, at::Tensor>> tensors; // dense tensors in checkpoint order
    std::vector<std::string> merged_modules;                 // projections that received an update
};

// The merged weights (dense, in the output dtype; with "nf4" the merged projections are returned dense in float32
// and quantized by write_merged).
MergedModel merge_tensors(const MergeOptions& opt);

// Writes a Hugging Face directory: config.json (torch_dtype updated, quantization_config only for nf4), the weights
// (sharded above max_shard_bytes), and the tokenizer files of the base directory (tokenizer.model, tokenizer.json,
// tokenizer_config.json, special_tokens_map.json, generation_config.json, those present). With dtype nf4 the merged
// projections are quantized here; returns their relative RMS rounding error ||Q(W') - W'|| / ||W'|| (0 otherwise).
double write_merged(
    const MergedModel& merged, const MergeOptions& opt, const std::string& out_dir,
    uint64_t max_shard_bytes = uint64_t{5} << 30
);

// A dense LlamaForCausalLM (compute dtype float32 or bfloat16) holding the merged tensors.
LlamaForCausalLM merged_model(const MergedModel& merged, at::ScalarType compute_dtype);

// Max |logit difference| of two models on a fixed probe batch (2 rows of up to 32 pseudo-random ids, seeded), and
// the largest |logit| of `a` for scale.
struct ProbeResult {
    double max_abs_diff = 0.0;
    double max_abs_logit = 0.0;
    int64_t logits = 0;
};
ProbeResult probe_logits(LlamaForCausalLM& a, LlamaForCausalLM& b);

// ---------------------------------------------------------------------------------------------------------------
// Export. TorchScript is deprecated upstream (torch.export is its successor), so exporters sit behind this interface;
// a new format is one more subclass and a name in make_exporter.

class Exporter {
  public:
    virtual ~Exporter() = default;
    virtual std::string format() const = 0;
    // Writes `model` (dense: no NF4 projections, no LoRA) to `out`, a file or directory as the format wants.
    virtual void write(LlamaForCausalLM& model, const std::string& out) const = 0;
};

// "torchscript": a TorchScript archive whose `forward(input_ids: Tensor[B, T] int64) -> Tensor[B, T, V]` is the
// model's causal forward in its dtype, written in TorchScript source and compiled by LibTorch, so it needs only stock
// PyTorch / LibTorch to load (torch::jit::load, torch.jit.load). "safetensors": a Hugging Face directory.
std::unique_ptr<Exporter> make_exporter(const std::string& format);

} // namespace qlora::llama
