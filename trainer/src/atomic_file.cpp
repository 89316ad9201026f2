// trainer/src/atomic_file.cpp: see qlora/trainer/atomic_file.h.
#include "qlora/trainer/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
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
    const int dir = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0) {
        ::fsync(dir);
        ::close(dir);
    }
}

} // namespace qlora::trainer
