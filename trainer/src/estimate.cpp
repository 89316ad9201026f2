// trainer/src/estimate.cpp: see qlora/trainer/estimate.h.
//
// Note [Activation bytes]
//
// Per token and decoder layer, autograd keeps (E hidden, HD = heads x head_dim, KD = kv_heads x head_dim,
// I intermediate, b the compute dtype's bytes): for each RMSNorm the float32 input and its normalised output
// (4E + bE); for attention the rotated q and k with their rotate_half terms, the attention output (whose [B, T, HD]
// view is the o_proj input) and its float32 log-sum-exp per head (about b(3 HD + 2 KD) + 4 heads;
// qlora::causal_attention neither repeats k and v nor keeps the attention matrix); for the MLP the gate, up, SiLU and
// product tensors (4 bI); for LoRA the r-wide intermediates of each target and, with dropout, the dropped copy of each
// target's input. With activation checkpointing only each layer's input (bE) is kept, and one layer is alive at a time
// while it is recomputed. Backward needs about one more layer's worth of gradient buffers.
#include "qlora/trainer/estimate.h"

#include <algorithm>
#include <map>

#include "qlora/trainer/data.h"
#include "qlora/trainer/llama_config.h"
#include "qlora/trainer/memory.h"

namespace qlora::train {
namespace {

// What training adds to the runtime besides the model, optimizer and activations: OpenMP/oneDNN thread pools and
// per-thread allocator arenas, the tokenized datasets, and allocator slack. Measured with the bundled configs
// (tests/python/test_estimate.py checks the whole estimate against measured peaks).
constexpr int64_t kTrainingOverhead = int64_t{160} << 20;

} // namespace

MemoryEstimate estimate_memory(const config::TrainConfig& c) {
    const llama::LlamaConfig m = llama::load_config(c.base_model);
    const int64_t E = m.hidden_size, I = m.intermediate_size, V = m.vocab_size, L = m.num_hidden_layers;
    const int64_t HD = m.num_attention_heads * m.head_dim, KD = m.num_key_value_heads * m.head_dim;
    const int64_t b = c.bf16 ? 2 : 4;
    const bool lora = c.adapter != "none";
    const auto targeted = [&](const std::string& name) {
        return lora && std::find(c.lora_target_modules.begin(), c.lora_target_modules.end(), name) !=
                           c.lora_target_modules.end();
    };
    // Projections: name, in, out, count.
    struct Proj {
        std::string name;
        int64_t in, out, count;
    };
    std::vector<Proj> projs = {{"q_proj", E, HD, L},   {"k_proj", E, KD, L},
                               {"v_proj", E, KD, L},   {"o_proj", HD, E, L},
                               {"gate_proj", E, I, L}, {"up_proj", E, I, L},
                               {"down_proj", I, E, L}, {"lm_head", E, V, m.tie_word_embeddings ? 0 : 1}};
    int64_t nf4 = 0, dense = E * V * b + (2 * L + 1) * E * b, trainable = 0, lora_inter = 0, dropout_copies = 0;
    std::vector<int64_t> trainable_tensors;
    for (const Proj& p : projs) {
        const int64_t n = p.in * p.out;
        if (targeted(p.name) && c.load_in_4bit) {
            const int64_t nb = (n + 63) / 64, nb2 = (nb + 255) / 256;
            nf4 += p.count * ((n + 1) / 2 + nb + 4 * nb2 + 4 * 256 + 4);
        } else {
            dense += p.count * n * b;
        }
        if (targeted(p.name)) {
            for (int64_t k = 0; k < p.count; ++k) {
                trainable_tensors.push_back(c.lora_r * p.in);
                trainable_tensors.push_back(c.lora_r * p.out);
            }
            trainable += p.count * c.lora_r * (p.in + p.out);
            if (p.name != "lm_head") {
                lora_inter += c.lora_r;
                dropout_copies += c.lora_dropout > 0 ? p.in : 0;
            }
        }
    }
    int64_t param_bytes = 0; // trainable values (LoRA: float32 masters; full training: the model itself, counted above)
    if (!lora) {
        trainable = nf4 == 0 ? (dense / b) : 0;
        trainable_tensors = {trainable};
    } else {
        param_bytes = trainable * 4;
    }
    const int64_t grads = trainable * 4;
    int64_t optim = 0;
    for (const int64_t n : trainable_tensors) {
        const bool eight = (c.optimizer == "paged_adamw_8bit" || c.optimizer == "adamw_8bit") && n >= 4096;
        optim += eight ? 2 * n + 2 * 4 * ((n + 255) / 256) : 8 * n;
    }
    // Rows are sequence_len long when packed; unpacked micro-batches are padded to their longest example, so the
    // longest example of the datasets (tokenized here: cheap next to training) bounds them.
    int64_t T = c.sequence_len;
    if (!c.sample_packing) {
        const data::Tokenizer tok = data::Tokenizer::load(c.tokenizer);
        data::FormatOptions fo;
        fo.sequence_len = c.sequence_len;
        fo.train_on_inputs = c.train_on_inputs;
        int64_t longest = 1;
        for (const auto& d : c.datasets) {
            for (const auto& ex : data::load_jsonl(d.path, data::parse_format(d.type), tok, fo, nullptr)) {
                longest = std::max(longest, static_cast<int64_t>(ex.input_ids.size()));
            }
        }
        T = std::min(T, longest);
    }
    const int64_t tokens = T * c.micro_batch_size;
    const int64_t per_layer = 2 * (4 * E + b * E) + b * (3 * HD + 2 * KD) + 4 * m.num_attention_heads + 4 * b * I +
                              b * (lora_inter + dropout_copies);
    const int64_t acts = c.gradient_checkpointing ? tokens * (L * b * E + 2 * per_layer) : tokens * (L + 1) * per_layer;
    const int64_t logits = tokens * V * (4 * 3 + (b == 2 ? 2 : 0));
    MemoryEstimate e;
    e.parts = {
        {"runtime (LibTorch, measured now) + training overhead", trainer::resident_bytes() + kTrainingOverhead},
        {"NF4 weights (with double-quantization constants)", nf4},
        {"dense weights", dense},
        {"trainable parameters (float32)", param_bytes},
        {"gradients", grads},
        {"optimizer state (" + c.optimizer + ")", optim},
        {std::string("activations (") + (c.gradient_checkpointing ? "checkpointed" : "all layers") + ", " +
             std::to_string(c.micro_batch_size) + " x " + std::to_string(T) + " tokens)",
         acts},
        {"logits, log-softmax and their gradient (float32)", logits},
    };
    for (const auto& [_, v] : e.parts) {
        e.total += v;
    }
    return e;
}

} // namespace qlora::train
