// trainer/src/profile.cpp: see qlora/trainer/profile.h.
#include "qlora/trainer/profile.h"

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/profiler_kineto.h>

#include "qlora/trainer/atomic_file.h"

namespace qlora::trainer {
namespace {

namespace fs = std::filesystem;
namespace prof = torch::autograd::profiler;

bool starts_with(const std::string& s, const char* prefix) {
    return s.rfind(prefix, 0) == 0;
}

bool contains(const std::string& s, const char* part) {
    return s.find(part) != std::string::npos;
}

uint64_t now_ns() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count()
    );
}

} // namespace

std::string op_category(const std::string& name) {
    if (starts_with(name, "qlora.")) {
        return "user";
    }
    if (starts_with(name, "qlora::adamw") || contains(name, "Optimizer") || contains(name, "optimizer")) {
        return "optimizer";
    }
    if (contains(name, "attention")) { // qlora::causal_attention(_backward) and aten's SDPA kernels
        return "attention";
    }
    if (starts_with(name, "qlora::")) {
        return "qlora";
    }
    static const std::set<std::string> matmul = {"aten::mm",    "aten::addmm", "aten::bmm", "aten::baddbmm",
                                                 "aten::addmv", "aten::mv",    "aten::dot"};
    if (matmul.count(name) != 0) {
        return "matmul";
    }
    if (contains(name, "log_softmax") || contains(name, "nll_loss") || contains(name, "cross_entropy")) {
        return "loss"; // over the vocabulary, in float32
    }
    return "other";
}

std::vector<OpTime> self_times(std::vector<OpEvent> events) {
    // Per thread, in start order, a parent before the children it contains (same start: the longer one first).
    std::sort(events.begin(), events.end(), [](const OpEvent& a, const OpEvent& b) {
        if (a.thread != b.thread) {
            return a.thread < b.thread;
        }
        if (a.start_ns != b.start_ns) {
            return a.start_ns < b.start_ns;
        }
        return a.end_ns > b.end_ns;
    });
    std::map<std::string, OpTime> by_name;
    std::vector<size_t> stack; // indices of the open ancestors of the current event
    std::vector<double> child_s(events.size(), 0.0);
    auto close = [&](size_t i) {
        const OpEvent& e = events[i];
        OpTime& t = by_name[e.name];
        const double total = static_cast<double>(e.end_ns - e.start_ns) * 1e-9;
        t.name = e.name;
        t.calls += 1;
        t.total_s += total;
        t.self_s += std::max(0.0, total - child_s[i]);
    };
    for (size_t i = 0; i < events.size(); ++i) {
        if (events[i].end_ns < events[i].start_ns) {
            throw std::runtime_error("profile: an event of '" + events[i].name + "' ends before it starts");
        }
        while (!stack.empty() &&
               (events[stack.back()].thread != events[i].thread || events[stack.back()].end_ns <= events[i].start_ns)) {
            close(stack.back());
            stack.pop_back();
        }
        if (!stack.empty()) {
            child_s[stack.back()] += static_cast<double>(events[i].end_ns - events[i].start_ns) * 1e-9;
        }
        stack.push_back(i);
    }
    while (!stack.empty()) {
        close(stack.back());
        stack.pop_back();
    }
    std::vector<OpTime> out;
    out.reserve(by_name.size());
    for (auto& [name, t] : by_name) {
        t.category = op_category(name);
        out.push_back(std::move(t));
    }
    std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) {
        return a.self_s != b.self_s ? a.self_s > b.self_s : a.name < b.name;
    });
    return out;
}

StepProfiler::StepProfiler(std::string dir, int64_t first, int64_t count)
    : dir_(std::move(dir)), first_(first), count_(count) {
    if (count_ < 1) {
        throw std::runtime_error("--profile-steps: expected at least 1 step, got " + std::to_string(count_));
    }
    fs::create_directories(dir_);
}

StepProfiler::~StepProfiler() {
    try {
        finish();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "profile: %s\n", e.what());
    }
}

void StepProfiler::begin(int64_t step) {
    if (done_ || step < first_ || step >= first_ + count_) {
        return;
    }
    if (!active_) {
        // Kineto logs at ERROR that it found no GPU (expected on the CPU); a user's own KINETO_LOG_LEVEL wins.
        ::setenv("KINETO_LOG_LEVEL", "5", /*overwrite=*/0);
        const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
        const std::set<torch::profiler::impl::ActivityType> activities = {torch::profiler::impl::ActivityType::CPU};
        prof::prepareProfiler(config, activities);
        prof::enableProfiler(config, activities);
        active_ = true;
    }
    t0_ns_ = now_ns();
}

