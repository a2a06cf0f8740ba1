// moe upcycle: a dense model (llama or qwen3) becomes an MoE model (llama with experts, qwen3moe)
// to train further: sparse upcycling, optionally Drop-Upcycling (train/upcycle.h).
#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "train/upcycle.h"
#include "util/error.h"

namespace moe::cli {

Runner AddUpcycle(CLI::App& app) {
  struct Options {
    std::string from, out, router = "softmax_topk";
    UpcycleOptions u;
  };
  auto o = std::make_shared<Options>();
  app.add_option("--from", o->from, "dense GGUF model (general.architecture llama or qwen3)")->required();
  app.add_option("--experts", o->u.n_expert, "experts per layer, each a copy of the dense FFN")->required();
  app.add_option("--experts-used", o->u.n_expert_used, "experts per token (k)")->required();
  app.add_option("--drop-upcycling", o->u.drop_ratio,
                 "Drop-Upcycling: share of each expert's FFN neurons re-initialised (0 = plain upcycling)")
      ->default_val(0.0);
  app.add_option("--router", o->router, std::string("router: ") + MoeRouterNames())->default_val("softmax_topk");
  app.add_option("--router-std", o->u.router_std, "the new router's weights ~ N(0, std)")->default_val(0.02);
  app.add_option("--seed", o->u.seed, "seed of the router and the re-initialised neurons")->default_val(0);
  app.add_option("-o,--output", o->out, "output GGUF file (F32)")->required();
  return [=]() {
    UpcycleOptions u = o->u;
    if (!ParseMoeRouterKind(o->router, &u.router))
      Fail("--router '%s' is not a router (use one of: %s)", o->router.c_str(), MoeRouterNames());
    const ModelParams<float> p = Upcycle(o->from, u);
    SaveParams(p, o->out);
    std::fprintf(stderr, "upcycled %s: %u layers, %u experts top-%u, %s%s; wrote %s\n", o->from.c_str(),
                 p.config.n_layer, p.config.n_expert, p.config.n_expert_used, p.config.arch_name.c_str(),
                 u.drop_ratio > 0 ? StrFormat(", %.0f%% of each expert re-initialised", 100 * u.drop_ratio).c_str() : "",
                 o->out.c_str());
    return 0;
  };
}

}  // namespace moe::cli
