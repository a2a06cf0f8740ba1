// The reference MoE layer: one token at a time, plain loops, no BLAS and no saved activations (the
// backward recomputes everything from x). Written separately from the grouped path so that the
// equivalence tests compare two implementations, not one with itself.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "moe/moe_layer.h"
#include "moe/moe_layer_internal.h"
#include "util/error.h"

namespace moe {
namespace {

template <typename T>
struct TokenRoute {
  std::vector<T> logits, probs, bprobs;  // [E]
};

template <typename T>
T Sig(T v) { return T(1) / (T(1) + std::exp(-v)); }

// Router of token t: logits, gating, balance probabilities.
template <typename T>
TokenRoute<T> RouteOne(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* xt,
                       const T* noise_t) {
  const int E = cfg.n_expert, D = cfg.d_model;
  TokenRoute<T> r;
  r.logits.assign(E, T(0));
  r.probs.assign(E, T(0));
  r.bprobs.assign(E, T(0));
  for (int e = 0; e < E; ++e) {
    T a = 0;
    for (int d = 0; d < D; ++d) a += w.router[static_cast<size_t>(e) * D + d] * (noise_t ? xt[d] * noise_t[d] : xt[d]);
    r.logits[e] = a;
  }
  if (cfg.router != MoeRouterKind::kSigmoidBias) {  // softmax_topk, expert_choice
    const T mx = *std::max_element(r.logits.begin(), r.logits.end());
    T s = 0;
    for (int e = 0; e < E; ++e) s += std::exp(r.logits[e] - mx);
    for (int e = 0; e < E; ++e) r.bprobs[e] = r.probs[e] = std::exp(r.logits[e] - mx) / s;
  } else {
    T s = 0;
    for (int e = 0; e < E; ++e) s += r.probs[e] = Sig(r.logits[e]);
    for (int e = 0; e < E; ++e) r.bprobs[e] = r.probs[e] / s;
  }
  return r;
}

// Selection by sorting (expert, score) pairs; the group limit ranks groups by the sum of their two
// best scores.
template <typename T>
std::vector<int32_t> SelectOne(const MoeLayerConfig& cfg, const MoeWeights<T>& w,
                               const std::vector<T>& probs) {
  const int E = cfg.n_expert;
  if (cfg.router == MoeRouterKind::kExpertChoice) {
    std::vector<int32_t> all(E);  // slot j = expert j; the experts decide which slots are used
    for (int e = 0; e < E; ++e) all[e] = e;
    return all;
  }
  std::vector<T> score = probs;
  if (cfg.router == MoeRouterKind::kSigmoidBias && !w.exp_probs_b.empty()) {
    for (int e = 0; e < E; ++e) score[e] += w.exp_probs_b[e];
  }
  std::vector<uint8_t> allowed(E, 1);
  if (cfg.n_group > 1) {
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
  for (int e = 0; e < E; ++e) {
    if (allowed[e]) order.push_back(e);
  }
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
  return std::vector<int32_t>(order.begin(), order.begin() + cfg.k);
}

template <typename T>
std::vector<T> WeightsOne(const MoeLayerConfig& cfg, const std::vector<T>& probs,
                          const int32_t* ids) {
  std::vector<T> gw(cfg.k);
  T s = 0;
  for (int j = 0; j < cfg.k; ++j) s += probs[ids[j]];
  for (int j = 0; j < cfg.k; ++j) {
    gw[j] = (cfg.norm_topk ? probs[ids[j]] / s : probs[ids[j]]) * static_cast<T>(cfg.weights_scale);
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

}  // namespace

template <typename T>
void MoeForwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                     T* y, MoeCache<T>* cache, const MoeForwardOptions& opt) {
  internal::CheckWeights(cfg, w);
  const int D = cfg.d_model, F = cfg.d_ff, E = cfg.n_expert, K = cfg.k;
  const size_t nd = static_cast<size_t>(n_tokens) * D;
  const auto* fixed = static_cast<const MoeCache<T>*>(opt.fixed_routing);
  if (fixed != nullptr && fixed->n_tokens != n_tokens) {
    Fail("MoE layer: the fixed routing was made for %d tokens, this call has %d", fixed->n_tokens, n_tokens);
  }
  if (cfg.router == MoeRouterKind::kExpertChoice && opt.seq_len > 0) {
    Fail("MoE layer: expert_choice chooses over the whole batch: set seq_len = 0 (got %d)", opt.seq_len);
  }
  MoeCache<T> c;  // built apart so that cache may be the fixed routing itself
  c.n_tokens = n_tokens;
  c.x.assign(x, x + nd);
  if (fixed != nullptr) {
    c.noise = fixed->noise;
  } else if (opt.training && cfg.jitter_eps > 0) {
    std::mt19937_64 rng(opt.jitter_seed);
    std::uniform_real_distribution<double> u(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps);
    c.noise.resize(nd);
    for (T& v : c.noise) v = static_cast<T>(u(rng));
  }
  c.plan.expert_ids.resize(static_cast<size_t>(n_tokens) * K);
  c.gate_w.resize(static_cast<size_t>(n_tokens) * K);
  std::vector<double> load(E, 0.0), pmean(E, 0.0);
  double z = 0.0;
  for (int t = 0; t < n_tokens; ++t) {
    const T* xt = x + static_cast<size_t>(t) * D;
    TokenRoute<T> r = RouteOne(cfg, w, xt, c.noise.empty() ? nullptr : &c.noise[static_cast<size_t>(t) * D]);
    int32_t* ids = &c.plan.expert_ids[static_cast<size_t>(t) * K];
    if (fixed != nullptr) {
      std::copy_n(&fixed->plan.expert_ids[static_cast<size_t>(t) * K], K, ids);
    } else {
      const std::vector<int32_t> sel = SelectOne(cfg, w, r.probs);
      std::copy(sel.begin(), sel.end(), ids);
    }
    const std::vector<T> gw = WeightsOne(cfg, r.probs, ids);
    std::copy(gw.begin(), gw.end(), &c.gate_w[static_cast<size_t>(t) * K]);
    c.logits.insert(c.logits.end(), r.logits.begin(), r.logits.end());
    c.probs.insert(c.probs.end(), r.probs.begin(), r.probs.end());
    c.bprobs.insert(c.bprobs.end(), r.bprobs.begin(), r.bprobs.end());
    for (int j = 0; j < K; ++j) load[ids[j]] += 1.0;
    double mx = -std::numeric_limits<double>::infinity(), s = 0.0;
    for (int e = 0; e < E; ++e) mx = std::max(mx, static_cast<double>(r.logits[e]));
    for (int e = 0; e < E; ++e) s += std::exp(r.logits[e] - mx);
    z += (mx + std::log(s)) * (mx + std::log(s));
    for (int e = 0; e < E; ++e) pmean[e] += r.bprobs[e] / n_tokens;
  }
  // Capacity: walk the slots in token order and count per expert and scope.
  c.kept.assign(c.plan.expert_ids.size(), 1);
  if (fixed != nullptr) {
    c.kept = fixed->kept;
  } else if (cfg.router == MoeRouterKind::kExpertChoice) {
    // Each expert ranks all tokens by its probability (stable: ties to the lower token) and keeps
    // the slot (t, e) of its first c.
    std::fill(c.kept.begin(), c.kept.end(), 0);
    const int64_t cap = n_tokens > 0 ? internal::ExpertChoiceCapacity(cfg, n_tokens) : 0;
    for (int e = 0; e < E; ++e) {
      std::vector<int> tokens(n_tokens);
      for (int t = 0; t < n_tokens; ++t) tokens[t] = t;
      std::stable_sort(tokens.begin(), tokens.end(), [&](int a, int b) {
        return c.probs[static_cast<size_t>(a) * E + e] > c.probs[static_cast<size_t>(b) * E + e];
      });
      for (int64_t r = 0; r < cap; ++r) c.kept[static_cast<size_t>(tokens[r]) * K + e] = 1;
    }
  } else if (cfg.capacity_factor > 0) {
    const int64_t cap = internal::ExpertCapacity(cfg, n_tokens, opt.seq_len);
    const int scope = opt.seq_len > 0 ? opt.seq_len : std::max(n_tokens, 1);
    for (int t0 = 0; t0 < n_tokens; t0 += scope) {
      std::vector<int64_t> used(E, 0);
      for (int t = t0; t < std::min(n_tokens, t0 + scope); ++t) {
        for (int j = 0; j < K; ++j) {
          const size_t s = static_cast<size_t>(t) * K + j;
          c.kept[s] = used[c.plan.expert_ids[s]] < cap ? 1 : 0;
          ++used[c.plan.expert_ids[s]];
        }
      }
    }
  }
  if (cfg.router == MoeRouterKind::kExpertChoice) c.active = c.kept;
  else c.active.assign(c.kept.size(), 1);
  internal::FinishRouting(cfg, n_tokens, &c);
  double aux = 0.0;
  for (int e = 0; e < E; ++e) aux += load[e] / (static_cast<double>(n_tokens) * K) * pmean[e];
  // Expert choice has no balance loss (balanced by construction).
  const double aux_coef = cfg.router == MoeRouterKind::kExpertChoice ? 0.0 : cfg.aux_loss_coef;
  c.aux_loss = n_tokens > 0 ? aux_coef * E * aux : 0.0;
  c.z_loss = n_tokens > 0 ? cfg.z_loss_coef * z / n_tokens : 0.0;

  std::vector<T> o(D), sh(D);
  for (int t = 0; t < n_tokens; ++t) {
    const T* xt = x + static_cast<size_t>(t) * D;
    T* yt = y + static_cast<size_t>(t) * D;
    std::fill(yt, yt + D, T(0));
    for (int j = 0; j < K; ++j) {
      const size_t s = static_cast<size_t>(t) * K + j;
      if (!c.kept[s]) continue;
      const size_t wo = static_cast<size_t>(c.plan.expert_ids[s]) * F * D;
      ExpertOne(&w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F, xt, o.data());
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
      T gsh = 1;
      if (cfg.shared_gate) {
        T a = 0;
        for (int d = 0; d < D; ++d) a += w.gate_inp_shexp[d] * xt[d];
        gsh = Sig(a);
      }
      for (int d = 0; d < D; ++d) yt[d] += gsh * sh[d];
    }
  }
  *cache = std::move(c);
}

template <typename T>
void MoeBackwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const MoeCache<T>& c,
                      const T* dy, T* dx, MoeGrads<T>* g, const T* dlogits_in) {
  internal::CheckWeights(cfg, w);
  const int D = cfg.d_model, F = cfg.d_ff, E = cfg.n_expert, K = cfg.k, n = c.n_tokens;
  std::vector<double> frac(E, 0.0);
  for (int32_t id : c.plan.expert_ids) frac[id] += 1.0 / (static_cast<double>(n) * K);
  const double aux_coef = cfg.router == MoeRouterKind::kExpertChoice ? 0.0 : cfg.aux_loss_coef;
  std::vector<T> o(D), sh(D), dxt(D), dxr(D);
  for (int t = 0; t < n; ++t) {
    const T* xt = &c.x[static_cast<size_t>(t) * D];
    const T* dyt = dy + static_cast<size_t>(t) * D;
    const T* nz = c.noise.empty() ? nullptr : &c.noise[static_cast<size_t>(t) * D];
    const int32_t* ids = &c.plan.expert_ids[static_cast<size_t>(t) * K];
    std::fill(dxt.begin(), dxt.end(), T(0));
    const TokenRoute<T> r = RouteOne(cfg, w, xt, nz);
    const std::vector<T> gw = WeightsOne(cfg, r.probs, ids);
    // Routed experts and the gradient of each gate weight.
    std::vector<T> dgw(K, T(0)), dout(D);
    for (int j = 0; j < K; ++j) {
      if (!c.kept[static_cast<size_t>(t) * K + j]) continue;
      const size_t wo = static_cast<size_t>(ids[j]) * F * D;
      ExpertOne(&w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F, xt, o.data());
      for (int d = 0; d < D; ++d) {
        dgw[j] += dyt[d] * o[d];
        dout[d] = gw[j] * dyt[d];
      }
      ExpertOneBackward(&w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F, xt, dout.data(),
                        &g->gate_exps[wo], &g->up_exps[wo], &g->down_exps[wo], dxt.data());
    }
    // Gate weights -> gating probabilities (dp), aux loss -> balance probabilities (dbp).
    std::vector<T> dp(E, T(0)), dl(E, T(0));
    const T scale = static_cast<T>(cfg.weights_scale);
    T psel = 0;
    for (int j = 0; j < K; ++j) psel += r.probs[ids[j]];
    for (int j = 0; j < K; ++j) {
      if (!cfg.norm_topk) {
        dp[ids[j]] += scale * dgw[j];
        continue;
      }
      // w_j = scale p_j / psel: dw_j/dp_i = scale (delta_ij / psel - p_j / psel^2) over selected i.
      for (int i = 0; i < K; ++i) {
        const T dji = (i == j ? T(1) / psel : T(0)) - r.probs[ids[j]] / (psel * psel);
        dp[ids[i]] += scale * dgw[j] * dji;
      }
    }
    for (int e = 0; e < E; ++e) {
      const T dbp = static_cast<T>(aux_coef * E * frac[e] / n);
      if (cfg.router != MoeRouterKind::kSigmoidBias) {
        dp[e] += dbp;
      } else {
        // bprobs_e = s_e / sum s: d bprobs_e / d s_i = (delta_ei - bprobs_e) / sum s.
        T ssum = 0;
        for (int i = 0; i < E; ++i) ssum += r.probs[i];
        for (int i = 0; i < E; ++i) dp[i] += dbp * ((i == e ? T(1) : T(0)) - r.bprobs[e]) / ssum;
      }
    }
    // Probabilities -> logits (full Jacobian for the softmax).
    for (int e = 0; e < E; ++e) {
      if (cfg.router != MoeRouterKind::kSigmoidBias) {
        for (int i = 0; i < E; ++i) {
          dl[i] += dp[e] * r.probs[e] * ((i == e ? T(1) : T(0)) - r.probs[i]);
        }
      } else {
        dl[e] += dp[e] * r.probs[e] * (T(1) - r.probs[e]);
      }
    }
    // z-loss.
    {
      T mx = *std::max_element(r.logits.begin(), r.logits.end()), s = 0;
      for (int e = 0; e < E; ++e) s += std::exp(r.logits[e] - mx);
      const T lse = mx + std::log(s);
      for (int e = 0; e < E; ++e) {
        dl[e] += static_cast<T>(cfg.z_loss_coef) * T(2) * lse * (std::exp(r.logits[e] - mx) / s) / T(n);
      }
    }
    for (int e = 0; e < E; ++e) {
      for (int d = 0; d < D; ++d) {
        const T xr = nz ? xt[d] * nz[d] : xt[d];
        g->router[static_cast<size_t>(e) * D + d] += dl[e] * xr;
        dxt[d] += dl[e] * w.router[static_cast<size_t>(e) * D + d] * (nz ? nz[d] : T(1));
      }
    }
    // Shared experts.
    if (cfg.n_shared > 0) {
      const int Fs = cfg.d_ff_shared;
      T gsh = 1;
      if (cfg.shared_gate) {
        T a = 0;
        for (int d = 0; d < D; ++d) a += w.gate_inp_shexp[d] * xt[d];
        gsh = Sig(a);
      }
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
