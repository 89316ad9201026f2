// tests/cpp/trainer/test_checkpoint.cpp: Hugging Face model directories (qlora/trainer/checkpoint.h): one file or
// shards through model.safetensors.index.json, the index rules of reliability-tests.md S21 and P1, and the strict JSON
// every trainer input goes through (qlora/trainer/json.h).
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "qlora/trainer/checkpoint.h"
#include "qlora/trainer/json.h"

namespace {

namespace st = qlora::safetensors;
namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
  protected:
    void SetUp() override {
        dir_ = fs::temp_directory_path() / ("qlora-ckpt-" + std::to_string(getpid()) + "-" +
                                            ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::create_directories(dir_);
        a_ = at::arange(6, at::kFloat).reshape({2, 3});
        b_ = at::arange(4, at::kLong);
        c_ = at::ones({5}, at::kBFloat16);
    }
    void TearDown() override { fs::remove_all(dir_); }

    void write_text(const std::string& name, const std::string& text) { std::ofstream((dir_ / name).string()) << text; }
    // Two shards: a and b in the first, c in the second, and an index saying so (plus `extra` weight_map entries).
    void write_sharded(const std::string& extra = "") {
        st::save((dir_ / "model-00001-of-00002.safetensors").string(), {{"a", a_}, {"b", b_}});
        st::save((dir_ / "model-00002-of-00002.safetensors").string(), {{"c", c_}});
        write_text(
            "model.safetensors.index.json",
            R"({"metadata":{"total_size":82,"total_parameters":15},"weight_map":{)"
            R"("a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors",)"
            R"("c":"model-00002-of-00002.safetensors")" +
                extra + "}}"
        );
    }
    std::string rejected() {
        try {
            st::Checkpoint::open(dir_.string());
        } catch (const std::runtime_error& e) {
            const std::string msg = e.what();
            EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
            return msg;
        }
        ADD_FAILURE() << "accepted";
        return "";
    }

    fs::path dir_;
    at::Tensor a_, b_, c_;
};

TEST_F(CheckpointTest, SingleFile) {
    st::save((dir_ / "model.safetensors").string(), {{"a", a_}, {"c", c_}});
    const st::Checkpoint ck = st::Checkpoint::open(dir_.string());
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "c"}));
    EXPECT_TRUE(at::equal(ck.tensor("a"), a_));
    EXPECT_EQ(ck.info("c").shape, (std::vector<int64_t>{5}));
    EXPECT_THROW(ck.tensor("zzz"), st::SafetensorsError);
}

TEST_F(CheckpointTest, ShardedThroughTheIndex) {
    write_sharded();
    const st::Checkpoint ck = st::Checkpoint::open(dir_.string());
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_TRUE(at::equal(ck.tensor("b"), b_));
    EXPECT_TRUE(at::equal(ck.tensor("c"), c_));
    EXPECT_NE(ck.file_of("c").find("model-00002-of-00002.safetensors"), std::string::npos);
}

TEST_F(CheckpointTest, S21_ShardNamesMustBePlainFilesThatExist) {
    for (const char* bad : {"../../etc/passwd", "/etc/passwd", "sub/model.safetensors", "..", ""}) {
        write_sharded(std::string(R"(,"d":")") + bad + "\"");
        EXPECT_NE(rejected().find("is not a plain file name"), std::string::npos) << bad;
    }
    write_sharded(R"(,"d":"model-00003-of-00003.safetensors")");
    EXPECT_NE(
        rejected().find("shard \"model-00003-of-00003.safetensors\" (holding \"d\") does not exist"), std::string::npos
    );
}

TEST_F(CheckpointTest, S21_ShardContentsMustMatchTheIndex) {
    write_sharded(R"(,"d":"model-00002-of-00002.safetensors")"); // d is in no shard
    EXPECT_NE(rejected().find("does not hold \"d\""), std::string::npos);
    write_sharded();
    st::save((dir_ / "model-00002-of-00002.safetensors").string(), {{"c", c_}, {"a", a_}}); // a in two shards
    EXPECT_NE(
        rejected().find("holds \"a\", which the index assigns to \"model-00001-of-00002.safetensors\""),
        std::string::npos
    );
    write_sharded();
    st::save((dir_ / "model-00002-of-00002.safetensors").string(), {{"c", c_}, {"e", a_}}); // e is unlisted
    EXPECT_NE(rejected().find("holds \"e\", which the index does not list"), std::string::npos);
}

TEST_F(CheckpointTest, IndexJsonIsStrict) {
    write_sharded(R"(,"a":"model-00001-of-00002.safetensors")"); // duplicate key
    EXPECT_NE(rejected().find("duplicate key \"a\""), std::string::npos);
    write_text("model.safetensors.index.json", R"({"weight_map":{"a":1}})");
    EXPECT_NE(rejected().find("weight_map[\"a\"] is not a string"), std::string::npos);
    write_text("model.safetensors.index.json", R"({"weight_map":[]})");
    EXPECT_NE(rejected().find("expected an object with a \"weight_map\" object"), std::string::npos);
    write_text("model.safetensors.index.json", R"({"weight_map":{)");
    EXPECT_NE(rejected().find("model.safetensors.index.json: invalid JSON"), std::string::npos);
}

TEST_F(CheckpointTest, P1_PickleWeightsAreRefused) {
    write_text("pytorch_model.bin", "not read");
    EXPECT_NE(rejected().find("only safetensors weights are accepted, found pytorch_model.bin"), std::string::npos);
    fs::remove(dir_ / "pytorch_model.bin");
    EXPECT_NE(rejected().find("no model.safetensors or model.safetensors.index.json"), std::string::npos);
}

TEST(StrictJsonTest, DuplicatesNulAndDepth) {
    using qlora::trainer::parse_json_strict;
    EXPECT_EQ(parse_json_strict(R"({"a":{"b":1},"c":[1,2]})", "x")["a"]["b"], 1);
    EXPECT_THROW(parse_json_strict(R"({"a":{"b":1,"b":2}})", "x"), std::runtime_error);
    EXPECT_THROW(parse_json_strict(std::string("{}\0", 3), "x"), std::runtime_error);
    EXPECT_THROW(parse_json_strict(std::string(1000, '[') + std::string(1000, ']'), "x"), std::runtime_error);
    try {
        parse_json_strict(R"({"a":1,"a":2})", "config.json");
        ADD_FAILURE();
    } catch (const std::runtime_error& e) {
        EXPECT_STREQ(e.what(), "config.json: duplicate key \"a\"");
    }
}

} // namespace
