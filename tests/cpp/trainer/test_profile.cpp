// tests/cpp/trainer/test_profile.cpp: the step profiler (qlora/trainer/profile.h). Self time on hand-built nested
// events (children subtracted from their parent only, threads kept apart, recursion counted per level), the
// categories, and a real profile of a few ATen calls: the files exist, count the calls that were made, and the
// outside-the-window calls are not counted.
#include <filesystem>
#include <fstream>
#include <map>

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "qlora/trainer/profile.h"

namespace {

using qlora::trainer::OpEvent;
using qlora::trainer::OpTime;
namespace fs = std::filesystem;

std::map<std::string, OpTime> by_name(const std::vector<OpTime>& v) {
    std::map<std::string, OpTime> m;
    for (const auto& t : v) {
        m[t.name] = t;
    }
    return m;
}

TEST(ProfileTest, SelfTimeSubtractsDirectChildrenOnly) {
    // thread 1: parent [0, 100] with children a [10, 40] and b [50, 60]; b has a grandchild c [52, 55].
    // thread 2: d [20, 90] overlaps the parent in time but is not its child.
    // Input order shuffled: the function sorts.
    const std::vector<OpEvent> events = {
        {"c", 1, 52, 55}, {"parent", 1, 0, 100}, {"d", 2, 20, 90}, {"b", 1, 50, 60}, {"a", 1, 10, 40},
    };
    const auto t = by_name(qlora::trainer::self_times(events));
    ASSERT_EQ(t.size(), 5u);
    EXPECT_NEAR(t.at("parent").self_s, 60e-9, 1e-15); // 100 - 30 - 10
    EXPECT_NEAR(t.at("parent").total_s, 100e-9, 1e-15);
    EXPECT_NEAR(t.at("a").self_s, 30e-9, 1e-15);
    EXPECT_NEAR(t.at("b").self_s, 7e-9, 1e-15); // 10 - 3
    EXPECT_NEAR(t.at("c").self_s, 3e-9, 1e-15);
    EXPECT_NEAR(t.at("d").self_s, 70e-9, 1e-15);
    // Sorted by self time, largest first.
    const auto v = qlora::trainer::self_times(events);
    for (size_t i = 1; i < v.size(); ++i) {
        EXPECT_GE(v[i - 1].self_s, v[i].self_s);
    }
}

TEST(ProfileTest, SameStartParentFirstAndRecursionPerLevel) {
    // An op that calls itself at the same start time: the longer one is the parent. Adjacent ops (one ends where
    // the next starts) are siblings, not nested.
    const std::vector<OpEvent> events = {
        {"f", 1, 0, 10},
        {"f", 1, 0, 100},
        {"g", 1, 100, 130},
        {"g", 1, 130, 140},
    };
    const auto t = by_name(qlora::trainer::self_times(events));
    EXPECT_EQ(t.at("f").calls, 2);
    EXPECT_NEAR(t.at("f").self_s, 100e-9, 1e-15); // 90 + 10
    EXPECT_NEAR(t.at("f").total_s, 110e-9, 1e-15);
    EXPECT_EQ(t.at("g").calls, 2);
    EXPECT_NEAR(t.at("g").self_s, 40e-9, 1e-15);
}

TEST(ProfileTest, RejectsAnEventEndingBeforeItStarts) {
    EXPECT_THROW(qlora::trainer::self_times({{"x", 1, 10, 5}}), std::runtime_error);
}

TEST(ProfileTest, Categories) {
    using qlora::trainer::op_category;
    EXPECT_EQ(op_category("aten::mm"), "matmul");
    EXPECT_EQ(op_category("aten::addmm"), "matmul");
    EXPECT_EQ(op_category("aten::_scaled_dot_product_flash_attention_for_cpu"), "attention");
    EXPECT_EQ(op_category("aten::_log_softmax_backward_data"), "loss");
    EXPECT_EQ(op_category("aten::nll_loss_forward"), "loss");
    EXPECT_EQ(op_category("qlora::nf4_linear"), "qlora");
    EXPECT_EQ(op_category("qlora::causal_attention"), "attention");
    EXPECT_EQ(op_category("qlora::causal_attention_backward"), "attention");
    EXPECT_EQ(op_category("qlora::adamw8bit_step"), "optimizer");
    EXPECT_EQ(op_category("qlora.forward"), "user");
    EXPECT_EQ(op_category("aten::add"), "other");
}

TEST(ProfileTest, ProfilesExactlyTheWindow) {
    const fs::path dir = fs::temp_directory_path() / ("qlora-profile-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    const at::Tensor a = at::randn({64, 64});
    {
        qlora::trainer::StepProfiler p(dir.string(), /*first=*/2, /*count=*/2);
        std::vector<double> spent;
        for (int64_t step = 1; step <= 4; ++step) {
            p.begin(step);
            {
                RECORD_USER_SCOPE("qlora.forward");
                for (int64_t i = 0; i < step; ++i) { // step k makes k matmuls
                    (void)at::mm(a, a);
                }
            }
            spent.push_back(p.end(step, 100));
        }
        EXPECT_EQ(spent[0], 0.0); // outside the window: nothing done
        EXPECT_EQ(spent[3], 0.0);
        EXPECT_GT(spent[2], 0.0);                  // the window's last step wrote the files
        EXPECT_GT(spent[2], spent[1]);             // and that took longer than closing an ordinary step
        EXPECT_TRUE(fs::exists(dir / "ops.json")); // written when the window closed, before the destructor
    }
    std::ifstream f(dir / "ops.json");
    const nlohmann::json doc = nlohmann::json::parse(f);
    EXPECT_EQ(doc["steps"], 2);
    EXPECT_EQ(doc["first_step"], 2);
    EXPECT_EQ(doc["tokens"], 200);
    int64_t mm_calls = -1;
    double self_sum = 0.0;
    for (const auto& op : doc["ops"]) {
        if (op["name"] == "aten::mm") {
            mm_calls = op["calls"].get<int64_t>();
            EXPECT_EQ(op["category"], "matmul");
        }
        if (op["category"] != "user") {
            self_sum += op["self_s"].get<double>();
        }
    }
    EXPECT_EQ(mm_calls, 2 + 3); // steps 2 and 3 only
    EXPECT_LE(self_sum, doc["wall_s"].get<double>());
    ASSERT_TRUE(doc["phases"].contains("forward"));
    EXPECT_LE(doc["phases"]["forward"]["total_s"].get<double>(), doc["wall_s"].get<double>());
    std::ifstream tf(dir / "trace.json");
    const nlohmann::json trace = nlohmann::json::parse(tf);
    EXPECT_TRUE(trace.contains("traceEvents"));
    EXPECT_FALSE(fs::exists(dir / ".trace.json.partial"));
    fs::remove_all(dir);
}

TEST(ProfileTest, ARunThatEndsBeforeTheWindowWritesNothing) {
    const fs::path dir = fs::temp_directory_path() / ("qlora-profile-none-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    {
        qlora::trainer::StepProfiler p(dir.string(), /*first=*/5, /*count=*/1);
        p.begin(1);
        p.end(1, 10);
        p.finish();
        p.finish(); // idempotent
    }
    EXPECT_FALSE(fs::exists(dir / "ops.json"));
    EXPECT_FALSE(fs::exists(dir / "trace.json"));
    fs::remove_all(dir);
}

} // namespace
