#include "train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "model/params.h"
#include "moe/moe_layer.h"
#include "train/data.h"
#include "train/model_train.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kCheckpoint = "checkpoint.gguf";
constexpr const char* kModel = "model.gguf";
constexpr const char* kMetrics = "metrics.jsonl";

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// The flags a run's results depend on (--resume must repeat them; threads, cadences and paths of
// the output do not change a bit).
nlohmann::json RunFingerprint(const TrainConfig& c) {
  const MoeLayerConfig& m = c.moe;
  return {{"model", c.model}, {"data", c.data}, {"val_data", c.val_data}, {"steps", c.steps}, {"batch", c.batch},
          {"seq", c.seq}, {"grad_accum", c.grad_accum}, {"seed", c.seed}, {"lr", c.adam.lr},
          {"min_lr", c.adam.min_lr}, {"warmup", c.adam.warmup}, {"beta1", c.adam.beta1}, {"beta2", c.adam.beta2},
          {"eps", c.adam.eps}, {"weight_decay", c.adam.weight_decay}, {"clip", c.adam.clip},
          {"val_fraction", c.val_fraction}, {"aux_loss_coef", m.aux_loss_coef}, {"z_loss_coef", m.z_loss_coef},
          {"entropy_loss_coef", m.entropy_loss_coef}, {"capacity_factor", m.capacity_factor},
          {"jitter_eps", m.jitter_eps}, {"bias_update_rate", m.bias_update_rate},
          {"ec_capacity_factor", m.ec_capacity_factor}, {"zc_balance_tau", m.zc_balance_tau}};
}

void CheckConfig(const TrainConfig& c) {
  if (c.model.empty()) Fail("give the starting model with -m FILE (moe init or moe upcycle makes one)");
  if (c.out_dir.empty()) Fail("give the output folder with --out DIR");
  if (c.steps < 1) Fail("--steps must be >= 1 (got %d)", c.steps);
  if (c.batch < 1) Fail("--batch must be >= 1 (got %d)", c.batch);
  if (c.seq < 1) Fail("--seq must be >= 1 (got %d)", c.seq);
  if (c.grad_accum < 1) Fail("--grad-accum must be >= 1 (got %d)", c.grad_accum);
  CheckThreadCount(c.threads);
  const AdamWConfig& a = c.adam;
  if (!(a.lr > 0) || !std::isfinite(a.lr)) Fail("--lr must be > 0 (got %g)", a.lr);
  if (!(a.min_lr >= 0) || a.min_lr > a.lr) Fail("--min-lr must be in [0, --lr] (got %g)", a.min_lr);
  if (a.warmup < 0 || a.warmup > c.steps) Fail("--warmup must be in [0, --steps] (got %d)", a.warmup);
  if (!(a.weight_decay >= 0)) Fail("--weight-decay must be >= 0");
  if (!(a.clip >= 0)) Fail("--clip must be >= 0 (0 = off)");
  if (!(a.beta1 >= 0 && a.beta1 < 1 && a.beta2 >= 0 && a.beta2 < 1)) Fail("--beta1 and --beta2 must be in [0, 1)");
  if (!(c.val_fraction >= 0 && c.val_fraction < 1)) Fail("--val-fraction must be in [0, 1)");
  if (c.eval_every < 0 || c.save_every < 0 || c.eval_batches < 0 || c.log_every < 0)
    Fail("--eval-every, --eval-batches, --save-every and --log-every must be >= 0");
  const MoeLayerConfig& m = c.moe;
  if (!(m.aux_loss_coef >= 0) || !(m.z_loss_coef >= 0)) Fail("--aux-loss and --z-loss must be >= 0");
  if (!(m.capacity_factor >= 0)) Fail("--capacity-factor must be >= 0 (0 = dropless)");
  if (!(m.jitter_eps >= 0 && m.jitter_eps < 1)) Fail("--jitter must be in [0, 1)");
  if (!(m.bias_update_rate >= 0)) Fail("--bias-update-rate must be >= 0");
}

