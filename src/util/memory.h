// Memory helpers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe {

// Makes the pages of [p, p + bytes) resident and writable now, in one system call
// (madvise(MADV_POPULATE_WRITE), Linux 5.14+), instead of one page fault at each first write.
// The pages keep their contents (fresh anonymous pages are zero). On the VMs this project runs
// on a page fault costs about 10 us and a populated page under 1 us, so memory that is about to
// be written page after page (a KV cache as the context grows) is cheaper populated in bulk.
// Returns false where the kernel does not support it (then never tries again) or cannot now
// (out of memory): nothing is changed and the pages fault in as usual. The range may start and
// end anywhere inside mapped memory.
bool PopulatePages(void* p, size_t bytes);

// A large buffer of anonymous memory (repacked weights, a KV cache), mapped at a 2 MiB boundary
// with transparent huge pages asked for (madvise(MADV_HUGEPAGE)): accesses scattered over it
// then fall in a few 2 MiB pages instead of many 4 KiB ones (a 16-sequence decode step of the
// medium model stores 2048 new key and value rows, every layer's and head's: 3x faster in huge
// pages, likely the TLB; this VM has no counters to confirm it). Its pages become
// resident when first touched (or populated), 2 MiB at a time where the kernel gives huge pages
// (the whole 2 MiB runs of the buffer; the tail past the last one is in 4 KiB pages, so it
// costs no more than it holds), and are zero until written. Unmapped when destroyed; movable,
// not copyable.
class HugePageBuffer {
 public:
  HugePageBuffer() = default;
  // (0 bytes: one small page.) Throws moe::Error when the address space cannot be had.
  explicit HugePageBuffer(size_t bytes);
  ~HugePageBuffer();
  HugePageBuffer(HugePageBuffer&& o) noexcept { *this = static_cast<HugePageBuffer&&>(o); }
  HugePageBuffer& operator=(HugePageBuffer&& o) noexcept;
  HugePageBuffer(const HugePageBuffer&) = delete;
  HugePageBuffer& operator=(const HugePageBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;  // the mapping, at a 2 MiB boundary
  size_t size_ = 0;
  size_t map_len_ = 0;  // size_ in whole small pages
};

}  // namespace moe
