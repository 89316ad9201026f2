// qlora/trainer/safetensors.h: the safetensors format (spec formats-and-ops.md §1), read memory-mapped and written
// atomically. The one validated reader of weight files in qlora (reliability-tests.md §11 rule 1).
//
// Reading checks, before anything is allocated from numbers in the file: the header length (at most 100,000,000,
// inside the file), strict JSON (the whole header is one object; leading and trailing JSON whitespace only; depth at
// most 3; duplicate names, duplicate fields, unknown fields, non-string metadata values and every wrong type are
// errors), dtype names, shapes and offsets with checked 64-bit arithmetic, and exact coverage of the data buffer (no
// gap, no overlap, no trailing byte). Tensors whose bytes are aligned for their dtype are returned without a copy,
// backed by a private (copy-on-write) mapping; unaligned ones are copied. Every error is one line naming the file and
// the problem (SafetensorsError).
//
// Writing follows the reference writer: tensors sorted by alignment (largest first) then name, packed without gaps,
// the header padded with spaces to a multiple of 8 so every tensor is aligned, `{"format":"pt"}` always in
// __metadata__ (Hugging Face loaders require it), and the file replaced atomically (temporary file, fsync, rename,
// fsync of the directory), so a crash leaves either the old file or the new one, and a file that is currently
// mapped as the source is never truncated.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace qlora::safetensors {

class SafetensorsError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// Every dtype of the format (Rust `Dtype` order); qlora maps the ones torch has.
enum class Dtype {
    kBool,
    kF4,
    kF6E2M3,
    kF6E3M2,
    kU8,
    kI8,
    kF8E5M2,
    kF8E4M3,
    kF8E8M0,
    kF8E4M3Fnuz,
    kF8E5M2Fnuz,
    kI16,
    kU16,
    kF16,
    kBF16,
    kI32,
    kU32,
    kF32,
    kC64,
    kF64,
    kI64,
    kU64,
};
const char* dtype_name(Dtype d);
int dtype_bits(Dtype d);

struct TensorInfo {
    std::string name;
    Dtype dtype = Dtype::kF32;
    std::vector<int64_t> shape;
    uint64_t begin = 0; // byte offsets into the data buffer (after the header), END exclusive
    uint64_t end = 0;
};

struct Header {
    std::vector<TensorInfo> tensors; // in data order
    std::map<std::string, std::string> metadata;
    uint64_t data_start = 0; // 8 + header length
};

// Validates the first bytes of a file of `file_size` bytes (`bytes` holds at least min(file_size, 8 + 100 MB) of it)
// and returns its layout. `what` names the file in errors. Throws SafetensorsError.
Header parse_header(const uint8_t* bytes, uint64_t available, uint64_t file_size, const std::string& what);

// A validated, memory-mapped file. Tensors stay valid after the File is destroyed (they keep the mapping alive).
class File {
  public:
    static File open(const std::string& path);

    const std::string& path() const { return path_; }
    const Header& header() const { return header_; }
    const TensorInfo* find(const std::string& name) const; // nullptr if absent
    // The tensor, on the CPU; throws for an absent name or a dtype torch does not have.
    at::Tensor tensor(const std::string& name) const;
    // The same as a fresh copy read with pread: the mapping is never touched, so streaming a large file tensor by
    // tensor keeps only the tensor being processed resident (mapped file pages would count in the process's RSS).
    at::Tensor read(const std::string& name) const;

  private:
    // The tensor's entry, and its torch dtype; throws for an absent name or a dtype torch does not have.
    const TensorInfo& loadable(const std::string& name, at::ScalarType* st) const;
    struct Mapping;
    std::string path_;
    std::shared_ptr<Mapping> mapping_;
    Header header_;
    std::map<std::string, size_t> index_;
};

// Writes `tensors` (any device and layout; written as contiguous CPU data) with `metadata` plus format=pt. Names must
// be unique and non-empty and must not be "__metadata__". Atomic replacement of `path`.
void save(
    const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata = {}
);

} // namespace qlora::safetensors
