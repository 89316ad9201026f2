// trainer/src/generate.cpp: see qlora/trainer/generate.h.
#include "qlora/trainer/generate.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

namespace qlora::llama {
namespace {

int64_t choose(at::Tensor logits, const GenerateOptions& opt, at::Generator& gen) {
    if (opt.temperature == 0.0) {
        return logits.argmax().item<int64_t>();
    }
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
    return at::multinomial(probs, 1, false, gen).item<int64_t>();
}

} // namespace

GenerateResult generate_text(
    LlamaForCausalLM& m, const std::vector<int64_t>& prompt, const GenerateOptions& opt,
    const std::function<void(int64_t)>& on_token
) {
    TORCH_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token");
    TORCH_CHECK(opt.temperature >= 0.0, "generate: temperature must be >= 0, got ", opt.temperature);
    TORCH_CHECK(opt.top_p > 0.0 && opt.top_p <= 1.0, "generate: top_p must be in (0, 1], got ", opt.top_p);
    TORCH_CHECK(opt.stop_strings.empty() || opt.decode, "generate: stop strings need a decode function");
    const bool was_training = m->is_training();
    m->eval();
    torch::NoGradGuard no_grad;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
    const at::ScalarType dtype = m->model->embed_tokens->weight.scalar_type();
    KVCache cache;
    if (opt.use_kv_cache) {
        cache = make_kv_cache(m, 1, static_cast<int64_t>(prompt.size()) + opt.max_new_tokens, dtype);
    }
    GenerateResult r;
    std::vector<int64_t> ids = prompt;
    at::Tensor input = torch::tensor(ids, at::kLong).view({1, -1});
    for (int64_t t = 0; t < opt.max_new_tokens; ++t) {
        at::Tensor logits = opt.use_kv_cache ? m->forward_cached(input, cache) : m->forward(input);
        const int64_t next = choose(logits.select(1, logits.size(1) - 1)[0].to(at::kFloat), opt, gen);
        ids.push_back(next);
        r.ids.push_back(next);
        if (on_token) {
            on_token(next);
        }
        if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), next) != opt.stop_ids.end()) {
            r.stop = GenerateResult::Stop::kStopId;
            break;
        }
        if (!opt.stop_strings.empty()) {
            const std::string text = opt.decode(r.ids);
            size_t cut = std::string::npos;
            for (const std::string& s : opt.stop_strings) {
                cut = std::min(cut, s.empty() ? std::string::npos : text.find(s));
            }
            if (cut != std::string::npos) {
                r.text = text.substr(0, cut);
                r.stop = GenerateResult::Stop::kStopString;
                break;
            }
        }
        input = opt.use_kv_cache ? torch::tensor(std::vector<int64_t>{next}, at::kLong).view({1, 1})
                                 : torch::tensor(ids, at::kLong).view({1, -1});
    }
    if (opt.decode && r.stop != GenerateResult::Stop::kStopString) {
        std::vector<int64_t> body = r.ids;
        if (r.stop == GenerateResult::Stop::kStopId) {
            body.pop_back();
        }
        r.text = opt.decode(body);
    }
    if (was_training) {
        m->train();
    }
    return r;
}

std::vector<int64_t> generate(
    LlamaForCausalLM& m, const std::vector<int64_t>& prompt, const GenerateOptions& opt,
    const std::function<void(int64_t)>& on_token
) {
    return generate_text(m, prompt, opt, on_token).ids;
}

} // namespace qlora::llama
