// moe bench-train: training speed of a model file on random token ids (uniform over the
// vocabulary, fresh every step: never one repeated token), the trainer's own step (StepEngine:
// forward, backward, AdamW), and the share of the machine's fp32 matrix throughput it reaches
// (model FLOPs per second / the own GEMM's peak, measured in the same command on every thread).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "kernels/gemm.h"
#include "model/params.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe::cli {

namespace {

using Clock = std::chrono::steady_clock;

// Model FLOPs of one token, forward + backward (3 x forward): every matrix product of the
// model (attention projections, router, the k routed experts, shared experts, head) and the
// causal attention itself at the average context (seq + 1) / 2.
double ModelFlopsPerToken(const ModelConfig& c, int seq) {
  const double D = c.n_embd, nq = c.n_q(), nk = c.n_k(), nv = c.n_v(), R = c.n_router();
  double per_layer = 2 * D * (nq + nk + nv) + 2 * nq * D;      // q, k, v, o
  per_layer += 2 * D * R;                                        // router
  per_layer += c.n_expert_used * 3 * 2 * D * c.n_ff_exp;         // routed experts (top-k)
  per_layer += 3 * 2 * D * c.n_ff_shexp;                         // shared experts
  per_layer += 2 * 2 * nq * (seq + 1) / 2.0;                     // scores and weighted values
  const double forward = c.n_layer * per_layer + 2 * D * c.n_vocab;
  return 3 * forward;
}

// Peak fp32 GEMM throughput of the own kernel with every thread busy (GFLOP/s).
double GemmPeakGflops(ThreadPool& pool) {
  const int n = 512;
  std::vector<std::vector<float>> a(pool.size()), b(pool.size()), c(pool.size());
  for (int t = 0; t < pool.size(); ++t) {
    a[t].assign(static_cast<size_t>(n) * n, 0.5f);
    b[t].assign(static_cast<size_t>(n) * n, 0.25f);
    c[t].assign(static_cast<size_t>(n) * n, 0.0f);
  }
  double best = 0;  // the best of 10 rounds: a busy moment on a shared VM only lowers a round
  for (int rep = 0; rep < 10; ++rep) {
    const int iters = 6;
    const auto t0 = Clock::now();
    pool.Run([&](int t, int) {
      for (int i = 0; i < iters; ++i)
        kernels::Gemm(kernels::GemmOp::kNN, n, n, n, a[t].data(), n, b[t].data(), n, c[t].data(), n, false);
    });
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n * iters * pool.size() / s / 1e9);
  }
  return best;
}

}  // namespace

Runner AddBenchTrain(CLI::App& app) {
  struct Options {
    std::string model;
    int batch = 8, seq = 256, steps = 10, warmup = 2, threads = 0;
    uint64_t seed = 1;
    bool json = false;
  };
  auto o = std::make_shared<Options>();
  app.add_option("-m,--model", o->model, "model file to train from (moe init)")->required();
  app.add_option("--batch", o->batch, "sequences per step")->default_val(8);
  app.add_option("--seq", o->seq, "tokens per sequence")->default_val(256);
  app.add_option("--steps", o->steps, "timed steps")->default_val(10);
  app.add_option("--warmup", o->warmup, "untimed steps first")->default_val(2);
  app.add_option("-t,--threads", o->threads, "threads (default: all CPUs)")->default_val(0);
  app.add_option("--seed", o->seed, "seed of the random tokens")->default_val(1);
  app.add_flag("--json", o->json, "print one JSON object");
  return [=]() {
    if (o->batch < 1 || o->seq < 1 || o->steps < 1 || o->warmup < 0)
      Fail("--batch, --seq and --steps must be >= 1, --warmup >= 0");
    CheckThreadCount(o->threads);
    ModelParams<float> p = LoadParams<float>(o->model, /*allow_training_only=*/true);
    if (static_cast<uint32_t>(o->seq) > p.config.n_ctx_train)
      Fail("--seq %d is longer than the model's context of %u tokens", o->seq, p.config.n_ctx_train);
    ThreadPool pool(o->threads);
    MoeLayerConfig train;  // the trainer's defaults
    train.aux_loss_coef = 0.01;
    train.z_loss_coef = 0.001;
    AdamWConfig adam;
    adam.total_steps = o->warmup + o->steps;
    StepEngine engine(&p, train, adam, 1, &pool);
    std::mt19937_64 rng(o->seed);
    std::vector<int32_t> tokens(static_cast<size_t>(o->batch) * (o->seq + 1));
    std::vector<double> ms;
    for (int s = 0; s < o->warmup + o->steps; ++s) {
      for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % p.config.n_vocab);
      const auto t0 = Clock::now();
      engine.Step(s, {tokens.data()}, {nullptr}, o->batch, o->seq, o->seed);
      if (s >= o->warmup) ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    const double step_ms = Median(ms);
    const double tokens_per_s = o->batch * o->seq / (step_ms / 1e3);
    const double flops = ModelFlopsPerToken(p.config, o->seq);
    const double peak = GemmPeakGflops(pool);
    nlohmann::json j = {{"tokens_per_s", tokens_per_s}, {"step_ms", step_ms},
                        {"model_gflop_per_token", flops / 1e9}, {"model_gflops", flops * tokens_per_s / 1e9},
                        {"gemm_peak_gflops", peak}, {"mfu", flops * tokens_per_s / 1e9 / peak},
                        {"threads", pool.size()}, {"batch", o->batch}, {"seq", o->seq}};
    if (o->json) {
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("training: %.0f tokens/s (median step %.1f ms, batch %d x seq %d, %d threads)\n"
                  "model: %.3f GFLOP per token (forward + backward) -> %.1f GFLOP/s, %.0f%% of the GEMM's %.1f GFLOP/s peak\n",
                  tokens_per_s, step_ms, o->batch, o->seq, pool.size(), flops / 1e9, flops * tokens_per_s / 1e9,
                  100 * flops * tokens_per_s / 1e9 / peak, peak);
    }
    return 0;
  };
}

}  // namespace moe::cli
