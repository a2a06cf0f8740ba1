// moe serve: the OpenAI-compatible server (src/runtime/server.h).
#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "model/model.h"
#include "runtime/server.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe::cli {

Runner AddServe(CLI::App& app) {
  struct Options {
    std::string model;
    ServerConfig server;
    int threads = 0;
    size_t max_body_kib = 1024;
    std::string cache_type;  // AddCacheTypeOption sets its default
    std::string mla;         // AddMlaOption sets its default
  };
  auto o = std::make_shared<Options>();
  ServerConfig& s = o->server;
  app.add_option("-m,--model", o->model, "GGUF model file")->required();
  app.add_option("--host", s.host, "address to listen on (loopback unless told otherwise)")->default_val("127.0.0.1");
  app.add_option("--port", s.port, "port (0: any free port, printed)")->default_val(8080);
  app.add_option("--parallel", s.engine.parallel, "sequences generated at once (continuous batching)")->default_val(4);
  app.add_option("--ctx-size", s.engine.ctx, "KV cache positions per sequence (0: the model's context, at most 4096)")
      ->default_val(0);
  AddCacheTypeOption(app, o->cache_type);
  AddMlaOption(app, o->mla);
  app.add_option("--chunk", s.engine.chunk, "prompt tokens per step of a prefilling request")->default_val(64);
  app.add_flag("!--no-prompt-cache", s.engine.prefix_reuse,
               "no request reuses another's cached prompt prefix (by default those with the same cache_salt do)");
  app.add_option("--queue", s.engine.max_queue, "requests that may wait for a slot; more get 503")->default_val(256);
  app.add_option("--api-key", s.api_key, "require \"Authorization: Bearer KEY\"");
  app.add_option("-t,--threads", o->threads, "compute threads (default: all CPUs)")->default_val(0);
  app.add_option("--max-body-kib", o->max_body_kib, "largest request body in KiB (larger: 413)")->default_val(1024);
  app.add_option("--timeout", s.timeout_s, "seconds a connection may stall reading or writing")->default_val(30);
  app.add_option("--model-name", s.model_name, "the model id /v1/models lists (default: the file name)");
  return [=]() {
    CheckThreadCount(o->threads);
    if (o->max_body_kib < 1 || o->max_body_kib > (1u << 20)) Fail("--max-body-kib must be in 1..1048576");
    o->server.max_body = o->max_body_kib * 1024;
    o->server.engine.kv_type = ParseCacheType(o->cache_type);
    o->server.engine.mla = ParseMlaForm(o->mla);
    auto model = Model::Load(o->model);
    ThreadPool pool(o->threads);
    model->RepackForInference(pool);
    return RunServer(*model, pool, o->server, [&](int port) {
      std::fprintf(stderr, "moe serve: listening on http://%s:%d (%s, %d parallel sequences, %d threads)\n",
                   o->server.host.c_str(), port, o->model.c_str(), o->server.engine.parallel, pool.size());
    });
  };
}

}  // namespace moe::cli
