#include "util/threadpool.h"

#include <unistd.h>

#include "util/error.h"

#include <pthread.h>
#include <sched.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define MOE_CPU_RELAX() asm volatile("yield")
#else
#define MOE_CPU_RELAX() ((void)0)
#endif

namespace moe {

namespace {

std::vector<int> AffinityCpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  if (cpus.empty()) cpus.push_back(0);
  return cpus;
}

void PinCurrentThread(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

// Spin iterations before a worker sleeps: long enough to bridge the gap between the kernels of
// one decode step (microseconds), short enough not to burn a core while idle.
constexpr int kSpinIterations = 1 << 16;

}  // namespace

int AvailableCpus() { return static_cast<int>(AffinityCpus().size()); }

uint64_t PhysicalMemoryBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
}

void CheckThreadCount(int n, const char* flag) {
  const int most = 4 * AvailableCpus() + 64;
  if (n < 0 || n > most) Fail("%s %d: use 1..%d, or 0 for every CPU", flag, n, most);
}

struct ThreadPool::Affinity {
  pthread_t thread;
  cpu_set_t cpus;
};

ThreadPool::ThreadPool(int n_threads, bool pin) {
  std::vector<int> cpus = AffinityCpus();
  if (n_threads <= 0) n_threads = static_cast<int>(cpus.size());
  n_threads_ = n_threads;
  ranges_ = std::make_unique<Range[]>(static_cast<size_t>(n_threads));
  const char* no_pin = std::getenv("MOE_NO_PIN");
  if (no_pin && std::strcmp(no_pin, "0") != 0) pin = false;
  // Pin only when every thread gets a CPU of its own; oversubscribed pools float.
  pin = pin && n_threads <= static_cast<int>(cpus.size()) && n_threads > 1;
  if (pin) {
    auto saved = std::make_unique<Affinity>();
    saved->thread = pthread_self();
    if (pthread_getaffinity_np(saved->thread, sizeof(saved->cpus), &saved->cpus) == 0) owner_affinity_ = std::move(saved);
    PinCurrentThread(cpus[0]);
  }
  for (int i = 1; i < n_threads; ++i) {
    workers_.emplace_back([this, i] { WorkerLoop(i); });
    if (pin) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpus[i], &set);
      pthread_setaffinity_np(workers_.back().native_handle(), sizeof(set), &set);
    }
  }
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  for (auto& t : workers_) t.join();
  if (owner_affinity_ && pthread_equal(owner_affinity_->thread, pthread_self()))
    pthread_setaffinity_np(owner_affinity_->thread, sizeof(owner_affinity_->cpus), &owner_affinity_->cpus);
}

void ThreadPool::WorkerLoop(int index) {
  uint32_t seen = 0;
  for (;;) {
    uint32_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < kSpinIterations; ++spin) {
      MOE_CPU_RELAX();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      generation_.wait(seen, std::memory_order_acquire);
      continue;
    }
    seen = gen;
    if (stop_.load(std::memory_order_acquire)) return;
    (*job_)(index, n_threads_);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::Run(const std::function<void(int, int)>& fn) {
  if (n_threads_ == 1) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  pending_.store(n_threads_ - 1, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  fn(0, n_threads_);
  while (pending_.load(std::memory_order_acquire) != 0) MOE_CPU_RELAX();
}

namespace {

// A thread's run of chunks [front, back) in one word, so its owner (taking from the front) and a
// thief (taking from the back) claim chunks with one compare-and-swap each and never both get
// the same one.
bool ClaimChunk(std::atomic<uint64_t>& range, bool from_back, int64_t* chunk) {
  uint64_t cur = range.load(std::memory_order_relaxed);
  for (;;) {
    const uint32_t front = static_cast<uint32_t>(cur), back = static_cast<uint32_t>(cur >> 32);
    if (front >= back) return false;
    const uint64_t next = from_back ? (static_cast<uint64_t>(back - 1) << 32) | front
                                    : (static_cast<uint64_t>(back) << 32) | (front + 1);
    if (range.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
      *chunk = from_back ? back - 1 : front;
      return true;
    }
  }
}

}  // namespace

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (n_threads_ == 1 || n <= grain) {
    fn(0, n, 0);
    return;
  }
  const int64_t chunks = (n + grain - 1) / grain;
  if (chunks > UINT32_MAX) Fail("ParallelFor: %lld chunks are too many", static_cast<long long>(chunks));
  for (int t = 0; t < n_threads_; ++t) {
    const uint64_t b = static_cast<uint64_t>(chunks * t / n_threads_), e = static_cast<uint64_t>(chunks * (t + 1) / n_threads_);
    ranges_[t].v.store((e << 32) | b, std::memory_order_relaxed);
  }
  Run([&](int thread, int nt) {
    const auto run = [&](int64_t c) {
      const int64_t b = c * grain;
      fn(b, b + grain < n ? b + grain : n, thread);
    };
    int64_t c;
    while (ClaimChunk(ranges_[thread].v, false, &c)) run(c);
    for (int k = 1; k < nt; ++k)  // then the others' last chunks
      while (ClaimChunk(ranges_[(thread + k) % nt].v, true, &c)) run(c);
  });
}

void ThreadPool::ParallelRange(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  Run([&](int thread, int nt) {
    int64_t b = n * thread / nt, e = n * (thread + 1) / nt;
    if (b < e) fn(b, e, thread);
  });
}

}  // namespace moe
