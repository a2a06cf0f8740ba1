// Writing a file so that it appears complete or not at all, and never through anything that is
// not a regular file. Every writer of moe.cpp (GGUF models and checkpoints, plots, the trainer's
// metrics) goes through this.
//   - The new file is created unnamed in the target's folder (O_TMPFILE) and linked into place
//     only when complete, so a killed writer leaves nothing behind and no existing file (a
//     stale "X.tmp" of someone else's, say) is ever opened for writing. Where the file system
//     has no O_TMPFILE, a fresh uniquely named "X.tmp.XXXXXX" (mkstemp) stands in.
//   - Commit() syncs the data and renames it over the target: a reader sees the old file or the
//     new one, and a failed write leaves the old one as it was.
//   - The target must be absent or a regular file: a symbolic link, device, directory or pipe
//     there is refused, not replaced.
// Failures throw moe::Error naming the file and the system's reason.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace moe {

class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();  // without Commit: the new file is discarded
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void Write(const void* p, size_t n);
  void Zeros(uint64_t n);
  // Flushes, syncs and puts the file at the path (atomically replacing a regular file there).
  void Commit();

 private:
  std::string path_;
  std::string tmp_;  // the named temporary (mkstemp, or the link Commit makes); "" while unnamed
  std::FILE* f_ = nullptr;
};

// The whole file at once.
void WriteFileAtomic(const std::string& path, const void* data, size_t n);

// Reads a whole regular file (a pipe, device or directory is refused without waiting on it).
// Failures throw moe::Error: "cannot read <what> <path>: <reason>".
std::string ReadRegularFile(const std::string& path, const char* what);

}  // namespace moe
