#!/usr/bin/python3
"""PyTorch golden for moe.cpp's trainable MoE layer (forward, backward, balance losses).

An independent plain-PyTorch MoE layer, written from the math, in float64. The C++ test writes
a config (and optionally its inputs) into a directory, runs this script on it, and compares its
own outputs and gradients with the ones written here (docs/golden-format.md; 1e-5 relative).

    /usr/bin/python3 tests/golden/moe_torch.py --dir DIR [--preset NAME]   # write a golden
    /usr/bin/python3 tests/golden/moe_torch.py --selftest                  # check this script
    /usr/bin/python3 tests/golden/moe_torch.py --list-presets

Use /usr/bin/python3 (Debian python3-torch): a pyenv python3 on PATH may lack torch.

The layer, for tokens x_t (t = 0..T-1, row vectors of width D):

  Targets: the router scores R = E + n_null + n_zero + n_copy + n_const targets, in that order:
    [0, E)   FFN experts: FFN_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x))
                                 ffn_gate_exps / ffn_up_exps [E][F][D], ffn_down_exps [E][D][F]
    null     (AdaMoE) output 0            zero (MoE++) output 0
    copy     (MoE++) output x             const (MoE++) output a1 x + a2 v_c,
             [a1, a2] = softmax(W_c x), const_wc [n_const][2][D], const_v [n_const][D]
  logits_t = W_r x_t (+ W_g prev_t with gating_residual)    W_r: ffn_gate_inp [R][D],
                                                            W_g: gate_res [R][R]
  y_t = sum over the token's kept slots of weight * output(target, x_t) + shared(x_t)

Routers (selection is a discrete function of the scores; ties go to the lower index). Token t has
k slots, best first; a slot is active when the router uses it; inactive slots have weight 0.
  softmax_topk  p_t = softmax(logits_t) over R; the k largest p, all active.
  sigmoid_bias  s_t = sigmoid(logits_t); selection by the k largest s_t + b (b = exp_probs_b
                [E], selection only, no gradient). Optional group-limited top-k: the E experts
                form n_group contiguous groups of E/n_group; a group's score is the sum of its
                two largest biased scores; only the topk_group best groups stay eligible.
  top_p         p_t = softmax(logits_t) over R; slots = the k (= k_max) largest p; the first n_t
                are active, n_t = the fewest whose cumulative p (summed in double, best first)
                is >= top_p, at most k (Huang et al. 2024).
  hash          no router: token id v goes to the k distinct experts HashExperts(hash_seed, v):
                attempt a = 0, 1, ... draws SplitMix64(seed ^ (uint32(v) << 32 | a)) mod E
                and keeps it if new (uint64 arithmetic mod 2^64). Weight weights_scale / k each.
  expert_choice p_t = softmax(logits_t); expert e takes the c tokens with the largest p[.][e]
                (c = floor(T * ec_capacity_factor / E), clipped to [1, T]), best first; the
                token's weight for e is p[t][e] (times weights_scale). A token gets 0..E experts.
  Weights (softmax_topk, sigmoid_bias, top_p): the selected p (s for sigmoid_bias) of the active
  slots; with norm_topk divided by their sum over the active non-null slots (a null slot keeps
  its p; nothing is divided when the token's active slots are all null); times weights_scale.

Capacity dropping (token-choice routers, capacity_factor > 0): C = ceil(capacity_factor * T *
k / E), computed in double in that order (T = seq_len when the capacity scope is each
sequence of seq_len tokens, counts restarting at each sequence). Active FFN slots (t, j) are
visited in token order t = 0..T-1 and, within a token, in selection order j = 0..k-1 (best
first); a slot is dropped when its expert already holds C slots. Null and zero-computation
targets are never dropped. A dropped slot contributes nothing (its weight is not given to the
token's other experts; the renormalisation above happened before dropping). capacity_factor
0 means dropless.

Shared experts (n_expert_shared = S > 0, width n_ff_shexp = Fs): always active,
  shared(x) = g(x) * sum_s FFN_shexp,s(x),  g(x) = sigmoid(w_g . x) when shared_gate else 1,
  with ffn_gate_shexp / ffn_up_shexp [S][Fs][D], ffn_down_shexp [S][D][Fs],
  ffn_gate_inp_shexp [D] (GGUF's qwen2moe convention: one gate for the shared output).

Losses (all 0 for hash, which has no router; aux is 0 for expert_choice):
  aux = aux_loss_coef * R * sum_i eta_i f_i P_i,  f_i = (active slots on i, before dropping) /
        (all active slots), a constant (no gradient); P_i = mean_t q_t[i] where q = p for the
        softmax routers and q_t = s_t / sum_j s_t[j] for sigmoid_bias (DeepSeek-V3's normalised
        scores); eta_i = 1 for FFN and null targets, zc_balance_tau for zero, copy and const
        (MoE++'s heterogeneous balance loss).
  z   = z_loss_coef * mean_t logsumexp(logits_t)^2.
  ent = entropy_coef * mean_t H(q_t), H(q) = -sum_i q_i log q_i; entropy_coef =
        entropy_loss_coef, or when that is negative the router's default (1e-4 for top_p, else 0).
Objective: L = sum(y * G) + aux + z + ent (+ sum(dlogits * logits) with gating_residual, dlogits
[T][R] being the gradient the next layer's gating residual sends back) for fixed random G [T][D];
every gradient is dL/d(input), including grad_prev_logits [T][R] and grad_gate_res [R][R].

Bias update (sigmoid_bias, reported, not applied): load_i = slots routed to i before dropping,
b_next_i = b_i + bias_update_rate * sign(mean_i(load) - load_i).
"""
import argparse
import json
import math
import os
import sys

import torch

if sys.byteorder != "little":
    raise SystemExit("moe_torch.py: the exchange format is little-endian; this machine is not")
torch.set_default_dtype(torch.float64)

ROUTERS = ("softmax_topk", "sigmoid_bias", "expert_choice", "hash", "top_p")
SOFTMAX_ROUTERS = ("softmax_topk", "top_p")   # the ones that take null / zero-computation targets

DEFAULT_CONFIG = {
    "router": "softmax_topk",
    "n_tokens": 24,            # T
    "n_embd": 16,              # D
    "n_ff_exp": 12,            # F
    "n_expert": 4,             # E
    "n_expert_used": 2,        # k (ignored by expert_choice; top_p: k_max)
    "norm_topk": True,         # ignored by expert_choice and hash
    "weights_scale": 1.0,
    "n_group": 0,              # sigmoid_bias group-limited top-k; 0 = off
    "topk_group": 0,
    "ec_capacity_factor": 2.0,  # expert_choice: c = floor(T * cf / E)
    "capacity_factor": 0.0,    # token choice: 0 = dropless, else C = ceil(cf * T * k / E)
    "seq_len": 0,              # capacity scope: 0 = the batch, else sequences of seq_len tokens
    "n_expert_shared": 0,      # S
    "n_ff_shexp": 0,           # Fs
    "shared_gate": False,
    "aux_loss_coef": 1e-2,
    "z_loss_coef": 1e-3,
    "bias_update_rate": 1e-3,
    "hash_seed": 0,            # hash: uint64 seed of HashExperts
    "top_p": 0.4,              # top_p: cumulative probability threshold in (0, 1]
    "n_null": 0,               # AdaMoE null experts (softmax routers)
    "n_zero": 0,               # MoE++ zero-computation experts (softmax routers)
    "n_copy": 0,
    "n_const": 0,
    "zc_balance_tau": 1.0,     # eta of zero / copy / const targets in the aux loss
    "gating_residual": False,  # logits += W_g prev_logits (softmax routers)
    "entropy_loss_coef": -1.0,  # negative = the router's default (1e-4 for top_p, else 0)
    "seed": 1,
}

