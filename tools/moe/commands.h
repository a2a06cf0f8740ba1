// The `moe` CLI: each sub-command registers its flags (declared once, with defaults and help
// text) and returns a runner. Runners throw moe::Error for user errors.
#pragma once

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace moe::cli {

using Runner = std::function<int()>;

// Median of timing samples (benchmarks report medians over repeats).
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// --cache-type of run, bench and serve: the KV cache's elements, f16 by default as in
// llama.cpp (llama-cli, llama-server), so that both engines run with their defaults compute the
// same model; f32 is the exact reference the library's own default (Forward, EngineConfig) uses.
inline void AddCacheTypeOption(CLI::App& app, std::string& cache_type) {
  app.add_option("--cache-type", cache_type,
                 "KV cache elements: f16 (llama.cpp's default: half the memory and the bytes attention reads) "
                 "or f32")
      ->default_val("f16");
}

// --mla of run, bench, eval and serve: how deepseek2's latent attention runs prompts
// (Forward::MlaForm; other architectures ignore it).
inline void AddMlaOption(CLI::App& app, std::string& mla) {
  app.add_option("--mla", mla,
                 "deepseek2 attention: absorbed (llama.cpp's form and roundings), expanded (long prompt "
                 "chunks decompress keys and values per head: fewer multiply-adds, other roundings), or auto "
                 "(expanded where that rounds as llama.cpp does: f32 attn_k_b/attn_v_b)")
      ->default_val("auto");
}

Runner AddInit(CLI::App& app);
Runner AddInspect(CLI::App& app);
Runner AddRun(CLI::App& app);
Runner AddServe(CLI::App& app);
Runner AddBench(CLI::App& app);
Runner AddBenchLayer(CLI::App& app);
Runner AddTrain(CLI::App& app);
Runner AddTokenizer(CLI::App& app);
Runner AddEval(CLI::App& app);
Runner AddUpcycle(CLI::App& app);
Runner AddBenchTrain(CLI::App& app);
Runner AddBenchMachine(CLI::App& app);
Runner AddReport(CLI::App& app);
Runner AddQuantize(CLI::App& app);

}  // namespace moe::cli
