// `moe serve`: an OpenAI-compatible HTTP API over the continuous-batching Engine (cpp-httplib).
//   POST /v1/completions, POST /v1/chat/completions (streaming with server-sent events; stop,
//   max_tokens, temperature, top_p, top_k, seed, logprobs), GET /v1/models, GET /health,
//   GET /metrics (Prometheus text: requests, tokens, tokens/s, queue depth, batch size, expert
//   load per layer).
// Bad requests get a 4xx with an OpenAI-style error object and the server goes on; a client that
// goes away mid-stream frees its sequence at the next token.
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <string>

#include "model/model.h"
#include "runtime/engine.h"
#include "util/threadpool.h"

namespace moe {

struct ServerConfig {
  std::string host = "127.0.0.1";  // loopback unless told otherwise
  int port = 8080;                 // 0: any free port (printed)
  std::string api_key;             // when set, requests need "Authorization: Bearer <key>"
  size_t max_body = 1 << 20;       // bytes of a request body; larger ones get 413
  int http_threads = 0;            // connection threads (0: 2 x parallel + 96)
  int timeout_s = 30;              // read / write timeout of a connection
  std::string model_name;          // what /v1/models lists (default: the file's base name)
  EngineConfig engine;
};

// Serves until SIGINT / SIGTERM. on_listening (may be null) hears the bound port. Returns the
// process exit code; throws moe::Error when it cannot start (the address is taken, ...).
int RunServer(const Model& model, ThreadPool& pool, const ServerConfig& cfg,
              const std::function<void(int port)>& on_listening = nullptr);

}  // namespace moe