# Named configurations covering the list; the C++ test may also write its own config.
PRESETS = {
    "softmax_norm": {"router": "softmax_topk", "norm_topk": True},                   # Mixtral
    "softmax_nonorm": {"router": "softmax_topk", "norm_topk": False,                 # Qwen/OLMoE
                       "n_expert": 6, "n_expert_used": 3},
    "softmax_k1_scale": {"router": "softmax_topk", "n_expert_used": 1,               # Switch
                         "norm_topk": False, "weights_scale": 1.5},
    "sigmoid_bias": {"router": "sigmoid_bias", "n_expert": 8, "n_expert_used": 2,
                     "weights_scale": 2.5},
    "sigmoid_bias_group": {"router": "sigmoid_bias", "n_expert": 8, "n_expert_used": 3,
                           "n_group": 4, "topk_group": 2},
    "expert_choice": {"router": "expert_choice", "n_expert": 4, "ec_capacity_factor": 2.0},
    "shared_gated": {"router": "softmax_topk", "norm_topk": False, "n_expert_shared": 2,
                     "n_ff_shexp": 10, "shared_gate": True},
    "shared_plain": {"router": "sigmoid_bias", "n_expert": 8, "n_expert_shared": 1,
                     "n_ff_shexp": 20, "shared_gate": False},
    "capacity": {"router": "softmax_topk", "norm_topk": True, "capacity_factor": 0.75},
    "capacity_seq": {"router": "softmax_topk", "norm_topk": False, "capacity_factor": 0.8,
                     "seq_len": 8},
    "capacity_sigmoid": {"router": "sigmoid_bias", "n_expert": 8, "n_expert_used": 2,
                         "capacity_factor": 1.1},
    # Dynamic top-p (Huang et al. 2024) with its default entropy loss (1e-4).
    "top_p": {"router": "top_p", "n_expert": 8, "n_expert_used": 4, "top_p": 0.5,
              "norm_topk": False},
    # top_p over FFN + null + zero / copy / const targets with a gating residual.
    "top_p_null_zc": {"router": "top_p", "n_expert": 4, "n_expert_used": 4, "top_p": 0.6,
                      "n_null": 2, "n_zero": 1, "n_copy": 1, "n_const": 2, "norm_topk": True,
                      "gating_residual": True, "zc_balance_tau": 0.5, "entropy_loss_coef": 0.05,
                      "seed": 2},
    # Hash layers (Roller et al. 2021): one expert, weight 1; two experts with capacity and a
    # seed above 2^63 (the C++ side must read it as uint64).
    "hash_k1": {"router": "hash", "n_expert": 6, "n_expert_used": 1, "norm_topk": False,
                "hash_seed": 12345},
    "hash_k2_capacity": {"router": "hash", "n_expert": 6, "n_expert_used": 2, "norm_topk": False,
                         "n_tokens": 30, "capacity_factor": 0.8, "weights_scale": 1.5,
                         "hash_seed": 18446744073709551557},
    # AdaMoE: top-k over E FFN + null experts, renormalised over the true experts only.
    "adamoe_null_norm": {"router": "softmax_topk", "n_expert": 6, "n_null": 4, "n_expert_used": 3,
                         "norm_topk": True, "seed": 4},
    # MoE++: zero / copy / const experts, heterogeneous balance (tau), gating residual.
    "moepp": {"router": "softmax_topk", "n_expert": 4, "n_expert_used": 2, "n_zero": 1,
              "n_copy": 1, "n_const": 2, "norm_topk": False, "zc_balance_tau": 0.75,
              "gating_residual": True, "seed": 3},
}


