// Sparse upcycling (Komatsuzaki et al. 2023): a dense model becomes an MoE model whose experts
// are copies of the dense FFN and whose router is new; with Drop-Upcycling (Nakamura et al.
// 2025) a fraction r of each expert's intermediate neurons (rows of W_gate and W_up, columns of
// W_down) is re-initialised from a normal with the mean and standard deviation of the dense
// matrix, a different random subset per expert, so the experts can diverge.
//
// Dense inputs: general.architecture llama (-> llama, Mixtral-style) or qwen3 (-> qwen3moe).
// Without drop, every expert equals the dense FFN and the renormalised top-k weights sum to 1,
// so the upcycled model computes the dense model's function exactly (up to rounding).
#pragma once

#include <cstdint>
#include <string>

#include "model/params.h"

namespace moe {

struct UpcycleOptions {
  int n_expert = 8;
  int n_expert_used = 2;
  double drop_ratio = 0.0;        // Drop-Upcycling's r, in [0, 1]
  double router_std = 0.02;       // the new router's weights ~ N(0, router_std)
  MoeRouterKind router = MoeRouterKind::kSoftmaxTopK;
  uint64_t seed = 0;
};

// Reads a dense GGUF model and returns the upcycled MoE parameter store (its source keeps the
// dense file's tokenizer). Throws moe::Error naming what is wrong with the file or the options.
ModelParams<float> Upcycle(const std::string& dense_path, const UpcycleOptions& opt);

}  // namespace moe
