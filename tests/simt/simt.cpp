// tests/simt/simt.cpp: the scheduler behind simt.h.
//
// Note [SIMT harness scheduling]
// A launch runs its blocks one after another in a random order drawn from the seed. A block's threads are ucontext
// fibers on the calling OS thread. A fiber runs until it reaches __syncthreads, a warp intrinsic, or the end of the
// kernel; then control returns to the scheduler, which picks the next fiber at random among the runnable ones. So
// between two barriers the threads of a block run in a random interleaving at barrier granularity: a thread that reads
// shared memory another thread writes, without a barrier between them, sees the old contents in some schedules.
// The pick is uniform (Schedule::kUniform) or favours one warp at a time (Schedule::kWarpPriority, see simt.h), which
// lets a warp run ahead into the next iteration of a loop while other warps still read what it is about to overwrite.
//   - __syncthreads releases its waiters when every thread of the block has arrived. A thread that exits while
//     others wait, or a state where nobody can run, is a deadlock and throws simt::Error.
//   - A warp intrinsic completes when every lane named in its mask has arrived with the same intrinsic; the last
//     lane to arrive computes every lane's result. A lane outside the mask, a mask naming a lane that does not exist
//     or has exited, or lanes of one warp meeting different intrinsics, throw simt::Error.
//   - Atomics need nothing: fibers never switch inside them.
#include "simt.h"

#include <ucontext.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

