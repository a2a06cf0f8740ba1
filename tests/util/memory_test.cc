// util/memory.h: populating pages keeps what they hold and makes them resident; huge-page
// buffers are aligned, zero, lazily resident and unmapped once.
#include "util/memory.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace moe {
namespace {

// Resident pages of [p, p + bytes) by mincore.
size_t ResidentPages(void* p, size_t bytes) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> v((bytes + page - 1) / page);
  if (::mincore(p, bytes, v.data()) != 0) return 0;
  size_t n = 0;
  for (unsigned char c : v) n += c & 1;
  return n;
}

TEST(Memory, PopulatePagesMakesFreshPagesResidentAndZero) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE)), bytes = 64 * page;
  void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(m, MAP_FAILED);
  auto* p = static_cast<uint8_t*>(m);
  EXPECT_EQ(ResidentPages(p, bytes), 0u);
  // An unaligned range inside pages 3..9 populates exactly those pages.
  if (!PopulatePages(p + 3 * page + 100, 6 * page)) {
    ::munmap(m, bytes);
    GTEST_SKIP() << "madvise(MADV_POPULATE_WRITE) is not supported by this kernel";
  }
  EXPECT_EQ(ResidentPages(p, bytes), 7u);
  EXPECT_EQ(ResidentPages(p + 3 * page, 7 * page), 7u);
  for (size_t i = 0; i < bytes; ++i) ASSERT_EQ(p[i], 0) << i;  // fresh pages stay zero
  ::munmap(m, bytes);
}

TEST(Memory, PopulatePagesKeepsWhatThePagesHold) {
  std::vector<uint32_t> v(1 << 16);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint32_t>(i * 2654435761u);
  PopulatePages(v.data() + 5, (v.size() - 10) * sizeof(uint32_t));  // supported or not: no change
  PopulatePages(v.data(), 0);
  for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], static_cast<uint32_t>(i * 2654435761u)) << i;
}

TEST(Memory, HugePageBufferIsAlignedZeroAndResidentOnlyWhereTouched) {
  const size_t huge = size_t{2} << 20, bytes = 3 * huge + 12345;
  HugePageBuffer b(bytes);
  ASSERT_NE(b.data(), nullptr);
  EXPECT_EQ(b.size(), bytes);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % huge, 0u);
  EXPECT_EQ(ResidentPages(b.data(), bytes), 0u);  // nothing touched, nothing resident
  b.data()[bytes - 1] = 7;                        // the last byte: in the tail's small pages
  EXPECT_EQ(ResidentPages(b.data(), bytes), 1u);
  EXPECT_EQ(ResidentPages(b.data(), 3 * huge), 0u);
  b.data()[huge + 5] = 1;  // inside a whole 2 MiB run: at most that run
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  EXPECT_GE(ResidentPages(b.data() + huge, huge), 1u);
  EXPECT_LE(ResidentPages(b.data(), bytes), 1 + huge / page);
  EXPECT_EQ(ResidentPages(b.data(), huge), 0u);
  b.data()[huge + 5] = 0;
  for (size_t i = 0; i + 1 < bytes; i += 4093) ASSERT_EQ(b.data()[i], 0) << i;
  // Moving hands the mapping over: the moved-from buffer is empty, the data is the same.
  uint8_t* at = b.data();
  HugePageBuffer c(std::move(b));
  EXPECT_EQ(b.data(), nullptr);
  EXPECT_EQ(b.size(), 0u);
  EXPECT_EQ(c.data(), at);
  EXPECT_EQ(c.data()[bytes - 1], 7);
  HugePageBuffer d(huge);
  d = std::move(c);  // d's own mapping is unmapped, c's taken
  EXPECT_EQ(d.data(), at);
  EXPECT_EQ(c.data(), nullptr);
}

}  // namespace
}  // namespace moe
