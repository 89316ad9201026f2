// qlora/trainer/generate.h: autoregressive generation from a LlamaForCausalLM: greedy, or sampling with temperature,
// top-k and top-p (nucleus), stopping at any of the stop ids (EOS), at a stop string, or after max_new_tokens. The
// prompt runs through the model once and every new token once, with a key/value cache (KVCache, llama.h); the
// uncached path (the whole sequence each step) is kept for tests.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
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
    // Stop as soon as the decoded new text contains one of these (needs `decode`); the text from the stop string on
    // is not part of GenerateResult::text.
    std::vector<std::string> stop_strings;
    std::function<std::string(const std::vector<int64_t>&)> decode; // ids (without the prompt) -> text
    bool use_kv_cache = true;
};

struct GenerateResult {
    std::vector<int64_t> ids; // new ids, without the prompt; a stop id that ended generation is included
    std::string text;         // decode(ids without a final stop id), cut before a stop string; empty without decode
    enum class Stop { kStopId, kStopString, kMaxTokens } stop = Stop::kMaxTokens;
};

// `on_token`, if set, is called with each new id as soon as it is chosen (for streaming).
GenerateResult generate_text(
    LlamaForCausalLM& m, const std::vector<int64_t>& prompt, const GenerateOptions& opt,
    const std::function<void(int64_t)>& on_token = {}
);

// The ids of generate_text (kept for callers that need only them).
std::vector<int64_t> generate(
    LlamaForCausalLM& m, const std::vector<int64_t>& prompt, const GenerateOptions& opt,
    const std::function<void(int64_t)>& on_token = {}
);

} // namespace qlora::llama
