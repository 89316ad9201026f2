// qlora/trainer/config.h: the YAML configuration of `qlora train`, with axolotl's key names so that users can copy
// their configs (configs/ holds examples; the trainer writes the resolved config next to its outputs).
//
// Strict (reliability-tests.md §2, Y1 and Y2): every error is a std::runtime_error of one line that starts with where
// the value came from, `<file>:<line>` or `override '<key=value>'`, and names the key by its full path
// (`datasets.0.type`):
//   - an unknown key is an error with a "did you mean" hint (edit distance, plus a few names from other trainers:
//     lr, grad_accum, epochs, max_seq_len...); all unknown keys of a map are listed in the one message, so a config
//     copied from axolotl with options qlora does not have is fixed in one pass;
//   - a wrong type or an out-of-range value names the key, the line and the value; a bad choice lists the valid ones;
//   - duplicate keys (which yaml-cpp would silently resolve), YAML syntax errors, a second YAML document, a file over
//     1 MiB and missing required keys are errors.
// A key whose value is null (`key:`, `key: null`, `key: ~`) counts as not given: it takes its default.
//
// Relative paths (base_model, tokenizer, datasets[].path, lora_model_dir, output_dir and a resume_from_checkpoint
// path) in the file are resolved against the directory of the config file, so a config works from any working
// directory; in command-line overrides they are resolved against the working directory, like any path typed in a
// shell. Every path of a loaded TrainConfig is absolute and lexically normal.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qlora::config {

struct Dataset {
    std::string path; // JSONL file
    std::string type; // alpaca | chat | completion | text
    bool operator==(const Dataset&) const = default;
};

// The keys, their defaults and their checks. Keys beyond the basic set, all axolotl's: lora_model_dir,
// shuffle_merged_datasets. `bf16` defaults to false, not to axolotl's auto, so that a config without it trains in
// float32 on every CPU (bit-comparable runs and PyTorch parity tests); `bf16: auto` resolves when the config is read.
struct TrainConfig {
    std::string base_model;        // required: a Hugging Face model directory
    std::string tokenizer;         // default <base_model>/tokenizer.model
    std::string adapter = "qlora"; // qlora | lora | none (full-parameter training of every weight)
    bool load_in_4bit = true;      // default adapter == qlora; must be true for qlora and false otherwise
    int64_t lora_r = 8;            // > 0
    double lora_alpha = 16.0;      // > 0
    double lora_dropout = 0.0;     // [0, 1)
    // q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head. Resolved: lora_target_linear adds the
    // seven projections; a LoRA adapter without targets is an error.
    std::vector<std::string> lora_target_modules;
    bool lora_target_linear = false;
    bool peft_use_rslora = false;
    std::string lora_model_dir;          // start from this PEFT adapter instead of a fresh one
    std::vector<Dataset> datasets;       // required, non-empty
    double val_set_size = 0.0;           // a fraction in [0, 1), or a whole count written as an integer
    bool shuffle_merged_datasets = true; // false: every epoch in file order
    int64_t sequence_len = 2048;         // > 0
    bool sample_packing = false;
    int64_t micro_batch_size = 1;               // > 0
    int64_t gradient_accumulation_steps = 1;    // > 0
    double num_epochs = 1.0;                    // > 0
    int64_t max_steps = -1;                     // -1: derived from num_epochs; > 0 wins over num_epochs
    std::string optimizer = "paged_adamw_8bit"; // paged_adamw_8bit | adamw_8bit | paged_adamw_32bit | adamw_torch
    double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_epsilon = 1e-8;
    std::string lr_scheduler = "cosine"; // constant | linear | cosine
    double learning_rate = 2e-4;
    int64_t warmup_steps = 0; // warmup_steps and warmup_ratio exclude each other
    double warmup_ratio = 0.0;
    double weight_decay = 0.0;
    double max_grad_norm = 1.0; // 0 disables clipping
    bool gradient_checkpointing = false;
    bool bf16 = false; // true | false | auto (resolved: the CPU has AVX512-BF16)
    bool train_on_inputs = false;
    int64_t seed = 42;
    int64_t logging_steps = 1;
    int64_t eval_steps = 0;             // 0: only at the end
    int64_t save_steps = 0;             // 0: only at the end
    int64_t save_total_limit = 0;       // 0: keep all
    std::string output_dir;             // required
    std::string resume_from_checkpoint; // "" (none) | "auto" (the newest checkpoint in output_dir) | a checkpoint
    int64_t num_threads = 0;            // 0: all cores

    bool operator==(const TrainConfig&) const = default;
};

// Reads the file, applies `overrides`, validates and resolves paths. An override is "key=value": the key is a config
// key or a dotted path into the datasets list (datasets.0.path, datasets.1=<entry>); the value is parsed as YAML (a
// scalar, a flow list such as [q_proj, v_proj], or empty/null for the default). Overrides apply in order.
TrainConfig load(const std::string& path, const std::vector<std::string>& overrides = {});

// The same from YAML text: `what` names it in errors and `base_dir` resolves its relative paths.
TrainConfig parse(
    const std::string& text, const std::string& what, const std::string& base_dir,
    const std::vector<std::string>& overrides = {}
);

// The resolved config as YAML: every key (the inactive one of warmup_steps / warmup_ratio and unset paths as null),
// absolute paths. The trainer writes it next to its outputs; parse() of it gives back an equal TrainConfig.
std::string to_yaml(const TrainConfig& c);

// The keys that change the training trajectory, in config order, with canonical values (the YAML of to_yaml; numbers
// with 17 significant digits): every key but logging_steps, eval_steps, save_steps, save_total_limit, output_dir,
// resume_from_checkpoint and num_threads (and lora_target_linear, which is folded into lora_target_modules).
// fingerprint() is a 64-bit FNV-1a hash of them as 16 hex digits; a checkpoint records both to report drift on resume.
std::vector<std::pair<std::string, std::string>> run_affecting(const TrainConfig& c);
std::string fingerprint(const TrainConfig& c);

} // namespace qlora::config