// Checks, before anything is read or written, that the output folder can be written (or created)
// and holds no other run; creates nothing.
void CheckOutDir(const TrainConfig& c) {
  const fs::path dir(c.out_dir);
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec)) Fail("--out %s exists and is not a folder", c.out_dir.c_str());
  fs::path probe_dir = dir;  // the folder itself, or the first ancestor that exists
  while (!probe_dir.empty() && !fs::exists(probe_dir, ec)) probe_dir = probe_dir.parent_path();
  if (probe_dir.empty()) probe_dir = ".";
  if (::access(probe_dir.c_str(), W_OK | X_OK) != 0)
    Fail("--out %s is not writable (%s)", c.out_dir.c_str(), probe_dir.c_str());
  if (!c.resume) {
    for (const char* name : {kCheckpoint, kModel, kMetrics}) {
      if (fs::exists(dir / name))
        Fail("--out %s already holds a training run (%s): pass --resume to continue it, or choose another folder",
             c.out_dir.c_str(), name);
    }
  } else if (!fs::exists(dir / kCheckpoint)) {
    Fail("--resume: %s has no %s to continue from", c.out_dir.c_str(), kCheckpoint);
  }
}

void CreateOutDir(const TrainConfig& c) {
  std::error_code ec;
  fs::create_directories(c.out_dir, ec);
  if (ec || !fs::is_directory(c.out_dir)) Fail("--out %s: cannot create the folder: %s", c.out_dir.c_str(), ec.message().c_str());
}

// metrics.jsonl of a resumed run: the complete lines of steps <= step, rewritten atomically.
void TruncateMetrics(const fs::path& path, int step) {
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("step") || !j["step"].is_number_integer()) continue;  // a torn last line
    if (j["step"].get<int>() <= step) kept += line + "\n";
  }
  WriteFileAtomic(path.string(), kept.data(), kept.size());
}

std::string FormatDuration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int t = static_cast<int>(s + 0.5);
  if (t >= 3600) return StrFormat("%dh%02dm", t / 3600, (t / 60) % 60);
  if (t >= 60) return StrFormat("%dm%02ds", t / 60, t % 60);
  return StrFormat("%ds", t);
}

