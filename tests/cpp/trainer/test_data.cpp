// tests/cpp/trainer/test_data.cpp: the data pipeline (qlora/trainer/data.h) with the bundled sentencepiece tokenizer
// (models/tiny-kjv): masking per format computed from separate encodes of the pieces, BOS/EOS as ids, a trained EOS
// at the end of every example, truncation and dropped examples counted, packing boundaries, padding that equals EOS,
// Llama 2 chat layout, and one-line `file:line:` errors for bad lines.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "qlora/trainer/data.h"

namespace {

using namespace qlora::data;
namespace fs = std::filesystem;

class DataTest : public ::testing::Test {
  protected:
    void SetUp() override {
        tok_ = std::make_unique<Tokenizer>(Tokenizer::load(QLORA_SOURCE_DIR "/models/tiny-kjv/tokenizer.model"));
        dir_ = fs::temp_directory_path() / ("qlora-data-" + std::to_string(getpid()) + "-" +
                                            ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::create_directories(dir_);
    }
    void TearDown() override { fs::remove_all(dir_); }
    std::string write(const std::string& text) {
        const std::string p = (dir_ / "d.jsonl").string();
        std::ofstream(p) << text;
        return p;
    }
    std::vector<Example> load(const std::string& text, Format f, int64_t T = 512, bool inputs = false) {
        FormatOptions o;
        o.sequence_len = T;
        o.train_on_inputs = inputs;
        return load_jsonl(write(text), f, *tok_, o, &stats_);
    }
    std::string error(const std::string& text, Format f) {
        try {
            load(text, f);
        } catch (const std::runtime_error& e) {
            const std::string m = e.what();
            EXPECT_EQ(m.find('\n'), std::string::npos) << m;
            return m;
        }
        ADD_FAILURE() << "accepted: " << text;
        return "";
    }
    // -100 x n, then the ids themselves.
    static std::vector<int32_t> masked(size_t n) { return std::vector<int32_t>(n, -100); }

    std::unique_ptr<Tokenizer> tok_;
    fs::path dir_;
    DatasetStats stats_;
};

TEST_F(DataTest, AlpacaMasksThePrompt) {
    const auto ex = load(
        R"({"instruction": "Who built the ark?", "input": "", "output": "Noah."})"
        "\n",
        Format::kAlpaca
    );
    ASSERT_EQ(ex.size(), 1u);
    const auto prompt = tok_->encode(alpaca_prompt("Who built the ark?", ""));
    const auto out = tok_->encode("Noah.");
    std::vector<int32_t> ids = {tok_->bos_id()};
    ids.insert(ids.end(), prompt.begin(), prompt.end());
    ids.insert(ids.end(), out.begin(), out.end());
    ids.push_back(tok_->eos_id());
    EXPECT_EQ(ex[0].input_ids, ids);
    std::vector<int32_t> labels = masked(1 + prompt.size());
    labels.insert(labels.end(), out.begin(), out.end());
    labels.push_back(tok_->eos_id());
    EXPECT_EQ(ex[0].labels, labels);
    EXPECT_EQ(stats_.ending_in_eos, 1);
    EXPECT_EQ(stats_.trained_tokens, static_cast<int64_t>(out.size() + 1));
    // With an input the longer template is used; train_on_inputs trains everything but the BOS.
    const auto all = load(
        R"({"instruction": "Finish.", "input": "The LORD is my shepherd;", "output": "I shall not want."})"
        "\n",
        Format::kAlpaca, 512, true
    );
    EXPECT_EQ(all[0].labels[0], -100);
    for (size_t k = 1; k < all[0].labels.size(); ++k) {
        EXPECT_EQ(all[0].labels[k], all[0].input_ids[k]);
    }
    EXPECT_NE(tok_->decode(all[0].input_ids).find("### Input:\nThe LORD is my shepherd;"), std::string::npos);
}

TEST_F(DataTest, CompletionTextAndChat) {
    const auto c = load(
        R"({"prompt": "In the beginning", "completion": " God created"})"
        "\n",
        Format::kCompletion
    );
    const auto p = tok_->encode("In the beginning");
    EXPECT_EQ(std::count(c[0].labels.begin(), c[0].labels.end(), -100), static_cast<long>(1 + p.size()));
    const auto t = load(
        R"({"text": "And God said"})"
        "\n",
        Format::kText
    );
    EXPECT_EQ(t[0].labels.front(), -100);
    EXPECT_EQ(t[0].labels.back(), tok_->eos_id());
    EXPECT_EQ(std::count(t[0].labels.begin(), t[0].labels.end(), -100), 1);

    const auto ch = load(
        R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, )"
        R"({"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}, )"
        R"({"role": "assistant", "content": "Farewell."}]})"
        "\n",
        Format::kChat
    );
    ASSERT_EQ(ch.size(), 1u);
    const auto& e = ch[0];
    // Layout: two BOS...EOS pairs, the system block in the first only.
    EXPECT_EQ(std::count(e.input_ids.begin(), e.input_ids.end(), tok_->bos_id()), 2);
    EXPECT_EQ(std::count(e.input_ids.begin(), e.input_ids.end(), tok_->eos_id()), 2);
    const auto first_user = tok_->encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]");
    const auto reply1 = tok_->encode(" Hello.");
    ASSERT_GE(e.input_ids.size(), 1 + first_user.size() + reply1.size() + 1);
    EXPECT_TRUE(std::equal(first_user.begin(), first_user.end(), e.input_ids.begin() + 1));
    // Trained: exactly the replies and their EOS.
    const auto reply2 = tok_->encode(" Farewell.");
    int64_t trained = 0;
    for (const int32_t l : e.labels) {
        trained += l != -100;
    }
    EXPECT_EQ(trained, static_cast<int64_t>(reply1.size() + 1 + reply2.size() + 1));
    const size_t r1 = 1 + first_user.size();
    for (size_t k = 0; k < reply1.size(); ++k) {
        EXPECT_EQ(e.labels[r1 + k], reply1[k]);
    }
    EXPECT_EQ(e.labels[r1 + reply1.size()], tok_->eos_id());
    EXPECT_EQ(e.labels[r1 + reply1.size() + 1], -100); // the second BOS
}

