// trainer/src/safetensors.cpp: see qlora/trainer/safetensors.h. Facts: shared/spec/formats-and-ops.md §1, test
// catalogue reliability-tests.md §1.6 (S1-S26).
#include "qlora/trainer/safetensors.h"

#include "qlora/trainer/atomic_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

static_assert(
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian; so is every host we build for"
);

namespace qlora::safetensors {
namespace {

constexpr uint64_t kMaxHeader = 100'000'000; // the reference's MAX_HEADER_SIZE
constexpr int64_t kMaxDim = int64_t{1} << 62;

struct DtypeInfo {
    Dtype dtype;
    const char* name;
    int bits;
};
constexpr DtypeInfo kDtypes[] = {
    {Dtype::kBool, "BOOL", 8},
    {Dtype::kF4, "F4", 4},
    {Dtype::kF6E2M3, "F6_E2M3", 6},
    {Dtype::kF6E3M2, "F6_E3M2", 6},
    {Dtype::kU8, "U8", 8},
    {Dtype::kI8, "I8", 8},
    {Dtype::kF8E5M2, "F8_E5M2", 8},
    {Dtype::kF8E4M3, "F8_E4M3", 8},
    {Dtype::kF8E8M0, "F8_E8M0", 8},
    {Dtype::kF8E4M3Fnuz, "F8_E4M3FNUZ", 8},
    {Dtype::kF8E5M2Fnuz, "F8_E5M2FNUZ", 8},
    {Dtype::kI16, "I16", 16},
    {Dtype::kU16, "U16", 16},
    {Dtype::kF16, "F16", 16},
    {Dtype::kBF16, "BF16", 16},
    {Dtype::kI32, "I32", 32},
    {Dtype::kU32, "U32", 32},
    {Dtype::kF32, "F32", 32},
    {Dtype::kC64, "C64", 64},
    {Dtype::kF64, "F64", 64},
    {Dtype::kI64, "I64", 64},
    {Dtype::kU64, "U64", 64},
};

const DtypeInfo& info_of(Dtype d) {
    for (const DtypeInfo& i : kDtypes) {
        if (i.dtype == d) {
            return i;
        }
    }
    throw SafetensorsError("safetensors: unknown dtype enum value");
}

// torch dtype of a safetensors dtype, or Undefined.
at::ScalarType torch_dtype(Dtype d) {
    switch (d) {
    case Dtype::kBool:
        return at::kBool;
    case Dtype::kU8:
        return at::kByte;
    case Dtype::kI8:
        return at::kChar;
    case Dtype::kI16:
        return at::kShort;
    case Dtype::kI32:
        return at::kInt;
    case Dtype::kI64:
        return at::kLong;
    case Dtype::kF16:
        return at::kHalf;
    case Dtype::kBF16:
        return at::kBFloat16;
    case Dtype::kF32:
        return at::kFloat;
    case Dtype::kF64:
        return at::kDouble;
    case Dtype::kF8E4M3:
        return at::kFloat8_e4m3fn;
    case Dtype::kF8E5M2:
        return at::kFloat8_e5m2;
    default:
        return at::ScalarType::Undefined;
    }
}

Dtype from_torch(at::ScalarType t, const std::string& what) {
    for (const DtypeInfo& i : kDtypes) {
        if (torch_dtype(i.dtype) == t) {
            return i.dtype;
        }
    }
    throw SafetensorsError(what + ": torch dtype " + std::string(c10::toString(t)) + " has no safetensors dtype");
}

std::string shape_string(const std::vector<int64_t>& shape) {
    std::ostringstream s;
    s << "[";
    for (size_t i = 0; i < shape.size(); ++i) {
        s << (i ? ", " : "") << shape[i];
    }
    s << "]";
    return s.str();
}

// --------------------------------------------------------------------------------------------------------------
// Header JSON: a SAX handler that accepts exactly the schema, so nothing is built from a header that is not valid.

class HeaderSax : public nlohmann::json_sax<nlohmann::json> {
  public:
    explicit HeaderSax(Header* out) : out_(out) {}

    const std::string& error() const { return error_; }

