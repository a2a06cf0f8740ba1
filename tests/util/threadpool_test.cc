#include "util/threadpool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <vector>

namespace moe {
namespace {

TEST(ThreadPool, RunVisitsEveryThreadOnce) {
  for (int n : {1, 2, 3, 5}) {
    ThreadPool pool(n);
    std::vector<std::atomic<int>> hits(n);
    for (int rep = 0; rep < 200; ++rep) {
      pool.Run([&](int t, int nt) {
        ASSERT_EQ(nt, n);
        hits[t].fetch_add(1);
      });
    }
    for (int t = 0; t < n; ++t) EXPECT_EQ(hits[t].load(), 200) << "thread " << t;
  }
}

TEST(ThreadPool, ParallelForCoversEachIndexExactlyOnce) {
  ThreadPool pool(2);
  for (int64_t n : {0, 1, 7, 64, 1000, 4097}) {
    for (int64_t grain : {1, 3, 64}) {
      std::vector<std::atomic<int>> seen(n);
      pool.ParallelFor(n, grain, [&](int64_t b, int64_t e, int) {
        ASSERT_LE(e - b, grain);
        for (int64_t i = b; i < e; ++i) seen[i].fetch_add(1);
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i].load(), 1) << n << " " << grain << " " << i;
    }
  }
}

TEST(ThreadPool, ParallelRangeSumsMatchSerial) {
  ThreadPool pool(3);
  std::vector<double> v(100003);
  std::iota(v.begin(), v.end(), 1.0);
  std::vector<double> partial(3, 0.0);
  pool.ParallelRange(static_cast<int64_t>(v.size()), [&](int64_t b, int64_t e, int t) {
    for (int64_t i = b; i < e; ++i) partial[t] += v[i];
  });
  const double n = static_cast<double>(v.size());
  EXPECT_EQ(partial[0] + partial[1] + partial[2], n * (n + 1) / 2);
}

}  // namespace
}  // namespace moe
