// The reference MoE layer: one token at a time, plain loops, no BLAS and no saved activations (the
// backward recomputes everything from x). Written separately from the grouped path so that the
// equivalence tests compare two implementations, not one with itself.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "moe/moe_layer.h"
#include "moe/moe_layer_internal.h"
#include "util/error.h"

namespace moe {
namespace {

template <typename T>
T Sig(T v) { return T(1) / (T(1) + std::exp(-v)); }

bool IsSoftmaxGating(MoeRouterKind r) { return r != MoeRouterKind::kSigmoidBias; }

// Router of token t over the R targets: logits, gating, balance probabilities, logsumexp.
template <typename T>
struct TokenRoute {
  std::vector<T> logits, probs, bprobs;  // [R]; empty for kHash
  T lse = 0;                             // logsumexp(logits), for the z-loss
};

// xt [D] the token, noise_t [D] or nullptr, prev_t [R] the previous layer's logits or nullptr.
template <typename T>
TokenRoute<T> RouteOne(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* xt,
                       const T* noise_t, const T* prev_t) {
  TokenRoute<T> r;
  if (cfg.router == MoeRouterKind::kHash) return r;
  const int R = cfg.router_width(), D = cfg.d_model;
  r.logits.assign(R, T(0));
  r.probs.assign(R, T(0));
  r.bprobs.assign(R, T(0));
  for (int i = 0; i < R; ++i) {
    T a = 0;
    for (int d = 0; d < D; ++d) {
      a += w.router[static_cast<size_t>(i) * D + d] * (noise_t ? xt[d] * noise_t[d] : xt[d]);
    }
    if (cfg.gating_residual && prev_t != nullptr) {
      for (int j = 0; j < R; ++j) a += w.gate_res[static_cast<size_t>(i) * R + j] * prev_t[j];
    }
    r.logits[i] = a;
  }
  const T mx = *std::max_element(r.logits.begin(), r.logits.end());
  T se = 0;
  for (int i = 0; i < R; ++i) se += std::exp(r.logits[i] - mx);
  r.lse = mx + std::log(se);
  if (IsSoftmaxGating(cfg.router)) {  // softmax_topk, top_p, expert_choice
    for (int i = 0; i < R; ++i) r.bprobs[i] = r.probs[i] = std::exp(r.logits[i] - mx) / se;
  } else {
    T s = 0;
    for (int i = 0; i < R; ++i) s += r.probs[i] = Sig(r.logits[i]);
    for (int i = 0; i < R; ++i) r.bprobs[i] = r.probs[i] / s;
  }
  return r;
}

// Constant experts' mixing weights of token t: a [n_const][2] = softmax(W_c x) per expert (on the
// un-jittered x: only the router sees the jitter).
template <typename T>
void ConstMixOne(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* xt, T* a) {
  const int D = cfg.d_model;
  for (int ci = 0; ci < cfg.n_const; ++ci) {
    T u[2];
    for (int m = 0; m < 2; ++m) {
      T s = 0;
      for (int d = 0; d < D; ++d) s += w.const_wc[(static_cast<size_t>(ci) * 2 + m) * D + d] * xt[d];
      u[m] = s;
    }
    const T mx = std::max(u[0], u[1]);
    const T e0 = std::exp(u[0] - mx), e1 = std::exp(u[1] - mx);
    a[2 * ci] = e0 / (e0 + e1);
    a[2 * ci + 1] = e1 / (e0 + e1);
  }
}

// Token-choice selection of token t: ids [k] best first and active [k]. Expert choice returns the
// identity (slot j = expert j) with every slot inactive: the experts decide later.
template <typename T>
void SelectOne(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const std::vector<T>& probs,
               int32_t token_id, int32_t* ids, uint8_t* active) {
  const int E = cfg.n_expert, R = cfg.router_width(), K = cfg.k;
  if (cfg.router == MoeRouterKind::kExpertChoice) {
    for (int j = 0; j < K; ++j) ids[j] = j, active[j] = 0;
    return;
  }
  if (cfg.router == MoeRouterKind::kHash) {
    HashExperts(cfg.hash_seed, token_id, E, K, ids);
    std::fill(active, active + K, 1);
    return;
  }
  std::vector<T> score = probs;
  if (cfg.router == MoeRouterKind::kSigmoidBias && !w.exp_probs_b.empty()) {
    for (int e = 0; e < E; ++e) score[e] += w.exp_probs_b[e];
  }
  std::vector<uint8_t> allowed(R, 1);
  if (cfg.n_group > 1) {  // R == E here (validated)
    const int gs = E / cfg.n_group;
    std::vector<std::pair<T, int>> groups;
    for (int g = 0; g < cfg.n_group; ++g) {
      std::vector<T> v(score.begin() + g * gs, score.begin() + (g + 1) * gs);
      std::sort(v.begin(), v.end(), std::greater<T>());
      groups.push_back({gs >= 2 ? v[0] + v[1] : v[0], g});
    }
    std::stable_sort(groups.begin(), groups.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    std::fill(allowed.begin(), allowed.end(), 0);
    for (int r = 0; r < cfg.topk_group; ++r) {
      for (int e = 0; e < gs; ++e) allowed[groups[r].second * gs + e] = 1;
    }
  }
  std::vector<int> order;
  for (int i = 0; i < R; ++i) {
    if (allowed[i]) order.push_back(i);
  }
  // Stable: equal scores keep the lower id first.
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
  std::copy(order.begin(), order.begin() + K, ids);
  int n_active = K;
  if (cfg.router == MoeRouterKind::kTopP) {
    // Fewest targets whose cumulative probability reaches top_p, at most k.
    double cum = 0.0;
    n_active = K;
    for (int j = 0; j < K; ++j) {
      cum += static_cast<double>(probs[order[j]]);
      if (cum >= cfg.top_p) {
        n_active = j + 1;
        break;
      }
    }
  }
  for (int j = 0; j < K; ++j) active[j] = j < n_active ? 1 : 0;
}

// Gate weights of token t from its probabilities and its (fixed) slots: 0 on inactive slots;
// norm_topk divides by the probability mass of the active non-null slots (null slots keep theirs).
template <typename T>
std::vector<T> WeightsOne(const MoeLayerConfig& cfg, const std::vector<T>& probs,
                          const int32_t* ids, const uint8_t* active) {
  const int K = cfg.k;
  const T scale = static_cast<T>(cfg.weights_scale);
  std::vector<T> gw(K, T(0));
  if (cfg.router == MoeRouterKind::kHash) {
    for (int j = 0; j < K; ++j) gw[j] = active[j] ? scale / static_cast<T>(K) : T(0);
    return gw;
  }
  T s = 0;
  for (int j = 0; j < K; ++j) {
    if (active[j] && cfg.TargetKind(ids[j]) != MoeTargetKind::kNull) s += probs[ids[j]];
  }
  for (int j = 0; j < K; ++j) {
    if (!active[j]) continue;
    const bool norm = cfg.norm_topk && cfg.TargetKind(ids[j]) != MoeTargetKind::kNull;
    gw[j] = (norm ? probs[ids[j]] / s : probs[ids[j]]) * scale;
  }
  return gw;
}

// One SwiGLU expert on one token: h = W_down (silu(W_gate x) * (W_up x)).
template <typename T>
void ExpertOne(const T* wg, const T* wu, const T* wd, int D, int F, const T* xt, T* out) {
  std::vector<T> a(F);
  for (int f = 0; f < F; ++f) {
    T g = 0, u = 0;
    for (int d = 0; d < D; ++d) {
      g += wg[static_cast<size_t>(f) * D + d] * xt[d];
      u += wu[static_cast<size_t>(f) * D + d] * xt[d];
    }
    a[f] = g * Sig(g) * u;
  }
  for (int d = 0; d < D; ++d) {
    T o = 0;
    for (int f = 0; f < F; ++f) o += wd[static_cast<size_t>(d) * F + f] * a[f];
    out[d] = o;
  }
}

// Backward of one expert on one token for the output gradient dout [D]: adds weight grads and
// dx_t.
template <typename T>
void ExpertOneBackward(const T* wg, const T* wu, const T* wd, int D, int F, const T* xt,
                       const T* dout, T* dwg, T* dwu, T* dwd, T* dxt) {
  for (int f = 0; f < F; ++f) {
    T g = 0, u = 0;
    for (int d = 0; d < D; ++d) {
      g += wg[static_cast<size_t>(f) * D + d] * xt[d];
      u += wu[static_cast<size_t>(f) * D + d] * xt[d];
    }
    const T sg = Sig(g), a = g * sg * u;
    T da = 0;
    for (int d = 0; d < D; ++d) {
      da += wd[static_cast<size_t>(d) * F + f] * dout[d];
      dwd[static_cast<size_t>(d) * F + f] += dout[d] * a;
    }
    const T dg = da * u * sg * (T(1) + g * (T(1) - sg));
    const T du = da * g * sg;
    for (int d = 0; d < D; ++d) {
      dwg[static_cast<size_t>(f) * D + d] += dg * xt[d];
      dwu[static_cast<size_t>(f) * D + d] += du * xt[d];
      dxt[d] += dg * wg[static_cast<size_t>(f) * D + d] + du * wu[static_cast<size_t>(f) * D + d];
    }
  }
}

// Index of a constant expert among the constant experts.
int ConstIndex(const MoeLayerConfig& cfg, int id) {
  return id - (cfg.n_expert + cfg.n_null + cfg.n_zero + cfg.n_copy);
}

// Output of a non-FFN target on token t (null and zero: 0; copy: x; constant: a1 x + a2 v).
template <typename T>
void ZeroComputationOut(const MoeLayerConfig& cfg, const MoeWeights<T>& w, int id, const T* xt,
                        const T* a_t, T* out) {
  const int D = cfg.d_model;
  switch (cfg.TargetKind(id)) {
    case MoeTargetKind::kCopy:
      std::copy(xt, xt + D, out);
      break;
    case MoeTargetKind::kConst: {
      const int ci = ConstIndex(cfg, id);
      const T* v = &w.const_v[static_cast<size_t>(ci) * D];
      for (int d = 0; d < D; ++d) out[d] = a_t[2 * ci] * xt[d] + a_t[2 * ci + 1] * v[d];
      break;
    }
    default:
      std::fill(out, out + D, T(0));
  }
}

// Shared experts' output on one token (before the shared gate), and the shared gate.
template <typename T>
T SharedGate(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* xt) {
  if (!cfg.shared_gate) return T(1);
  T a = 0;
  for (int d = 0; d < cfg.d_model; ++d) a += w.gate_inp_shexp[d] * xt[d];
  return Sig(a);
}

}  // namespace

template <typename T>
void MoeForwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                     T* y, MoeCache<T>* cache, const MoeForwardOptions& opt) {
  internal::CheckWeights(cfg, w);
  internal::CheckForwardOptions<T>(cfg, n_tokens, opt);
  const int D = cfg.d_model, F = cfg.d_ff, E = cfg.n_expert, K = cfg.k, R = cfg.router_width();
  const bool hash = cfg.router == MoeRouterKind::kHash;
  const size_t nd = static_cast<size_t>(n_tokens) * D, nk = static_cast<size_t>(n_tokens) * K;
  const size_t nr = static_cast<size_t>(n_tokens) * R;
  const auto* fixed = static_cast<const MoeCache<T>*>(opt.fixed_routing);
  MoeCache<T> c;  // built apart so that cache may be the fixed routing itself
  c.n_tokens = n_tokens;
  c.x.assign(x, x + nd);
  if (hash) {
    if (opt.token_ids != nullptr) c.token_ids.assign(opt.token_ids, opt.token_ids + n_tokens);
    else if (fixed != nullptr) c.token_ids = fixed->token_ids;
  }
  if (fixed != nullptr) {
    c.noise = fixed->noise;
  } else if (opt.training && cfg.jitter_eps > 0) {
    std::mt19937_64 rng(opt.jitter_seed);
    std::uniform_real_distribution<double> u(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps);
    c.noise.resize(nd);
    for (T& v : c.noise) v = static_cast<T>(u(rng));
  }
  if (cfg.gating_residual && opt.prev_logits != nullptr) {
    const T* p = static_cast<const T*>(opt.prev_logits);
    c.prev_logits.assign(p, p + nr);
  }
  c.plan.expert_ids.resize(nk);
  // The naive path's own bookkeeping: active = the router uses the slot, kept = an active FFN slot
  // capacity keeps. Turned into the plan's convention (routing.h) at the end.
  std::vector<uint8_t> active(nk, 0), kept(nk, 0);
  c.gate_w.assign(nk, T(0));
  c.const_a.assign(static_cast<size_t>(n_tokens) * cfg.n_const * 2, T(0));
  if (!hash) {
    c.logits.reserve(nr);
    c.probs.reserve(nr);
    c.bprobs.reserve(nr);
  }
  std::vector<T> lse(n_tokens, T(0));
  // Router, constant mixing and selection, token by token.
  for (int t = 0; t < n_tokens; ++t) {
    const T* xt = x + static_cast<size_t>(t) * D;
    const TokenRoute<T> r =
        RouteOne(cfg, w, xt, c.noise.empty() ? nullptr : &c.noise[static_cast<size_t>(t) * D],
                 c.prev_logits.empty() ? nullptr : &c.prev_logits[static_cast<size_t>(t) * R]);
    c.logits.insert(c.logits.end(), r.logits.begin(), r.logits.end());
    c.probs.insert(c.probs.end(), r.probs.begin(), r.probs.end());
    c.bprobs.insert(c.bprobs.end(), r.bprobs.begin(), r.bprobs.end());
    lse[t] = r.lse;
    ConstMixOne(cfg, w, xt, c.const_a.data() + static_cast<size_t>(t) * cfg.n_const * 2);
    int32_t* ids = &c.plan.expert_ids[static_cast<size_t>(t) * K];
    uint8_t* act = &active[static_cast<size_t>(t) * K];
    if (fixed != nullptr) {
      for (int j = 0; j < K; ++j) {
        const size_t s = static_cast<size_t>(t) * K + j;
        act[j] = fixed->plan.expert_ids[s] >= 0;
        ids[j] = act[j] ? fixed->plan.expert_ids[s] : j;
      }
    } else {
      SelectOne(cfg, w, r.probs, hash ? c.token_ids[t] : 0, ids, act);
    }
  }
  // Expert choice: each expert ranks all tokens by its probability (stable: ties to the lower
  // token) and takes its first c; token-choice capacity: count the active FFN slots per expert in
  // token order within each scope.
  if (fixed != nullptr) {
    for (size_t s = 0; s < nk; ++s) kept[s] = fixed->plan.slot_position[s] >= 0;
  } else if (cfg.router == MoeRouterKind::kExpertChoice) {
    const int64_t cap = n_tokens > 0 ? ExpertChoiceCapacity(cfg, n_tokens) : 0;
    for (int e = 0; e < E; ++e) {
      std::vector<int> tokens(n_tokens);
      std::iota(tokens.begin(), tokens.end(), 0);
      std::stable_sort(tokens.begin(), tokens.end(), [&](int a, int b) {
        return c.probs[static_cast<size_t>(a) * R + e] > c.probs[static_cast<size_t>(b) * R + e];
      });
      for (int64_t q = 0; q < cap; ++q) {
        const size_t s = static_cast<size_t>(tokens[q]) * K + e;
        kept[s] = active[s] = 1;
      }
    }
  } else {
    const int64_t cap = ExpertCapacity(cfg, n_tokens, opt.seq_len);
    const int scope = opt.seq_len > 0 ? opt.seq_len : std::max(n_tokens, 1);
    for (int t0 = 0; t0 < n_tokens; t0 += scope) {
      std::vector<int64_t> used(E, 0);
      for (int t = t0; t < std::min(n_tokens, t0 + scope); ++t) {
        for (int j = 0; j < K; ++j) {
          const size_t s = static_cast<size_t>(t) * K + j;
          const int id = c.plan.expert_ids[s];
          if (!active[s] || id >= E) continue;
          kept[s] = cap < 0 || used[id] < cap ? 1 : 0;
          ++used[id];
        }
      }
    }
  }
  for (int t = 0; t < n_tokens; ++t) {
    const size_t s0 = static_cast<size_t>(t) * K;
    std::vector<T> p;
    if (!hash) p.assign(c.probs.begin() + static_cast<size_t>(t) * R, c.probs.begin() + static_cast<size_t>(t + 1) * R);
    const std::vector<T> gw = WeightsOne(cfg, p, &c.plan.expert_ids[s0], &active[s0]);
    std::copy(gw.begin(), gw.end(), &c.gate_w[s0]);
  }
  {  // the plan: unused slots get id -1, dropped FFN slots no row
    RoutingPlan& p = c.plan;
    p.n_tokens = n_tokens;
    p.k = K;
    p.n_expert = E;
    p.n_targets = R;
    p.weights.resize(nk);
    std::vector<uint8_t> dropped(nk, 0);
    for (size_t s = 0; s < nk; ++s) {
      if (!active[s]) p.expert_ids[s] = -1;
      dropped[s] = active[s] && p.expert_ids[s] < E && !kept[s];
      p.weights[s] = static_cast<float>(c.gate_w[s]);
    }
    p.BuildGroups(dropped.data());
  }
  internal::SetLossScope(cfg, opt.balance, &c);

  // Losses over the scope's f and N.
  const double N = c.loss_tokens;
  if (!hash && n_tokens > 0 && N > 0) {
    double aux = 0.0;
    for (int i = 0; i < R; ++i) {
      double psum = 0.0;
      for (int t = 0; t < n_tokens; ++t) psum += static_cast<double>(c.bprobs[static_cast<size_t>(t) * R + i]);
      aux += internal::BalanceEta(cfg, i) * c.loss_f[i] * psum;
    }
    c.aux_loss = internal::AuxCoef(cfg) * R * aux / N;
    double z = 0.0, h = 0.0;
    for (int t = 0; t < n_tokens; ++t) {
      z += static_cast<double>(lse[t]) * static_cast<double>(lse[t]);
      for (int i = 0; i < R; ++i) {
        const double p = c.bprobs[static_cast<size_t>(t) * R + i];
        if (p > 0) h -= p * std::log(p);
      }
    }
    c.z_loss = cfg.z_loss_coef * z / N;
    c.entropy_loss = cfg.EntropyCoef() * h / N;
  }

  // Outputs: the active slots in slot order, then the shared experts.
  std::vector<T> o(D), sh(D);
  for (int t = 0; t < n_tokens; ++t) {
    const T* xt = x + static_cast<size_t>(t) * D;
    const T* a_t = c.const_a.data() + static_cast<size_t>(t) * cfg.n_const * 2;
    T* yt = y + static_cast<size_t>(t) * D;
    std::fill(yt, yt + D, T(0));
    for (int j = 0; j < K; ++j) {
      const size_t s = static_cast<size_t>(t) * K + j;
      if (!active[s]) continue;
      const int id = c.plan.expert_ids[s];
      if (id < E) {
        if (!kept[s]) continue;
        const size_t wo = static_cast<size_t>(id) * F * D;
        ExpertOne(&w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F, xt, o.data());
      } else {
        const MoeTargetKind kind = cfg.TargetKind(id);
        if (kind == MoeTargetKind::kNull || kind == MoeTargetKind::kZero) continue;
        ZeroComputationOut(cfg, w, id, xt, a_t, o.data());
      }
      for (int d = 0; d < D; ++d) yt[d] += c.gate_w[s] * o[d];
    }
    if (cfg.n_shared > 0) {
      std::fill(sh.begin(), sh.end(), T(0));
      const int Fs = cfg.d_ff_shared;
      for (int s = 0; s < cfg.n_shared; ++s) {
        const size_t wo = static_cast<size_t>(s) * Fs * D;
        ExpertOne(&w.gate_shexp[wo], &w.up_shexp[wo], &w.down_shexp[wo], D, Fs, xt, o.data());
        for (int d = 0; d < D; ++d) sh[d] += o[d];
      }
      const T gsh = SharedGate(cfg, w, xt);
      for (int d = 0; d < D; ++d) yt[d] += gsh * sh[d];
    }
  }
  *cache = std::move(c);
}

template <typename T>
void MoeBackwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const MoeCache<T>& c,
                      const T* dy, T* dx, MoeGrads<T>* g, const T* dlogits_in) {
  internal::CheckWeights(cfg, w);
  internal::CheckGrads(cfg, *g);
  const int D = cfg.d_model, F = cfg.d_ff, K = cfg.k, n = c.n_tokens;
  const int R = cfg.router_width();
  const bool hash = cfg.router == MoeRouterKind::kHash;
  if (c.x.size() != static_cast<size_t>(n) * D || c.plan.expert_ids.size() != static_cast<size_t>(n) * K) {
    Fail("MoE layer: the backward needs the cache of a forward call with this config");
  }
  std::vector<uint8_t> active_slots(c.plan.expert_ids.size()), kept_slots(active_slots.size());
  for (size_t s = 0; s < active_slots.size(); ++s) {
    active_slots[s] = c.plan.expert_ids[s] >= 0;
    kept_slots[s] = c.plan.slot_position[s] >= 0;
  }
  const double N = c.loss_tokens;
  const double aux_coef = internal::AuxCoef(cfg), ent_coef = cfg.EntropyCoef();
  if (cfg.gating_residual) g->prev_logits.assign(static_cast<size_t>(n) * R, T(0));
  std::vector<T> o(D), sh(D), dxt(D), dout(D), a_t(static_cast<size_t>(cfg.n_const) * 2);
  for (int t = 0; t < n; ++t) {
    const T* xt = &c.x[static_cast<size_t>(t) * D];
    const T* dyt = dy + static_cast<size_t>(t) * D;
    const T* nz = c.noise.empty() ? nullptr : &c.noise[static_cast<size_t>(t) * D];
    const T* prev = c.prev_logits.empty() ? nullptr : &c.prev_logits[static_cast<size_t>(t) * R];
    const int32_t* ids = &c.plan.expert_ids[static_cast<size_t>(t) * K];
    const uint8_t* act = &active_slots[static_cast<size_t>(t) * K];
    const uint8_t* kept = &kept_slots[static_cast<size_t>(t) * K];
    std::fill(dxt.begin(), dxt.end(), T(0));
    const TokenRoute<T> r = RouteOne(cfg, w, xt, nz, prev);
    ConstMixOne(cfg, w, xt, a_t.data());
    const std::vector<T> gw = WeightsOne(cfg, r.probs, ids, act);
    // Targets, and the gradient of each gate weight (dgw_j = dy . out_j).
    std::vector<T> dgw(K, T(0));
    for (int j = 0; j < K; ++j) {
      if (!act[j]) continue;
      const int id = ids[j];
      switch (cfg.TargetKind(id)) {
        case MoeTargetKind::kFfn: {
          if (!kept[j]) break;
          const size_t wo = static_cast<size_t>(id) * F * D;
          ExpertOne(&w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F, xt, o.data());
          for (int d = 0; d < D; ++d) {
            dgw[j] += dyt[d] * o[d];
            dout[d] = gw[j] * dyt[d];
          }
          ExpertOneBackward(&w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F, xt,
                            dout.data(), &g->gate_exps[wo], &g->up_exps[wo], &g->down_exps[wo],
                            dxt.data());
          break;
        }
        case MoeTargetKind::kCopy:
          for (int d = 0; d < D; ++d) {
            dgw[j] += dyt[d] * xt[d];
            dxt[d] += gw[j] * dyt[d];
          }
          break;
        case MoeTargetKind::kConst: {
          // out = a1 x + a2 v, [a1, a2] = softmax(u), u = W_c x.
          const int ci = ConstIndex(cfg, id);
          const T a1 = a_t[2 * ci], a2 = a_t[2 * ci + 1];
          const T* v = &w.const_v[static_cast<size_t>(ci) * D];
          T* dv = &g->const_v[static_cast<size_t>(ci) * D];
          T da1 = 0, da2 = 0;
          for (int d = 0; d < D; ++d) {
            dgw[j] += dyt[d] * (a1 * xt[d] + a2 * v[d]);
            da1 += gw[j] * dyt[d] * xt[d];
            da2 += gw[j] * dyt[d] * v[d];
            dxt[d] += gw[j] * a1 * dyt[d];
            dv[d] += gw[j] * a2 * dyt[d];
          }
          const T dot = a1 * da1 + a2 * da2;
          const T du[2] = {a1 * (da1 - dot), a2 * (da2 - dot)};
          for (int m = 0; m < 2; ++m) {
            const size_t wo = (static_cast<size_t>(ci) * 2 + m) * D;
            for (int d = 0; d < D; ++d) {
              g->const_wc[wo + d] += du[m] * xt[d];
              dxt[d] += du[m] * w.const_wc[wo + d];
            }
          }
          break;
        }
        default:  // null and zero experts: output 0
          break;
      }
    }
    if (!hash) {
      // Gate weights -> gating probabilities (dp).
      std::vector<T> dp(R, T(0)), dbp(R, T(0)), dl(R, T(0));
      const T scale = static_cast<T>(cfg.weights_scale);
      T psel = 0;  // mass of the active non-null slots (the norm_topk denominator)
      for (int j = 0; j < K; ++j) {
        if (act[j] && cfg.TargetKind(ids[j]) != MoeTargetKind::kNull) psel += r.probs[ids[j]];
      }
      for (int j = 0; j < K; ++j) {
        if (!act[j]) continue;
        if (!cfg.norm_topk || cfg.TargetKind(ids[j]) == MoeTargetKind::kNull) {
          dp[ids[j]] += scale * dgw[j];
          continue;
        }
        // w_j = scale p_j / psel: dw_j/dp_i = scale (delta_ij / psel - p_j / psel^2) over the
        // active non-null i.
        for (int i = 0; i < K; ++i) {
          if (!act[i] || cfg.TargetKind(ids[i]) == MoeTargetKind::kNull) continue;
          const T dji = (i == j ? T(1) / psel : T(0)) - r.probs[ids[j]] / (psel * psel);
          dp[ids[i]] += scale * dgw[j] * dji;
        }
      }
      // Aux and entropy losses -> balance probabilities.
      if (N > 0) {
        for (int i = 0; i < R; ++i) {
          dbp[i] += static_cast<T>(aux_coef * R * internal::BalanceEta(cfg, i) * c.loss_f[i] / N);
          if (ent_coef != 0.0 && r.bprobs[i] > T(0)) {
            dbp[i] -= static_cast<T>(ent_coef / N) * (std::log(r.bprobs[i]) + T(1));
          }
        }
      }
      // Balance probabilities -> gating probabilities.
      if (IsSoftmaxGating(cfg.router)) {
        for (int i = 0; i < R; ++i) dp[i] += dbp[i];
      } else {
        // bprobs_e = s_e / sum s: d bprobs_e / d s_i = (delta_ei - bprobs_e) / sum s.
        T ssum = 0;
        for (int i = 0; i < R; ++i) ssum += r.probs[i];
        for (int e = 0; e < R; ++e) {
          for (int i = 0; i < R; ++i) dp[i] += dbp[e] * ((i == e ? T(1) : T(0)) - r.bprobs[e]) / ssum;
        }
      }
      // Probabilities -> logits (full Jacobian for the softmax).
      for (int e = 0; e < R; ++e) {
        if (IsSoftmaxGating(cfg.router)) {
          for (int i = 0; i < R; ++i) {
            dl[i] += dp[e] * r.probs[e] * ((i == e ? T(1) : T(0)) - r.probs[i]);
          }
        } else {
          dl[e] += dp[e] * r.probs[e] * (T(1) - r.probs[e]);
        }
      }
      // z-loss: d lse^2 / d l_i = 2 lse softmax(l)_i.
      if (N > 0) {
        for (int i = 0; i < R; ++i) {
          dl[i] += static_cast<T>(cfg.z_loss_coef * 2.0 / N) * r.lse * std::exp(r.logits[i] - r.lse);
        }
      }
      // The next layer's gating residual.
      if (dlogits_in != nullptr) {
        for (int i = 0; i < R; ++i) dl[i] += dlogits_in[static_cast<size_t>(t) * R + i];
      }
      // logits = W_r (x * noise) + W_g prev.
      for (int i = 0; i < R; ++i) {
        for (int d = 0; d < D; ++d) {
          const T xr = nz ? xt[d] * nz[d] : xt[d];
          g->router[static_cast<size_t>(i) * D + d] += dl[i] * xr;
          dxt[d] += dl[i] * w.router[static_cast<size_t>(i) * D + d] * (nz ? nz[d] : T(1));
        }
      }
      if (cfg.gating_residual) {
        T* dprev = &g->prev_logits[static_cast<size_t>(t) * R];
        for (int i = 0; i < R; ++i) {
          for (int j = 0; j < R; ++j) {
            if (prev != nullptr) g->gate_res[static_cast<size_t>(i) * R + j] += dl[i] * prev[j];
            dprev[j] += w.gate_res[static_cast<size_t>(i) * R + j] * dl[i];
          }
        }
      }
    }
    // Shared experts.
    if (cfg.n_shared > 0) {
      const int Fs = cfg.d_ff_shared;
      const T gsh = SharedGate(cfg, w, xt);
      std::fill(sh.begin(), sh.end(), T(0));
      for (int d = 0; d < D; ++d) dout[d] = gsh * dyt[d];
      for (int s = 0; s < cfg.n_shared; ++s) {
        const size_t wo = static_cast<size_t>(s) * Fs * D;
        ExpertOne(&w.gate_shexp[wo], &w.up_shexp[wo], &w.down_shexp[wo], D, Fs, xt, o.data());
        for (int d = 0; d < D; ++d) sh[d] += o[d];
        ExpertOneBackward(&w.gate_shexp[wo], &w.up_shexp[wo], &w.down_shexp[wo], D, Fs, xt,
                          dout.data(), &g->gate_shexp[wo], &g->up_shexp[wo], &g->down_shexp[wo],
                          dxt.data());
      }
      if (cfg.shared_gate) {
        T a = 0;
        for (int d = 0; d < D; ++d) a += dyt[d] * sh[d];
        const T dgl = a * gsh * (T(1) - gsh);
        for (int d = 0; d < D; ++d) {
          g->gate_inp_shexp[d] += dgl * xt[d];
          dxt[d] += dgl * w.gate_inp_shexp[d];
        }
      }
    }
    std::copy(dxt.begin(), dxt.end(), dx + static_cast<size_t>(t) * D);
  }
}

template void MoeForwardNaive<float>(const MoeLayerConfig&, const MoeWeights<float>&, const float*,
                                     int, float*, MoeCache<float>*, const MoeForwardOptions&);
template void MoeForwardNaive<double>(const MoeLayerConfig&, const MoeWeights<double>&,
                                      const double*, int, double*, MoeCache<double>*,
                                      const MoeForwardOptions&);
template void MoeBackwardNaive<float>(const MoeLayerConfig&, const MoeWeights<float>&,
                                      const MoeCache<float>&, const float*, float*,
                                      MoeGrads<float>*, const float*);
template void MoeBackwardNaive<double>(const MoeLayerConfig&, const MoeWeights<double>&,
                                       const MoeCache<double>&, const double*, double*,
                                       MoeGrads<double>*, const double*);

}  // namespace moe