    bool null() override { return fail("null " + where()); }
    bool boolean(bool) override { return fail("a boolean " + where()); }
    bool number_integer(number_integer_t v) override {
        return fail("negative number " + std::to_string(v) + " " + where());
    }
    bool number_float(number_float_t, const string_t& s) override {
        return fail("number " + s + " " + where() + " (not an unsigned 64-bit integer)");
    }
    bool binary(binary_t&) override { return fail("binary value " + where()); }
    bool number_unsigned(number_unsigned_t v) override {
        if (depth_ != 3) {
            return fail("a number " + where());
        }
        numbers_.push_back(v);
        return true;
    }
    bool string(string_t& s) override {
        if (depth_ == 2 && in_metadata_) {
            out_->metadata[key_] = s;
            return true;
        }
        if (depth_ == 2 && field_ == "dtype") {
            for (const DtypeInfo& i : kDtypes) {
                if (s == i.name) {
                    tensor_.dtype = i.dtype;
                    return true;
                }
            }
            return fail("unknown dtype \"" + s + "\" " + where());
        }
        return fail("a string " + where());
    }
    bool start_object(std::size_t) override {
        if (depth_ == 0) {
            depth_ = 1;
            return true;
        }
        if (depth_ == 1) {
            depth_ = 2;
            fields_.clear();
            tensor_ = TensorInfo{};
            tensor_.name = name_;
            return true;
        }
        return fail("an object " + where());
    }
    bool key(string_t& k) override {
        if (depth_ == 1) {
            if (!names_.insert(k).second) {
                return fail("duplicate key \"" + k + "\" in the header");
            }
            name_ = k;
            in_metadata_ = k == "__metadata__";
            return true;
        }
        if (depth_ == 2 && in_metadata_) {
            if (out_->metadata.count(k) != 0) {
                return fail("duplicate key \"" + k + "\" in __metadata__");
            }
            key_ = k;
            return true;
        }
        if (k != "dtype" && k != "shape" && k != "data_offsets") {
            return fail(
                "unknown field \"" + k + "\" in tensor \"" + name_ + "\" (expected dtype, shape, data_offsets)"
            );
        }
        if (!fields_.insert(k).second) {
            return fail("duplicate field \"" + k + "\" in tensor \"" + name_ + "\"");
        }
        field_ = k;
        return true;
    }
    bool end_object() override {
        if (depth_ == 2 && !in_metadata_) {
            for (const char* f : {"dtype", "shape", "data_offsets"}) {
                if (fields_.count(f) == 0) {
                    return fail("tensor \"" + name_ + "\" has no " + f);
                }
            }
            out_->tensors.push_back(tensor_);
        }
        --depth_;
        field_.clear();
        return true;
    }
    bool start_array(std::size_t) override {
        if (depth_ != 2 || in_metadata_ || (field_ != "shape" && field_ != "data_offsets")) {
            return fail("an array " + where());
        }
        depth_ = 3;
        numbers_.clear();
        return true;
    }
    bool end_array() override {
        depth_ = 2;
        if (field_ == "data_offsets") {
            if (numbers_.size() != 2) {
                return fail(
                    "tensor \"" + name_ + "\": data_offsets has " + std::to_string(numbers_.size()) +
                    " entries, expected 2"
                );
            }
            tensor_.begin = numbers_[0];
            tensor_.end = numbers_[1];
            return true;
        }
        tensor_.shape.clear();
        for (uint64_t d : numbers_) {
            if (d > static_cast<uint64_t>(kMaxDim)) {
                return fail("tensor \"" + name_ + "\": dimension " + std::to_string(d) + " is too large");
            }
            tensor_.shape.push_back(static_cast<int64_t>(d));
        }
        return true;
    }
    bool parse_error(std::size_t pos, const std::string&, const nlohmann::detail::exception& ex) override {
        if (error_.empty()) {
            std::string msg = ex.what();
            const size_t colon = msg.find("error: ");
            error_ = "header is not valid JSON at byte " + std::to_string(pos) +
                     (colon == std::string::npos ? "" : ": " + msg.substr(colon + 7));
        }
        return false;
    }

  private:
    bool fail(const std::string& msg) {
        if (error_.empty()) {
            error_ = msg;
        }
        return false;
    }
    std::string where() const {
        if (depth_ == 0) {
            return "as the header (expected a JSON object)";
        }
        if (depth_ == 1) {
            return "as the value of \"" + name_ + "\" (expected an object)";
        }
        if (in_metadata_) {
            return "as the value of __metadata__ key \"" + key_ + "\" (expected a string)";
        }
        return "in field \"" + field_ + "\" of tensor \"" + name_ + "\"";
    }

