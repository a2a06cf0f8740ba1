#include "util/memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>

#include "util/error.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14 (older C libraries do not name it)
#endif

namespace moe {

bool PopulatePages(void* p, size_t bytes) {
  static std::atomic<bool> unsupported{false};
  if (bytes == 0 || unsupported.load(std::memory_order_relaxed)) return false;
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) & ~(page - 1);
  if (::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE) == 0) return true;
  if (errno == EINVAL) unsupported.store(true, std::memory_order_relaxed);  // a kernel before 5.14
  return false;  // otherwise (no memory now): the pages fault in as usual
}

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}  // namespace

HugePageBuffer::HugePageBuffer(size_t bytes) {
  // Room for the buffer rounded up to whole huge pages, plus one to align it; the slack is
  // address space only (never touched, so never resident).
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  map_len_ = rounded + kHugePage;
  map_ = ::mmap(nullptr, map_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    Fail("out of memory: cannot map %zu bytes", bytes);
  }
  const uintptr_t at = (reinterpret_cast<uintptr_t>(map_) + kHugePage - 1) & ~uintptr_t{kHugePage - 1};
  data_ = reinterpret_cast<uint8_t*>(at);
  size_ = bytes;
  ::madvise(data_, rounded, MADV_HUGEPAGE);  // a hint: without THP the pages are 4 KiB ones
}

HugePageBuffer::~HugePageBuffer() {
  if (map_) ::munmap(map_, map_len_);
}

HugePageBuffer& HugePageBuffer::operator=(HugePageBuffer&& o) noexcept {
  if (this != &o) {
    if (map_) ::munmap(map_, map_len_);
    map_ = o.map_;
    map_len_ = o.map_len_;
    data_ = o.data_;
    size_ = o.size_;
    o.map_ = nullptr;
    o.map_len_ = 0;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

}  // namespace moe
