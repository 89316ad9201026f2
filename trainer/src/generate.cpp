// trainer/src/generate.cpp: see qlora/trainer/generate.h.
#include "qlora/trainer/generate.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

namespace qlora::llama {

std::vector<int64_t> generate(
    LlamaForCausalLM& m, const std::vector<int64_t>& prompt, const GenerateOptions& opt,
    const std::function<void(int64_t)>& on_token
) {
    TORCH_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token");
    TORCH_CHECK(opt.temperature >= 0.0, "generate: temperature must be >= 0, got ", opt.temperature);
    TORCH_CHECK(opt.top_p > 0.0 && opt.top_p <= 1.0, "generate: top_p must be in (0, 1], got ", opt.top_p);
    const bool was_training = m->is_training();
    m->eval();
    torch::NoGradGuard no_grad;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
    std::vector<int64_t> ids = prompt, out;
    for (int64_t t = 0; t < opt.max_new_tokens; ++t) {
        const at::Tensor input = torch::tensor(ids, at::kLong).view({1, -1});
        at::Tensor logits = m->forward(input).select(1, input.size(1) - 1)[0].to(at::kFloat); // [V]
        int64_t next;
        if (opt.temperature == 0.0) {
            next = logits.argmax().item<int64_t>();
        } else {
            logits = logits / opt.temperature;
            if (opt.top_k > 0 && opt.top_k < logits.size(0)) {
                const at::Tensor kth = std::get<0>(logits.topk(opt.top_k)).min();
                logits = logits.masked_fill(logits < kth, -INFINITY);
            }
            at::Tensor probs = logits.softmax(0);
            if (opt.top_p < 1.0) { // keep the smallest set of most likely tokens whose mass reaches top_p
                const auto [sorted, order] = probs.sort(0, /*descending=*/true);
                const at::Tensor before = sorted.cumsum(0) - sorted; // mass of the more likely tokens
                const at::Tensor drop = before >= opt.top_p;
                probs = probs.scatter(0, order, sorted.masked_fill(drop, 0.0));
                probs = probs / probs.sum();
            }
            next = at::multinomial(probs, 1, false, gen).item<int64_t>();
        }
        ids.push_back(next);
        out.push_back(next);
        if (on_token) {
            on_token(next);
        }
        if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), next) != opt.stop_ids.end()) {
            break;
        }
    }
    if (was_training) {
        m->train();
    }
    return out;
}

} // namespace qlora::llama
