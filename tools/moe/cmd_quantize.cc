// moe quantize: rewrite a model in another weight type or one of llama.cpp's named mixes
// (model/quantize.h), one tensor in memory at a time, with a line per tensor.

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "model/quantize.h"
#include "util/error.h"

namespace moe::cli {

Runner AddQuantize(CLI::App& app) {
  struct Options {
    std::string in, out, type;
    std::vector<std::string> tensor_types;
    bool pure = false, quiet = false;
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  app.add_option("input", o->in, "GGUF model to read (any weight types moe.cpp reads)")->required();
  app.add_option("output", o->out, "GGUF file to write")->required();
  app.add_option("--type", o->type,
                 "a llama.cpp mix (" + QuantMixNames() +
                     "; Q4_K, Q3_K, Q5_K mean the _M mixes) or one of its weight types: each "
                     "tensor's type chosen by llama.cpp's rules")
      ->required();
  app.add_flag("--pure", o->pure, "every matrix in the --type's base type (no bumps, no output/embedding rule)");
  app.add_option("--tensor-type", o->tensor_types,
                 "PATTERN=TYPE (repeatable): tensors whose name contains a match of the regular expression "
                 "get TYPE instead of the mix's choice (llama-quantize's --tensor-type)");
  app.add_option("--threads", o->threads, "quantization threads (0 = every CPU)")->default_val(0);
  app.add_flag("-q,--quiet", o->quiet, "no line per tensor");
  return [=]() {
    QuantizeOptions q;
    q.mix = o->type;
    q.pure = o->pure;
    q.threads = o->threads;
    for (const std::string& tt : o->tensor_types) {
      const size_t eq = tt.rfind('=');
      DType t;
      if (eq == std::string::npos || eq == 0 || !ParseDType(tt.substr(eq + 1).c_str(), &t))
        Fail("--tensor-type '%s': use PATTERN=TYPE with a weight type (%s)", tt.c_str(), WeightTypeNames().c_str());
      q.overrides.emplace_back(tt.substr(0, eq), t);
    }
    if (!o->quiet) {
      q.progress = [](const std::string& line) {
        std::fprintf(stderr, "%s\n", line.c_str());
        std::fflush(stderr);
      };
    }
    const QuantizeSummary s = QuantizeModel(o->in, o->out, q);
    int n_changed = 0;
    for (const TensorPlan& p : s.plan) n_changed += p.quantized;
    std::fprintf(stderr,
                 "%s -> %s (%s%s): %.2f MiB -> %.2f MiB, %.2f bits per weight, %d of %zu tensors converted\n",
                 o->in.c_str(), o->out.c_str(), FindQuantMix(o->type)->name, o->pure ? ", pure" : "",
                 s.bytes_in / 1048576.0, s.bytes_out / 1048576.0,
                 s.params ? 8.0 * static_cast<double>(s.bytes_out) / static_cast<double>(s.params) : 0.0,
                 n_changed, s.plan.size());
    return 0;
  };
}

}  // namespace moe::cli
