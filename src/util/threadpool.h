// A persistent pool of pinned worker threads (the caller is thread 0 and works too).
// On the 2-vCPU VMs we run on, threads created per step, or left unpinned, run about 2x slower
// (measured: see bench/RESULTS.md), so workers are created once, pinned to distinct CPUs of the
// process's affinity mask, and spin briefly between jobs before sleeping on a futex.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace moe {

class ThreadPool {
 public:
  // n_threads >= 1 (0 = number of CPUs in the affinity mask). pin=false leaves threads to the OS
  // scheduler (the environment variable MOE_NO_PIN=1 does the same). Pinning pins the calling
  // thread (thread 0) too, and threads it creates afterwards inherit that CPU; the destructor,
  // called on the same thread, gives it back the CPUs it had (so a later pool sees them all).
  explicit ThreadPool(int n_threads = 0, bool pin = true);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(thread_index, n_threads) once on every thread, the caller included; returns when all
  // are done. Not re-entrant.
  void Run(const std::function<void(int, int)>& fn);

  // Calls fn(b, e, thread) over [0, n) in chunks of `grain` indices. Each thread owns an even,
  // contiguous run of chunks and works through it in order (so a thread streams through
  // consecutive memory, as a static split does); a thread that finishes its run takes chunks from
  // the end of the others' (so one slow thread does not hold everyone at the barrier).
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn);

  // Static even split of [0, n) over the threads: fn(begin, end, thread).
  void ParallelRange(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn);

 private:
  void WorkerLoop(int index);

  int n_threads_ = 1;
  std::vector<std::thread> workers_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  struct alignas(64) Range {  // ParallelFor: a thread's chunks, front in the low half, back in the high
    std::atomic<uint64_t> v{0};
  };
  std::unique_ptr<Range[]> ranges_;
  struct Affinity;  // the creating thread's CPUs before it was pinned
  std::unique_ptr<Affinity> owner_affinity_;
};

// Number of CPUs this process may run on.
int AvailableCpus();

// Bytes of physical memory of this machine (sysconf), 0 when unknown: the bound for buffers a
// command would otherwise try to allocate from a user's number (a KV cache, a model to write).
uint64_t PhysicalMemoryBytes();

// A --threads value checked once for every command: 0 (every CPU) or 1 .. 4 x the CPUs + 64
// (oversubscription is allowed, a hundred thousand threads are not). Throws moe::Error naming
// the flag.
void CheckThreadCount(int n, const char* flag = "--threads");

}  // namespace moe
