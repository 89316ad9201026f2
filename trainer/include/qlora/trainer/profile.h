// qlora/trainer/profile.h: where a training step's time goes. `qlora train CONFIG --profile DIR` records a few
// optimizer steps with PyTorch's profiler (Kineto, CPU operators) and writes
//   DIR/trace.json  a Chrome trace of every operator (chrome://tracing or https://ui.perfetto.dev),
//   DIR/ops.json    per operator: calls, self and total time, and the share of the profiled steps' wall time,
//                   plus the same summed by category (matmul, attention, loss, qlora ops, optimizer, other),
// and prints the top operators by self time.
//
// Self time is an operator's time minus that of the operators it called (ops nest on a thread: a child starts and
// ends inside its parent). A matmul inside qlora::linear is therefore counted as aten::mm, not as qlora::linear.
// Intra-op worker threads (OpenMP) are not separate events: their work is inside the operator that started them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace qlora::trainer {

struct OpEvent { // one operator call, as the profiler recorded it
    std::string name;
    uint64_t thread = 0;
    uint64_t start_ns = 0;
    uint64_t end_ns = 0;
};

struct OpTime {
    std::string name;
    std::string category;
    int64_t calls = 0;
    double self_s = 0.0;
    double total_s = 0.0; // inclusive; a recursive op (an op calling itself) counts each level
};

// Operators by self time, largest first (see the header comment). Events need not be sorted.
std::vector<OpTime> self_times(std::vector<OpEvent> events);

// "matmul", "attention", "loss" (log-softmax / NLL over the vocabulary), "qlora" (qlora's NF4 ops), "optimizer",
// "user" (this program's own scopes: qlora.forward, ...) or "other", from the name.
std::string op_category(const std::string& name);

// Profiles steps [first, first + count) of a run (1-based step numbers). Calls: begin(step) before a step's
// work, end(step, tokens) after it; both do nothing outside the window. The profiled steps themselves run a little
// slower (an event per operator call); the time spent writing the files is returned by end() so that the training
// loop can leave it out of its tokens/s. The files are written when the last profiled
// step ends or, if the run stops earlier, by finish() (also called by the destructor).
class StepProfiler {
  public:
    StepProfiler(std::string dir, int64_t first, int64_t count);
    ~StepProfiler();
    StepProfiler(const StepProfiler&) = delete;
    StepProfiler& operator=(const StepProfiler&) = delete;

    void begin(int64_t step);
    double end(int64_t step, int64_t tokens); // seconds it spent (writing the files), for the caller's clock
    void finish();

  private:
    std::string dir_;
    int64_t first_, count_;
    bool active_ = false, done_ = false;
    int64_t steps_ = 0, tokens_ = 0;
    double wall_s_ = 0.0;
    uint64_t t0_ns_ = 0;
};

} // namespace qlora::trainer
