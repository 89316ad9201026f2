// tests/cpp/trainer/test_safetensors.cpp: the safetensors reader and writer (qlora/trainer/safetensors.h) against the
// malformed-file catalogue of shared/spec/reliability-tests.md §1.6 (test names carry the S-numbers), plus round trips
// of the writer through the reader. Every rejected file must give a SafetensorsError whose one-line message names the
// file and the problem.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "qlora/trainer/safetensors.h"

namespace {

namespace st = qlora::safetensors;
namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
  protected:
    void SetUp() override {
        dir_ = fs::temp_directory_path() / ("qlora-st-" + std::to_string(getpid()) + "-" +
                                            ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::create_directories(dir_);
    }
    void TearDown() override { fs::remove_all(dir_); }

    std::string write_bytes(const std::string& bytes, const std::string& name = "t.safetensors") {
        const std::string path = (dir_ / name).string();
        std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        return path;
    }
    // 8-byte little-endian length + header + `data_bytes` bytes (0, 1, 2, ...).
    std::string file(const std::string& header, size_t data_bytes, uint64_t n_override = 0, bool use_override = false) {
        std::string out(8, '\0');
        const uint64_t n = use_override ? n_override : header.size();
        std::memcpy(out.data(), &n, 8);
        out += header;
        for (size_t i = 0; i < data_bytes; ++i) {
            out.push_back(static_cast<char>(i));
        }
        return write_bytes(out);
    }
    // The error message of opening `path`, which must be rejected.
    std::string rejected(const std::string& path) {
        try {
            st::File::open(path);
        } catch (const st::SafetensorsError& e) {
            const std::string msg = e.what();
            EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << "message must start with the file: " << msg;
            EXPECT_EQ(msg.find('\n'), std::string::npos) << "message must be one line: " << msg;
            return msg;
        }
        ADD_FAILURE() << path << " was accepted";
        return "";
    }

    fs::path dir_;
};

const std::string kS5 = R"({"a":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})";

TEST_F(SafetensorsTest, S1_FilesShorterThanTheLengthField) {
    for (size_t n = 0; n < 8; ++n) {
        EXPECT_NE(
            rejected(write_bytes(std::string(n, '\x01'))).find("shorter than the 8-byte header length"),
            std::string::npos
        );
    }
}

TEST_F(SafetensorsTest, S2_HugeHeaderLengthRejectedBeforeAllocating) {
    for (uint64_t n : {~uint64_t{0}, uint64_t{100'000'001}, uint64_t{1} << 63}) {
        EXPECT_NE(rejected(file("{}", 0, n, true)).find("exceeds the format's limit"), std::string::npos) << n;
    }
}

TEST_F(SafetensorsTest, S3_HeaderLengthPastTheEnd) {
    EXPECT_NE(rejected(file("{}", 0, 3, true)).find("runs past the end"), std::string::npos);
}

TEST_F(SafetensorsTest, S4_HeaderNotAJsonObject) {
    for (const std::string& h :
         {std::string("\xff"), std::string("{"), std::string("[]"), std::string("\"x\""), std::string("1"),
          std::string("{} x"), std::string("{}\0", 3)}) {
        rejected(file(h, 0));
    }
    EXPECT_NE(rejected(file("[]", 0)).find("expected a JSON object"), std::string::npos);
}

TEST_F(SafetensorsTest, S5_ValidFileRoundTripsValues) {
    const st::File f = st::File::open(file(kS5, 16));
    const at::Tensor a = f.tensor("a");
    ASSERT_EQ(a.scalar_type(), at::kInt);
    ASSERT_EQ(a.sizes(), (std::vector<int64_t>{2, 2}));
    const std::vector<int32_t> want = {0x03020100, 0x07060504, 0x0b0a0908, 0x0f0e0d0c};
    for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(a.flatten()[i].item<int32_t>(), want[i]);
    }
}

TEST_F(SafetensorsTest, S6_TrailingOrMissingBytes) {
    EXPECT_NE(rejected(file(kS5, 17)).find("(trailing bytes)"), std::string::npos);
    EXPECT_NE(rejected(file(kS5, 14)).find("(truncated)"), std::string::npos);
    EXPECT_NE(rejected(file(kS5, 16 + 22)).find("trailing"), std::string::npos); // e.g. an appended ZIP
}