def full_config(overrides):
    cfg = dict(DEFAULT_CONFIG)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise SystemExit(f"config: unknown keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    check_config(cfg)
    return cfg


def router_width(c):
    """R: FFN experts + null + zero-computation targets."""
    return c["n_expert"] + c["n_null"] + c["n_zero"] + c["n_copy"] + c["n_const"]


def target_kinds(c):
    """[R] kind of each target id: 'ffn', 'null', 'zero', 'copy' or 'const'."""
    return (["ffn"] * c["n_expert"] + ["null"] * c["n_null"] + ["zero"] * c["n_zero"]
            + ["copy"] * c["n_copy"] + ["const"] * c["n_const"])


def entropy_coef(c):
    if c["entropy_loss_coef"] >= 0:
        return c["entropy_loss_coef"]
    return 1e-4 if c["router"] == "top_p" else 0.0


def check_config(c):
    if c["router"] not in ROUTERS:
        raise SystemExit(f"config: router '{c['router']}' is not one of {ROUTERS}")
    E, k, R = c["n_expert"], c["n_expert_used"], router_width(c)
    if min(c["n_tokens"], c["n_embd"], c["n_ff_exp"], E) < 1:
        raise SystemExit("config: n_tokens, n_embd, n_ff_exp, n_expert must be >= 1")
    if min(c["n_null"], c["n_zero"], c["n_copy"], c["n_const"]) < 0:
        raise SystemExit("config: n_null, n_zero, n_copy, n_const must be >= 0")
    if (R != E or c["gating_residual"]) and c["router"] not in SOFTMAX_ROUTERS:
        raise SystemExit(f"config: null / zero-computation experts and gating_residual need a "
                         f"softmax router {SOFTMAX_ROUTERS}, not {c['router']}")
    if c["router"] == "hash" and not 1 <= k <= E:
        raise SystemExit(f"config: hash needs n_expert_used {k} in [1, n_expert={E}] (distinct experts)")
    if c["router"] != "expert_choice" and not 1 <= k <= R:
        raise SystemExit(f"config: n_expert_used {k} must be in [1, R={R}]")
    if c["router"] == "top_p" and not 0 < c["top_p"] <= 1:
        raise SystemExit(f"config: top_p {c['top_p']} must be in (0, 1]")
    if not 0 <= int(c["hash_seed"]) < 2 ** 64 or int(c["hash_seed"]) != c["hash_seed"]:
        raise SystemExit(f"config: hash_seed {c['hash_seed']} must be an integer in [0, 2^64)")
    if c["zc_balance_tau"] < 0:
        raise SystemExit(f"config: zc_balance_tau {c['zc_balance_tau']} must be >= 0")
    if c["n_group"]:
        if c["router"] != "sigmoid_bias":
            raise SystemExit("config: n_group (group-limited top-k) is for router sigmoid_bias")
        g = c["n_group"]
        if E % g or E // g < 2 or not 1 <= c["topk_group"] <= g or c["topk_group"] * (E // g) < k:
            raise SystemExit(f"config: n_group {g} / topk_group {c['topk_group']} do not fit "
                             f"n_expert {E}, k {k} (groups of >= 2 experts, enough kept for k)")
    if c["seq_len"] and (c["seq_len"] < 0 or c["n_tokens"] % c["seq_len"]):
        raise SystemExit(f"config: seq_len {c['seq_len']} must divide n_tokens {c['n_tokens']}")
    if c["n_expert_shared"] and c["n_ff_shexp"] < 1:
        raise SystemExit("config: n_expert_shared > 0 needs n_ff_shexp >= 1")


def ec_capacity(c):
    return min(c["n_tokens"], max(1, int(math.floor(c["n_tokens"] * c["ec_capacity_factor"] / c["n_expert"]))))


def token_capacity(c):
    scope = c["seq_len"] or c["n_tokens"]
    return int(math.ceil(c["capacity_factor"] * scope * c["n_expert_used"] / c["n_expert"]))


# ---------------------------------------------------------------------------------------------
# Hash routing: SplitMix64 (Steele, Lea, Flood 2014; Vigna's splitmix64.c finaliser), uint64
# arithmetic mod 2^64 on Python ints.

MASK64 = (1 << 64) - 1


def splitmix64(z):
    """One SplitMix64 output for state z: the state advanced by the golden gamma, then mixed."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def hash_experts(seed, token_id, n_expert, k):
    """The k distinct experts of a token id: attempt a = 0, 1, ... draws
    splitmix64(seed ^ (uint32(token_id) << 32 | a)) mod n_expert, kept if new."""
    base = (int(token_id) & 0xFFFFFFFF) << 32
    ids, a = [], 0
    while len(ids) < k:
        e = splitmix64((int(seed) & MASK64) ^ (base | a)) % n_expert
        if e not in ids:
            ids.append(e)
        a += 1
    return ids


# ---------------------------------------------------------------------------------------------
# Tensors: name -> shape, in the exchange directory as <name>.bin (raw little-endian float64,
# row-major, last index fastest).

def input_shapes(c):
    T, D, F, E = c["n_tokens"], c["n_embd"], c["n_ff_exp"], c["n_expert"]
    S, Fs, R, Cn = c["n_expert_shared"], c["n_ff_shexp"], router_width(c), c["n_const"]
    shapes = {"x": [T, D]}
    if c["router"] != "hash":
        shapes["ffn_gate_inp"] = [R, D]
    shapes.update({
        "ffn_gate_exps": [E, F, D],
        "ffn_up_exps": [E, F, D],
        "ffn_down_exps": [E, D, F],
        "G": [T, D],
    })
    if c["router"] == "sigmoid_bias":
        shapes["exp_probs_b"] = [E]
    if S:
        shapes["ffn_gate_shexp"] = [S, Fs, D]
        shapes["ffn_up_shexp"] = [S, Fs, D]
        shapes["ffn_down_shexp"] = [S, D, Fs]
        if c["shared_gate"]:
            shapes["ffn_gate_inp_shexp"] = [D]
    if c["router"] == "hash":
        shapes["token_ids"] = [T]
    if Cn:
        shapes["const_wc"] = [Cn, 2, D]
        shapes["const_v"] = [Cn, D]
    if c["gating_residual"]:
        shapes["gate_res"] = [R, R]
        shapes["prev_logits"] = [T, R]
        shapes["dlogits"] = [T, R]
    return shapes


# Inputs with a gradient (everything but the upstream gradients G and dlogits, the selection-only
# bias and the token ids).
def trainable(name):
    return name not in ("G", "exp_probs_b", "token_ids", "dlogits")


def generate_inputs(c):
    g = torch.Generator().manual_seed(int(c["seed"]))
    D, F, Fs, R = c["n_embd"], c["n_ff_exp"], max(1, c["n_ff_shexp"]), router_width(c)
    scale = {"x": 1.0, "ffn_gate_inp": 1.5 / math.sqrt(D), "ffn_gate_exps": 1 / math.sqrt(D),
             "ffn_up_exps": 1 / math.sqrt(D), "ffn_down_exps": 1 / math.sqrt(F), "G": 1.0,
             "exp_probs_b": 0.3, "ffn_gate_shexp": 1 / math.sqrt(D), "ffn_up_shexp": 1 / math.sqrt(D),
             "ffn_down_shexp": 1 / math.sqrt(Fs), "ffn_gate_inp_shexp": 1 / math.sqrt(D),
             "const_wc": 1 / math.sqrt(D), "const_v": 1.0, "gate_res": 0.5 / math.sqrt(R),
             "prev_logits": 1.0, "dlogits": 0.5}
    out = {}
    for n, s in input_shapes(c).items():
        if n == "token_ids":
            # Ids over the whole int32 range (the hash takes all 32 bits), every third one a
            # repeat of the token before it (equal ids must route equally).
            ids = torch.randint(0, 2 ** 31 - 1, s, generator=g)
            ids[1::3] = ids[0::3][:ids[1::3].numel()]
            out[n] = ids.to(torch.float64)
        else:
            out[n] = torch.randn(s, generator=g) * scale[n]
    return out


def read_bin(path, shape):
    n = math.prod(shape)
    data = open(path, "rb").read()
    if len(data) != 8 * n:
        raise SystemExit(f"{path}: {len(data)} bytes, expected {8 * n} (float64 {shape}): "
                         "rewrite it or delete it to regenerate")
    return torch.frombuffer(bytearray(data), dtype=torch.float64).reshape(shape).clone()


def write_bin(path, t):
    with open(path, "wb") as f:
        f.write(t.detach().to(torch.float64).contiguous().numpy().tobytes())


# ---------------------------------------------------------------------------------------------
# Routing: the discrete part (which expert takes which token). Computed without gradients; the
# differentiable part (weights, outputs, losses) takes it as fixed data, so the selftest can
# check gradients by central differences at a fixed assignment.

def topk_stable(scores, k):
    """Indices of the k largest entries along the last dim, best first, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def selection_gap(scores, k):
    """Smallest margin between the k-th and (k+1)-th best score of any row (inf if none):
    a test in lower precision can only expect the same selection when this is well above its
    rounding error."""
    if k >= scores.shape[-1]:
        return math.inf
    v = torch.sort(scores, dim=-1, descending=True).values
    gap = v[..., k - 1] - v[..., k]
    gap = gap[torch.isfinite(gap)]
    return float(gap.min()) if gap.numel() else math.inf


def router_logits(c, P):
    """[T][R] logits = W_r x (+ W_g prev_logits), or None for hash (no router)."""
    if c["router"] == "hash":
        return None
    logits = P["x"] @ P["ffn_gate_inp"].t()
    if c["gating_residual"]:
        logits = logits + P["prev_logits"] @ P["gate_res"].t()
    return logits


def select(c, logits, bias, token_ids=None):
    """Returns a dict of plain selection data for the router in c."""
    T = logits.shape[0] if logits is not None else token_ids.shape[0]
    E = c["n_expert"]
    with torch.no_grad():
        if c["router"] == "expert_choice":
            p = torch.softmax(logits, dim=-1)
            cap = ec_capacity(c)
            ec_tokens = topk_stable(p.t(), cap)          # [E][c] token ids, best first
            return {"ec_tokens": ec_tokens, "gap": selection_gap(p.t(), cap)}
        k = c["n_expert_used"]
        active = torch.ones(T, k, dtype=torch.bool)
        if c["router"] == "hash":
            ids = torch.tensor([hash_experts(c["hash_seed"], v, E, k) for v in token_ids.tolist()],
                               dtype=torch.long).reshape(T, k)
            gap = math.inf                                 # no scores: nothing to be close
        elif c["router"] == "top_p":
            p = torch.softmax(logits, dim=-1)
            ids = topk_stable(p, k)                        # [T][k] the k_max best, ranked
            # Every slot's id is compared, so every rank margin among the first k + 1 matters,
            # and so does the distance of each cumulative sum looked at from the threshold.
            v = torch.sort(p, dim=-1, descending=True).values
            m = min(k, v.shape[1] - 1)
            gap = float((v[:, :m] - v[:, 1:m + 1]).min()) if m > 0 else math.inf
            for t in range(T):
                cum, used = 0.0, k
                for j in range(k):
                    cum += float(p[t, ids[t, j]])          # Python float: double
                    if j < k - 1:                          # the last slot is used either way
                        gap = min(gap, abs(cum - c["top_p"]))
                    if cum >= c["top_p"]:
                        used = j + 1
                        break
                active[t, used:] = False
        else:
            if c["router"] == "softmax_topk":
                score = torch.softmax(logits, dim=-1)
            else:
                score = torch.sigmoid(logits) + bias
                if c["n_group"]:
                    ng, tg = c["n_group"], c["topk_group"]
                    grouped = score.reshape(T, ng, E // ng)
                    top2 = torch.sort(grouped, dim=-1, descending=True).values[..., :2]
                    gscore = top2.sum(-1)                      # [T][n_group]
                    keep = topk_stable(gscore, tg)              # [T][topk_group]
                    gmask = torch.zeros(T, ng, dtype=torch.bool)
                    gmask.scatter_(1, keep, True)
                    emask = gmask.repeat_interleave(E // ng, dim=1)  # [T][E]
                    score = score.masked_fill(~emask, -math.inf)
            ids = topk_stable(score, k)                        # [T][k]
            gap = selection_gap(score, k)
        dropped = torch.zeros(T, k, dtype=torch.bool)      # active FFN slots over capacity
        if c["capacity_factor"] > 0:
            C = token_capacity(c)
            fill = [0] * E
            for t in range(T):
                if c["seq_len"] and t % c["seq_len"] == 0:
                    fill = [0] * E                         # a new capacity scope
                for j in range(k):
                    e = int(ids[t, j])
                    if not active[t, j] or e >= E:         # null / zero-computation: no limit
                        continue
                    if fill[e] >= C:
                        dropped[t, j] = True
                    else:
                        fill[e] += 1
        return {"ids": ids, "active": active, "dropped": dropped, "gap": gap}


def swiglu(x, wg, wu, wd):
    """x [N][D], wg/wu [F][D], wd [D][F] -> [N][D]."""
    return (torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()


def entropy_rows(q):
    """[T] H(q_t) = -sum_i q_i log q_i (0 log 0 = 0)."""
    pos = q > 0
    return -torch.where(pos, q * torch.log(torch.where(pos, q, torch.ones_like(q))), torch.zeros_like(q)).sum(-1)


def layer(c, P, sel):
    """Differentiable forward at a fixed selection. P: name -> tensor. Returns a dict."""
    x = P["x"]
    T, E, R = x.shape[0], c["n_expert"], router_width(c)
    kinds = target_kinds(c)
    logits = router_logits(c, P)                           # [T][R] or None
    out = {}
    zero = torch.zeros(())
    combine = torch.zeros(T, R)                            # [T][R] weight of target r for token t
    q = None                                               # [T][R] balance probabilities
    if c["router"] == "expert_choice":
        p = torch.softmax(logits, dim=-1)
        et = sel["ec_tokens"]                              # [E][c]
        ew = p.t().gather(1, et) * c["weights_scale"]      # [E][c]
        combine = combine.index_put((et.reshape(-1), torch.arange(E).repeat_interleave(et.shape[1])),
                                    ew.reshape(-1), accumulate=True)
        out.update(probs=p, ec_weights=ew, aux=zero)
        q = p
    else:
        ids, active, dropped = sel["ids"], sel["active"], sel["dropped"]
        k = ids.shape[1]
        act = active.to(torch.float64)
        if c["router"] == "hash":
            w = torch.full((T, k), c["weights_scale"] / k) * act
            aux = zero
        else:
            if c["router"] == "sigmoid_bias":
                p = torch.sigmoid(logits)
                q = p / p.sum(-1, keepdim=True)
            else:
                p = torch.softmax(logits, dim=-1)
                q = p
            w = p.gather(1, ids) * act                     # [T][k], 0 on inactive slots
            if c["norm_topk"]:
                is_null = (ids >= E) & (ids < E + c["n_null"])
                m = active & ~is_null                      # the slots the renormalisation covers
                s = (w * m.to(w.dtype)).sum(-1, keepdim=True)
                safe = torch.where(s > 0, s, torch.ones_like(s))
                w = torch.where(m & (s > 0), w / safe, w)
            w = w * c["weights_scale"]
            out["probs"] = p
        counts = torch.bincount(ids[active], minlength=R).to(torch.float64)  # before dropping
        if c["router"] != "hash":
            f = counts / counts.sum()                      # share of the active slots, constant
            eta = torch.tensor([1.0 if kd in ("ffn", "null") else c["zc_balance_tau"] for kd in kinds])
            aux = c["aux_loss_coef"] * R * (eta * f * q.mean(0)).sum()
        kept = w * (~dropped).to(w.dtype)
        combine = combine.scatter_add(1, ids, kept)
        out.update(expert_weights=w, aux=aux, tokens_per_expert=counts)
    if logits is not None:
        out["logits"] = logits
        z = c["z_loss_coef"] * (torch.logsumexp(logits, dim=-1) ** 2).mean()
        ent = entropy_coef(c) * entropy_rows(q).mean()
    else:
        z = ent = zero
    y = torch.zeros_like(x)
    for e in range(E):
        y = y + combine[:, e:e + 1] * swiglu(x, P["ffn_gate_exps"][e], P["ffn_up_exps"][e],
                                             P["ffn_down_exps"][e])
    const0 = R - c["n_const"]
    for r in range(E, R):
        if kinds[r] == "copy":
            y = y + combine[:, r:r + 1] * x
        elif kinds[r] == "const":
            a = torch.softmax(x @ P["const_wc"][r - const0].t(), dim=-1)   # [T][2]
            y = y + combine[:, r:r + 1] * (a[:, 0:1] * x + a[:, 1:2] * P["const_v"][r - const0])
    if c["n_expert_shared"]:
        sh = torch.zeros_like(x)
        for s in range(c["n_expert_shared"]):
            sh = sh + swiglu(x, P["ffn_gate_shexp"][s], P["ffn_up_shexp"][s], P["ffn_down_shexp"][s])
        if c["shared_gate"]:
            sh = torch.sigmoid(x @ P["ffn_gate_inp_shexp"])[:, None] * sh
        y = y + sh
    loss = (y * P["G"]).sum() + out["aux"] + z + ent
    if c["gating_residual"]:
        loss = loss + (P["dlogits"] * logits).sum()
    out.update(y=y, z=z, entropy=ent, combine=combine, loss=loss)
    return out


def selection_of(c, inputs):
    with torch.no_grad():
        logits0 = router_logits(c, inputs)
    return select(c, logits0, inputs.get("exp_probs_b"), inputs.get("token_ids"))


def run(c, inputs):
    """Full golden: selection, forward, backward. Returns (outputs dict, grads dict)."""
    P = {n: t.clone().requires_grad_(trainable(n)) for n, t in inputs.items()}
    sel = selection_of(c, P)
    o = layer(c, P, sel)
    names = [n for n in P if trainable(n)]
    grads = torch.autograd.grad(o["loss"], [P[n] for n in names])
    outs = {"y": o["y"], "aux": o["aux"].reshape(1), "z": o["z"].reshape(1),
            "entropy": o["entropy"].reshape(1), "loss": o["loss"].reshape(1), "combine": o["combine"]}
    if "logits" in o:
        outs["logits"] = o["logits"]
        outs["probs"] = o["probs"]
    if c["router"] == "expert_choice":
        outs["ec_tokens"] = sel["ec_tokens"].to(torch.float64)
        outs["ec_weights"] = o["ec_weights"]
    else:
        outs["expert_ids"] = sel["ids"].to(torch.float64)
        outs["expert_weights"] = o["expert_weights"]
        outs["active"] = sel["active"].to(torch.float64)
        outs["dropped"] = sel["dropped"].to(torch.float64)
        outs["tokens_per_expert"] = o["tokens_per_expert"]
        if c["router"] == "sigmoid_bias":
            load = o["tokens_per_expert"]
            outs["exp_probs_b_next"] = inputs["exp_probs_b"] + c["bias_update_rate"] * torch.sign(load.mean() - load)
    outs = {n: t.detach() for n, t in outs.items()}
    outs["selection_gap"] = torch.tensor([sel["gap"]])
    return outs, {"grad_" + n: g.detach() for n, g in zip(names, grads)}


def write_golden(d, preset, seed):
    os.makedirs(d, exist_ok=True)
    cpath = os.path.join(d, "config.json")
    if os.path.exists(cpath):
        c = full_config(json.load(open(cpath)))
    else:
        over = dict(PRESETS[preset]) if preset else {}
        if seed is not None:
            over["seed"] = seed
        c = full_config(over)
        json.dump(c, open(cpath, "w"), indent=1)
    shapes = input_shapes(c)
    gen = None
    inputs = {}
    for n, s in shapes.items():
        path = os.path.join(d, n + ".bin")
        if os.path.exists(path):
            inputs[n] = read_bin(path, s)
        else:
            gen = gen or generate_inputs(c)
            inputs[n] = gen[n]
            write_bin(path, inputs[n])
    if "token_ids" in inputs:
        ti = inputs["token_ids"]
        if not bool(((ti == ti.round()) & (ti >= -2 ** 31) & (ti < 2 ** 31)).all()):
            raise SystemExit(f"{d}/token_ids.bin: token ids must be integers in the int32 range")
    outs, grads = run(c, inputs)
    manifest = {"format": "moe.cpp golden v1: raw little-endian float64, row-major",
                "config": c, "inputs": [], "outputs": []}
    for n, s in shapes.items():
        manifest["inputs"].append({"name": n, "file": n + ".bin", "shape": s})
    for n, t in list(outs.items()) + list(grads.items()):
        write_bin(os.path.join(d, n + ".bin"), t)
        manifest["outputs"].append({"name": n, "file": n + ".bin", "shape": list(t.shape)})
    if c["router"] != "expert_choice":
        manifest["capacity"] = token_capacity(c) if c["capacity_factor"] > 0 else 0
        manifest["n_dropped"] = int(outs["dropped"].sum())
    else:
        manifest["ec_capacity"] = ec_capacity(c)
    json.dump(manifest, open(os.path.join(d, "manifest.json"), "w"), indent=1)
    return c, outs, grads


# ---------------------------------------------------------------------------------------------
# Self-test: this script against itself by independent routes (central differences, a scalar
# per-token loop, hand-made routing cases).

def naive_forward(c, inputs, sel):
    """Per-token, per-slot loop in plain Python floats over torch scalars: y and the losses."""
    x = inputs["x"]
    T, D = x.shape
    E, R, kinds = c["n_expert"], router_width(c), target_kinds(c)
    const0 = R - c["n_const"]

    def ffn(v, wg, wu, wd):
        h = [0.0] * wg.shape[0]
        for f in range(wg.shape[0]):
            a = float(wg[f] @ v)
            b = float(wu[f] @ v)
            h[f] = a / (1 + math.exp(-a)) * b
        return [sum(float(wd[i, f]) * h[f] for f in range(len(h))) for i in range(wd.shape[0])]

    def target_out(t, r):
        """Output of target r for token t (a list of D floats)."""
        kind = kinds[r]
        if kind == "ffn":
            return ffn(x[t], inputs["ffn_gate_exps"][r], inputs["ffn_up_exps"][r], inputs["ffn_down_exps"][r])
        if kind == "copy":
            return [float(v) for v in x[t]]
        if kind == "const":
            wc, v = inputs["const_wc"][r - const0], inputs["const_v"][r - const0]
            z0, z1 = float(wc[0] @ x[t]), float(wc[1] @ x[t])
            a1 = 1 / (1 + math.exp(z1 - z0))               # softmax of two
            return [a1 * float(x[t, i]) + (1 - a1) * float(v[i]) for i in range(D)]
        return [0.0] * D                                   # null, zero

    routed = c["router"] != "hash"
    logits, lse, probs, bal = [], [], [], []
    for t in range(T if routed else 0):
        row = []
        for e in range(R):
            l = float(inputs["ffn_gate_inp"][e] @ x[t])
            if c["gating_residual"]:
                l += sum(float(inputs["gate_res"][e, j]) * float(inputs["prev_logits"][t, j]) for j in range(R))
            row.append(l)
        logits.append(row)
        m = max(row)
        s = sum(math.exp(l - m) for l in row)
        lse.append(m + math.log(s))
        if c["router"] == "sigmoid_bias":
            sg = [1 / (1 + math.exp(-l)) for l in row]
            probs.append(sg)
            bal.append([v / sum(sg) for v in sg])
        else:
            probs.append([math.exp(l - m) / s for l in row])
            bal.append(probs[-1])
    y = [[0.0] * D for _ in range(T)]
    aux = 0.0
    if c["router"] == "expert_choice":
        for e in range(E):
            for t in sel["ec_tokens"][e].tolist():
                o = target_out(t, e)
                for i in range(D):
                    y[t][i] += probs[t][e] * c["weights_scale"] * o[i]
    else:
        k = c["n_expert_used"]
        active = sel.get("active")
        count = [0] * R
        for t in range(T):
            ids = sel["ids"][t].tolist()
            on = [bool(active[t, j]) if active is not None else True for j in range(k)]
            if routed:
                ws = [probs[t][e] for e in ids]
                tot = sum(ws[j] for j in range(k) if on[j] and kinds[ids[j]] != "null")
            for j, e in enumerate(ids):
                if not on[j]:
                    continue
                count[e] += 1
                if not routed:
                    w = c["weights_scale"] / k
                else:
                    norm = c["norm_topk"] and kinds[e] != "null" and tot > 0
                    w = (ws[j] / tot if norm else ws[j]) * c["weights_scale"]
                if sel["dropped"][t, j]:
                    continue
                o = target_out(t, e)
                for i in range(D):
                    y[t][i] += w * o[i]
        if routed:
            n_active = sum(count)
            Pm = [sum(bal[t][e] for t in range(T)) / T for e in range(R)]
            eta = [1.0 if kinds[e] in ("ffn", "null") else c["zc_balance_tau"] for e in range(R)]
            aux = c["aux_loss_coef"] * R * sum(eta[e] * count[e] / n_active * Pm[e] for e in range(R))
    for t in range(T):
        if c["n_expert_shared"]:
            g = 1.0
            if c["shared_gate"]:
                g = 1 / (1 + math.exp(-float(inputs["ffn_gate_inp_shexp"] @ x[t])))
            for s in range(c["n_expert_shared"]):
                o = ffn(x[t], inputs["ffn_gate_shexp"][s], inputs["ffn_up_shexp"][s], inputs["ffn_down_shexp"][s])
                for i in range(D):
                    y[t][i] += g * o[i]
    z = c["z_loss_coef"] * sum(l * l for l in lse) / T
    ent = entropy_coef(c) * sum(-sum(q * math.log(q) for q in row if q > 0) for row in bal) / T
    return torch.tensor(y), aux, z, ent


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def selftest_gradients(name, c):
    """Autograd gradients vs central differences at a fixed selection, every input entry."""
    inputs = generate_inputs(c)
    sel = selection_of(c, inputs)
    outs, grads = run(c, inputs)
    h = 1e-5
    worst = 0.0
    for n, t in inputs.items():
        if not trainable(n):
            continue
        g = grads["grad_" + n].reshape(-1)
        flat = t.reshape(-1)
        for i in range(flat.numel()):
            def loss_at(v):
                P = dict(inputs)
                q = flat.clone()
                q[i] = v
                P[n] = q.reshape(t.shape)
                return float(layer(c, P, sel)["loss"])
            num = (loss_at(flat[i] + h) - loss_at(flat[i] - h)) / (2 * h)
            err = abs(num - float(g[i])) / max(1.0, abs(num))
            worst = max(worst, err)
            check(err < 1e-7, f"{name}: d loss / d {n}[{i}]: autograd {float(g[i]):.10g}, "
                              f"central difference {num:.10g}")
    # The real selection at the base point must be the one the differences were taken at, and
    # the vectorised forward must agree with a per-token scalar loop.
    y, aux, z, ent = naive_forward(c, inputs, sel)
    check(torch.allclose(outs["y"], y, rtol=1e-12, atol=1e-12), f"{name}: y differs from the scalar loop")
    check(abs(float(outs["aux"]) - aux) <= 1e-13 + 1e-12 * abs(aux), f"{name}: aux {float(outs['aux'])} vs {aux}")
    check(abs(float(outs["z"]) - z) <= 1e-12 * abs(z), f"{name}: z {float(outs['z'])} vs {z}")
    check(abs(float(outs["entropy"]) - ent) <= 1e-15 + 1e-12 * abs(ent),
          f"{name}: entropy {float(outs['entropy'])} vs {ent}")
    return worst


def selftest_capacity():
    # Every token prefers expert 0 then expert 1 (k=2, E=4, T=6, cf=1 -> C=ceil(6*2/4)=3):
    # expert 0 keeps tokens 0,1,2 (slot j=0), expert 1 keeps tokens 0,1,2 (slot j=1), the
    # rest are dropped. Then a mixed case where within-token order decides.
    c = full_config({"n_tokens": 6, "n_expert": 4, "n_expert_used": 2, "capacity_factor": 1.0})
    check(token_capacity(c) == 3, "capacity formula")
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).repeat(6, 1)
    s = select(c, logits, None)
    check(s["ids"].tolist() == [[0, 1]] * 6, "capacity: selection order")
    check(s["dropped"].tolist() == [[False, False]] * 3 + [[True, True]] * 3, f"capacity: {s['dropped']}")
    # Per-sequence scope (seq_len 3: C = ceil(3*2/4) = 2): each sequence keeps its first two.
    cs = dict(c, seq_len=3)
    check(token_capacity(cs) == 2, "capacity formula (per sequence)")
    s = select(cs, logits, None)
    check(s["dropped"].tolist() == ([[False, False]] * 2 + [[True, True]]) * 2, f"seq capacity: {s['dropped']}")
    # Token order first, then selection order: C=1 (cf=0.5, T=4, k=2, E=4 -> ceil(1.0)=1).
    # t0 picks (1,0): keeps both. t1 picks (0,2): 0 full -> dropped, 2 kept. t2 picks (2,3):
    # 2 full -> dropped, 3 kept. t3 picks (3,1): both full -> dropped.
    c = full_config({"n_tokens": 4, "n_expert": 4, "n_expert_used": 2, "capacity_factor": 0.5})
    check(token_capacity(c) == 1, "capacity formula (C=1)")
    big, mid = 4.0, 3.0
    logits = torch.zeros(4, 4)
    for t, (a, b) in enumerate([(1, 0), (0, 2), (2, 3), (3, 1)]):
        logits[t, a], logits[t, b] = big, mid
    s = select(c, logits, None)
    check(s["ids"].tolist() == [[1, 0], [0, 2], [2, 3], [3, 1]], f"capacity: ids {s['ids'].tolist()}")
    check(s["dropped"].tolist() == [[False, False], [True, False], [True, False], [True, True]],
          f"capacity: dropped {s['dropped'].tolist()}")
    # Dropping removes exactly the dropped slots' contributions, without renormalising.
    c = full_config({"n_tokens": 8, "n_expert": 4, "n_expert_used": 2, "capacity_factor": 0.5, "seed": 3})
    inputs = generate_inputs(c)
    o, _ = run(c, inputs)
    check(o["dropped"].sum() > 0, "capacity case drops nothing: make it tighter")
    y, _, _, _ = naive_forward(c, inputs, {"ids": o["expert_ids"].long(), "dropped": o["dropped"].bool()})
    check(torch.allclose(o["y"], y, rtol=1e-12, atol=1e-12), "capacity: y vs loop")
    # Dropless == capacity mode when the capacity is at least the maximum load.
    c0 = dict(c, capacity_factor=0.0)
    big_cf = dict(c, capacity_factor=float(c["n_expert"]))   # C = T*k >= any load
    o0, g0 = run(c0, inputs)
    o1, g1 = run(big_cf, inputs)
    check(o1["dropped"].sum() == 0 and torch.equal(o0["y"], o1["y"]), "dropless vs large capacity")
    check(all(torch.equal(g0[n], g1[n]) for n in g0), "dropless vs large capacity: gradients")


def selftest_expert_choice():
    c = full_config({"router": "expert_choice", "n_tokens": 10, "n_expert": 4, "ec_capacity_factor": 2.0,
                     "seed": 5})
    cap = ec_capacity(c)
    check(cap == 5, f"ec capacity {cap}")
    inputs = generate_inputs(c)
    o, _ = run(c, inputs)
    p = o["probs"]
    et = o["ec_tokens"].long()
    check(list(et.shape) == [4, cap], "ec_tokens shape")
    for e in range(4):
        col = p[:, e].tolist()
        expect = sorted(range(10), key=lambda t: (-col[t], t))[:cap]
        check(et[e].tolist() == expect, f"expert {e} takes {et[e].tolist()}, expected {expect}")
        check(torch.equal(o["ec_weights"][e], p[et[e], e]), "ec weights = probs")
    per_token = (o["combine"] > 0).sum(1)
    check(int(per_token.sum()) == 4 * cap, "ec: E*c assignments")
    # A crafted batch (T=12, E=4, c=3): experts 1..3 all prefer token 0, expert 0 prefers
    # tokens 2,3,4 over token 1 (whose other probs are tiny), and tokens 5..11 tie at 0.25, so
    # the lower indices 5, 6 win. Token experts: 0 -> 3, 1 -> 0, 2..4 -> 1, 5, 6 -> 3, rest 0.
    c = full_config({"router": "expert_choice", "n_tokens": 12, "n_expert": 4, "ec_capacity_factor": 1.0})
    check(ec_capacity(c) == 3, "ec capacity (cf 1)")
    logits = torch.zeros(12, 4)
    logits[0] = torch.tensor([-10.0, 3.0, 3.0, 3.0])
    logits[1] = torch.tensor([4.4, 1.0, 1.0, 1.0])
    logits[2:5] = torch.tensor([6.0, 0.0, 0.0, 0.0])
    s = select(c, logits, None)
    got = torch.zeros(12, dtype=torch.long)
    for e in range(4):
        got[s["ec_tokens"][e]] += 1
    check(got.tolist() == [3, 0, 1, 1, 1, 3, 3, 0, 0, 0, 0, 0], f"ec: experts per token {got.tolist()}")
    check(s["ec_tokens"][1].tolist() == [0, 5, 6], f"ec: ties to the lower token {s['ec_tokens'][1].tolist()}")


def selftest_groups():
    # E=8 in 4 groups of 2, keep 1 group, k=2: the best single expert is in group 3, but the
    # best pair sum is group 1, so both picks come from group 1 (experts 2, 3).
    c = full_config({"router": "sigmoid_bias", "n_tokens": 1, "n_expert": 8, "n_expert_used": 2,
                     "n_group": 4, "topk_group": 1})
    s_target = torch.tensor([[0.1, 0.1, 0.7, 0.7, 0.1, 0.1, 0.95, 0.05]])
    logits = torch.log(s_target / (1 - s_target))
    s = select(c, logits, torch.zeros(8))
    check(sorted(s["ids"][0].tolist()) == [2, 3], f"groups: {s['ids'].tolist()}")
    # Without groups the top expert (6) is chosen; the bias moves selection but not weights.
    c2 = dict(c, n_group=0, topk_group=0)
    s = select(c2, logits, torch.zeros(8))
    check(s["ids"][0].tolist()[0] == 6, "no groups: expert 6 first")
    bias = torch.zeros(8)
    bias[0] = 1.0
    s = select(c2, logits, bias)
    check(s["ids"][0].tolist() == [0, 6], f"bias selects: {s['ids'].tolist()}")
    Wr = torch.zeros(8, 8)
    Wr[:, 0] = logits[0]                                   # x = e_0, so logits_0 = Wr[:, 0]
    P = {"x": torch.eye(8)[:1], "ffn_gate_inp": Wr}
    cc = full_config({"router": "sigmoid_bias", "n_tokens": 1, "n_embd": 8, "n_expert": 8, "n_expert_used": 2})
    ins = generate_inputs(cc)
    ins.update(P)
    ins["exp_probs_b"] = bias
    o, _ = run(cc, ins)
    w = o["expert_weights"][0]
    check(abs(float(w[0]) - 0.1 / 1.05) < 1e-12 and abs(float(w[1]) - 0.95 / 1.05) < 1e-12,
          f"weights from unbiased scores: {w.tolist()}")


def one_token_inputs(c, logits_row):
    """Inputs of a one-token layer whose router logits are logits_row exactly: n_embd = R,
    x = e_0 and W_r's first column = the logits (no rounding: x is 1 and 0)."""
    ins = generate_inputs(c)
    R = router_width(c)
    ins["x"] = torch.eye(R)[:1].clone()
    Wr = torch.zeros(R, R)
    Wr[:, 0] = torch.tensor(logits_row)
    ins["ffn_gate_inp"] = Wr
    return ins


def selftest_hash():
    # Published SplitMix64 outputs (Vigna's splitmix64.c seeded with 1234567; the first output
    # for state 0 is the well-known 0xe220a8397b1dcdaf): the hash is the standard one.
    gamma = 0x9E3779B97F4A7C15
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423,
            4593380528125082431, 16408922859458223821]
    got = [splitmix64((1234567 + i * gamma) & MASK64) for i in range(5)]
    check(got == want, f"splitmix64 sequence {got}")
    check(splitmix64(0) == 0xE220A8397B1DCDAF, "splitmix64(0)")
    # k = 1 is the first draw: attempt 0 of token 0 with seed 0 is splitmix64(0) mod E.
    check(hash_experts(0, 0, 6, 1) == [0xE220A8397B1DCDAF % 6], "hash: first draw")
    # The seed and the token id enter as seed ^ (uint32(id) << 32 | attempt).
    s, v = 0xDEADBEEF12345678, 77
    check(hash_experts(s, v, 7, 1) == [splitmix64(s ^ (v << 32)) % 7], "hash: seed ^ (id << 32)")
    check(hash_experts(s, -1, 7, 1) == [splitmix64(s ^ (0xFFFFFFFF << 32)) % 7], "hash: uint32 id")
    for seed in (0, 1, 2 ** 64 - 1):
        for tid in (0, 1, 5, 2 ** 31 - 1):
            for E, k in ((2, 2), (5, 3), (8, 8), (8, 1)):
                ids = hash_experts(seed, tid, E, k)
                check(len(set(ids)) == k and all(0 <= e < E for e in ids), f"hash: {ids} for E={E} k={k}")
                if k == E:
                    check(sorted(ids) == list(range(E)), "hash: k = E is a permutation")
                check(hash_experts(seed, tid, E, k)[:1] == hash_experts(seed, tid, E, 1), "hash: prefix")
    # The layer: weights scale / k, equal ids route equally, no router losses, no router input.
    c = full_config({"router": "hash", "n_tokens": 9, "n_expert": 5, "n_expert_used": 2,
                     "weights_scale": 1.5, "hash_seed": 3, "aux_loss_coef": 0.5, "z_loss_coef": 0.5})
    ins = generate_inputs(c)
    check("ffn_gate_inp" not in ins and "token_ids" in ins, "hash: inputs")
    o, g = run(c, ins)
    check(torch.equal(o["expert_weights"], torch.full((9, 2), 0.75)), "hash: weights scale / k")
    ti = ins["token_ids"]
    for t in range(9):
        check(o["expert_ids"][t].long().tolist() == hash_experts(3, int(ti[t]), 5, 2), f"hash: token {t}")
        if t % 3 == 1:
            check(ti[t] == ti[t - 1] and torch.equal(o["expert_ids"][t], o["expert_ids"][t - 1]), "hash: repeats")
    check(float(o["aux"]) == 0 and float(o["z"]) == 0 and float(o["entropy"]) == 0, "hash: no losses")
    check("grad_ffn_gate_inp" not in g and "grad_token_ids" not in g, "hash: gradients")


def selftest_top_p():
    c = full_config({"router": "top_p", "n_tokens": 1, "n_embd": 4, "n_expert": 4, "n_expert_used": 3,
                     "norm_topk": False, "top_p": 0.7})
    probs = [0.3, 0.5, 0.05, 0.15]
    logits = torch.log(torch.tensor([probs]))
    for top_p, n in ((0.7, 2), (0.4, 1), (0.99, 3), (0.8 + 1e-9, 3)):
        s = select(dict(c, top_p=top_p), logits, None)
        check(s["ids"][0].tolist() == [1, 0, 3], f"top_p: ranking {s['ids'].tolist()}")
        check(s["active"][0].tolist() == [j < n for j in range(3)], f"top_p {top_p}: {s['active'].tolist()}")
    # Ties rank the lower id first; the sum is in double: 0.25 + 0.25 reaches 0.5 exactly.
    s = select(dict(c, top_p=0.5), torch.zeros(1, 4), None)
    check(s["ids"][0].tolist() == [0, 1, 2] and s["active"][0].tolist() == [True, True, False],
          f"top_p ties: {s['ids'].tolist()} {s['active'].tolist()}")
    # Weights: the probabilities of the active slots (renormalised over them with norm_topk).
    o, _ = run(c, one_token_inputs(c, logits[0].tolist()))
    w = o["expert_weights"][0].tolist()
    check(abs(w[0] - 0.5) < 1e-12 and abs(w[1] - 0.3) < 1e-12 and w[2] == 0, f"top_p weights {w}")
    o, _ = run(dict(c, norm_topk=True, weights_scale=2.0), one_token_inputs(c, logits[0].tolist()))
    w = o["expert_weights"][0].tolist()
    check(abs(w[0] - 1.25) < 1e-12 and abs(w[1] - 0.75) < 1e-12 and w[2] == 0, f"top_p norm weights {w}")
    # f counts active slots only: tokens using 1 and 3 slots, 4 active slots in all.
    c2 = full_config({"router": "top_p", "n_tokens": 2, "n_embd": 4, "n_expert": 4, "n_expert_used": 3,
                      "top_p": 0.8, "aux_loss_coef": 1.0, "z_loss_coef": 0.0})
    ins = generate_inputs(c2)
    ins["x"] = torch.eye(4)[:2].clone()
    Wr = torch.zeros(4, 4)
    Wr[:, 0] = torch.log(torch.tensor([0.85, 0.05, 0.05, 0.05]))  # token 0: expert 0 alone
    Wr[:, 1] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))      # token 1: 3, 2, 1 (0.7 < 0.8)
    ins["ffn_gate_inp"] = Wr
    o, _ = run(c2, ins)
    check(o["active"].tolist() == [[1, 0, 0], [1, 1, 1]], f"top_p activity {o['active'].tolist()}")
    check(o["expert_ids"].tolist() == [[0, 1, 2], [3, 2, 1]], f"top_p ids {o['expert_ids'].tolist()}")
    f = [0.25, 0.25, 0.25, 0.25]
    Pm = [0.475, 0.125, 0.175, 0.225]
    want = 4 * sum(a * b for a, b in zip(f, Pm))
    check(abs(float(o["aux"]) - want) < 1e-12, f"top_p aux {float(o['aux'])} vs {want}")
    check(o["tokens_per_expert"].tolist() == [1, 1, 1, 1], "top_p loads count active slots")
    # The entropy default is 1e-4 for top_p, 0 for the other routers; explicit values win.
    check(entropy_coef(c) == 1e-4 and entropy_coef(dict(c, router="softmax_topk")) == 0.0
          and entropy_coef(dict(c, entropy_loss_coef=0.0)) == 0.0, "entropy coefficient default")
    h = -sum(p * math.log(p) for p in probs)
    o, _ = run(c, one_token_inputs(c, logits[0].tolist()))
    check(abs(float(o["entropy"]) - 1e-4 * h) < 1e-16, f"entropy {float(o['entropy'])} vs {1e-4 * h}")