    Header* out_;
    std::string error_;
    int depth_ = 0;
    bool in_metadata_ = false;
    std::string name_, key_, field_;
    std::set<std::string> names_, fields_;
    TensorInfo tensor_;
    std::vector<uint64_t> numbers_;
};

uint64_t read_u64_le(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

[[noreturn]] void fail(const std::string& what, const std::string& msg) {
    throw SafetensorsError(what + ": " + msg);
}

} // namespace

const char* dtype_name(Dtype d) {
    return info_of(d).name;
}
int dtype_bits(Dtype d) {
    return info_of(d).bits;
}

Header parse_header(const uint8_t* bytes, uint64_t available, uint64_t file_size, const std::string& what) {
    if (file_size < 8) {
        fail(
            what, "file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length (truncated?)"
        );
    }
    const uint64_t n = read_u64_le(bytes);
    if (n > kMaxHeader) {
        fail(what, "header length " + std::to_string(n) + " exceeds the format's limit of 100000000 bytes");
    }
    if (8 + n > file_size) {
        fail(
            what, "header length " + std::to_string(n) + " runs past the end of the " + std::to_string(file_size) +
                      "-byte file (truncated?)"
        );
    }
    if (8 + n > available) {
        fail(what, "internal: header not in memory");
    }
    Header h;
    h.data_start = 8 + n;
    HeaderSax sax(&h);
    const char* first = reinterpret_cast<const char*>(bytes + 8);
    // nlohmann's lexer takes a NUL byte for the end of input, which would accept zero-padded headers that the
    // reference rejects; raw NUL is never valid JSON.
    if (std::memchr(first, 0, n) != nullptr) {
        fail(
            what, "header contains a NUL byte at " +
                      std::to_string(static_cast<const char*>(std::memchr(first, 0, n)) - first) +
                      " (JSON allows none; zero padding?)"
        );
    }
    const bool ok = nlohmann::json::sax_parse(first, first + n, &sax, nlohmann::json::input_format_t::json, true);
    if (!ok || !sax.error().empty()) {
        fail(what, sax.error().empty() ? std::string("header is not valid JSON") : sax.error());
    }
    // Data layout: sorted by offsets, back to back from 0, each exactly shape x dtype bytes, covering the buffer.
    std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t expected = 0;
    for (const TensorInfo& t : h.tensors) {
        if (t.end < t.begin) {
            fail(
                what, "tensor \"" + t.name + "\": data_offsets [" + std::to_string(t.begin) + ", " +
                          std::to_string(t.end) + "] end before they begin"
            );
        }
        if (t.begin != expected) {
            fail(
                what, "tensor \"" + t.name + "\": data_offsets begin at " + std::to_string(t.begin) + " but the " +
                          (t.begin < expected ? "previous tensor ends at " : "data so far ends at ") +
                          std::to_string(expected) + (t.begin < expected ? " (overlap)" : " (gap)")
            );
        }
        uint64_t count = 1;
        for (int64_t d : t.shape) {
            if (__builtin_mul_overflow(count, static_cast<uint64_t>(d), &count)) {
                fail(what, "tensor \"" + t.name + "\": shape " + shape_string(t.shape) + " overflows 64 bits");
            }
        }
        uint64_t bits = 0;
        if (__builtin_mul_overflow(count, static_cast<uint64_t>(dtype_bits(t.dtype)), &bits)) {
            fail(what, "tensor \"" + t.name + "\": shape " + shape_string(t.shape) + " overflows 64 bits");
        }
        if (bits % 8 != 0) {
            fail(
                what, "tensor \"" + t.name + "\": " + std::to_string(count) + " elements of " + dtype_name(t.dtype) +
                          " are not a whole number of bytes"
            );
        }
        if (t.end - t.begin != bits / 8) {
            fail(
                what, "tensor \"" + t.name + "\": " + dtype_name(t.dtype) + " " + shape_string(t.shape) + " needs " +
                          std::to_string(bits / 8) + " bytes but data_offsets [" + std::to_string(t.begin) + ", " +
                          std::to_string(t.end) + "] hold " + std::to_string(t.end - t.begin)
            );
        }
        expected = t.end;
    }
    if (file_size - h.data_start != expected) {
        fail(
            what, "the tensors cover " + std::to_string(expected) + " bytes of data but the file has " +
                      std::to_string(file_size - h.data_start) +
                      (file_size - h.data_start > expected ? " (trailing bytes)" : " (truncated)")
        );
    }
    return h;
}

// --------------------------------------------------------------------------------------------------------------
// Reading

struct File::Mapping {
    void* base = nullptr;
    size_t size = 0;
    int fd = -1; // kept open for File::read
    ~Mapping() {
        if (base != nullptr) {
            munmap(base, size);
        }
        if (fd >= 0) {
            ::close(fd);
        }
    }
};

File File::open(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fail(path, std::string("cannot open: ") + std::strerror(errno));
    }
    struct stat st {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(path, "not a regular file");
    }
    File f;
    f.path_ = path;
    f.mapping_ = std::make_shared<Mapping>();
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    if (size >= 8) {
        // Private and writable: a tensor that is written to gets its own copy of the page, never the file's.
        void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (base == MAP_FAILED) {
            ::close(fd);
            fail(path, std::string("cannot map: ") + std::strerror(errno));
        }
        f.mapping_->base = base;
        f.mapping_->size = size;
    }
    f.mapping_->fd = fd;
    const auto* bytes = static_cast<const uint8_t*>(f.mapping_->base);
    f.header_ = parse_header(bytes, size, size, path);
    for (size_t i = 0; i < f.header_.tensors.size(); ++i) {
        f.index_[f.header_.tensors[i].name] = i;
    }
    return f;
}

const TensorInfo* File::find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

const TensorInfo& File::loadable(const std::string& name, at::ScalarType* st) const {
    const TensorInfo* t = find(name);
    if (t == nullptr) {
        fail(path_, "no tensor named \"" + name + "\"");
    }
    *st = torch_dtype(t->dtype);
    if (*st == at::ScalarType::Undefined) {
        fail(path_, "tensor \"" + name + "\" has dtype " + dtype_name(t->dtype) + ", which qlora cannot load");
    }
    return *t;
}

at::Tensor File::tensor(const std::string& name) const {
    at::ScalarType st;
    const TensorInfo* t = &loadable(name, &st);
    const at::TensorOptions options = at::TensorOptions().dtype(st);
    if (t->end == t->begin) {
        return at::empty(t->shape, options); // no data: never touch the mapping
    }
    uint8_t* data = static_cast<uint8_t*>(mapping_->base) + header_.data_start + t->begin;
    const size_t element = static_cast<size_t>(dtype_bits(t->dtype) / 8);
    if (reinterpret_cast<uintptr_t>(data) % element == 0) {
        std::shared_ptr<Mapping> keep = mapping_;
        return at::from_blob(
            data, t->shape, [keep](void*) {}, options
        );
    }
    // Third-party writers need not align tensors (spec §1.3): copy instead of reinterpreting unaligned bytes.
    at::Tensor out = at::empty(t->shape, options);
    std::memcpy(out.data_ptr(), data, t->end - t->begin);
    return out;
}

at::Tensor File::read(const std::string& name) const {
    at::ScalarType st;
    const TensorInfo* t = &loadable(name, &st);
    at::Tensor out = at::empty(t->shape, at::TensorOptions().dtype(st));
    auto* dst = static_cast<uint8_t*>(out.data_ptr());
    uint64_t done = 0;
    const uint64_t total = t->end - t->begin; // == out.nbytes(), validated by parse_header
    while (done < total) {
        const ssize_t n = ::pread(
            mapping_->fd, dst + done, std::min<uint64_t>(total - done, 1u << 30),
            static_cast<off_t>(header_.data_start + t->begin + done)
        );
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            fail(path_, "cannot read tensor \"" + name + "\": " + (n < 0 ? std::strerror(errno) : "file shrank"));
        }
        done += static_cast<uint64_t>(n);
    }
    return out;
}

