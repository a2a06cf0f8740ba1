// moe bench-machine: this machine's ceilings (kernels/ceilings.h), measured on the pinned
// thread pool the engine runs on, so that benchmarks can state their floors in the same run:
// memory read bandwidth with one thread and with every thread (the decode floor is the bytes a
// token reads over it), and the fp32 FMA and int8 multiply-add rates (prefill's bounds).
// Each figure is the best of several rounds: a busy moment on a shared VM only lowers a round.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "kernels/ceilings.h"
#include "kernels/kernels.h"
#include "util/error.h"
#include "util/memory.h"
#include "util/threadpool.h"

namespace moe::cli {

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// GB/s reading all of buf with the first `users` threads of the pool, each its own slice.
double ReadBandwidth(ThreadPool& pool, const uint8_t* buf, size_t bytes, int users, int rounds) {
  const size_t slice = bytes / static_cast<size_t>(users) / 256 * 256;
  std::vector<uint64_t> sums(static_cast<size_t>(pool.size()));
  double best = 0;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = Clock::now();
    pool.Run([&](int t, int) {
      if (t < users) sums[static_cast<size_t>(t)] = kernels::ReadStream(buf + slice * static_cast<size_t>(t), slice);
    });
    best = std::max(best, static_cast<double>(slice) * users / Since(t0) / 1e9);
  }
  uint64_t all = 0;  // (keeps the checksums alive)
  for (uint64_t s : sums) all ^= s;
  volatile uint64_t sink = all;
  (void)sink;
  return best;
}

// G operations per second of probe(iters) on the first `users` threads together.
double ProbeRate(ThreadPool& pool, double (*probe)(int64_t), int users, int rounds) {
  int64_t iters = 1 << 16;  // grown until one call takes about 50 ms
  for (auto t0 = Clock::now(); probe(iters) > 0 && Since(t0) < 0.05; t0 = Clock::now()) iters *= 2;
  double best = 0;
  for (int r = 0; r < rounds; ++r) {
    std::vector<double> ops(static_cast<size_t>(pool.size()), 0.0);
    const auto t0 = Clock::now();
    pool.Run([&](int t, int) {
      if (t < users) ops[static_cast<size_t>(t)] = probe(iters);
    });
    const double s = Since(t0);
    double total = 0;
    for (double o : ops) total += o;
    best = std::max(best, total / s / 1e9);
  }
  return best;
}

}  // namespace

Runner AddBenchMachine(CLI::App& app) {
  struct Options {
    int threads = 0, mib = 1024, rounds = 8;
    bool json = false, read_only = false;
  };
  auto o = std::make_shared<Options>();
  app.add_option("-t,--threads", o->threads, "threads (default: all CPUs)")->default_val(0);
  app.add_option("--mib", o->mib, "MiB of memory streamed per bandwidth round (beyond the caches)")->default_val(1024);
  app.add_option("-r,--rounds", o->rounds, "rounds per figure; the best is reported")->default_val(8);
  app.add_flag("--json", o->json, "print one JSON object");
  app.add_flag("--read-only", o->read_only,
               "only the read bandwidth (a short probe next to a decode measurement: bench/compare.py)");
  return [=]() {
    const int cpus = AvailableCpus();
    if (o->threads < 0 || o->threads > cpus) Fail("--threads must be between 0 and %d (the CPUs this process may use)", cpus);
    if (o->mib < 16 || o->mib > 65536) Fail("--mib must be between 16 and 65536");
    if (o->rounds < 1 || o->rounds > 1000) Fail("--rounds must be between 1 and 1000");
    ThreadPool pool(o->threads);
    const int n = pool.size();
    const size_t bytes = static_cast<size_t>(o->mib) << 20;
    // In huge pages where the kernel gives them, as the engine's repacked weights and KV caches
    // are (util/memory.h): in 4 KiB pages one thread read 22-23 GB/s where it read 28-30 in huge
    // pages (session 19, Zen 4 host), and decode then read faster than the probe said memory could.
    HugePageBuffer buf(bytes);
    // First touch by the threads that read each slice (their NUMA node's pages).
    pool.ParallelRange(static_cast<int64_t>(bytes), [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) buf.data()[i] = static_cast<uint8_t>(i * 131);
    });
    nlohmann::json j;
    j["threads"] = n;
    j["target"] = kernels::ActiveTarget();
    j["buffer_mib"] = o->mib;
    j["read_gbs_1t"] = ReadBandwidth(pool, buf.data(), bytes, 1, o->rounds);
    j["read_gbs"] = ReadBandwidth(pool, buf.data(), bytes, n, o->rounds);
    if (o->read_only) {
      if (o->json) {
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("target %s, %d threads\nmemory read: %.1f GB/s (1 thread), %.1f GB/s (%d threads)\n",
                    kernels::ActiveTarget(), n, j["read_gbs_1t"].get<double>(), j["read_gbs"].get<double>(), n);
      }
      return 0;
    }
    j["fp32_gflops_1t"] = ProbeRate(pool, kernels::FmaProbe, 1, o->rounds);
    j["fp32_gflops"] = ProbeRate(pool, kernels::FmaProbe, n, o->rounds);
    j["int8_gops_1t"] = ProbeRate(pool, kernels::Int8Probe, 1, o->rounds);
    j["int8_gops"] = ProbeRate(pool, kernels::Int8Probe, n, o->rounds);
    if (o->json) {
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("target %s, %d threads\n"
                  "memory read: %.1f GB/s (1 thread), %.1f GB/s (%d threads)\n"
                  "fp32 FMA:    %.1f GFLOP/s (1 thread), %.1f GFLOP/s (%d threads)\n"
                  "int8 madd:   %.1f GOP/s (1 thread), %.1f GOP/s (%d threads)\n",
                  kernels::ActiveTarget(), n, j["read_gbs_1t"].get<double>(), j["read_gbs"].get<double>(), n,
                  j["fp32_gflops_1t"].get<double>(), j["fp32_gflops"].get<double>(), n,
                  j["int8_gops_1t"].get<double>(), j["int8_gops"].get<double>(), n);
    }
    return 0;
  };
}

}  // namespace moe::cli