def selftest_null_zc():
    # AdaMoE renormalisation: E = 2 FFN, 2 null, k = 2, norm_topk. Token 0 picks FFN 0 (0.4) and
    # null 2 (0.3): FFN weight 1, null keeps 0.3. Token 1 picks two nulls: nothing to divide.
    # Token 2 picks FFN 1 (0.4) and FFN 0 (0.3): 4/7, 3/7.
    c = full_config({"router": "softmax_topk", "n_tokens": 3, "n_embd": 4, "n_expert": 2, "n_null": 2,
                     "n_expert_used": 2, "norm_topk": True, "capacity_factor": 0.5})
    check(token_capacity(c) == 2, "null capacity formula")
    ins = generate_inputs(c)
    ins["x"] = torch.eye(4)[:3].clone()
    Wr = torch.zeros(4, 4)
    Wr[:, 0] = torch.log(torch.tensor([0.4, 0.1, 0.3, 0.2]))
    Wr[:, 1] = torch.log(torch.tensor([0.1, 0.2, 0.4, 0.3]))
    Wr[:, 2] = torch.log(torch.tensor([0.3, 0.4, 0.2, 0.1]))
    ins["ffn_gate_inp"] = Wr
    o, _ = run(c, ins)
    check(o["expert_ids"].tolist() == [[0, 2], [2, 3], [1, 0]], f"null ids {o['expert_ids'].tolist()}")
    want = torch.tensor([[1.0, 0.3], [0.4, 0.3], [4 / 7, 3 / 7]])
    check(torch.allclose(o["expert_weights"], want, atol=1e-12, rtol=0), f"null weights {o['expert_weights'].tolist()}")
    # Capacity C = 2 counts FFN slots only: FFN 0 is taken by tokens 0 and 2, nothing drops;
    # the nulls (3 slots) have no limit.
    check(o["dropped"].sum() == 0, "nulls do not use capacity")
    check(torch.equal(o["y"][1], torch.zeros(4)), "a token routed to nulls only outputs 0")
    # Copy and constant experts: E = 1, copy, const; token 0 -> copy alone (norm: weight 1, y = x);
    # token 1 -> const alone with W_c = 0, so a = [1/2, 1/2] and y = (x + v) / 2.
    c = full_config({"router": "softmax_topk", "n_tokens": 2, "n_embd": 3, "n_expert": 1, "n_copy": 1,
                     "n_const": 1, "n_expert_used": 1, "norm_topk": True})
    ins = generate_inputs(c)
    ins["x"] = torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.5, -1.0]])
    ins["ffn_gate_inp"] = torch.tensor([[0.0, 0.0, 0.0], [9.0, -3.0, 0.0], [0.0, 0.0, -4.0]])
    ins["const_wc"] = torch.zeros(1, 2, 3)
    ins["const_v"] = torch.tensor([[2.0, 4.0, -6.0]])
    o, g = run(c, ins)
    check(o["expert_ids"].tolist() == [[1], [2]], f"zc ids {o['expert_ids'].tolist()}")
    check(torch.allclose(o["y"][0], ins["x"][0], atol=1e-15, rtol=0), "copy expert outputs x")
    check(torch.allclose(o["y"][1], (ins["x"][1] + ins["const_v"][0]) / 2, atol=1e-15, rtol=0),
          "const expert outputs a1 x + a2 v")
    # aux = coef * R * sum_i eta_i f_i P_i with f = [0, 1/2, 1/2] (one slot each on copy and
    # const); tau scales the zero-computation terms, so tau = 0 leaves only the FFN term (0 here).
    Pm = o["probs"].mean(0)
    for tau in (1.0, 0.25, 0.0):
        ot, _ = run(dict(c, zc_balance_tau=tau), ins)
        want = c["aux_loss_coef"] * 3 * tau * 0.5 * float(Pm[1] + Pm[2])
        check(abs(float(ot["aux"]) - want) < 1e-15, f"aux with tau {tau}: {float(ot['aux'])} vs {want}")
    # Gating residual: x = 0, W_g = I -> logits = prev_logits.
    c = full_config({"router": "softmax_topk", "n_tokens": 2, "n_embd": 3, "n_expert": 2, "n_zero": 1,
                     "n_expert_used": 1, "gating_residual": True})
    ins = generate_inputs(c)
    ins["x"] = torch.zeros(2, 3)
    ins["gate_res"] = torch.eye(3)
    o, g = run(c, ins)
    check(torch.equal(o["logits"], ins["prev_logits"]), "gating residual logits")
    check(torch.equal(g["grad_ffn_gate_inp"], torch.zeros(3, 3)), "x = 0: no router gradient")


