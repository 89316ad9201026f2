// qlora/trainer/atomic_file.h: every file the trainer writes is replaced atomically (reliability-tests.md §6): the
// content goes to a temporary file beside the target, which is fsynced, renamed over the target, and the directory
// fsynced, so a crash or a full disk leaves either the old file or the new one, never a torn one, and a reader that
// has the old file mapped keeps valid data.
#pragma once

#include <cstddef>
#include <functional>
#include <string>

namespace qlora::trainer {

class FileSink {
  public:
    FileSink(int fd, std::string tmp) : fd_(fd), tmp_(std::move(tmp)) {}
    // Writes all bytes (retrying short writes); throws std::runtime_error naming the file.
    void write(const void* data, size_t size);

  private:
    int fd_;
    std::string tmp_;
};

// Replaces `path` with what `fill` writes. On any error the temporary file is removed, `path` is unchanged, and the
// error propagates (std::runtime_error naming the file for I/O errors).
void write_file_atomically(const std::string& path, const std::function<void(FileSink&)>& fill);

// fsync of a directory (makes renames and creations in it durable). Errors are ignored (best effort).
void sync_directory(const std::string& dir);

// Creates the directory `path` (which must not exist) atomically: `fill` writes into a hidden sibling
// `.<name>.partial` (files written with write_file_atomically), which is fsynced and renamed to `path`. A crash leaves
// no `path` at all, only a `.partial` that the next call removes; `path` is never half-written.
void write_directory_atomically(const std::string& path, const std::function<void(const std::string&)>& fill);

} // namespace qlora::trainer