namespace qlora::simt {
namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kWarp = 32;

enum class FiberState { kRunnable, kAtBarrier, kAtWarp, kDone };

struct Fiber {
    ucontext_t ctx{};
    FiberState state = FiberState::kRunnable;
    ThreadCoords coords;
    int linear = 0;
    uint64_t warp_result = 0;
};

struct WarpExchange {
    bool active = false;
    unsigned expected = 0;
    unsigned arrived = 0;
    int op = 0;
    int arg = 0;
    bool wide = false;
    uint64_t values[kWarp] = {};
};

struct BlockRun {
    std::vector<Fiber> fibers;
    std::vector<WarpExchange> warps;
    int at_barrier = 0;
    int done = 0;
    std::vector<uint64_t> warp_priority; // kWarpPriority: redrawn at every barrier release
    std::mt19937_64* rng = nullptr;
    ucontext_t scheduler{};
    Fiber* current = nullptr;
    const std::function<void()>* fn = nullptr;
    std::exception_ptr error;
};

uint64_t g_seed = 1;
Schedule g_schedule = Schedule::kUniform;
thread_local BlockRun* t_block = nullptr;
thread_local std::vector<std::unique_ptr<char[]>> t_stacks;
thread_local std::vector<unsigned char> t_dynamic_shared;

[[noreturn]] void fail(const std::string& what) {
    throw Error("simt: " + what);
}

// Switches from the running fiber back to the scheduler.
void yield_to_scheduler() {
    BlockRun* b = t_block;
    Fiber* f = b->current;
    swapcontext(&f->ctx, &b->scheduler);
}

void fiber_entry() {
    BlockRun* b = t_block;
    try {
        (*b->fn)();
    } catch (...) {
        if (!b->error) {
            b->error = std::current_exception();
        }
    }
    b->current->state = FiberState::kDone;
    ++b->done;
    // uc_link returns to the scheduler.
}

std::string coords_text(const Fiber& f) {
    const ThreadCoords& c = f.coords;
    return "block (" + std::to_string(c.block_idx.x) + "," + std::to_string(c.block_idx.y) + "," +
           std::to_string(c.block_idx.z) + ") thread (" + std::to_string(c.thread_idx.x) + "," +
           std::to_string(c.thread_idx.y) + "," + std::to_string(c.thread_idx.z) + ")";
}

uint64_t exchange_result(const WarpExchange& w, int lane) {
    const int width = w.arg >> 8;
    const int a = w.arg & 0xff;
    const int base = lane & ~(width - 1);
    int src = lane;
    switch (w.op) {
    case kShflIdx:
        src = base + (a % width);
        break;
    case kShflXor:
        src = lane ^ a;
        if (src >= base + width) { // a later group: CUDA returns the lane's own value
            src = lane;
        }
        break;
    case kShflUp:
        src = (lane - a >= base) ? lane - a : lane;
        break;
    case kShflDown:
        src = (lane + a < base + width) ? lane + a : lane;
        break;
    case kBallot:
    case kAny:
    case kAll: {
        unsigned ballot = 0;
        for (int l = 0; l < kWarp; ++l) {
            if ((w.expected >> l) & 1u) {
                ballot |= (w.values[l] != 0 ? 1u : 0u) << l;
            }
        }
        if (w.op == kBallot) {
            return ballot;
        }
        return w.op == kAny ? (ballot != 0) : (ballot == w.expected);
    }
    default:
        fail("unknown warp operation");
    }
    if (!((w.expected >> src) & 1u)) {
        fail(
            "lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
            ", which is not in the shuffle mask (undefined on the GPU)"
        );
    }
    return w.values[src];
}

uint64_t exchange(unsigned mask, uint64_t value, int op, int arg, bool wide) {
    BlockRun* b = t_block;
    if (b == nullptr) {
        fail("warp intrinsic called outside a kernel launch");
    }
    Fiber* f = b->current;
    const int lane = f->linear % kWarp;
    const size_t warp = static_cast<size_t>(f->linear / kWarp);
    WarpExchange& w = b->warps[warp];
    if (!((mask >> lane) & 1u)) {
        fail(coords_text(*f) + ": warp intrinsic with mask 0x" + std::to_string(mask) + " that excludes the caller");
    }
    const int lanes_in_warp = std::min<int>(kWarp, static_cast<int>(b->fibers.size()) - static_cast<int>(warp) * kWarp);
    if (lanes_in_warp < kWarp && (mask >> lanes_in_warp) != 0) {
        fail(coords_text(*f) + ": warp intrinsic mask names lanes beyond the end of the block");
    }
    if (!w.active) {
        w = WarpExchange{};
        w.active = true;
        w.expected = mask;
        w.op = op;
        w.arg = arg;
        w.wide = wide;
    } else if (w.expected != mask || w.op != op || w.wide != wide || ((op != kShflIdx) && w.arg != arg)) {
        fail(coords_text(*f) + ": lanes of one warp meet different warp intrinsics or masks (divergent code)");
    }
    w.values[lane] = value;
    w.arrived |= 1u << lane;
    f->state = FiberState::kAtWarp;
    if (w.arrived == w.expected) {
        w.active = false;
        for (int l = 0; l < kWarp; ++l) {
            if ((w.expected >> l) & 1u) {
                Fiber& other = b->fibers[warp * kWarp + static_cast<size_t>(l)];
                other.warp_result = exchange_result(w, l);
                other.state = FiberState::kRunnable;
            }
        }
    }
    yield_to_scheduler();
    return f->warp_result;
}

void run_block(BlockRun& b, const dim3& block_idx, const dim3& block, const dim3& grid, std::mt19937_64& rng) {
    const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
    while (t_stacks.size() < n) {
        t_stacks.emplace_back(new char[kStackBytes]);
    }
    b.fibers.assign(n, Fiber{});
    b.warps.assign((n + kWarp - 1) / kWarp, WarpExchange{});
    b.at_barrier = 0;
    b.done = 0;
    b.rng = &rng;
    b.warp_priority.resize(b.warps.size());
    for (uint64_t& p : b.warp_priority) {
        p = rng();
    }
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.linear = static_cast<int>(i);
        f.coords.thread_idx = dim3(
            static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
            static_cast<unsigned>(i / (static_cast<size_t>(block.x) * block.y))
        );
        f.coords.block_idx = block_idx;
        f.coords.block_dim = block;
        f.coords.grid_dim = grid;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = t_stacks[i].get();
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    std::vector<size_t> runnable;
    while (true) {
        runnable.clear();
        uint64_t best = 0;
        for (size_t i = 0; i < n; ++i) {
            if (b.fibers[i].state != FiberState::kRunnable) {
                continue;
            }
            if (g_schedule == Schedule::kWarpPriority) {
                const uint64_t p = b.warp_priority[i / kWarp];
                if (runnable.empty() || p > best) {
                    runnable.clear();
                    best = p;
                } else if (p < best) {
                    continue;
                }
            }
            runnable.push_back(i);
        }
        if (runnable.empty()) {
            if (b.done == static_cast<int>(n)) {
                return;
            }
            int waiting_warp = 0;
            for (const Fiber& f : b.fibers) {
                waiting_warp += f.state == FiberState::kAtWarp;
            }
            fail(
                "deadlock in block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                std::to_string(block_idx.z) + "): " + std::to_string(b.at_barrier) +
                " threads wait at __syncthreads, " + std::to_string(waiting_warp) + " at a warp intrinsic, " +
                std::to_string(b.done) + " have exited (a barrier or warp intrinsic that not every thread reaches)"
            );
        }
        Fiber& f = b.fibers[runnable[std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(rng)]];
        b.current = &f;
        swapcontext(&b.scheduler, &f.ctx);
        b.current = nullptr;
        if (b.error) {
            std::rethrow_exception(b.error);
        }
    }
}

} // namespace

