#include "util/memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>

#include "util/error.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14 (older C libraries do not name it)
#endif

namespace moe {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t SmallPage() {
  static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

bool PopulatePages(void* p, size_t bytes) {
  static std::atomic<bool> unsupported{false};
  if (bytes == 0 || unsupported.load(std::memory_order_relaxed)) return false;
  const uintptr_t page = SmallPage();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) & ~(page - 1);
  if (::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE) == 0) return true;
  if (errno == EINVAL) unsupported.store(true, std::memory_order_relaxed);  // a kernel before 5.14
  return false;  // otherwise (no memory now): the pages fault in as usual
}

HugePageBuffer::HugePageBuffer(size_t bytes) {
  // Map a huge page more than needed, then unmap the slack before the first 2 MiB boundary and
  // after the buffer's last small page: the mapping is exactly the buffer, aligned.
  const size_t page = SmallPage();
  const size_t len = (std::max<size_t>(bytes, 1) + page - 1) / page * page;
  const size_t want = len + kHugePage;
  void* m = ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) Fail("out of memory: cannot map %zu bytes", bytes);
  const uintptr_t base = reinterpret_cast<uintptr_t>(m);
  const uintptr_t at = (base + kHugePage - 1) & ~uintptr_t{kHugePage - 1};
  if (at > base) ::munmap(m, at - base);
  if (base + want > at + len) ::munmap(reinterpret_cast<void*>(at + len), base + want - (at + len));
  map_len_ = len;
  data_ = reinterpret_cast<uint8_t*>(at);
  size_ = bytes;
  // Huge pages for the whole 2 MiB runs only: a tail in one would make the rest of its 2 MiB
  // resident too (the repacked weights are many matrices of a few MiB: 55-90 MiB more resident
  // on the medium model when every tail was a huge page). The mapping ends with the buffer, so
  // not even a system that gives huge pages unasked puts the tail in one. A hint: without THP
  // all pages are 4 KiB.
  if (const size_t whole = bytes / kHugePage * kHugePage; whole > 0) ::madvise(data_, whole, MADV_HUGEPAGE);
}

HugePageBuffer::~HugePageBuffer() {
  if (data_) ::munmap(data_, map_len_);
}

HugePageBuffer& HugePageBuffer::operator=(HugePageBuffer&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(data_, map_len_);
    data_ = o.data_;
    size_ = o.size_;
    map_len_ = o.map_len_;
    o.data_ = nullptr;
    o.size_ = 0;
    o.map_len_ = 0;
  }
  return *this;
}

}  // namespace moe
