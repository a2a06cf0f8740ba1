// MoE layer bookkeeping shared by the grouped and the naive implementation: names, validation,
// array sizes, routing groups, loss scope, fine-grained split, telemetry and the bias update.
#include <algorithm>
#include <cmath>
#include <string>

#include <nlohmann/json.hpp>

#include "moe/moe_layer.h"
#include "moe/moe_layer_internal.h"
#include "util/error.h"

namespace moe {

// ---- names ------------------------------------------------------------------------------------

namespace {
struct RouterName {
  MoeRouterKind kind;
  const char* name;
};
constexpr RouterName kRouterNames[] = {
    {MoeRouterKind::kSoftmaxTopK, "softmax_topk"}, {MoeRouterKind::kSigmoidBias, "sigmoid_bias"},
    {MoeRouterKind::kExpertChoice, "expert_choice"}, {MoeRouterKind::kHash, "hash"},
    {MoeRouterKind::kTopP, "top_p"},
};
}  // namespace

const char* MoeRouterName(MoeRouterKind kind) {
  for (const auto& r : kRouterNames) {
    if (r.kind == kind) return r.name;
  }
  return "unknown";
}

bool ParseMoeRouterKind(std::string_view name, MoeRouterKind* out) {
  for (const auto& r : kRouterNames) {
    if (name == r.name) {
      *out = r.kind;
      return true;
    }
  }
  return false;
}

const char* MoeRouterNames() { return "softmax_topk, sigmoid_bias, expert_choice, hash, top_p"; }

MoeTargetKind MoeLayerConfig::TargetKind(int id) const {
  if (id < n_expert) return MoeTargetKind::kFfn;
  id -= n_expert;
  if (id < n_null) return MoeTargetKind::kNull;
  id -= n_null;
  if (id < n_zero) return MoeTargetKind::kZero;
  id -= n_zero;
  if (id < n_copy) return MoeTargetKind::kCopy;
  return MoeTargetKind::kConst;
}

double MoeLayerConfig::EntropyCoef() const {
  if (entropy_loss_coef >= 0) return entropy_loss_coef;
  return router == MoeRouterKind::kTopP ? 1e-4 : 0.0;
}

// ---- validation and sizes ---------------------------------------------------------------------

void ValidateMoeConfig(const MoeLayerConfig& c) {
  const char* rn = MoeRouterName(c.router);
  if (std::string(rn) == "unknown") Fail("MoE layer: router kind %d is unknown: use one of %s", static_cast<int>(c.router), MoeRouterNames());
  if (c.d_model <= 0 || c.d_ff <= 0) Fail("MoE layer: d_model (%d) and d_ff (%d) must be > 0", c.d_model, c.d_ff);
  if (c.n_expert <= 0) Fail("MoE layer: n_expert is %d: set at least 1 expert", c.n_expert);
  if (c.n_null < 0 || c.n_zero < 0 || c.n_copy < 0 || c.n_const < 0) Fail("MoE layer: n_null, n_zero, n_copy and n_const must be >= 0");
  const int R = c.router_width();
  if (c.k < 1 || c.k > R) Fail("MoE layer: k = %d must be in [1, %d] (the router's %d targets)", c.k, R, R);
  const bool softmax_router = c.router == MoeRouterKind::kSoftmaxTopK || c.router == MoeRouterKind::kTopP;
  if (R != c.n_expert && !softmax_router) Fail("MoE layer: null and zero-computation experts need a softmax router (softmax_topk or top_p), not %s", rn);
  if (c.gating_residual && !softmax_router) Fail("MoE layer: gating_residual needs a softmax router (softmax_topk or top_p), not %s", rn);
  if (c.router == MoeRouterKind::kExpertChoice) {
    if (c.k != c.n_expert) Fail("MoE layer: expert_choice needs k = n_expert (%d), got k = %d: one slot per expert, used when the expert picks the token", c.n_expert, c.k);
    if (c.capacity_factor != 0.0) Fail("MoE layer: expert_choice sets its capacity with ec_capacity_factor: set capacity_factor = 0 (got %g)", c.capacity_factor);
    if (!(c.ec_capacity_factor > 0)) Fail("MoE layer: ec_capacity_factor = %g must be > 0", c.ec_capacity_factor);
    if (c.norm_topk) Fail("MoE layer: expert_choice weights are the token's probabilities: set norm_topk = false");
  }
  if (c.router == MoeRouterKind::kHash) {
    if (c.norm_topk) Fail("MoE layer: hash routing has fixed weights 1/k: set norm_topk = false");
    if (c.jitter_eps != 0.0) Fail("MoE layer: hash routing has no router to jitter: set jitter_eps = 0");
  }
  if (c.router == MoeRouterKind::kTopP && !(c.top_p > 0 && c.top_p <= 1)) Fail("MoE layer: top_p = %g must be in (0, 1]", c.top_p);
  if (c.n_group > 1) {
    if (c.router != MoeRouterKind::kSoftmaxTopK && c.router != MoeRouterKind::kSigmoidBias) Fail("MoE layer: group-limited selection (n_group = %d) needs softmax_topk or sigmoid_bias, not %s", c.n_group, rn);
    if (R != c.n_expert) Fail("MoE layer: group-limited selection does not combine with null or zero-computation experts");
    if (c.n_expert % c.n_group != 0) Fail("MoE layer: n_expert = %d is not a multiple of n_group = %d", c.n_expert, c.n_group);
    if (c.topk_group < 1 || c.topk_group > c.n_group) Fail("MoE layer: topk_group = %d must be in [1, n_group = %d]", c.topk_group, c.n_group);
    if (c.topk_group * (c.n_expert / c.n_group) < c.k) Fail("MoE layer: topk_group = %d groups hold fewer than k = %d experts: raise topk_group", c.topk_group, c.k);
  }
  if (c.n_shared < 0 || (c.n_shared > 0 && c.d_ff_shared <= 0)) Fail("MoE layer: n_shared = %d needs d_ff_shared > 0 (got %d)", c.n_shared, c.d_ff_shared);
  if (c.shared_gate && c.n_shared == 0) Fail("MoE layer: shared_gate is set but n_shared is 0");
  if (c.capacity_factor < 0) Fail("MoE layer: capacity_factor = %g must be >= 0 (0 = dropless)", c.capacity_factor);
  if (c.jitter_eps < 0 || c.jitter_eps >= 1) Fail("MoE layer: jitter_eps = %g must be in [0, 1)", c.jitter_eps);
  if (c.zc_balance_tau < 0) Fail("MoE layer: zc_balance_tau = %g must be >= 0", c.zc_balance_tau);
  if (c.aux_loss_coef < 0 || c.z_loss_coef < 0) Fail("MoE layer: aux_loss_coef (%g) and z_loss_coef (%g) must be >= 0", c.aux_loss_coef, c.z_loss_coef);
}

MoeLayerConfig FineGrainedConfig(const MoeLayerConfig& cfg, int m) {
  if (m < 1) Fail("MoE layer: fine-grained factor m = %d must be >= 1", m);
  if (cfg.d_ff % m != 0) Fail("MoE layer: d_ff = %d is not a multiple of the fine-grained factor m = %d", cfg.d_ff, m);
  MoeLayerConfig f = cfg;
  f.n_expert = cfg.n_expert * m;
  f.d_ff = cfg.d_ff / m;
  f.k = cfg.router == MoeRouterKind::kExpertChoice ? f.n_expert : cfg.k * m;
  ValidateMoeConfig(f);
  return f;
}

namespace internal {

MoeArraySizes ArraySizes(const MoeLayerConfig& c) {
  const size_t D = c.d_model, F = c.d_ff, E = c.n_expert, S = c.n_shared, Fs = c.d_ff_shared;
  const size_t R = c.router_width(), C = c.n_const;
  MoeArraySizes z;
  z.router = c.router == MoeRouterKind::kHash ? 0 : R * D;
  z.gate_exps = z.up_exps = z.down_exps = E * F * D;
  z.exp_probs_b = c.router == MoeRouterKind::kSigmoidBias ? E : 0;
  z.gate_shexp = z.up_shexp = z.down_shexp = S * Fs * D;
  z.gate_inp_shexp = c.shared_gate ? D : 0;
  z.const_wc = C * 2 * D;
  z.const_v = C * D;
  z.gate_res = c.gating_residual ? R * R : 0;
  return z;
}

}  // namespace internal

template <typename T>
void MoeWeights<T>::Resize(const MoeLayerConfig& c) {
  const internal::MoeArraySizes z = internal::ArraySizes(c);
  router.assign(z.router, T(0));
  gate_exps.assign(z.gate_exps, T(0));
  up_exps.assign(z.up_exps, T(0));
  down_exps.assign(z.down_exps, T(0));
  exp_probs_b.assign(z.exp_probs_b, T(0));
  gate_shexp.assign(z.gate_shexp, T(0));
  up_shexp.assign(z.up_shexp, T(0));
  down_shexp.assign(z.down_shexp, T(0));
  gate_inp_shexp.assign(z.gate_inp_shexp, T(0));
  const_wc.assign(z.const_wc, T(0));
  const_v.assign(z.const_v, T(0));
  gate_res.assign(z.gate_res, T(0));
}

template <typename T>
void MoeGrads<T>::Resize(const MoeLayerConfig& c) {
  const internal::MoeArraySizes z = internal::ArraySizes(c);
  router.assign(z.router, T(0));
  gate_exps.assign(z.gate_exps, T(0));
  up_exps.assign(z.up_exps, T(0));
  down_exps.assign(z.down_exps, T(0));
  gate_shexp.assign(z.gate_shexp, T(0));
  up_shexp.assign(z.up_shexp, T(0));
  down_shexp.assign(z.down_shexp, T(0));
  gate_inp_shexp.assign(z.gate_inp_shexp, T(0));
  const_wc.assign(z.const_wc, T(0));
  const_v.assign(z.const_v, T(0));
  gate_res.assign(z.gate_res, T(0));
  prev_logits.clear();
}

template <typename T>
void MoeGrads<T>::Zero() {
  for (auto* v : {&router, &gate_exps, &up_exps, &down_exps, &gate_shexp, &up_shexp, &down_shexp,
                  &gate_inp_shexp, &const_wc, &const_v, &gate_res, &prev_logits}) {
    std::fill(v->begin(), v->end(), T(0));
  }
}

template <typename T>
void SplitExperts(const MoeLayerConfig& cfg, const MoeWeights<T>& w, int m, MoeLayerConfig* cfg_out,
                  MoeWeights<T>* w_out) {
  internal::CheckWeights(cfg, w);
  if (cfg.router != MoeRouterKind::kSoftmaxTopK || cfg.router_width() != cfg.n_expert) {
    Fail("MoE layer: SplitExperts keeps the function only for softmax_topk without null or zero-computation experts (got %s)", MoeRouterName(cfg.router));
  }
  MoeLayerConfig f = FineGrainedConfig(cfg, m);
  f.weights_scale = cfg.weights_scale * m;
  MoeWeights<T> o;
  o.Resize(f);
  const size_t D = cfg.d_model, F = cfg.d_ff, Fc = f.d_ff;
  for (int e = 0; e < cfg.n_expert; ++e) {
    for (int c = 0; c < m; ++c) {
      const size_t child = static_cast<size_t>(e) * m + c;
      std::copy_n(&w.router[e * D], D, &o.router[child * D]);
      // Rows [c*Fc, (c+1)*Fc) of W_gate / W_up: contiguous blocks of Fc rows.
      std::copy_n(&w.gate_exps[(e * F + c * Fc) * D], Fc * D, &o.gate_exps[child * Fc * D]);
      std::copy_n(&w.up_exps[(e * F + c * Fc) * D], Fc * D, &o.up_exps[child * Fc * D]);
      // The same columns of W_down [D][F].
      for (size_t d = 0; d < D; ++d) {
        std::copy_n(&w.down_exps[(e * D + d) * F + c * Fc], Fc, &o.down_exps[(child * D + d) * Fc]);
      }
    }
  }
  o.gate_shexp = w.gate_shexp;
  o.up_shexp = w.up_shexp;
  o.down_shexp = w.down_shexp;
  o.gate_inp_shexp = w.gate_inp_shexp;
  *cfg_out = f;
  *w_out = std::move(o);
}

namespace internal {

namespace {
void CheckSize(const char* what, const char* name, size_t have, size_t need) {
  if (have != need) Fail("MoE layer: %s '%s' has %zu values, the config needs %zu", what, name, have, need);
}
}  // namespace

template <typename T>
void CheckWeights(const MoeLayerConfig& c, const MoeWeights<T>& w) {
  ValidateMoeConfig(c);
  const MoeArraySizes z = ArraySizes(c);
  const char* what = "weight";
  CheckSize(what, "ffn_gate_inp", w.router.size(), z.router);
  CheckSize(what, "ffn_gate_exps", w.gate_exps.size(), z.gate_exps);
  CheckSize(what, "ffn_up_exps", w.up_exps.size(), z.up_exps);
  CheckSize(what, "ffn_down_exps", w.down_exps.size(), z.down_exps);
  if (!w.exp_probs_b.empty()) CheckSize(what, "exp_probs_b", w.exp_probs_b.size(), static_cast<size_t>(c.n_expert));
  CheckSize(what, "ffn_gate_shexp", w.gate_shexp.size(), z.gate_shexp);
  CheckSize(what, "ffn_up_shexp", w.up_shexp.size(), z.up_shexp);
  CheckSize(what, "ffn_down_shexp", w.down_shexp.size(), z.down_shexp);
  CheckSize(what, "ffn_gate_inp_shexp", w.gate_inp_shexp.size(), z.gate_inp_shexp);
  CheckSize(what, "const_wc", w.const_wc.size(), z.const_wc);
  CheckSize(what, "const_v", w.const_v.size(), z.const_v);
  CheckSize(what, "gate_res", w.gate_res.size(), z.gate_res);
}

template <typename T>
void CheckGrads(const MoeLayerConfig& c, const MoeGrads<T>& g) {
  const MoeArraySizes z = ArraySizes(c);
  const char* what = "gradient (call MoeGrads::Resize(cfg))";
  CheckSize(what, "ffn_gate_inp", g.router.size(), z.router);
  CheckSize(what, "ffn_gate_exps", g.gate_exps.size(), z.gate_exps);
  CheckSize(what, "ffn_up_exps", g.up_exps.size(), z.up_exps);
  CheckSize(what, "ffn_down_exps", g.down_exps.size(), z.down_exps);
  CheckSize(what, "ffn_gate_shexp", g.gate_shexp.size(), z.gate_shexp);
  CheckSize(what, "ffn_up_shexp", g.up_shexp.size(), z.up_shexp);
  CheckSize(what, "ffn_down_shexp", g.down_shexp.size(), z.down_shexp);
  CheckSize(what, "ffn_gate_inp_shexp", g.gate_inp_shexp.size(), z.gate_inp_shexp);
  CheckSize(what, "const_wc", g.const_wc.size(), z.const_wc);
  CheckSize(what, "const_v", g.const_v.size(), z.const_v);
  CheckSize(what, "gate_res", g.gate_res.size(), z.gate_res);
}

template <typename T>
void CheckForwardOptions(const MoeLayerConfig& cfg, int n_tokens, const MoeForwardOptions& opt) {
  if (n_tokens < 0) Fail("MoE layer: n_tokens = %d must be >= 0", n_tokens);
  const auto* fixed = static_cast<const MoeCache<T>*>(opt.fixed_routing);
  if (fixed != nullptr && fixed->n_tokens != n_tokens) {
    Fail("MoE layer: the fixed routing was made for %d tokens, this call has %d", fixed->n_tokens, n_tokens);
  }
  if (opt.seq_len < 0 || (opt.seq_len > 0 && n_tokens % opt.seq_len != 0)) {
    Fail("MoE layer: %d tokens are not whole sequences of seq_len = %d", n_tokens, opt.seq_len);
  }
  if (cfg.router == MoeRouterKind::kExpertChoice && opt.seq_len > 0) {
    Fail("MoE layer: expert_choice chooses over the whole batch: set seq_len = 0 (got %d)", opt.seq_len);
  }
  if (cfg.router == MoeRouterKind::kHash && fixed == nullptr && n_tokens > 0 && opt.token_ids == nullptr) {
    Fail("MoE layer: hash routing needs the token ids (MoeForwardOptions::token_ids)");
  }
  if (opt.prev_logits != nullptr && !cfg.gating_residual) {
    Fail("MoE layer: prev_logits was given but gating_residual is off");
  }
  if (opt.balance != nullptr) {
    if (static_cast<int>(opt.balance->counts.size()) != cfg.router_width()) {
      Fail("MoE layer: the balance scope has %zu targets, the router %d", opt.balance->counts.size(), cfg.router_width());
    }
    if (!(opt.balance->n_tokens >= n_tokens) || !(opt.balance->n_slots > 0 || n_tokens == 0)) {
      Fail("MoE layer: the balance scope (%g tokens, %g slots) does not cover this call's %d tokens: fill it with AddToBalanceScope first",
           opt.balance->n_tokens, opt.balance->n_slots, n_tokens);
    }
  }
}

double BalanceEta(const MoeLayerConfig& cfg, int target) {
  const MoeTargetKind k = cfg.TargetKind(target);
  return k == MoeTargetKind::kFfn || k == MoeTargetKind::kNull ? 1.0 : cfg.zc_balance_tau;
}

double AuxCoef(const MoeLayerConfig& cfg) {
  return cfg.router == MoeRouterKind::kExpertChoice || cfg.router == MoeRouterKind::kHash ? 0.0
                                                                                          : cfg.aux_loss_coef;
}

template <typename T>
void SetLossScope(const MoeLayerConfig& cfg, const MoeBalanceScope* scope, MoeCache<T>* cache) {
  const int R = cfg.router_width();
  cache->loss_f.assign(R, 0.0);
  if (scope != nullptr) {
    for (int i = 0; i < R; ++i) cache->loss_f[i] = scope->n_slots > 0 ? scope->counts[i] / scope->n_slots : 0.0;
    cache->loss_tokens = scope->n_tokens;
    return;
  }
  double n_active = 0;
  for (int32_t id : cache->plan.expert_ids) {
    if (id < 0) continue;
    cache->loss_f[id] += 1.0;
    n_active += 1.0;
  }
  for (double& f : cache->loss_f) f = n_active > 0 ? f / n_active : 0.0;
  cache->loss_tokens = cache->n_tokens;
}

}  // namespace internal

template <typename T>
void AddToBalanceScope(const MoeLayerConfig& cfg, const MoeCache<T>& cache, MoeBalanceScope* scope) {
  const int R = cfg.router_width();
  if (scope->counts.empty()) scope->counts.assign(R, 0.0);
  if (static_cast<int>(scope->counts.size()) != R) Fail("MoE layer: the balance scope has %zu targets, the router %d", scope->counts.size(), R);
  if (cache.plan.expert_ids.size() != static_cast<size_t>(cache.n_tokens) * cfg.k) Fail("MoE layer: AddToBalanceScope needs the cache of a forward call");
  for (int32_t id : cache.plan.expert_ids) {
    if (id < 0) continue;
    scope->counts[id] += 1.0;
    scope->n_slots += 1.0;
  }
  scope->n_tokens += cache.n_tokens;
}

// ---- telemetry and bias ---------------------------------------------------------------------

template <typename T>
MoeTelemetry ComputeTelemetry(const MoeLayerConfig& cfg, const MoeCache<T>& c) {
  MoeTelemetry m;
  const int E = cfg.n_expert, R = cfg.router_width(), n = c.n_tokens;
  m.router = MoeRouterName(cfg.router);
  m.n_tokens = n;
  m.n_expert = E;
  m.n_targets = R;
  m.k = cfg.k;
  m.routed_per_expert.assign(R, 0);
  m.kept_per_expert.assign(R, 0);
  m.share.assign(R, 0.0);
  m.aux_loss = c.aux_loss;
  m.z_loss = c.z_loss;
  m.entropy_loss = c.entropy_loss;
  if (n == 0) return m;
  int64_t n_active = 0, active_ffn = 0, active_zc = 0;
  for (int32_t id : c.plan.expert_ids) {
    if (id < 0) continue;
    ++m.routed_per_expert[id];
    ++n_active;
    if (id < E) ++active_ffn;
    else ++active_zc;
  }
  int64_t max_load = 0;
  for (int e = 0; e < R; ++e) {
    if (e < E) {
      m.kept_per_expert[e] = c.plan.tokens_per_expert[e];
      max_load = std::max(max_load, m.routed_per_expert[e]);
    }
    m.share[e] = n_active > 0 ? static_cast<double>(m.routed_per_expert[e]) / n_active : 0.0;
  }
  const double mean_load = static_cast<double>(active_ffn) / E;
  m.max_vio = mean_load > 0 ? (max_load - mean_load) / mean_load : 0.0;
  m.drop_rate = active_ffn > 0 ? static_cast<double>(c.plan.n_dropped) / active_ffn : 0.0;
  m.mean_experts_per_token = static_cast<double>(c.plan.n_rows()) / n;
  m.mean_zc_per_token = static_cast<double>(active_zc) / n;
  double h = 0.0;
  for (size_t i = 0; i < c.bprobs.size(); ++i) {
    const double p = c.bprobs[i];
    if (p > 0) h -= p * std::log(p);
  }
  m.router_entropy = h / n;
  return m;
}

std::string MoeTelemetryToJson(const MoeTelemetry& t) {
  nlohmann::json j = {
      {"layer", t.layer},
      {"router", t.router},
      {"n_tokens", t.n_tokens},
      {"n_expert", t.n_expert},
      {"n_targets", t.n_targets},
      {"k", t.k},
      {"routed_per_expert", t.routed_per_expert},
      {"kept_per_expert", t.kept_per_expert},
      {"share", t.share},
      {"max_vio", t.max_vio},
      {"drop_rate", t.drop_rate},
      {"router_entropy", t.router_entropy},
      {"mean_experts_per_token", t.mean_experts_per_token},
      {"mean_zc_per_token", t.mean_zc_per_token},
      {"aux_loss", t.aux_loss},
      {"z_loss", t.z_loss},
      {"entropy_loss", t.entropy_loss},
  };
  return j.dump();
}

template <typename T>
void UpdateBias(const MoeLayerConfig& cfg, const MoeTelemetry& tel, MoeWeights<T>* w) {
  if (cfg.router != MoeRouterKind::kSigmoidBias) Fail("MoE layer: UpdateBias is for the sigmoid_bias router, not %s", MoeRouterName(cfg.router));
  if (static_cast<int>(tel.routed_per_expert.size()) != cfg.n_expert) {
    Fail("MoE layer: telemetry has %zu experts, the config %d", tel.routed_per_expert.size(), cfg.n_expert);
  }
  if (w->exp_probs_b.empty()) w->exp_probs_b.assign(cfg.n_expert, T(0));
  double total = 0;
  for (int64_t v : tel.routed_per_expert) total += static_cast<double>(v);
  const double mean = total / cfg.n_expert;
  for (int e = 0; e < cfg.n_expert; ++e) {
    const double diff = mean - static_cast<double>(tel.routed_per_expert[e]);
    const double sgn = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
    w->exp_probs_b[e] += static_cast<T>(cfg.bias_update_rate * sgn);
  }
}

#define MOE_INSTANTIATE(T)                                                                        \
  template struct MoeWeights<T>;                                                                  \
  template struct MoeGrads<T>;                                                                    \
  template void SplitExperts<T>(const MoeLayerConfig&, const MoeWeights<T>&, int,                 \
                                MoeLayerConfig*, MoeWeights<T>*);                                 \
  template void internal::CheckWeights<T>(const MoeLayerConfig&, const MoeWeights<T>&);           \
  template void internal::CheckGrads<T>(const MoeLayerConfig&, const MoeGrads<T>&);               \
  template void internal::CheckForwardOptions<T>(const MoeLayerConfig&, int,                      \
                                                 const MoeForwardOptions&);                       \
  template void internal::SetLossScope<T>(const MoeLayerConfig&, const MoeBalanceScope*,          \
                                          MoeCache<T>*);                                          \
  template void AddToBalanceScope<T>(const MoeLayerConfig&, const MoeCache<T>&, MoeBalanceScope*); \
  template MoeTelemetry ComputeTelemetry<T>(const MoeLayerConfig&, const MoeCache<T>&);           \
  template void UpdateBias<T>(const MoeLayerConfig&, const MoeTelemetry&, MoeWeights<T>*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
