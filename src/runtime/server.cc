#include "runtime/server.h"

#include <httplib.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <random>

#include <nlohmann/json.hpp>

#include "runtime/chat_template.h"
#include "util/error.h"

namespace moe {

namespace {

using json = nlohmann::json;

// ---- errors ------------------------------------------------------------------------------------

// A request error: HTTP status and an OpenAI-style message.
struct HttpError {
  int status;
  std::string message;
  std::string type = "invalid_request_error";
};

json ErrorJson(const std::string& message, const std::string& type) {
  return {{"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}}}};
}

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// ---- request fields ------------------------------------------------------------------------------

const json* Field(const json& body, const char* name) {
  auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

double Number(const json& body, const char* name, double fallback) {
  const json* v = Field(body, name);
  if (!v) return fallback;
  if (!v->is_number()) throw HttpError{400, StrFormat("'%s' must be a number", name)};
  return v->get<double>();
}

int64_t Integer(const json& body, const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const json* v = Field(body, name);
  if (!v) return fallback;
  if (!v->is_number_integer() && !(v->is_number_float() && v->get<double>() == static_cast<int64_t>(v->get<double>())))
    throw HttpError{400, StrFormat("'%s' must be an integer", name)};
  const double d = v->get<double>();
  if (d < static_cast<double>(lo) || d > static_cast<double>(hi))
    throw HttpError{400, StrFormat("'%s' must be in %lld..%lld", name, static_cast<long long>(lo), static_cast<long long>(hi))};
  return static_cast<int64_t>(d);
}

bool Bool(const json& body, const char* name, bool fallback) {
  const json* v = Field(body, name);
  if (!v) return fallback;
  if (!v->is_boolean()) throw HttpError{400, StrFormat("'%s' must be true or false", name)};
  return v->get<bool>();
}

// Fields whose meaning this server does not implement are refused rather than ignored (an
// ignored one would give an answer the client did not ask for).
void RejectUnsupported(const json& body, bool chat) {
  const auto refuse = [](const std::string& what) { throw HttpError{400, what + " is not supported by this server"}; };
  if (!chat) {
    if (Bool(body, "echo", false)) refuse("'echo'");
    if (const json* v = Field(body, "suffix"); v && !(v->is_string() && v->get<std::string>().empty())) refuse("'suffix'");
    if (Integer(body, "best_of", 1, 1, INT32_MAX) > 1) refuse("'best_of' above 1");
  }
  if (const json* v = Field(body, "response_format")) {
    const json* type = v->is_object() ? Field(*v, "type") : nullptr;
    if (!type || !type->is_string()) throw HttpError{400, "'response_format' must be an object with a string 'type'"};
    if (type->get<std::string>() != "text") refuse("'response_format' " + type->get<std::string>() + " (constrained output)");
  }
  for (const char* name : {"tools", "functions"})
    if (const json* v = Field(body, name); v && !(v->is_array() && v->empty())) refuse(std::string("'") + name + "' (tool calls)");
}

// OpenAI's logit_bias: {"token id": bias, ...} (ranges are checked with the other options).
std::vector<std::pair<int32_t, float>> LogitBias(const json& body) {
  const json* v = Field(body, "logit_bias");
  std::vector<std::pair<int32_t, float>> out;
  if (!v) return out;
  if (!v->is_object()) throw HttpError{400, "'logit_bias' must be an object mapping token ids to biases"};
  for (const auto& [key, bias] : v->items()) {
    int64_t id = 0;
    const char* end = key.data() + key.size();
    const auto [at, ec] = std::from_chars(key.data(), end, id);
    if (key.empty() || ec != std::errc() || at != end)
      throw HttpError{400, StrFormat("'logit_bias' keys must be token ids (got \"%.40s\")", key.c_str())};
    if (!bias.is_number()) throw HttpError{400, "'logit_bias' values must be numbers"};
    out.push_back({static_cast<int32_t>(std::clamp<int64_t>(id, -1, INT32_MAX)), static_cast<float>(bias.get<double>())});
  }
  return out;
}

std::vector<std::string> StopList(const json& body) {
  const json* v = Field(body, "stop");
  std::vector<std::string> out;
  if (!v) return out;
  if (v->is_string()) {
    out.push_back(v->get<std::string>());
  } else if (v->is_array()) {
    if (v->size() > 4) throw HttpError{400, "'stop' takes at most 4 sequences"};
    for (const json& s : *v) {
      if (!s.is_string()) throw HttpError{400, "'stop' must be a string or an array of strings"};
      out.push_back(s.get<std::string>());
    }
  } else {
    throw HttpError{400, "'stop' must be a string or an array of strings"};
  }
  for (const std::string& s : out)
    if (s.empty()) throw HttpError{400, "'stop' sequences must not be empty"};
  return out;
}

// The message content: a string, or an array of {"type": "text", "text": ...} parts.
std::string Content(const json& m) {
  const json* c = Field(m, "content");
  if (!c) return "";
  if (c->is_string()) return c->get<std::string>();
  if (!c->is_array()) throw HttpError{400, "a message's 'content' must be a string or an array of text parts"};
  std::string out;
  for (const json& p : *c) {
    if (!p.is_object() || p.value("type", "") != "text" || !p.contains("text") || !p["text"].is_string())
      throw HttpError{400, "content parts must be {\"type\": \"text\", \"text\": ...} (no images or audio)"};
    out += p["text"].get<std::string>();
  }
  return out;
}

// Bytes of s that end on a whole UTF-8 character (a piece may end inside one).
size_t Utf8Whole(const std::string& s, size_t end) {
  size_t i = end;
  int back = 0;
  while (i > 0 && back < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i, ++back;
  if (i == 0) return end;
  const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
  const int len = lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 1;
  return back + 1 >= len ? end : i - 1;
}

// ---- one request's state, shared by its HTTP thread and the engine's ---------------------------

struct TokenRecord {
  std::string piece;
  double logprob;
  std::vector<std::pair<std::string, double>> top;
};

struct Job {
  std::mutex mu;
  std::condition_variable cv;
  std::string text;                 // accepted text (cut at a stop sequence)
  std::vector<TokenRecord> tokens;  // accepted tokens
  bool finished = false;
  bool stop_hit = false;
  FinishInfo fin;
  std::atomic<bool> cancel{false};
  std::vector<std::string> stops;
  size_t max_stop = 0;
  // Streaming: what the client has been sent.
  size_t sent_bytes = 0, sent_tokens = 0;
  bool role_sent = false;
  // The finish reason once finished: a stop sequence or an end-of-generation token ends with
  // "stop" (the engine stops at either), max_tokens with "length".
  const char* FinishReason() const { return fin.reason == "stop" ? "stop" : "length"; }
};

// ---- the server -----------------------------------------------------------------------------------

struct Counters {
  std::mutex mu;
  std::map<int, int64_t> by_status;
};

class Api {
 public:
  Api(const Model& model, ThreadPool& pool, const ServerConfig& cfg)
      : model_(model), cfg_(cfg), engine_(model, pool, cfg.engine),
        format_(DetectChatFormat(model.file().GetStringOpt("tokenizer.chat_template").value_or(""))) {}

  void Register(httplib::Server& svr) {
    svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) { Reply(res, 200, {{"status", "ok"}}); });
    svr.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      if (!Authorized(req, res)) return;
      Reply(res, 200, {{"object", "list"},
                       {"data", json::array({{{"id", cfg_.model_name}, {"object", "model"}, {"created", created_},
                                              {"owned_by", "moe.cpp"}}})}});
    });
    svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(Metrics(), "text/plain; version=0.0.4");
    });
    svr.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) { Handle(req, res, false); });
    svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) { Handle(req, res, true); });
    svr.set_error_handler([this](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      const char* msg = res.status == 404 ? "no such endpoint" : res.status == 413 ? "the request body is too large"
                                                                                   : "bad request";
      res.set_content(Dump(ErrorJson(msg, "invalid_request_error")), "application/json");
      Count(res.status);
    });
  }

 private:
  void Count(int status) {
    std::lock_guard<std::mutex> lock(counters_.mu);
    ++counters_.by_status[status];
  }

  void Reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(Dump(body), "application/json");
    Count(status);
  }

  bool Authorized(const httplib::Request& req, httplib::Response& res) {
    if (cfg_.api_key.empty()) return true;
    if (req.get_header_value("Authorization") == "Bearer " + cfg_.api_key) return true;
    Reply(res, 401, ErrorJson("invalid or missing API key (Authorization: Bearer <key>)", "authentication_error"));
    return false;
  }

  void Handle(const httplib::Request& req, httplib::Response& res, bool chat) {
    if (!Authorized(req, res)) return;
    try {
      Run(req, res, chat);
    } catch (const HttpError& e) {
      Reply(res, e.status, ErrorJson(e.message, e.type));
    }
  }

  void Run(const httplib::Request& req, httplib::Response& res, bool chat) {
    const json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded()) throw HttpError{400, "the request body is not valid JSON"};
    if (!body.is_object()) throw HttpError{400, "the request body must be a JSON object"};
    if (Integer(body, "n", 1, 1, 1) != 1) throw HttpError{400, "'n' must be 1"};
    RejectUnsupported(body, chat);
    const Tokenizer& tok = model_.tokenizer();
    std::vector<int32_t> prompt;
    if (chat) {
      const json* msgs = Field(body, "messages");
      if (!msgs || !msgs->is_array() || msgs->empty()) throw HttpError{400, "'messages' must be a non-empty array"};
      std::vector<ChatMessage> m;
      for (const json& x : *msgs) {
        if (!x.is_object() || !x.contains("role") || !x["role"].is_string())
          throw HttpError{400, "every message needs a string 'role'"};
        const std::string role = x["role"].get<std::string>();
        if (role != "system" && role != "user" && role != "assistant" && role != "developer")
          throw HttpError{400, "message role '" + role + "' is not system, developer, user or assistant"};
        m.push_back({role == "developer" ? "system" : role, Content(x)});
      }
      if (!tok.HasVocab()) throw HttpError{400, "the model has no vocabulary: use /v1/completions with token ids"};
      prompt = tok.Encode(FormatChat(format_, m), /*add_special=*/true, /*parse_special=*/true);
    } else {
      const json* p = Field(body, "prompt");
      if (!p) throw HttpError{400, "'prompt' is required"};
      if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) p = &(*p)[0];
      if (p->is_string()) {
        if (!tok.HasVocab()) throw HttpError{400, "the model has no vocabulary: give 'prompt' as token ids"};
        prompt = tok.Encode(p->get<std::string>(), /*add_special=*/true);
      } else if (p->is_array()) {
        for (const json& t : *p) {
          if (!t.is_number_integer()) throw HttpError{400, "'prompt' must be a string or an array of token ids"};
          prompt.push_back(static_cast<int32_t>(std::clamp<int64_t>(t.get<int64_t>(), -1, INT32_MAX)));
        }
      } else {
        throw HttpError{400, "'prompt' must be a string or an array of token ids"};
      }
    }
    if (prompt.empty()) throw HttpError{400, "the prompt is empty"};
    const int ctx = engine_.ctx();
    if (static_cast<int>(prompt.size()) >= ctx)
      throw HttpError{400, StrFormat("the prompt has %zu tokens; the context holds %d", prompt.size(), ctx)};
    GenerateOptions g;
    const int64_t room = ctx - static_cast<int64_t>(prompt.size()) + 1;
    int64_t max_tokens = Integer(body, "max_tokens", chat ? room : 16, 0, INT32_MAX);
    if (chat) max_tokens = Integer(body, "max_completion_tokens", max_tokens, 0, INT32_MAX);
    g.n_predict = static_cast<int>(max_tokens);
    g.sampler.temp = static_cast<float>(Number(body, "temperature", 1.0));
    g.sampler.top_p = static_cast<float>(Number(body, "top_p", 1.0));
    g.sampler.top_k = static_cast<int>(Integer(body, "top_k", 0, 0, INT32_MAX));
    g.sampler.min_p = static_cast<float>(Number(body, "min_p", 0.0));  // llama-server's extension
    g.sampler.presence_penalty = static_cast<float>(Number(body, "presence_penalty", 0.0));
    g.sampler.frequency_penalty = static_cast<float>(Number(body, "frequency_penalty", 0.0));
    g.sampler.logit_bias = LogitBias(body);
    g.sampler.seed = Field(body, "seed") ? static_cast<uint64_t>(Integer(body, "seed", 0, INT64_MIN, INT64_MAX))
                                         : std::random_device{}();
    int n_top = 0;
    bool want_logprobs = false;
    if (chat) {
      want_logprobs = Bool(body, "logprobs", false);
      n_top = static_cast<int>(Integer(body, "top_logprobs", 0, 0, 20));
      if (n_top > 0 && !want_logprobs) throw HttpError{400, "'top_logprobs' needs 'logprobs': true"};
    } else if (Field(body, "logprobs")) {
      want_logprobs = true;
      n_top = static_cast<int>(Integer(body, "logprobs", 0, 0, 5));
    }
    g.top_logprobs = n_top;
    g.ignore_eos = Bool(body, "ignore_eos", false);  // llama-server's extension: generate max_tokens
    // llama-server's extension too: false evaluates the whole prompt and leaves no prefix behind (the
    // result is the same).
    const bool cache_prompt = Bool(body, "cache_prompt", true);
    const bool stream = Bool(body, "stream", false);
    bool include_usage = false;  // stream_options.include_usage: a last chunk with the usage
    if (const json* so = Field(body, "stream_options")) {
      if (!stream) throw HttpError{400, "'stream_options' is only allowed when 'stream' is true"};
      if (!so->is_object()) throw HttpError{400, "'stream_options' must be an object"};
      include_usage = Bool(*so, "include_usage", false);
    }
    auto job = std::make_shared<Job>();
    job->stops = StopList(body);
    for (const std::string& s : job->stops) job->max_stop = std::max(job->max_stop, s.size());

    EngineRequest er;
    er.prompt = prompt;
    er.options = g;
    er.logprobs = want_logprobs;
    er.reuse_prefix = cache_prompt;
    if (const json* salt = Field(body, "cache_salt")) {
      if (!salt->is_string() || salt->get<std::string>().size() > 256)
        throw HttpError{400, "'cache_salt' must be a string of at most 256 bytes"};
      er.cache_salt = salt->get<std::string>();
    }
    er.on_token = [job, &tok = tok](const TokenEvent& ev) {
      std::lock_guard<std::mutex> lock(job->mu);
      const size_t before = job->text.size();
      job->text += ev.piece;
      TokenRecord rec{ev.piece, ev.logprob, {}};
      for (const auto& [id, lp] : ev.top) rec.top.push_back({tok.TokenToPiece(id), lp});
      job->tokens.push_back(std::move(rec));
      if (!job->stops.empty()) {  // a stop sequence ends the text where it starts
        const size_t from = before >= job->max_stop ? before - job->max_stop + 1 : 0;
        size_t cut = std::string::npos;
        for (const std::string& s : job->stops) cut = std::min(cut, job->text.find(s, from));
        if (cut != std::string::npos) {
          job->text.resize(cut);
          job->stop_hit = true;
        }
      }
      job->cv.notify_all();
      return !job->stop_hit && !job->cancel.load();
    };
    er.on_finish = [job](const FinishInfo& f) {
      std::lock_guard<std::mutex> lock(job->mu);
      job->fin = f;
      job->finished = true;
      job->cv.notify_all();
    };
    try {
      engine_.Submit(std::move(er));
    } catch (const Error& e) {
      const std::string msg = e.what();
      throw HttpError{msg.find("queue is full") != std::string::npos ? 503 : 400, msg};
    }
    const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(++next_id_);
    if (stream) {
      Stream(res, job, chat, id, want_logprobs, include_usage);
      return;
    }
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->finished; });
    if (job->fin.reason == "error") {
      lock.unlock();
      throw HttpError{500, job->fin.error, "server_error"};
    }
    json choice = {{"index", 0}, {"finish_reason", job->FinishReason()}};
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", job->text}};
      choice["logprobs"] = want_logprobs ? ChatLogprobs(job->tokens, 0, job->tokens.size()) : json(nullptr);
    } else {
      choice["text"] = job->text;
      choice["logprobs"] = want_logprobs ? CompletionLogprobs(job->tokens, 0, job->tokens.size(), 0) : json(nullptr);
    }
    json out = {{"id", id}, {"object", chat ? "chat.completion" : "text_completion"}, {"created", Now()},
                {"model", cfg_.model_name}, {"choices", json::array({choice})},
                {"usage", Usage(job->fin)}};
    lock.unlock();
    Reply(res, 200, out);
  }

  // Server-sent events: text as it becomes final (held back while it could still turn into a stop
  // sequence, or ends inside a UTF-8 character), then the finish reason and [DONE].
  // include_usage (stream_options): every chunk carries "usage": null, and a last chunk before
  // [DONE] has no choices and the request's usage, as OpenAI's API streams it.
  void Stream(httplib::Response& res, const std::shared_ptr<Job>& job, bool chat, const std::string& id, bool logprobs,
              bool include_usage) {
    Count(200);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider("text/event-stream", [this, job, chat, id, logprobs, include_usage](
                                                              size_t, httplib::DataSink& sink) {
      const auto send = [&](json choices, json usage) {
        json j = {{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", Now()},
                  {"model", cfg_.model_name}, {"choices", std::move(choices)}};
        if (include_usage) j["usage"] = std::move(usage);
        const std::string line = "data: " + Dump(j) + "\n\n";
        return sink.write(line.data(), line.size());
      };
      const auto chunk = [&](const json& choice) { return send(json::array({choice}), nullptr); };
      std::unique_lock<std::mutex> lock(job->mu);
      const size_t hold = job->max_stop ? job->max_stop - 1 : 0;  // could still become a stop sequence
      job->cv.wait_for(lock, std::chrono::milliseconds(200), [&] {
        return job->finished || job->text.size() > job->sent_bytes + hold || job->tokens.size() > job->sent_tokens;
      });
      if (!sink.is_writable()) {
        job->cancel = true;
        return false;
      }
      if (chat && !job->role_sent) {
        job->role_sent = true;
        if (!chunk({{"index", 0}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"finish_reason", nullptr}})) {
          job->cancel = true;
          return false;
        }
      }
      size_t ready = job->text.size();
      if (!job->finished) ready = Utf8Whole(job->text, ready > hold ? ready - hold : 0);
      // A chunk per new token, its text possibly empty (held back, or a model without a vocabulary).
      size_t& sent = job->sent_bytes;
      if (ready > sent || job->tokens.size() > job->sent_tokens) {
        const std::string piece = job->text.substr(sent, ready > sent ? ready - sent : 0);
        const size_t t1 = job->tokens.size();
        json choice = {{"index", 0}, {"finish_reason", nullptr}};
        if (chat) {
          choice["delta"] = {{"content", piece}};
          choice["logprobs"] = logprobs ? ChatLogprobs(job->tokens, job->sent_tokens, t1) : json(nullptr);
        } else {
          choice["text"] = piece;
          choice["logprobs"] = logprobs ? CompletionLogprobs(job->tokens, job->sent_tokens, t1, sent) : json(nullptr);
        }
        sent = std::max(sent, ready);
        job->sent_tokens = t1;
        if (!chunk(choice)) {
          job->cancel = true;
          return false;
        }
      }
      if (!job->finished) return true;
      if (job->fin.reason == "error") {
        const std::string line = "data: " + Dump(ErrorJson(job->fin.error, "server_error")) + "\n\n";
        sink.write(line.data(), line.size());
      } else {
        json choice = {{"index", 0}, {"finish_reason", job->FinishReason()}};
        if (chat) {
          choice["delta"] = json::object();
        } else {
          choice["text"] = "";
        }
        chunk(choice);
        if (include_usage) send(json::array(), Usage(job->fin));
      }
      const std::string done = "data: [DONE]\n\n";
      sink.write(done.data(), done.size());
      sink.done();
      return true;
    }, [job](bool) { job->cancel = true; });  // the connection ended: stop generating
  }

  static json Usage(const FinishInfo& f) {
    return {{"prompt_tokens", f.prompt_tokens}, {"completion_tokens", f.completion_tokens},
            {"total_tokens", f.prompt_tokens + f.completion_tokens},
            {"prompt_tokens_details", {{"cached_tokens", f.cached_tokens}}}};
  }

  static json ChatLogprobs(const std::vector<TokenRecord>& t, size_t a, size_t b) {
    json content = json::array();
    for (size_t i = a; i < b; ++i) {
      json top = json::array();
      for (const auto& [piece, lp] : t[i].top) top.push_back({{"token", piece}, {"logprob", lp}, {"bytes", Bytes(piece)}});
      content.push_back({{"token", t[i].piece}, {"logprob", t[i].logprob}, {"bytes", Bytes(t[i].piece)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }

  static json CompletionLogprobs(const std::vector<TokenRecord>& t, size_t a, size_t b, size_t offset) {
    json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
    for (size_t i = a; i < b; ++i) {
      tokens.push_back(t[i].piece);
      lps.push_back(t[i].logprob);
      json top = json::object();
      for (const auto& [piece, lp] : t[i].top) top[piece] = lp;
      tops.push_back(top);
      offsets.push_back(offset);
      offset += t[i].piece.size();
    }
    return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
  }

  static json Bytes(const std::string& s) {
    json b = json::array();
    for (unsigned char c : s) b.push_back(static_cast<int>(c));
    return b;
  }

  static int64_t Now() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  }

  std::string Metrics() {
    const EngineStats s = engine_.Stats();
    std::string m;
    const auto metric = [&](const char* name, const char* type, const char* help, const std::string& samples) {
      m += StrFormat("# HELP %s %s\n# TYPE %s %s\n", name, help, name, type) + samples;
    };
    std::string http;
    {
      std::lock_guard<std::mutex> lock(counters_.mu);
      for (const auto& [code, n] : counters_.by_status)
        http += StrFormat("moe_http_responses_total{code=\"%d\"} %lld\n", code, static_cast<long long>(n));
    }
    metric("moe_http_responses_total", "counter", "HTTP responses by status code", http);
    metric("moe_requests_total", "counter", "generation requests that ended, by outcome",
           StrFormat("moe_requests_total{outcome=\"ok\"} %lld\nmoe_requests_total{outcome=\"error\"} %lld\n",
                     static_cast<long long>(s.requests_finished), static_cast<long long>(s.requests_failed)));
    metric("moe_prompt_tokens_total", "counter", "prompt tokens evaluated",
           StrFormat("moe_prompt_tokens_total %lld\n", static_cast<long long>(s.prompt_tokens)));
    metric("moe_prompt_tokens_cached_total", "counter", "prompt tokens not evaluated: cache rows reused from earlier requests",
           StrFormat("moe_prompt_tokens_cached_total %lld\n", static_cast<long long>(s.prompt_tokens_cached)));
    metric("moe_generated_tokens_total", "counter", "tokens generated",
           StrFormat("moe_generated_tokens_total %lld\n", static_cast<long long>(s.generated_tokens)));
    metric("moe_tokens_per_second", "gauge", "tokens (prompt and generated) per second of engine work",
           StrFormat("moe_tokens_per_second %.3f\n", s.busy_seconds > 0 ? (s.prompt_tokens + s.generated_tokens) / s.busy_seconds : 0.0));
    metric("moe_queue_depth", "gauge", "requests waiting for a sequence slot", StrFormat("moe_queue_depth %d\n", s.queue_depth));
    metric("moe_active_sequences", "gauge", "sequences being generated", StrFormat("moe_active_sequences %d\n", s.active));
    metric("moe_batch_tokens", "gauge", "tokens in the last step and the mean over steps",
           StrFormat("moe_batch_tokens{stat=\"last\"} %d\nmoe_batch_tokens{stat=\"mean\"} %.3f\n", s.last_batch,
                     s.steps ? static_cast<double>(s.batch_tokens) / s.steps : 0.0));
    std::string load;
    for (size_t l = 0; l < s.expert_load.size(); ++l)
      for (size_t e = 0; e < s.expert_load[l].size(); ++e)
        load += StrFormat("moe_expert_tokens_total{layer=\"%zu\",expert=\"%zu\"} %lld\n", l, e,
                          static_cast<long long>(s.expert_load[l][e]));
    metric("moe_expert_tokens_total", "counter", "tokens routed to each expert of each layer", load);
    return m;
  }

  const Model& model_;
  const ServerConfig& cfg_;
  Engine engine_;
  ChatFormat format_;
  Counters counters_;
  std::atomic<int64_t> next_id_{0};
  const int64_t created_ = Now();
};

std::atomic<httplib::Server*> g_server{nullptr};
extern "C" void OnSignal(int) {
  if (httplib::Server* s = g_server.load()) s->stop();
}

}  // namespace

int RunServer(const Model& model, ThreadPool& pool, const ServerConfig& cfg_in,
              const std::function<void(int port)>& on_listening) {
  ServerConfig cfg = cfg_in;
  if (cfg.port < 0 || cfg.port > 65535) Fail("--port %d must be in 0..65535 (0: any free port)", cfg.port);
  if (cfg.max_body < 1024) Fail("the request body limit must be at least 1024 bytes");
  if (cfg.timeout_s < 1) Fail("the connection timeout must be at least 1 s");
  if (const std::string why = UnservableRouterReason(model.config()); !why.empty()) Fail("%s", why.c_str());
  // Batch invariance: routing that looks across the batch would let requests change each other.
  if (model.config().moe.capacity_factor > 0)
    Fail("the model routes with a capacity limit, which lets requests in one batch change each other's "
         "output: moe serve needs dropless token-choice routing");
  if (cfg.model_name.empty()) {
    const std::string& p = model.file().path();
    cfg.model_name = p.substr(p.find_last_of('/') == std::string::npos ? 0 : p.find_last_of('/') + 1);
  }
  const int threads = cfg.http_threads > 0 ? cfg.http_threads : 2 * cfg.engine.parallel + 96;
  Api api(model, pool, cfg);
  httplib::Server svr;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  svr.set_payload_max_length(cfg.max_body);
  svr.set_read_timeout(cfg.timeout_s, 0);
  svr.set_write_timeout(cfg.timeout_s, 0);
  api.Register(svr);
  const int port = cfg.port == 0 ? svr.bind_to_any_port(cfg.host) : (svr.bind_to_port(cfg.host, cfg.port) ? cfg.port : -1);
  if (port < 0) Fail("cannot listen on %s:%d (is the address in use?)", cfg.host.c_str(), cfg.port);
  g_server = &svr;
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGPIPE, SIG_IGN);
  if (on_listening) on_listening(port);
  const bool ok = svr.listen_after_bind();
  g_server = nullptr;
  return ok ? 0 : 1;
}

}  // namespace moe
