// qlora/trainer/config.h: the YAML configuration of `qlora train`, with axolotl's key names so that users can copy
// their configs.
//
// Strict: an unknown key is an error with a "did you mean" hint, a wrong type or value names the key and its line,
// duplicate keys and YAML syntax errors name the line; every error is one std::runtime_error line starting with the
// file (or `override 'k=v'`). Relative paths (base_model, tokenizer, datasets[].path, output_dir and a
// resume_from_checkpoint path) are resolved against the directory of the config file, so a config works from any
// working directory.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qlora::config {

struct Dataset {
    std::string path;
    std::string type; // alpaca | chat | completion | text
    bool operator==(const Dataset&) const = default;
};

struct TrainConfig {
    std::string base_model;        // required: a Hugging Face model directory
    std::string tokenizer;         // default <base_model>/tokenizer.model
    std::string adapter = "qlora"; // qlora | lora | none (full-parameter training)
    bool load_in_4bit = true;      // default: adapter == qlora
    int64_t lora_r = 8;
    double lora_alpha = 16.0;
    double lora_dropout = 0.0;
    std::vector<std::string> lora_target_modules; // resolved: lora_target_linear gives all seven projections
    bool lora_target_linear = false;
    bool peft_use_rslora = false;
    std::string lora_model_dir;          // start from this PEFT adapter instead of a fresh one (axolotl)
    std::vector<Dataset> datasets;       // required, non-empty
    double val_set_size = 0.0;           // fraction in [0, 1) or a count >= 1
    bool shuffle_merged_datasets = true; // false: every epoch in file order
    int64_t sequence_len = 2048;
    bool sample_packing = false;
    int64_t micro_batch_size = 1;
    int64_t gradient_accumulation_steps = 1;
    double num_epochs = 1.0;
    int64_t max_steps = -1;                     // > 0 overrides num_epochs
    std::string optimizer = "paged_adamw_8bit"; // paged_adamw_8bit | adamw_8bit | paged_adamw_32bit | adamw_torch
    double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_epsilon = 1e-8;
    std::string lr_scheduler = "cosine"; // constant | linear | cosine
    double learning_rate = 2e-4;
    int64_t warmup_steps = 0;
    double warmup_ratio = 0.0;
    double weight_decay = 0.0;
    double max_grad_norm = 1.0; // 0 disables clipping
    bool gradient_checkpointing = false;
    bool bf16 = false; // resolved: "auto" = the CPU has AVX512-BF16
    bool train_on_inputs = false;
    int64_t seed = 42;
    int64_t logging_steps = 1;
    int64_t eval_steps = 0;             // 0: only at the end
    int64_t save_steps = 0;             // 0: only at the end
    int64_t save_total_limit = 0;       // 0: keep all
    std::string output_dir;             // required
    std::string resume_from_checkpoint; // "" (none) | "auto" | a checkpoint directory
    int64_t num_threads = 0;            // 0: all cores

    bool operator==(const TrainConfig&) const = default;
};

// Reads, applies `overrides` ("key=value", dotted keys for nested entries such as datasets.0.path; values are YAML
// scalars or flow lists), validates and resolves paths.
TrainConfig load(const std::string& path, const std::vector<std::string>& overrides = {});

// Parses YAML text; `what` names it in errors and `base_dir` resolves relative paths.
TrainConfig parse(
    const std::string& text, const std::string& what, const std::string& base_dir,
    const std::vector<std::string>& overrides = {}
);

// The resolved config (every key, absolute paths): written next to the outputs; parse() of it gives it back.
std::string to_yaml(const TrainConfig& c);

// The keys that change the training trajectory, with canonical values (everything but logging, evaluation and
// checkpoint cadence, output_dir, resume_from_checkpoint and num_threads), and a stable 64-bit FNV-1a hash of them.
std::vector<std::pair<std::string, std::string>> run_affecting(const TrainConfig& c);
std::string fingerprint(const TrainConfig& c);

} // namespace qlora::config
