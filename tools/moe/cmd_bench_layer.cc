// moe bench-layer: times one MoE layer (router + grouped SwiGLU experts), forward and
// forward+backward, on fresh random inputs every repeat; medians are reported.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "moe/moe_layer.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe::cli {

namespace {

void Fill(std::vector<float>& v, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, scale);
  for (float& x : v) x = nd(rng);
}

}  // namespace

Runner AddBenchLayer(CLI::App& app) {
  struct Options {
    std::string router = "softmax_topk";
    int tokens = 4096, dim = 512, ffn = 1024, experts = 8, k = 2, threads = 0, repeats = 5;
    double capacity_factor = 0.0, top_p = 0.4;
    uint64_t seed = 1;
    bool json = false;
  };
  auto o = std::make_shared<Options>();
  app.add_option("--router", o->router, std::string("router: ") + MoeRouterNames())->default_val("softmax_topk");
  app.add_option("--tokens", o->tokens, "tokens in the batch")->default_val(4096);
  app.add_option("--dim", o->dim, "model width")->default_val(512);
  app.add_option("--ffn", o->ffn, "expert width")->default_val(1024);
  app.add_option("--experts", o->experts, "routed experts")->default_val(8);
  app.add_option("--experts-used", o->k, "experts per token (k)")->default_val(2);
  app.add_option("--capacity-factor", o->capacity_factor, "0 = dropless")->default_val(0.0);
  app.add_option("--top-p", o->top_p, "top_p router: cumulative probability (--experts-used is k_max)")->default_val(0.4);
  app.add_option("-t,--threads", o->threads, "threads (default: all CPUs)")->default_val(0);
  app.add_option("-r,--repeats", o->repeats, "timed repeats (median reported)")->default_val(5);
  app.add_option("--seed", o->seed, "seed of the weights and inputs")->default_val(1);
  app.add_flag("--json", o->json, "print one JSON object");
  return [=]() {
    MoeLayerConfig cfg;
    if (!ParseMoeRouterKind(o->router, &cfg.router)) {
      Fail("--router '%s' is unknown (use one of %s)", o->router.c_str(), MoeRouterNames());
    }
    // Renormalised top-k for the token-choice routers with a learned top-k (Mixtral, DeepSeek-V3).
    cfg.norm_topk = cfg.router == MoeRouterKind::kSoftmaxTopK || cfg.router == MoeRouterKind::kSigmoidBias;
    cfg.top_p = o->top_p;
    if (o->tokens < 1 || o->repeats < 1) Fail("--tokens and --repeats must be >= 1");
    cfg.d_model = o->dim;
    cfg.d_ff = o->ffn;
    cfg.n_expert = o->experts;
    cfg.k = cfg.router == MoeRouterKind::kExpertChoice ? o->experts : o->k;  // one slot per expert
    cfg.capacity_factor = o->capacity_factor;
    ValidateMoeConfig(cfg);
    CheckThreadCount(o->threads);
    ThreadPool pool(o->threads);
    std::mt19937_64 rng(o->seed);
    MoeWeights<float> w;
    w.Resize(cfg);
    Fill(w.router, 1.0f / std::sqrt(static_cast<float>(o->dim)), rng);
    Fill(w.gate_exps, 1.0f / std::sqrt(static_cast<float>(o->dim)), rng);
    Fill(w.up_exps, 1.0f / std::sqrt(static_cast<float>(o->dim)), rng);
    Fill(w.down_exps, 1.0f / std::sqrt(static_cast<float>(o->ffn)), rng);
    MoeGrads<float> g;
    g.Resize(cfg);
    const size_t n = static_cast<size_t>(o->tokens) * o->dim;
    std::vector<float> x(n), dy(n), y(n), dx(n);
    std::vector<int32_t> token_ids(o->tokens);  // for the hash router
    std::uniform_int_distribution<int32_t> vocab(0, 31999);
    MoeCache<float> cache;
    MoeForwardOptions fo;
    fo.pool = &pool;
    using Clock = std::chrono::steady_clock;
    auto ms = [](Clock::time_point a, Clock::time_point b) {
      return std::chrono::duration<double, std::milli>(b - a).count();
    };
    std::vector<double> fwd, fwd_bwd;
    MoeTelemetry tel;
    for (int r = -1; r < o->repeats; ++r) {  // r = -1: untimed warm-up
      Fill(x, 1.0f, rng);  // fresh inputs: routing differs every repeat
      Fill(dy, 1.0f, rng);
      for (int32_t& v : token_ids) v = vocab(rng);
      fo.token_ids = token_ids.data();
      g.Zero();
      const auto t0 = Clock::now();
      MoeForward(cfg, w, x.data(), o->tokens, y.data(), &cache, fo);
      const auto t1 = Clock::now();
      MoeBackward(cfg, w, cache, dy.data(), dx.data(), &g, &pool);
      const auto t2 = Clock::now();
      if (r == o->repeats - 1) tel = ComputeTelemetry(cfg, cache);
      if (r >= 0) {
        fwd.push_back(ms(t0, t1));
        fwd_bwd.push_back(ms(t0, t2));
      }
    }
    nlohmann::json j = {{"router", o->router}, {"tokens", o->tokens}, {"dim", o->dim},
                        {"ffn", o->ffn}, {"experts", o->experts}, {"experts_used", o->k},
                        {"threads", pool.size()}, {"forward_ms", Median(fwd)},
                        {"forward_backward_ms", Median(fwd_bwd)},
                        {"telemetry", nlohmann::json::parse(MoeTelemetryToJson(tel))}};
    if (o->json) {
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("forward %.2f ms, forward+backward %.2f ms (median of %d, %d threads)\n",
                  Median(fwd), Median(fwd_bwd), o->repeats, pool.size());
    }
    return 0;
  };
}

}  // namespace moe::cli