const ThreadCoords& coords() {
    if (t_block == nullptr || t_block->current == nullptr) {
        fail("threadIdx/blockIdx used outside a kernel launch");
    }
    return t_block->current->coords;
}

void set_seed(uint64_t seed) {
    g_seed = seed;
}

void set_schedule(Schedule schedule) {
    g_schedule = schedule;
}

void* dynamic_shared() {
    return t_dynamic_shared.data();
}

void syncthreads() {
    BlockRun* b = t_block;
    if (b == nullptr) {
        fail("__syncthreads called outside a kernel launch");
    }
    Fiber* f = b->current;
    f->state = FiberState::kAtBarrier;
    ++b->at_barrier;
    if (b->at_barrier + b->done == static_cast<int>(b->fibers.size())) {
        if (b->done > 0) {
            fail(
                coords_text(*f) + ": __syncthreads reached after " + std::to_string(b->done) +
                " threads of the block exited (they never arrive)"
            );
        }
        for (Fiber& other : b->fibers) {
            if (other.state == FiberState::kAtBarrier) {
                other.state = FiberState::kRunnable;
            }
        }
        b->at_barrier = 0;
        for (uint64_t& p : b->warp_priority) {
            p = (*b->rng)();
        }
    }
    yield_to_scheduler();
}

void syncwarp(unsigned mask) {
    exchange(mask, 0, kAll, 0, false);
}

uint32_t warp_exchange(unsigned mask, uint32_t value, int op, int arg) {
    return static_cast<uint32_t>(exchange(mask, value, op, arg, false));
}

uint64_t warp_exchange64(unsigned mask, uint64_t value, int op, int arg) {
    return exchange(mask, value, op, arg, true);
}

void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& fn) {
    if (t_block != nullptr) {
        fail("nested kernel launch");
    }
    const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        fail(
            "invalid launch configuration: block of " + std::to_string(threads) + " threads, grid " +
            std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z)
        );
    }
    const size_t nblocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
    std::vector<size_t> order(nblocks);
    std::iota(order.begin(), order.end(), size_t{0});
    std::mt19937_64 rng(g_seed);
    std::shuffle(order.begin(), order.end(), rng);
    t_dynamic_shared.assign(dynamic_shared_bytes + 16, 0);
    BlockRun b;
    b.fn = &fn;
    t_block = &b;
    try {
        for (size_t id : order) {
            const dim3 block_idx(
                static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
                static_cast<unsigned>(id / (static_cast<size_t>(grid.x) * grid.y))
            );
            // Poison the dynamic shared memory: a kernel must not read what it did not write in this block.
            std::fill(t_dynamic_shared.begin(), t_dynamic_shared.end(), static_cast<unsigned char>(0xA5));
            run_block(b, block_idx, block, grid, rng);
        }
    } catch (...) {
        t_block = nullptr;
        throw;
    }
    t_block = nullptr;
}

} // namespace qlora::simt

// IEEE binary16 conversions with round to nearest even (as __half2float / __float2half_rn on the GPU).
float __half2float(__half h) {
    const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
    const uint32_t exp = (h.bits >> 10) & 0x1fu;
    const uint32_t man = h.bits & 0x3ffu;
    if (exp == 0x1f) {
        return __uint_as_float(sign | 0x7f800000u | (man << 13));
    }
    if (exp == 0) {
        const float v = std::ldexp(static_cast<float>(man), -24); // subnormal (exact)
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

__half __float2half_rn(float f) {
    const uint32_t u = __float_as_uint(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const float a = std::fabs(f);
    if (std::isnan(f)) {
        return {static_cast<uint16_t>(0x7fff)}; // CUDA's canonical half NaN
    }
    if (a >= 65520.0f) { // rounds to infinity
        return {static_cast<uint16_t>(sign | 0x7c00u)};
    }
    if (a < 6.103515625e-05f) {                 // subnormal half: a multiple of 2^-24, rounded to nearest even
        const float scaled = a * 16777216.0f;   // exact: a * 2^24
        const float r = std::nearbyint(scaled); // default rounding mode: nearest even
        return {static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
    }
    // Normal: keep 10 mantissa bits, round to nearest even on the 13 dropped bits.
    const uint32_t mag = __float_as_uint(a);
    uint32_t h = ((mag >> 13) - (112u << 10)); // rebias exponent 127 -> 15
    const uint32_t rest = mag & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) {
        ++h; // may carry into the exponent, which is correct (up to 0x7c00 = inf, excluded above)
    }
    return {static_cast<uint16_t>(sign | h)};
}
