#include "util/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "util/error.h"

namespace moe {

AtomicFile::AtomicFile(const std::string& path) : path_(path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    Fail("%s: exists and is not a regular file (%s): refusing to replace it", path.c_str(),
         S_ISLNK(st.st_mode) ? "a symbolic link" : S_ISDIR(st.st_mode) ? "a directory" : "a device, pipe or socket");
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  int fd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
  if (fd < 0) {  // no O_TMPFILE here: a fresh named file
    tmp_ = path + ".tmp.XXXXXX";
    fd = ::mkstemp(tmp_.data());
    if (fd < 0) Fail("%s: cannot create a file in %s: %s", path.c_str(), dir.c_str(), std::strerror(errno));
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::fchmod(fd, 0666 & ~mask);
  }
  f_ = ::fdopen(fd, "wb");
  if (f_ == nullptr) {
    const int err = errno;
    ::close(fd);
    if (!tmp_.empty()) std::remove(tmp_.c_str());
    Fail("%s: cannot create: %s", path.c_str(), std::strerror(err));
  }
}

AtomicFile::~AtomicFile() {
  if (f_ != nullptr) {
    std::fclose(f_);
    if (!tmp_.empty()) std::remove(tmp_.c_str());
  }
}

void AtomicFile::Write(const void* p, size_t n) {
  if (n != 0 && std::fwrite(p, 1, n, f_) != n) Fail("%s: write failed: %s", path_.c_str(), std::strerror(errno));
}

void AtomicFile::Zeros(uint64_t n) {
  static const uint8_t kZeros[4096] = {};
  while (n > 0) {
    const size_t k = n < sizeof(kZeros) ? static_cast<size_t>(n) : sizeof(kZeros);
    Write(kZeros, k);
    n -= k;
  }
}

void AtomicFile::Commit() {
  if (std::fflush(f_) != 0 || ::fsync(::fileno(f_)) != 0)
    Fail("%s: write failed: %s", path_.c_str(), std::strerror(errno));
  if (tmp_.empty()) {  // unnamed: link it under a fresh name, then rename that over the path
    const std::string proc = "/proc/self/fd/" + std::to_string(::fileno(f_));
    for (int attempt = 0;; ++attempt) {
      const std::string name = StrFormat("%s.tmp.%d.%d", path_.c_str(), static_cast<int>(::getpid()), attempt);
      if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, name.c_str(), AT_SYMLINK_FOLLOW) == 0) {
        tmp_ = name;
        break;
      }
      if (errno != EEXIST || attempt >= 100)
        Fail("%s: cannot link the new file into place: %s", path_.c_str(), std::strerror(errno));
    }
  }
  std::FILE* f = f_;
  f_ = nullptr;
  const bool closed = std::fclose(f) == 0;
  const int err = errno;
  if (!closed || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int e = closed ? errno : err;
    std::remove(tmp_.c_str());
    Fail("%s: cannot write it: %s", path_.c_str(), std::strerror(e));
  }
}

void WriteFileAtomic(const std::string& path, const void* data, size_t n) {
  AtomicFile f(path);
  f.Write(data, n);
  f.Commit();
}

std::string ReadRegularFile(const std::string& path, const char* what) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) Fail("cannot read %s %s: %s", what, path.c_str(), std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    Fail("cannot read %s %s: %s", what, path.c_str(), std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    Fail("cannot read %s %s: %s", what, path.c_str(), S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
  }
  std::string out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      Fail("cannot read %s %s: %s", what, path.c_str(), std::strerror(err));
    }
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

}  // namespace moe