TEST_F(DataTest, TruncationAndDroppedExamplesAreCounted) {
    std::string long_out, long_in;
    for (int i = 0; i < 100; ++i) {
        long_out += "and the earth ";
        long_in += "unto the LORD ";
    }
    const auto ex = load(
        R"({"instruction": "x", "output": ")" + long_out + "\"}\n" + R"({"instruction": ")" + long_in +
            R"(", "output": "y"})"
            "\n" +
            R"({"instruction": "q", "output": "z"})"
            "\n",
        Format::kAlpaca, 128
    );
    EXPECT_EQ(stats_.lines, 3);
    EXPECT_EQ(stats_.truncated, 2);
    EXPECT_EQ(stats_.no_target, 1); // the prompt alone fills the 128 tokens
    ASSERT_EQ(ex.size(), 2u);
    EXPECT_EQ(ex[0].input_ids.size(), 128u);
    EXPECT_NE(ex[0].labels.back(), tok_->eos_id()); // truncated: no EOS
    EXPECT_EQ(ex[1].labels.back(), tok_->eos_id());
    EXPECT_EQ(stats_.ending_in_eos, 1);
}

TEST_F(DataTest, PackingAndCollation) {
    std::string text;
    for (int i = 0; i < 7; ++i) {
        std::string words;
        for (int w = 0; w < 2 + 2 * i; ++w) {
            words += "light ";
        }
        text += R"({"text": ")" + words + "\"}\n";
    }
    const auto ex = load(text, Format::kText);
    std::vector<int64_t> order = {3, 0, 6, 1, 5, 2, 4};
    const int64_t T = 24;
    const auto rows = pack(ex, order, T);
    std::vector<int64_t> seen;
    for (const auto& row : rows) {
        int64_t len = 0;
        for (const int64_t i : row) {
            len += static_cast<int64_t>(ex[static_cast<size_t>(i)].input_ids.size());
            seen.push_back(i);
        }
        EXPECT_TRUE(len <= T || row.size() == 1) << len;
    }
    EXPECT_EQ(seen, order);               // every example once, in order
    ASSERT_LT(rows.size(), order.size()); // something was packed
    // A row of two examples: positions restart, segments 1 and 2, padding label -100 / segment 0.
    size_t two = 0;
    while (rows[two].size() < 2) {
        ++two;
    }
    const Batch b = collate(ex, {rows[two]}, 64, tok_->eos_id()); // pad id = EOS
    const auto& a = ex[static_cast<size_t>(rows[two][0])];
    const auto n0 = static_cast<int64_t>(a.input_ids.size());
    EXPECT_EQ(b.position_ids[0][n0].item<int64_t>(), 0);
    EXPECT_EQ(b.position_ids[0][n0 - 1].item<int64_t>(), n0 - 1);
    EXPECT_EQ(b.segment_ids[0][0].item<int64_t>(), 1);
    EXPECT_EQ(b.segment_ids[0][n0].item<int64_t>(), 2);
    EXPECT_EQ(b.segment_ids[0][63].item<int64_t>(), 0);
    EXPECT_EQ(b.labels[0][63].item<int64_t>(), -100);
    EXPECT_EQ(b.input_ids[0][63].item<int64_t>(), tok_->eos_id());
    // The real EOS that ends the first example is still trained although it equals the pad id.
    EXPECT_EQ(b.labels[0][n0 - 1].item<int64_t>(), tok_->eos_id());
    EXPECT_EQ(
        b.tokens, static_cast<int64_t>(a.input_ids.size() + ex[static_cast<size_t>(rows[two][1])].input_ids.size())
    );
    EXPECT_EQ(unpacked(order).size(), order.size());
}

