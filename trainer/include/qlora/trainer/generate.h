// qlora/trainer/generate.h: autoregressive generation from a LlamaForCausalLM: greedy, or sampling with temperature,
// top-k and top-p (nucleus), stopping at any of the stop ids (EOS) or after max_new_tokens. Each step runs the model
// on the whole sequence so far (no key/value cache yet), so it suits short generations from small models.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "qlora/trainer/llama.h"

namespace qlora::llama {

struct GenerateOptions {
    int64_t max_new_tokens = 128;
    double temperature = 0.0; // 0: greedy (argmax, ties to the lowest id)
    int64_t top_k = 0;        // 0: no top-k cut
    double top_p = 1.0;       // 1: no nucleus cut
    uint64_t seed = 0;        // sampling generator seed (the global generator is untouched)
    std::vector<int64_t> stop_ids;
};

// Returns the generated ids (without the prompt; a stop id that ended generation is included). `on_token`, if set,
// is called with each new id as soon as it is chosen (for streaming).
std::vector<int64_t> generate(
    LlamaForCausalLM& m, const std::vector<int64_t>& prompt, const GenerateOptions& opt,
    const std::function<void(int64_t)>& on_token = {}
);

} // namespace qlora::llama
