#include "util/threadpool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <thread>
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

// A pinned pool pins its creating thread to one CPU while it lives; afterwards that thread has
// its CPUs back, so a second pool pins its threads to distinct CPUs again (before the fix, a
// second pool's workers inherited the one CPU and every Run waited on the scheduler).
TEST(ThreadPool, GivesTheCreatingThreadItsCpusBack) {
  const int cpus = AvailableCpus();
  const char* no_pin = std::getenv("MOE_NO_PIN");
  if (cpus < 2 || (no_pin && std::strcmp(no_pin, "0") != 0)) GTEST_SKIP() << "pools do not pin here";
  {
    ThreadPool pool(2);
    EXPECT_EQ(AvailableCpus(), 1);  // pinned while the pool lives
  }
  EXPECT_EQ(AvailableCpus(), cpus);
  {
    ThreadPool pool(2);
    EXPECT_EQ(AvailableCpus(), 1);
  }
  EXPECT_EQ(AvailableCpus(), cpus);
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

// Each thread starts on its own contiguous run, in order; when one thread stalls, the others
// take its remaining chunks from the back, and still every chunk runs once. Thread 0 stalls on
// its first chunk until every other chunk has run, so the others must take all the rest of its
// run (whatever the scheduler does with threads that outnumber the CPUs).
TEST(ThreadPool, ParallelForRunsOwnChunksInOrderAndStealsFromStalledThreads) {
  for (int n_threads : {2, 3}) {
    ThreadPool pool(n_threads);
    const int64_t n = 60;
    std::vector<std::atomic<int>> seen(n);
    std::atomic<int64_t> done{0};
    std::vector<std::vector<int64_t>> order(n_threads);
    pool.ParallelFor(n, 1, [&](int64_t b, int64_t, int t) {
      if (t == 0 && order[0].empty()) {  // thread 0 stalls on its first chunk
        while (done.load() < n - 1) std::this_thread::yield();
      }
      order[t].push_back(b);
      seen[b].fetch_add(1);
      done.fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i].load(), 1) << i;
    // Thread 0 ran its first chunk, 0, and nothing else; thread 1 ran its own run in order
    // first, then stole (thread 0's chunks, from the back; or the last thread's).
    EXPECT_EQ(order[0], std::vector<int64_t>{0}) << "the stalled thread's chunks were not taken";
    const int64_t own_b = n / n_threads, own_e = 2 * n / n_threads;
    ASSERT_GE(static_cast<int64_t>(order[1].size()), own_e - own_b);
    for (int64_t k = 0; k < own_e - own_b; ++k) EXPECT_EQ(order[1][k], own_b + k);
    if (n_threads == 2) {  // thread 1 alone took the rest of thread 0's run from the back: 29 down to 1
      std::vector<int64_t> stolen(order[1].begin() + (own_e - own_b), order[1].end()), want;
      for (int64_t b = own_b - 1; b >= 1; --b) want.push_back(b);
      EXPECT_EQ(stolen, want);
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
