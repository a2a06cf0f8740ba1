// Generation as `moe run` drives it: the options validated once, here, with one-line errors (the
// server takes the same), the context size, and one request through the serving engine, the
// one generation loop of moe.cpp.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/forward.h"
#include "runtime/sampler.h"
#include "tokenizer/tokenizer.h"

namespace moe {

class Engine;

struct GenerateOptions {
  int n_predict = 64;        // tokens to generate at most
  SamplerConfig sampler;
  bool ignore_eos = false;   // keep going after an end-of-generation token
  int top_logprobs = 0;      // report the N most likely tokens at every generated position
};

// Throws moe::Error naming the first bad option: a temperature that is not a finite number >= 0,
// top_k < 0, top_p outside (0, 1], a penalty outside [-2, 2], a logit bias outside [-100, 100] or
// for a token outside the vocabulary, n_predict < 0, top_logprobs outside 0..n_vocab.
void ValidateGenerateOptions(const GenerateOptions& o, int n_vocab);

// Throws moe::Error when KV caches of `positions` positions in all (what names them), of
// kv_type elements, would not fit in this machine's memory.
void CheckKvFits(const ModelConfig& c, int64_t positions, const std::string& what, DType kv_type = DType::kF32);

// The KV cache length a generation needs: ctx when given (> 0; it must hold the prompt and at
// least one more position), else prompt + n_predict + 1. Throws moe::Error when ctx < 0, when
// the prompt does not fit, or when the cache would not fit in this machine's memory; warn
// (may be null) hears about a context beyond the model's training context.
int ContextSize(const ModelConfig& c, int ctx, int n_prompt, int n_predict,
                const std::function<void(const std::string&)>& warn, DType kv_type = DType::kF32);

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated, the end-of-generation token included when it came
  std::string text;             // their pieces (empty without a vocabulary)
  std::vector<std::vector<std::pair<int, double>>> top;  // top_logprobs per generated token
  double prefill_s = 0, decode_s = 0;
  int cached_tokens = 0;  // prompt tokens whose cache rows an earlier Run left (Generator)
};

// Generations of one sequence at a time through the serving engine (runtime/engine.h), the one
// generation loop of moe.cpp: each Run evaluates a prompt, then generates until n_predict, an
// end-of-generation token or on_token (if given; it hears each token as it is chosen) returning
// false. Runs one after another reuse the cached rows of earlier prompts' whole chunks (a
// conversation's turns), with results bitwise those of a fresh Generator. Throws moe::Error.
// kv_type: the cache's elements (kF32 or kF16).
class Generator {
 public:
  Generator(const Model& model, ThreadPool& pool, int n_ctx, DType kv_type = DType::kF32,
            Forward::MlaForm mla = Forward::MlaForm::kAuto);
  ~Generator();
  GenerateResult Run(const std::vector<int32_t>& prompt, const GenerateOptions& o,
                     const std::function<bool(int32_t, const std::string&)>& on_token = nullptr);

 private:
  std::unique_ptr<Engine> engine_;
};

// One generation with a fresh Generator of n_ctx positions.
GenerateResult Generate(const Model& model, ThreadPool& pool, int n_ctx, const std::vector<int32_t>& prompt,
                        const GenerateOptions& o,
                        const std::function<bool(int32_t, const std::string&)>& on_token = nullptr,
                        DType kv_type = DType::kF32, Forward::MlaForm mla = Forward::MlaForm::kAuto);

}  // namespace moe