// --------------------------------------------------------------------------------------------------------------
// Writing

void save(
    const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata
) {
    struct Entry {
        std::string name;
        at::Tensor data;
        Dtype dtype;
    };
    std::vector<Entry> entries;
    std::set<std::string> names;
    for (const auto& [name, tensor] : tensors) {
        if (name.empty() || name == "__metadata__") {
            fail(path, "invalid tensor name \"" + name + "\"");
        }
        if (!names.insert(name).second) {
            fail(path, "duplicate tensor name \"" + name + "\"");
        }
        const Dtype d = from_torch(tensor.scalar_type(), path + ": tensor \"" + name + "\"");
        entries.push_back({name, tensor.detach().to(at::kCPU).contiguous(), d});
    }
    std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        const int ea = dtype_bits(a.dtype), eb = dtype_bits(b.dtype);
        return ea != eb ? ea > eb : a.name < b.name;
    });
    nlohmann::ordered_json header;
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) {
        meta[k] = v;
    }
    meta["format"] = "pt";
    header["__metadata__"] = meta;
    uint64_t offset = 0;
    for (const Entry& e : entries) {
        const uint64_t bytes = static_cast<uint64_t>(e.data.numel()) * static_cast<uint64_t>(e.data.element_size());
        header[e.name] = {
            {"dtype", dtype_name(e.dtype)},
            {"shape", e.data.sizes().vec()},
            {"data_offsets", {offset, offset + bytes}}};
        offset += bytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    if (text.size() > kMaxHeader) {
        fail(path, "header of " + std::to_string(text.size()) + " bytes exceeds the format's 100000000-byte limit");
    }

    qlora::trainer::write_file_atomically(path, [&](qlora::trainer::FileSink& out) {
        const uint64_t n = text.size();
        out.write(&n, sizeof(n));
        out.write(text.data(), text.size());
        for (const Entry& e : entries) {
            out.write(e.data.const_data_ptr(), static_cast<size_t>(e.data.nbytes()));
        }
    });
}

} // namespace qlora::safetensors