def selftest_presets():
    """Each preset exercises what it is named for (so a C++ comparison of it cannot pass by
    never reaching the feature)."""
    for name, over in sorted(PRESETS.items()):
        c = full_config(over)
        ins = generate_inputs(c)
        o, _ = run(c, ins)
        if c["router"] == "expert_choice":
            continue
        kinds = target_kinds(c)
        ids, act = o["expert_ids"].long(), o["active"].bool()
        used = {kinds[int(e)] for e in ids[act].tolist()}
        need = {kd for kd, n in (("null", "n_null"), ("zero", "n_zero"), ("copy", "n_copy"),
                                 ("const", "n_const")) if c[n]}
        check(need <= used, f"preset {name}: no active slot on {sorted(need - used)}")
        if c["capacity_factor"] > 0:
            check(o["dropped"].sum() > 0, f"preset {name}: capacity drops nothing")
        if c["router"] == "top_p":
            n_t = act.sum(1)
            check(int(n_t.min()) < c["n_expert_used"] and int(n_t.max()) > 1,
                  f"preset {name}: top_p uses {n_t.tolist()} slots: no variety")
        if c["n_null"] and c["norm_topk"]:
            is_null = (ids >= c["n_expert"]) & (ids < c["n_expert"] + c["n_null"]) & act
            mixed = (is_null.any(1) & (act & ~is_null).any(1)).any()
            check(bool(mixed), f"preset {name}: no token mixes null and other targets")
        if c["router"] == "hash":
            check(len(set(ins["token_ids"].tolist())) < c["n_tokens"], f"preset {name}: no repeated id")