TEST_F(DataTest, BadLinesNameFileAndLine) {
    const std::string good = R"({"instruction": "a", "output": "b"})"
                             "\n";
    EXPECT_NE(error(good + "{not json\n", Format::kAlpaca).find("d.jsonl:2:"), std::string::npos);
    EXPECT_NE(error(good + "[1, 2]\n", Format::kAlpaca).find("d.jsonl:2: expected a JSON object"), std::string::npos);
    EXPECT_NE(
        error(
            good + R"({"instruction": "a"})"
                   "\n",
            Format::kAlpaca
        )
            .find("d.jsonl:2: missing field 'output'"),
        std::string::npos
    );
    EXPECT_NE(
        error(
            R"({"instruction": "a", "output": 3})"
            "\n",
            Format::kAlpaca
        )
            .find("d.jsonl:1: field 'output' must be a string"),
        std::string::npos
    );
    EXPECT_NE(
        error(
            R"({"instruction": "a", "output": "  "})"
            "\n",
            Format::kAlpaca
        )
            .find("field 'output' is empty"),
        std::string::npos
    );
    EXPECT_NE(error(good + "\n" + good, Format::kAlpaca).find("d.jsonl:2: blank line"), std::string::npos);
    EXPECT_NE(
        error(
            R"({"text": "a", "text": "b"})"
            "\n",
            Format::kText
        )
            .find("d.jsonl:1:"),
        std::string::npos
    );
    EXPECT_NE(
        error(
            R"({"messages": [{"role": "assistant", "content": "x"}]})"
            "\n",
            Format::kChat
        )
            .find("message 0 must be from the user"),
        std::string::npos
    );
    EXPECT_NE(
        error(
            R"({"messages": [{"role": "user", "content": "x"}]})"
            "\n",
            Format::kChat
        )
            .find("d.jsonl:1: message 1"),
        std::string::npos
    );
    EXPECT_NE(
        error(
            R"({"messages": [{"role": "bot", "content": "x"}]})"
            "\n",
            Format::kChat
        )
            .find("role 'bot'"),
        std::string::npos
    );
    EXPECT_THROW(parse_format("sharegpt"), std::runtime_error);
    EXPECT_THROW(Tokenizer::load((dir_ / "missing.model").string()), std::runtime_error);
}

} // namespace
