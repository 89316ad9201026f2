// trainer/src/atomic_file.cpp: see qlora/trainer/atomic_file.h.
#include "qlora/trainer/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace qlora::trainer {
namespace {

std::string directory_of(const std::string& path) {
    const size_t slash = path.find_last_of('/');
    if (slash == std::string::npos) {
        return ".";
    }
    return slash == 0 ? "/" : path.substr(0, slash);
}

[[noreturn]] void fail(const std::string& file, const char* what, int err) {
    throw std::runtime_error(file + ": " + what + ": " + std::strerror(err));
}

} // namespace

void FileSink::write(const void* data, size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    while (size > 0) {
        const ssize_t w = ::write(fd_, p, std::min<size_t>(size, size_t{1} << 30));
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            fail(tmp_, "write failed", w < 0 ? errno : ENOSPC);
        }
        p += w;
        size -= static_cast<size_t>(w);
    }
}

void write_file_atomically(const std::string& path, const std::function<void(FileSink&)>& fill) {
    static std::atomic<unsigned long> counter{0};
    const std::string tmp = path + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        fail(tmp, "cannot create", errno);
    }
    try {
        FileSink sink(fd, tmp);
        fill(sink);
        if (::fsync(fd) != 0) {
            fail(tmp, "fsync failed", errno);
        }
        const int closed = ::close(fd);
        fd = -1;
        if (closed != 0) {
            fail(tmp, "close failed", errno);
        }
        if (std::rename(tmp.c_str(), path.c_str()) != 0) {
            fail(path, "cannot replace", errno);
        }
    } catch (...) {
        if (fd >= 0) {
            ::close(fd);
        }
        ::unlink(tmp.c_str());
        throw;
    }
    sync_directory(directory_of(path));
}

void sync_directory(const std::string& dir) {
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        ::fsync(fd);
        ::close(fd);
    }
}

void write_directory_atomically(const std::string& path, const std::function<void(const std::string&)>& fill) {
    namespace fs = std::filesystem;
    const fs::path final_path(path);
    std::string hidden = ".";
    hidden += final_path.filename().string();
    hidden += ".partial";
    const fs::path partial = final_path.parent_path() / hidden;
    fs::remove_all(partial); // a leftover of an interrupted write
    fs::create_directories(partial);
    try {
        fill(partial.string()); // every file in it is written with write_file_atomically (fsynced)
        sync_directory(partial.string());
        if (std::rename(partial.c_str(), final_path.c_str()) != 0) {
            fail(path, "cannot rename the finished directory into place", errno);
        }
    } catch (...) {
        std::error_code ignored;
        fs::remove_all(partial, ignored);
        throw;
    }
    sync_directory(final_path.parent_path().string());
}

} // namespace qlora::trainer