TEST_F(SafetensorsTest, S7_OffsetsDisagreeWithShape) {
    const std::string h = R"({"a":{"dtype":"I32","shape":[2,2],"data_offsets":[0,4]}})";
    EXPECT_NE(rejected(file(h, 4)).find("needs 16 bytes but data_offsets [0, 4] hold 4"), std::string::npos);
}

TEST_F(SafetensorsTest, S8_OverlapGapMisplacedStartAndReversedOffsets) {
    const auto two = [](int b1, int e1, int b2, int e2) {
        return R"({"a":{"dtype":"U8","shape":[16],"data_offsets":[)" + std::to_string(b1) + "," + std::to_string(e1) +
               R"(]},"b":{"dtype":"U8","shape":[16],"data_offsets":[)" + std::to_string(b2) + "," + std::to_string(e2) +
               "]}}";
    };
    EXPECT_NE(rejected(file(two(0, 16, 8, 24), 24)).find("\"b\": data_offsets begin at 8"), std::string::npos);
    EXPECT_NE(rejected(file(two(0, 16, 20, 36), 36)).find("(gap)"), std::string::npos);
    EXPECT_NE(
        rejected(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", 8)).find("(gap)"), std::string::npos
    );
    EXPECT_NE(
        rejected(file(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})", 4)).find("end before"),
        std::string::npos
    );
}

TEST_F(SafetensorsTest, S9_ShapeOverflowNeverTakesTheEmptyPath) {
    for (const char* shape :
         {"[2,4611686018427387903]", "[2,4611686018427387904,3]", "[4194305,4194305,211106198978564]",
          "[4294967296,4294967296]"}) {
        const std::string h = R"({"a":{"dtype":"F32","shape":)" + std::string(shape) + R"(,"data_offsets":[0,16]}})";
        const std::string msg = rejected(file(h, 16));
        EXPECT_TRUE(msg.find("overflows 64 bits") != std::string::npos || msg.find("too large") != std::string::npos)
            << msg;
    }
}

TEST_F(SafetensorsTest, S10_BadNumbersInShapeAndOffsets) {
    for (const char* shape : {"[-1,4]", "[1.5]", "[1e3]", "[\"4\"]", "[18446744073709551616]", "[null]"}) {
        rejected(file(R"({"a":{"dtype":"U8","shape":)" + std::string(shape) + R"(,"data_offsets":[0,4]}})", 4));
    }
    for (const char* offsets : {"[0]", "[0,4,8]", "[-1,4]", "[0,4.0]"}) {
        rejected(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":)" + std::string(offsets) + "}}", 4));
    }
    EXPECT_NE(
        rejected(file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0]}})", 4)).find("has 1 entries"),
        std::string::npos
    );
}

TEST_F(SafetensorsTest, S11_UnknownDtypesAndTypesQloraCannotLoad) {
    for (const char* d : {"\"F33\"", "\"f32\"", "123"}) {
        rejected(file(R"({"a":{"dtype":)" + std::string(d) + R"(,"shape":[1],"data_offsets":[0,4]}})", 4));
    }
    // C64 is a valid format dtype: the file parses, loading that tensor says why it cannot.
    const st::File f = st::File::open(file(R"({"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8));
    try {
        f.tensor("a");
        ADD_FAILURE() << "C64 loaded";
    } catch (const st::SafetensorsError& e) {
        EXPECT_NE(std::string(e.what()).find("has dtype C64, which qlora cannot load"), std::string::npos);
    }
}

TEST_F(SafetensorsTest, S12_SubByteDtypeWithOddCount) {
    EXPECT_NE(
        rejected(file(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2)).find("whole number"),
        std::string::npos
    );
    EXPECT_NO_THROW(st::File::open(file(R"({"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})", 2)));
}

TEST_F(SafetensorsTest, S13_DuplicateNamesAndFields) {
    const std::string dup = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                            R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})";
    EXPECT_NE(rejected(file(dup, 4)).find("duplicate key \"a\""), std::string::npos);
    EXPECT_NE(rejected(file(R"({"__metadata__":{},"__metadata__":{}})", 0)).find("duplicate key"), std::string::npos);
    const std::string dup_field = R"({"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}})";
    EXPECT_NE(rejected(file(dup_field, 4)).find("duplicate field \"dtype\""), std::string::npos);
    EXPECT_NE(
        rejected(file(R"({"__metadata__":{"k":"1","k":"2"}})", 0)).find("duplicate key \"k\""), std::string::npos
    );
}