double StepProfiler::end(int64_t step, int64_t tokens) {
    if (!active_ || step < first_ || step >= first_ + count_) {
        return 0.0;
    }
    const uint64_t t1 = now_ns();
    wall_s_ += static_cast<double>(t1 - t0_ns_) * 1e-9;
    steps_ += 1;
    tokens_ += tokens;
    if (step == first_ + count_ - 1) {
        finish();
    }
    return static_cast<double>(now_ns() - t1) * 1e-9;
}

void StepProfiler::finish() {
    if (done_) {
        return;
    }
    if (!active_) { // the run ended before the window: say so rather than leave no files and no word
        done_ = true;
        std::printf(
            "profile: no step was profiled (the window starts at step %lld); nothing written to %s\n",
            static_cast<long long>(first_), dir_.c_str()
        );
        std::fflush(stdout);
        return;
    }
    done_ = true;
    active_ = false;
    const std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
    std::vector<OpEvent> events;
    events.reserve(result->events().size());
    for (const prof::KinetoEvent& e : result->events()) {
        if (e.deviceType() != c10::DeviceType::CPU || e.endNs() == 0) {
            continue;
        }
        events.push_back({e.name(), e.startThreadId(), e.startNs(), e.endNs()});
    }
    const std::vector<OpTime> ops = self_times(std::move(events));

    const std::string trace = (fs::path(dir_) / "trace.json").string();
    const std::string tmp = (fs::path(dir_) / ".trace.json.partial").string();
    result->save(tmp);
    fs::rename(tmp, trace);
    sync_directory(dir_);

    std::map<std::string, double> by_category;
    nlohmann::json jops = nlohmann::json::array();
    nlohmann::json phases = nlohmann::json::object(); // this program's scopes (qlora.forward, ...): inclusive time
    for (const OpTime& t : ops) {
        if (t.category == "user") {
            phases[t.name.substr(6)] = {{"total_s", t.total_s}, {"share", wall_s_ > 0 ? t.total_s / wall_s_ : 0.0}};
        } else {
            by_category[t.category] += t.self_s;
        }
        jops.push_back(
            {{"name", t.name},
             {"category", t.category},
             {"calls", t.calls},
             {"self_s", t.self_s},
             {"total_s", t.total_s},
             {"self_share", wall_s_ > 0 ? t.self_s / wall_s_ : 0.0}}
        );
    }
    double in_ops = 0.0;
    nlohmann::json jcat = nlohmann::json::object();
    for (const auto& [name, s] : by_category) {
        jcat[name] = {{"self_s", s}, {"self_share", wall_s_ > 0 ? s / wall_s_ : 0.0}};
        in_ops += s;
    }
    // Wall time not inside any operator: the loop's own work, Python-free as it is (tokenizing is done before).
    jcat["outside_ops"] = {
        {"self_s", std::max(0.0, wall_s_ - in_ops)},
        {"self_share", wall_s_ > 0 ? std::max(0.0, wall_s_ - in_ops) / wall_s_ : 0.0}};
    const nlohmann::json doc = {{"steps", steps_},  {"first_step", first_}, {"tokens", tokens_}, {"wall_s", wall_s_},
                                {"phases", phases}, {"categories", jcat},   {"ops", jops}};
    const std::string text = doc.dump(1) + "\n";
    write_file_atomically((fs::path(dir_) / "ops.json").string(), [&](FileSink& f) {
        f.write(text.data(), text.size());
    });

    std::printf(
        "profile: %lld step(s) from step %lld, %.2f s, %.0f tokens/s; %s, %s\n", static_cast<long long>(steps_),
        static_cast<long long>(first_), wall_s_, wall_s_ > 0 ? static_cast<double>(tokens_) / wall_s_ : 0.0,
        trace.c_str(), (fs::path(dir_) / "ops.json").c_str()
    );
    std::printf("  %-12s %9s %7s\n", "phase", "s", "share");
    for (const auto& [name, v] : phases.items()) {
        std::printf(
            "  %-12s %9.3f %6.1f%%\n", name.c_str(), v["total_s"].get<double>(), 100.0 * v["share"].get<double>()
        );
    }
    std::printf("  %-12s %9s %7s\n", "category", "self s", "share");
    for (const auto& [name, v] : jcat.items()) {
        std::printf(
            "  %-12s %9.3f %6.1f%%\n", name.c_str(), v["self_s"].get<double>(), 100.0 * v["self_share"].get<double>()
        );
    }
    std::printf("  %-56s %7s %9s %7s\n", "operator", "calls", "self s", "share");
    int shown = 0;
    for (size_t i = 0; i < ops.size() && shown < 15; ++i) {
        if (ops[i].category == "user") {
            continue;
        }
        ++shown;
        std::printf(
            "  %-56s %7lld %9.3f %6.1f%%\n", ops[i].name.substr(0, 56).c_str(), static_cast<long long>(ops[i].calls),
            ops[i].self_s, wall_s_ > 0 ? 100.0 * ops[i].self_s / wall_s_ : 0.0
        );
    }
    std::fflush(stdout);
}

} // namespace qlora::trainer