def selftest():
    tiny = {"n_tokens": 7, "n_embd": 5, "n_ff_exp": 3, "aux_loss_coef": 0.3, "z_loss_coef": 0.2}
    cases = {
        "softmax_norm": {"router": "softmax_topk", "n_expert": 4, "n_expert_used": 2},
        "softmax_nonorm_scale": {"router": "softmax_topk", "n_expert": 5, "n_expert_used": 3,
                                 "norm_topk": False, "weights_scale": 1.7},
        "sigmoid_bias_group": {"router": "sigmoid_bias", "n_expert": 6, "n_expert_used": 2, "n_group": 3,
                               "topk_group": 2, "weights_scale": 2.0},
        "sigmoid_nonorm": {"router": "sigmoid_bias", "n_expert": 4, "n_expert_used": 2, "norm_topk": False},
        "expert_choice": {"router": "expert_choice", "n_expert": 3, "ec_capacity_factor": 1.5},
        "shared_gated_capacity": {"router": "softmax_topk", "n_expert": 4, "n_expert_used": 2,
                                  "capacity_factor": 0.6, "n_expert_shared": 2, "n_ff_shexp": 2,
                                  "shared_gate": True},
        "sigmoid_entropy": {"router": "sigmoid_bias", "n_expert": 4, "n_expert_used": 2,
                            "entropy_loss_coef": 0.3},
        "top_p_entropy": {"router": "top_p", "n_expert": 4, "n_expert_used": 3, "top_p": 0.5,
                          "norm_topk": False, "entropy_loss_coef": 0.3},
        "top_p_null_zc_residual": {"router": "top_p", "n_expert": 3, "n_null": 1, "n_zero": 1,
                                   "n_copy": 1, "n_const": 1, "n_expert_used": 4, "top_p": 0.6,
                                   "gating_residual": True, "zc_balance_tau": 0.5,
                                   "entropy_loss_coef": 0.2, "capacity_factor": 0.8},
        "hash_k2_capacity": {"router": "hash", "n_expert": 4, "n_expert_used": 2, "norm_topk": False,
                             "capacity_factor": 0.7, "weights_scale": 1.3, "hash_seed": 99},
        "adamoe_null_norm": {"router": "softmax_topk", "n_expert": 3, "n_null": 2, "n_expert_used": 3},
        "moepp_residual": {"router": "softmax_topk", "n_expert": 3, "n_zero": 1, "n_copy": 1,
                           "n_const": 2, "n_expert_used": 2, "norm_topk": False,
                           "zc_balance_tau": 0.6, "gating_residual": True, "entropy_loss_coef": 0.1},
    }
    for name, over in cases.items():
        c = full_config({**tiny, **over, "seed": 11})
        worst = selftest_gradients(name, c)
        print(f"gradients {name}: ok (worst relative error {worst:.1e})")
    selftest_capacity()
    print("capacity dropping order: ok")
    selftest_expert_choice()
    print("expert choice: ok")
    selftest_groups()
    print("group-limited top-k and selection-only bias: ok")
    selftest_hash()
    print("hash routing (SplitMix64 vectors, distinct experts, weights): ok")
    selftest_top_p()
    print("top_p (threshold, ties, weights, active-slot balance, entropy): ok")
    selftest_null_zc()
    print("null / zero / copy / const experts, tau, gating residual: ok")
    selftest_presets()
    print("presets reach their features: ok")
    # Round trip through the exchange format: written inputs read back give the same golden.
    import tempfile
    for preset in ("shared_gated", "hash_k2_capacity", "top_p_null_zc"):
        with tempfile.TemporaryDirectory() as d:
            _, o1, g1 = write_golden(d, preset, None)
            for n in list(o1) + list(g1):
                os.remove(os.path.join(d, n + ".bin"))
            c2, o2, g2 = write_golden(d, None, None)
            man = json.load(open(os.path.join(d, "manifest.json")))
            check(c2 == full_config(PRESETS[preset]), f"{preset}: config round trip")
            check(all(torch.equal(o1[n], o2[n]) for n in o1) and all(torch.equal(g1[n], g2[n]) for n in g1),
                  f"{preset}: exchange round trip")
            for e in man["inputs"] + man["outputs"]:
                check(os.path.getsize(os.path.join(d, e["file"])) == 8 * math.prod(e["shape"]),
                      f"size of {e['file']}")
    print("exchange format round trip: ok")
    print("selftest passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="exchange directory (config.json and inputs read if present)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="config when DIR has no config.json")
    ap.add_argument("--seed", type=int, help="seed for generated inputs (with --preset)")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--list-presets", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.list_presets:
        for n in sorted(PRESETS):
            print(n, json.dumps(PRESETS[n]))
        return 0
    if a.selftest:
        selftest()
        return 0
    if not a.dir:
        ap.error("give --dir DIR (or --selftest)")
    c, outs, _ = write_golden(a.dir, a.preset, a.seed)
    print(f"golden written to {a.dir}: router {c['router']}, loss {float(outs['loss']):.12g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