TEST_F(SafetensorsTest, S14_MetadataValuesMustBeStrings) {
    for (const char* m : {R"({"k":1})", R"({"k":{"x":"y"}})", R"({"k":null})", "null", "[]"}) {
        rejected(file(R"({"__metadata__":)" + std::string(m) + "}", 0));
    }
    const st::File f = st::File::open(file(R"({"__metadata__":{}})", 0));
    EXPECT_TRUE(f.header().metadata.empty() && f.header().tensors.empty());
}

TEST_F(SafetensorsTest, S15_EmptyAndRankZeroTensors) {
    const std::string h = R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                          R"("e":{"dtype":"F32","shape":[2,0],"data_offsets":[4,4]},)"
                          R"("z":{"dtype":"U8","shape":[0,0],"data_offsets":[4,4]},)"
                          R"("b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})";
    const st::File f = st::File::open(file(h, 6));
    EXPECT_EQ(f.tensor("a").dim(), 0);
    EXPECT_EQ(f.tensor("e").sizes(), (std::vector<int64_t>{2, 0}));
    EXPECT_EQ(f.tensor("z").numel(), 0);
    EXPECT_EQ(f.tensor("b")[1].item<uint8_t>(), 5);
}

TEST_F(SafetensorsTest, S16_WhitespaceAroundTheHeader) {
    const st::File f = st::File::open(file(" \t\r\n" + kS5 + "  \t\n  ", 16));
    EXPECT_NE(f.find("a"), nullptr);
}

TEST_F(SafetensorsTest, S18_ManyEntriesLoadInLinearTime) {
    std::string h = "{";
    const int n = 200000;
    for (int i = 0; i < n; ++i) {
        if (i > 0) {
            h += ',';
        }
        h.append("\"t").append(std::to_string(i)).append(R"(":{"dtype":"U8","shape":[1],"data_offsets":[)");
        h.append(std::to_string(i)).append(",").append(std::to_string(i + 1)).append("]}");
    }
    h += "}";
    const auto t0 = std::chrono::steady_clock::now();
    const st::File f = st::File::open(file(h, n));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(f.header().tensors.size(), static_cast<size_t>(n));
    EXPECT_LT(seconds, 10.0); // a quadratic parser would take minutes here
}

TEST_F(SafetensorsTest, S19_DeepNestingRejectedWithoutRecursion) {
    const std::string h = R"({"__metadata__":{"a":)" + std::string(100000, '[') + std::string(100000, ']') + "}}";
    rejected(file(h, 0));
}

TEST_F(SafetensorsTest, S20_UnknownFieldInATensorEntryIsRejected) {
    // Policy: reject (the format's JSON schema forbids extra fields; the reference reader ignores them).
    const std::string h = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"foo":1}})";
    EXPECT_NE(rejected(file(h, 4)).find("unknown field \"foo\" in tensor \"a\""), std::string::npos);
    EXPECT_NE(rejected(file(R"({"a":{"dtype":"U8","shape":[4]}})", 0)).find("has no data_offsets"), std::string::npos);
}

TEST_F(SafetensorsTest, UnalignedTensorsAreCopiedWithCorrectValues) {
    // A 1-byte tensor first puts the F32 at an odd offset (allowed by the format; spec §1.3).
    const std::string h = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
    std::string bytes(8, '\0');
    uint64_t n = h.size();
    std::memcpy(bytes.data(), &n, 8);
    bytes += h;
    bytes.push_back('\x07');
    const float values[2] = {1.5f, -2.25f};
    bytes.append(reinterpret_cast<const char*>(values), sizeof(values));
    const st::File f = st::File::open(write_bytes(bytes));
    const at::Tensor b = f.tensor("b");
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data_ptr()) % 4, 0u);
    EXPECT_EQ(b[0].item<float>(), 1.5f);
    EXPECT_EQ(b[1].item<float>(), -2.25f);
}

