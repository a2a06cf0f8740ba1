// moe: the command-line front end of moe.cpp. Exit codes: 0 ok, 1 bad flags, 2 bad input
// (file, config, prompt: one line on stderr naming the problem).
#include <malloc.h>

#include <cstdio>
#include <exception>
#include <vector>

#include "commands.h"
#include "util/error.h"

int main(int argc, char** argv) {
#ifdef __GLIBC__
  // Keep freed memory: training and long prefills reuse large buffers call after call, and on
  // these VMs every page handed back to the OS costs a page fault (microseconds) when it is
  // touched again. Blocks up to 256 MiB come from the heap, which is trimmed only past 1 GiB.
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
  CLI::App app{"moe.cpp: train, run, inspect and benchmark Mixture-of-Experts models in GGUF"};
  app.require_subcommand(1);
  std::vector<std::pair<CLI::App*, moe::cli::Runner>> cmds;
  auto add = [&](const char* name, const char* help, moe::cli::Runner (*f)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, help);
    cmds.push_back({sub, f(*sub)});
  };
  add("init", "write a randomly initialised MoE model (GGUF)", moe::cli::AddInit);
  add("inspect", "show a model's architecture, tensors and bytes per token", moe::cli::AddInspect);
  add("run", "generate text (or token ids) from a model", moe::cli::AddRun);
  add("serve", "an OpenAI-compatible HTTP server with continuous batching", moe::cli::AddServe);
  add("bench", "measure prefill and decode speed on random tokens", moe::cli::AddBench);
  add("bench-machine", "this machine's ceilings: memory read bandwidth, fp32 and int8 rates", moe::cli::AddBenchMachine);
  add("bench-layer", "time one MoE layer forward and backward", moe::cli::AddBenchLayer);
  add("train", "train a model on text (AdamW; checkpoints, resume, metrics)", moe::cli::AddTrain);
  add("tokenizer", "train a vocabulary: moe tokenizer train --data ... --vocab V -o tok.gguf", moe::cli::AddTokenizer);
  add("eval", "held-out loss and perplexity, counted as llama.cpp's perplexity tool", moe::cli::AddEval);
  add("report", "plots and a summary of a training run (moe report DIR)", moe::cli::AddReport);
  add("bench-train", "training speed on random tokens, and the share of the GEMM's peak", moe::cli::AddBenchTrain);
  add("quantize", "rewrite a model in another weight type or a llama.cpp mix (Q4_K_M, ...)", moe::cli::AddQuantize);
  add("upcycle", "turn a dense model into an MoE model (sparse upcycling, Drop-Upcycling)", moe::cli::AddUpcycle);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help, or the flag error and a hint
    return code == 0 ? 0 : 1;
  }
  try {
    for (auto& [sub, run] : cmds)
      if (sub->parsed()) return run();
  } catch (const moe::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "moe: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "moe: error: out of memory\n");
    return 2;
  }
  return 1;
}
