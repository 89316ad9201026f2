// qlora/trainer/train.h: the training loop of `qlora train` (Note [Training loop] in train.cpp).
//
// One run: load the tokenizer and datasets (qlora/trainer/data.h; every bad line stops the run before training),
// split off the validation set, load the base model streaming into NF4 + LoRA (or dense + LoRA, or dense and fully
// trainable for adapter: none), then optimizer steps of micro_batch_size x gradient_accumulation_steps rows with
// gradient clipping, the learning-rate schedule, evaluation, logging (progress bar on a terminal, plain lines
// otherwise, output_dir/metrics.jsonl) and checkpoints that resume bit-identically.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/trainer/config.h"

namespace qlora::train {

enum class Schedule { kConstant, kLinear, kCosine };
Schedule parse_schedule(const std::string& name);

// The learning rate of optimizer step `step` (0-based) out of `total`, as transformers' schedulers give it: linear
// warmup from 0 over `warmup` steps, then constant, linear decay to 0, or half a cosine to 0.
double lr_at(Schedule s, double base_lr, int64_t step, int64_t warmup, int64_t total);

struct RunOptions {
    bool progress_bar = false;               // redraw one status line (a terminal) instead of printing log lines
    const std::atomic<bool>* stop = nullptr; // set by SIGINT/SIGTERM: finish the current step, checkpoint, return
    std::string profile_dir;                 // non-empty: profile steps into it (qlora/trainer/profile.h)
    int64_t profile_steps = 2;               // how many steps, from the run's second step (its first if only one)
};

struct RunResult {
    int64_t steps_done = 0;
    bool interrupted = false;
    std::string last_checkpoint; // empty if none was written
    double final_loss = 0.0;     // mean loss of the last optimizer step
};

// Trains according to `cfg`. Throws std::runtime_error (one line) for bad input or a non-finite loss (naming the
// step; nothing is saved after it, so the last checkpoint stays the last good one).
RunResult run(const config::TrainConfig& cfg, const RunOptions& options = {});

} // namespace qlora::train