TEST_F(SafetensorsTest, S26_WriterRoundTripsEveryDtypeAndAlignsTensors) {
    at::manual_seed(3);
    std::vector<std::pair<std::string, at::Tensor>> tensors = {
        {"f32", at::randn({3, 5})},
        {"bf16", at::randn({7}).to(at::kBFloat16)},
        {"f16", at::randn({2, 3}).to(at::kHalf)},
        {"f64", at::randn({4}, at::kDouble)},
        {"u8", at::randint(0, 255, {9}, at::kByte)},
        {"i8", at::randint(-100, 100, {3}, at::kChar)},
        {"i32", at::randint(-1000, 1000, {3}, at::kInt)},
        {"i64", at::randint(-1000, 1000, {5}, at::kLong)},
        {"bool", at::randint(0, 2, {6}).to(at::kBool)},
        {"scalar", at::scalar_tensor(4.5)},
        {"empty", at::empty({0, 3})},
        {"strided", at::randn({4, 6}).t()},
    };
    const std::string path = (dir_ / "w.safetensors").string();
    st::save(path, tensors, {{"note", "qlora test"}});
    const st::File f = st::File::open(path);
    EXPECT_EQ(f.header().metadata.at("format"), "pt");
    EXPECT_EQ(f.header().metadata.at("note"), "qlora test");
    EXPECT_EQ(f.header().data_start % 8, 0u);
    for (const auto& [name, t] : tensors) {
        const at::Tensor got = f.tensor(name);
        EXPECT_TRUE(at::equal(got, t.contiguous())) << name;
        EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
        if (got.numel() > 0) {
            EXPECT_EQ(reinterpret_cast<uintptr_t>(got.data_ptr()) % got.element_size(), 0u) << name;
        }
    }
    // The header starts with '{' and pads only with trailing spaces.
    std::ifstream in(path, std::ios::binary);
    std::string head(9, '\0');
    in.read(head.data(), 9);
    EXPECT_EQ(head[8], '{');
}

TEST_F(SafetensorsTest, WriterRejectsBadNamesAndReplacesAtomically) {
    const std::string path = (dir_ / "w.safetensors").string();
    EXPECT_THROW(st::save(path, {{"a", at::ones({2})}, {"a", at::ones({2})}}), st::SafetensorsError);
    EXPECT_THROW(st::save(path, {{"__metadata__", at::ones({2})}}), st::SafetensorsError);
    EXPECT_FALSE(fs::exists(path));
    st::save(path, {{"w", at::full({1024}, 1.0f)}});
    const at::Tensor old = st::File::open(path).tensor("w"); // still mapped
    st::save(path, {{"w", at::full({1024}, 2.0f)}});         // in-place replace of a live source (S24)
    EXPECT_EQ(old[1000].item<float>(), 1.0f);                // the old mapping is intact, not truncated
    EXPECT_EQ(st::File::open(path).tensor("w")[1000].item<float>(), 2.0f);
    for (const auto& e : fs::directory_iterator(dir_)) {
        EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << "temporary file left behind";
    }
}

TEST_F(SafetensorsTest, RandomBytesNeverCrash) {
    // A miniature fuzz run (S25's target is the same entry point): random bytes and random mutations of a valid file
    // either parse or raise SafetensorsError.
    std::mt19937_64 rng(11);
    std::string valid(8, '\0');
    uint64_t n = kS5.size();
    std::memcpy(valid.data(), &n, 8);
    valid += kS5 + std::string(16, '\x01');
    for (int iter = 0; iter < 3000; ++iter) {
        std::string bytes = valid;
        const int edits = 1 + static_cast<int>(rng() % 4);
        for (int e = 0; e < edits; ++e) {
            bytes[rng() % bytes.size()] = static_cast<char>(rng());
        }
        if (iter % 3 == 0) {
            bytes.resize(rng() % (bytes.size() + 1));
        }
        const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
        try {
            st::parse_header(p, bytes.size(), bytes.size(), "fuzz");
        } catch (const st::SafetensorsError&) {
        }
    }
}

} // namespace
