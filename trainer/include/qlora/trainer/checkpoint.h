// qlora/trainer/checkpoint.h: the weights of a Hugging Face model directory, one file (model.safetensors) or shards
// listed in model.safetensors.index.json (spec formats-and-ops.md §1.6).
//
// The index is validated before any shard is opened: strict JSON (qlora/trainer/json.h), a "weight_map" object of
// tensor name -> shard file name, every shard name a plain file name inside the directory (no path separators, "."
// or "..": reliability-tests.md S21) that exists. Then every shard must hold exactly the tensors the index assigns
// to it: a tensor missing from its shard, present in a shard the index does not name for it, or present in two
// shards is an error. Unknown index keys ("metadata", "total_parameters", ...) are ignored. Pickle weights
// (pytorch_model.bin, *.pt, *.pth) are never read: a directory with only those is refused (P1).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "qlora/trainer/safetensors.h"

namespace qlora::safetensors {

class Checkpoint {
  public:
    static Checkpoint open(const std::string& dir);

    const std::string& dir() const { return dir_; }
    std::vector<std::string> names() const; // sorted
    bool contains(const std::string& name) const { return where_.count(name) != 0; }
    const TensorInfo& info(const std::string& name) const;
    at::Tensor tensor(const std::string& name) const; // throws SafetensorsError for an absent name
    at::Tensor read(const std::string& name) const;   // a copy that leaves the mapping untouched (File::read)
    // Every name, file by file in the order of the data in each file, so reading them in turn streams each file once.
    std::vector<std::string> names_in_storage_order() const;
    const std::string& file_of(const std::string& name) const;

  private:
    std::string dir_;
    std::vector<File> files_;
    std::map<std::string, size_t> where_; // tensor name -> index into files_
};

// Writes the weights of a Hugging Face model directory: model.safetensors when everything fits in one shard of
// `max_shard_bytes`, else model-0000i-of-0000n.safetensors (tensors in the given order, a new shard whenever the next
// tensor would overflow the current one; a larger tensor gets a shard of its own) and model.safetensors.index.json
// (metadata.total_size and the weight_map), the index written last. Every file is replaced atomically; weight files
// of the other layout or of an earlier shard count left in `dir` are removed afterwards, so the directory never
// mixes two checkpoints.
void save_checkpoint(
    const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    uint64_t max_shard_bytes = uint64_t{5} << 30
);

} // namespace qlora::safetensors
