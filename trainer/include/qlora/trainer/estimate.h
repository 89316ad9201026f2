// qlora/trainer/estimate.h: the memory budget of a `qlora train` run, computed from the config and the model's
// config.json before anything large is allocated (`qlora estimate`).
//
// Parts (bytes): the runtime (this process's resident set when the estimate is made: LibTorch and its libraries,
// plus the per-thread allocator arenas and caches training adds, a constant measured on the bundled configs), NF4
// weights with their double-quantization constants, dense weights in the compute dtype, trainable parameters and
// their gradients, optimizer state, activations kept for backward for micro_batch_size rows of sequence_len tokens
// (without packing: of the longest tokenized example, which pads every micro-batch at most that far) (all layers, or
// with gradient_checkpointing each layer's input plus one layer recomputed), and the float32 logits with their
// log-softmax and gradient. Note [Activation bytes] in estimate.cpp counts what autograd saves per token.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "qlora/trainer/config.h"

namespace qlora::train {

struct MemoryEstimate {
    std::vector<std::pair<std::string, int64_t>> parts;
    int64_t total = 0;
};

MemoryEstimate estimate_memory(const config::TrainConfig& c);

} // namespace qlora::train