uint64_t MixSeed(uint64_t seed, uint64_t a, uint64_t b) {
  uint64_t z = seed ^ (a * 0x9e3779b97f4a7c15ULL) ^ (b * 0xc2b2ae3d27d4eb4fULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

StepEngine::StepEngine(ModelParams<float>* p, const MoeLayerConfig& moe_train, const AdamWConfig& adam, int grad_accum,
                       ThreadPool* pool)
    : p_(p), pool_(pool), adam_(adam), grad_accum_(grad_accum) {
  cfgs_ = TrainLayerConfigs(*p, moe_train, 1.0 / grad_accum);
  grads_ = p->NewGrads();
  gnamed_ = NamedTensors(*p, grads_);
  pnamed_ = TrainableParams(*p, gnamed_);
  opt_.set_config(adam);
  opt_.Init(gnamed_);
}

StepStats StepEngine::Step(int step, const std::vector<const int32_t*>& tokens, const std::vector<const uint8_t*>& targets,
                           int n_seq, int seq_len, uint64_t jitter_seed) {
  const ModelConfig& mc = p_->config;
  const int G = grad_accum_, L = seq_len;
  MOE_ASSERT(static_cast<int>(tokens.size()) == G && static_cast<int>(targets.size()) == G);
  StepStats st;
  for (int m = 0; m < G; ++m) {  // the step's targets weigh 1 / their number
    for (int b = 0; b < n_seq; ++b) {
      const uint8_t* t = targets[m] ? targets[m] + static_cast<size_t>(b) * (L + 1) : nullptr;
      for (int j = 1; j <= L; ++j) st.targets += t == nullptr || t[j];
    }
  }
  grads_.Zero();
  TrainForwardOptions fo;
  fo.pool = pool_;
  fo.training = true;
  fo.token_weight = 1.0 / std::max<int64_t>(1, st.targets);
  double ce = 0;
  st.loads.assign(mc.n_layer, {});
  for (int m = 0; m < G; ++m) {
    fo.jitter_seed = MixSeed(jitter_seed, static_cast<uint64_t>(step), static_cast<uint64_t>(m));
    ModelForward(*p_, cfgs_, tokens[m], targets[m], n_seq, L, fo, &cache_);
    ModelBackward(*p_, cfgs_, cache_, &grads_, pool_);
    ce += cache_.ce_sum;
    st.aux_loss += cache_.moe_loss;
    for (uint32_t il = 0; il < mc.n_layer; ++il) {
      if (!mc.IsMoeLayer(il)) continue;  // a dense block routes nothing (its loads stay empty)
      const MoeTelemetry t = ComputeTelemetry(cfgs_[il], cache_.blocks[il].moe);
      if (st.loads[il].empty()) st.loads[il].assign(t.routed_per_expert.size(), 0);
      for (size_t e = 0; e < t.routed_per_expert.size(); ++e) st.loads[il][e] += t.routed_per_expert[e];
    }
  }
  st.loss = ce / static_cast<double>(std::max<int64_t>(1, st.targets));
  st.grad_norm = AdamW::GradNorm(gnamed_);
  st.lr = LearningRate(adam_, step);
  if (!std::isfinite(st.grad_norm) || !std::isfinite(ce))
    Fail("step %d: the loss or the gradient is not finite (loss %g, gradient norm %g): lower --lr", step + 1, st.loss,
         st.grad_norm);
  const double scale = adam_.clip > 0 && st.grad_norm > adam_.clip ? adam_.clip / st.grad_norm : 1.0;
  opt_.Step(pnamed_, gnamed_, st.lr, scale, pool_);
  // Per layer: MaxVio over the FFN experts, and the aux-loss-free bias update (DeepSeek-V3).
  const uint32_t n_moe = mc.n_layer - mc.n_layer_dense_lead;
  for (uint32_t il = 0; il < mc.n_layer; ++il) {
    if (!mc.IsMoeLayer(il)) continue;
    const int E = static_cast<int>(mc.n_expert);
    int64_t total = 0, mx = 0;
    for (int e = 0; e < E; ++e) {
      total += st.loads[il][e];
      mx = std::max(mx, st.loads[il][e]);
    }
    const double mean = static_cast<double>(total) / E;
    st.max_vio += mean > 0 ? (mx - mean) / mean / n_moe : 0.0;
    if (mc.router_kind == MoeRouterKind::kSigmoidBias) {
      MoeTelemetry t;
      t.routed_per_expert = st.loads[il];
      UpdateBias(cfgs_[il], t, &p_->layers[il].moe);
    }
  }
  return st;
}

TrainSummary Train(const TrainConfig& cfg_in, const std::function<void(const std::string&)>& log_in) {
  TrainConfig cfg = cfg_in;
  cfg.adam.total_steps = cfg.steps;
  const bool tty = isatty(STDERR_FILENO) != 0 && !log_in;
  auto log = [&](const std::string& s) {
    if (log_in) {
      log_in(s);
    } else {
      std::fprintf(stderr, "%s%s\n", tty ? "\r\033[K" : "", s.c_str());
    }
  };
  CheckConfig(cfg);
  CheckOutDir(cfg);
  const fs::path dir(cfg.out_dir);
  // The starting point (or the checkpoint), read and checked before anything is written.
  ModelParams<float> p;
  nlohmann::json ckpt_state;
  std::shared_ptr<const GgufFile> ckpt_file;
  if (cfg.resume) {
    ckpt_file = GgufFile::Open((dir / kCheckpoint).string());
    const std::string state = ckpt_file->GetStringOpt("train.state").value_or("");
    ckpt_state = nlohmann::json::parse(state, nullptr, false);
    if (ckpt_state.is_discarded() || !ckpt_state.contains("fingerprint") || !ckpt_state.contains("step"))
      ckpt_file->Throw("key 'train.state' is missing or not the JSON of a moe.cpp checkpoint");
    const nlohmann::json want = RunFingerprint(cfg), have = ckpt_state["fingerprint"];
    for (auto& [k, v] : want.items()) {
      if (!have.contains(k) || have[k] != v)
        Fail("--resume: flag '%s' was %s in the run being resumed, now %s: resume with the same flags",
             k.c_str(), have.contains(k) ? have[k].dump().c_str() : "absent", v.dump().c_str());
    }
    p = LoadParamsFrom<float>(ckpt_file, true, [](const std::string& n) { return n.rfind("opt.", 0) == 0; });
  } else {
    p = LoadParams<float>(cfg.model, /*allow_training_only=*/true);
  }
  const ModelConfig& mc = p.config;
  if (static_cast<uint32_t>(cfg.seq) > mc.n_ctx_train)
    Fail("--seq %d is longer than the model's context of %u tokens (%s.context_length)", cfg.seq, mc.n_ctx_train,
         mc.arch_name.c_str());
  ThreadPool pool(cfg.threads);
  // The vocabulary: the model file's, read as moe run reads it.
  auto served = Model::FromParams(p, /*allow_training_only=*/true);
  const Tokenizer& tok = served->tokenizer();

  // Data.
  CorpusStats st, vst;
  Sequences train_seqs, val_seqs;
  {
    const std::vector<Document> docs = ReadDocuments(cfg.data, &st);
    train_seqs = Pack(TokenizeDocuments(docs, tok, &pool, &st), cfg.seq);
  }
  if (train_seqs.size() == 0)
    Fail("the data has %lld tokens, fewer than one sequence of --seq %d + 1: give more data or a smaller --seq",
         static_cast<long long>(st.tokens), cfg.seq);
  if (!cfg.val_data.empty()) {
    const std::vector<Document> vdocs = ReadDocuments(cfg.val_data, &vst);
    val_seqs = Pack(TokenizeDocuments(vdocs, tok, &pool, &vst), cfg.seq);
    if (val_seqs.size() == 0)
      Fail("--val-data has %lld tokens, fewer than one sequence of --seq %d + 1", static_cast<long long>(vst.tokens),
           cfg.seq);
  } else if (cfg.val_fraction > 0 && train_seqs.size() >= 2) {
    const int64_t n_val = std::max<int64_t>(1, static_cast<int64_t>(train_seqs.size() * cfg.val_fraction));
    val_seqs = SplitTail(&train_seqs, std::min<int64_t>(n_val, train_seqs.size() - 1));
  }
  CreateOutDir(cfg);
  TrainSummary sum;
  sum.train_tokens = train_seqs.size() * cfg.seq;
  sum.val_tokens = val_seqs.size() * cfg.seq;
  sum.val_loss = std::numeric_limits<double>::quiet_NaN();

  // Optimizer (and the resumed state).
  ThreadPool* pool_ptr = &pool;
  StepEngine engine(&p, cfg.moe, cfg.adam, cfg.grad_accum, pool_ptr);
  AdamW& opt = engine.optimizer();
  const std::vector<NamedArray<float>>& gnamed = engine.grad_tensors();
  int step0 = 0;
  if (ckpt_file) {
    step0 = ckpt_state["step"].get<int>();
    opt.set_t(ckpt_state.value("adam_t", static_cast<int64_t>(step0)));
    for (size_t i = 0; i < gnamed.size(); ++i) {
      for (const char* which : {"m", "v"}) {
        const std::string name = std::string("opt.") + which + "." + gnamed[i].name;
        const TensorView* t = ckpt_file->FindTensor(name);
        if (!t || t->dtype != DType::kF32 || static_cast<size_t>(t->NumElements()) != gnamed[i].data->size())
          ckpt_file->Throw("checkpoint tensor '" + name + "' is missing or has the wrong size");
        std::vector<float>& dst = which[0] == 'm' ? opt.m()[i] : opt.v()[i];
        std::copy(t->F32(), t->F32() + dst.size(), dst.begin());
      }
    }
    TruncateMetrics(dir / kMetrics, step0);
  }
  const std::string diff = LlamaCppDifference(mc);
  log(StrFormat("moe train: %s, %u layers, dim %u, %u experts top-%u, router %s; %lld parameters", mc.arch_name.c_str(),
                mc.n_layer, mc.n_embd, mc.n_expert, mc.n_expert_used, MoeRouterName(mc.router_kind),
                [&] { long long n = 0; for (const auto& a : NamedTensors(p)) n += a.data->size(); return n; }()));
  log(StrFormat("data: %lld documents, %lld tokens -> %lld training sequences of %d, %lld held out%s",
                static_cast<long long>(st.documents + vst.documents), static_cast<long long>(st.tokens + vst.tokens),
                static_cast<long long>(train_seqs.size()), cfg.seq, static_cast<long long>(val_seqs.size()),
                step0 > 0 ? StrFormat("; resuming at step %d", step0).c_str() : ""));
  if (!diff.empty()) log("note: llama.cpp will not compute this model (" + diff + "); moe run serves it");
  if (!UnservableRouterReason(mc).empty()) log("note: " + UnservableRouterReason(mc));

  std::ofstream metrics(dir / kMetrics, std::ios::app);
  if (!metrics) Fail("cannot open %s for writing", (dir / kMetrics).c_str());
  auto emit = [&](const nlohmann::json& j) {
    metrics << j.dump() << "\n";
    metrics.flush();
  };

  const int B = cfg.batch, L = cfg.seq, G = cfg.grad_accum;
  const int64_t n_train = train_seqs.size();

  auto evaluate = [&](int step) {
    if (val_seqs.size() == 0) return;
    const int64_t n_val = cfg.eval_batches > 0 ? std::min<int64_t>(val_seqs.size(), static_cast<int64_t>(cfg.eval_batches) * B)
                                               : val_seqs.size();
    TrainForwardOptions eo;
    eo.pool = &pool;
    eo.training = false;
    MoeLayerConfig eval_moe = cfg.moe;  // validation computes the served model: dropless
    eval_moe.capacity_factor = 0.0;
    const std::vector<MoeLayerConfig> ecfgs = TrainLayerConfigs(p, eval_moe, 1.0);
    double total = 0;
    int64_t counted = 0;
    ModelCache<float> ec;
    for (int64_t i = 0; i < n_val; i += B) {
      const int nb = static_cast<int>(std::min<int64_t>(B, n_val - i));
      ModelForward(p, ecfgs, val_seqs.at(i), val_seqs.target_at(i), nb, L, eo, &ec);
      total += ec.ce_sum;
      counted += ec.n_counted;
    }
    const double v = counted ? total / static_cast<double>(counted) : 0.0;
    sum.val_loss = v;
    emit({{"step", step}, {"val_loss", v}, {"val_ppl", std::exp(v)}});
    log(StrFormat("step %d: validation loss %.4f, perplexity %.2f", step, v, std::exp(v)));
  };
  auto save = [&](int step) {
    nlohmann::json state = {{"step", step}, {"adam_t", opt.t()}, {"fingerprint", RunFingerprint(cfg)}};
    SaveParams(p, (dir / kCheckpoint).string(), DType::kF32, [&](GgufWriter& w) {
      w.SetString("train.state", state.dump());
      for (size_t i = 0; i < gnamed.size(); ++i) {
        w.AddTensor("opt.m." + gnamed[i].name, DType::kF32, gnamed[i].ne, opt.m()[i].data(), opt.m()[i].size() * 4);
        w.AddTensor("opt.v." + gnamed[i].name, DType::kF32, gnamed[i].ne, opt.v()[i].data(), opt.v()[i].size() * 4);
      }
    });
    SaveParams(p, (dir / kModel).string());
  };

  const auto t_start = Clock::now();
  std::vector<int64_t> order;
  int64_t order_epoch = -1;
  double step_seconds_avg = 0;
  int64_t tokens_done = 0;
  std::vector<int32_t> tokens(static_cast<size_t>(G) * B * (L + 1));
  std::vector<uint8_t> targets(train_seqs.target.empty() ? 0 : tokens.size());
  for (int step = step0; step < cfg.steps; ++step) {
    const auto t0 = Clock::now();
    // The step's sequences: sequence k of the run is the k-th of its epoch's order.
    std::vector<const int32_t*> tok_ptrs(G);
    std::vector<const uint8_t*> tgt_ptrs(G, nullptr);
    for (int micro = 0; micro < G; ++micro) {
      for (int b = 0; b < B; ++b) {
        const int64_t k = (static_cast<int64_t>(step) * G + micro) * B + b;
        const int64_t epoch = k / n_train, pos = k % n_train;
        if (order_epoch != epoch) {
          order = EpochOrder(n_train, cfg.seed, epoch);
          order_epoch = epoch;
        }
        const size_t o = (static_cast<size_t>(micro) * B + b) * (L + 1);
        std::copy_n(train_seqs.at(order[pos]), L + 1, &tokens[o]);
        if (!targets.empty()) std::copy_n(train_seqs.target_at(order[pos]), L + 1, &targets[o]);
      }
      tok_ptrs[micro] = &tokens[static_cast<size_t>(micro) * B * (L + 1)];
      if (!targets.empty()) tgt_ptrs[micro] = &targets[static_cast<size_t>(micro) * B * (L + 1)];
    }
    const StepStats st = engine.Step(step, tok_ptrs, tgt_ptrs, B, L, cfg.seed);
    nlohmann::json load_json = nlohmann::json::array();
    for (const std::vector<int64_t>& l : st.loads) {
      int64_t all = 0;
      for (int64_t v : l) all += v;
      std::vector<double> share(l.size());
      for (size_t e = 0; e < share.size(); ++e) share[e] = all ? std::round(1e4 * l[e] / all) / 1e4 : 0.0;
      load_json.push_back(share);
    }
    const double loss = st.loss, aux = st.aux_loss, lr = st.lr, gnorm = st.grad_norm, max_vio = st.max_vio;
    const double dt = Seconds(t0, Clock::now());
    const int64_t step_tokens = static_cast<int64_t>(B) * L * G;
    tokens_done += step_tokens;
    step_seconds_avg = step == step0 ? dt : 0.9 * step_seconds_avg + 0.1 * dt;
    sum.last_loss = loss;
    emit({{"step", step + 1}, {"loss", loss}, {"aux_loss", aux}, {"lr", lr}, {"grad_norm", gnorm},
          {"tokens_per_s", step_tokens / dt}, {"max_vio", max_vio}, {"expert_load", load_json},
          {"elapsed_s", Seconds(t_start, Clock::now())}});
    const std::string line = StrFormat("step %d/%d | loss %.4f | %.0f tok/s | ETA %s | MaxVio %.3f", step + 1,
                                       cfg.steps, loss, step_tokens / dt,
                                       FormatDuration(step_seconds_avg * (cfg.steps - step - 1)).c_str(), max_vio);
    const int log_every = cfg.log_every > 0 ? cfg.log_every : std::max(1, cfg.steps / 20);
    if (tty) {
      std::fprintf(stderr, "\r\033[K%s", line.c_str());
      std::fflush(stderr);
    } else if ((step + 1) % log_every == 0 || step + 1 == cfg.steps) {
      log(line);
    }
    const bool last = step + 1 == cfg.steps;
    if ((cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0) || last) evaluate(step + 1);
    if ((cfg.save_every > 0 && (step + 1) % cfg.save_every == 0) || last) save(step + 1);
  }
  if (step0 >= cfg.steps) {  // nothing left to do: the run had finished
    log(StrFormat("the run in %s has already done its %d steps", cfg.out_dir.c_str(), cfg.steps));
  }
  if (tty) std::fprintf(stderr, "\n");
  sum.steps = cfg.steps;
  sum.seconds = Seconds(t_start, Clock::now());
  sum.tokens_per_s = sum.seconds > 0 ? tokens_done / sum.seconds : 0.0;
  log(StrFormat("done: %d steps, last loss %.4f, validation loss %.4f (perplexity %.2f), %.0f tok/s; wrote %s",
                sum.steps, sum.last_loss, sum.val_loss, std::exp(sum.val_loss), sum.tokens_per_s,
                (dir / kModel).c_str()));
  return sum;
}

}  // namespace moe
