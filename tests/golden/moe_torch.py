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

  logits_t = W_r x_t                                       W_r: ffn_gate_inp [E][D]
  expert e: FFN_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x))
                                                           ffn_gate_exps / ffn_up_exps [E][F][D],
                                                           ffn_down_exps [E][D][F]
  y_t = sum_e combine[t][e] * FFN_e(x_t) + shared(x_t)

Routers (selection is a discrete function of the scores; ties go to the lower index):
  softmax_topk  p_t = softmax(logits_t); the k largest p, best first; weights = the selected p,
                divided by their sum when norm_topk, times weights_scale.
  sigmoid_bias  s_t = sigmoid(logits_t); selection by the k largest s_t + b (b = exp_probs_b
                [E], selection only, no gradient). Optional group-limited top-k: the E experts
                form n_group contiguous groups of E/n_group; a group's score is the sum of its
                two largest biased scores; only the topk_group best groups stay eligible.
                Weights = the unbiased s of the selected experts, divided by their sum when
                norm_topk, times weights_scale.
  expert_choice p_t = softmax(logits_t); expert e takes the c tokens with the largest p[.][e]
                (c = floor(T * ec_capacity_factor / E), clipped to [1, T]), best first; the
                token's weight for e is p[t][e] (times weights_scale). A token gets 0..E experts.

Capacity dropping (token-choice routers, capacity_factor > 0): C = ceil(capacity_factor * T *
k / E), computed in double in that order (T = seq_len when the capacity scope is each
sequence of seq_len tokens, counts restarting at each sequence). Slots (t, j) are visited in token order t = 0..T-1
and, within a token, in selection order j = 0..k-1 (best first); a slot is dropped when its
expert already holds C slots. A dropped slot contributes nothing (its weight is not given to
the token's other experts; the renormalisation above happened before dropping). capacity_factor
0 means dropless.

Shared experts (n_expert_shared = S > 0, width n_ff_shexp = Fs): always active,
  shared(x) = g(x) * sum_s FFN_shexp,s(x),  g(x) = sigmoid(w_g . x) when shared_gate else 1,
  with ffn_gate_shexp / ffn_up_shexp [S][Fs][D], ffn_down_shexp [S][D][Fs],
  ffn_gate_inp_shexp [D] (GGUF's qwen2moe convention: one gate for the shared output).

Losses (token-choice routers; both 0 for expert_choice's aux):
  aux = aux_loss_coef * E * sum_i f_i * P_i,  f_i = (slots routed to i, before dropping) /
        (T * k), a constant (no gradient); P_i = mean_t q_t[i] where q = p for softmax_topk and
        q_t = s_t / sum_j s_t[j] for sigmoid_bias (DeepSeek-V3's normalised scores).
  z   = z_loss_coef * mean_t logsumexp(logits_t)^2 (all routers).
Objective: L = sum(y * G) + aux + z for a fixed random G [T][D]; every gradient is dL/d(input).

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

ROUTERS = ("softmax_topk", "sigmoid_bias", "expert_choice")

DEFAULT_CONFIG = {
    "router": "softmax_topk",
    "n_tokens": 24,            # T
    "n_embd": 16,              # D
    "n_ff_exp": 12,            # F
    "n_expert": 4,             # E
    "n_expert_used": 2,        # k (ignored by expert_choice)
    "norm_topk": True,
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
}


def full_config(overrides):
    cfg = dict(DEFAULT_CONFIG)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise SystemExit(f"config: unknown keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    check_config(cfg)
    return cfg


def check_config(c):
    if c["router"] not in ROUTERS:
        raise SystemExit(f"config: router '{c['router']}' is not one of {ROUTERS}")
    E, k = c["n_expert"], c["n_expert_used"]
    if min(c["n_tokens"], c["n_embd"], c["n_ff_exp"], E) < 1:
        raise SystemExit("config: n_tokens, n_embd, n_ff_exp, n_expert must be >= 1")
    if c["router"] != "expert_choice" and not 1 <= k <= E:
        raise SystemExit(f"config: n_expert_used {k} must be in [1, n_expert={E}]")
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
# Tensors: name -> shape, in the exchange directory as <name>.bin (raw little-endian float64,
# row-major, last index fastest).

def input_shapes(c):
    T, D, F, E = c["n_tokens"], c["n_embd"], c["n_ff_exp"], c["n_expert"]
    S, Fs = c["n_expert_shared"], c["n_ff_shexp"]
    shapes = {
        "x": [T, D],
        "ffn_gate_inp": [E, D],
        "ffn_gate_exps": [E, F, D],
        "ffn_up_exps": [E, F, D],
        "ffn_down_exps": [E, D, F],
        "G": [T, D],
    }
    if c["router"] == "sigmoid_bias":
        shapes["exp_probs_b"] = [E]
    if S:
        shapes["ffn_gate_shexp"] = [S, Fs, D]
        shapes["ffn_up_shexp"] = [S, Fs, D]
        shapes["ffn_down_shexp"] = [S, D, Fs]
        if c["shared_gate"]:
            shapes["ffn_gate_inp_shexp"] = [D]
    return shapes


# Inputs with a gradient (everything but G and the selection-only bias).
def trainable(name):
    return name not in ("G", "exp_probs_b")


def generate_inputs(c):
    g = torch.Generator().manual_seed(int(c["seed"]))
    D, F, Fs = c["n_embd"], c["n_ff_exp"], max(1, c["n_ff_shexp"])
    scale = {"x": 1.0, "ffn_gate_inp": 1.5 / math.sqrt(D), "ffn_gate_exps": 1 / math.sqrt(D),
             "ffn_up_exps": 1 / math.sqrt(D), "ffn_down_exps": 1 / math.sqrt(F), "G": 1.0,
             "exp_probs_b": 0.3, "ffn_gate_shexp": 1 / math.sqrt(D), "ffn_up_shexp": 1 / math.sqrt(D),
             "ffn_down_shexp": 1 / math.sqrt(Fs), "ffn_gate_inp_shexp": 1 / math.sqrt(D)}
    return {n: torch.randn(s, generator=g) * scale[n] for n, s in input_shapes(c).items()}


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


def select(c, logits, bias):
    """Returns a dict of plain selection data for the router in c."""
    T, E = logits.shape
    with torch.no_grad():
        if c["router"] == "expert_choice":
            p = torch.softmax(logits, dim=-1)
            cap = ec_capacity(c)
            ec_tokens = topk_stable(p.t(), cap)          # [E][c] token ids, best first
            return {"ec_tokens": ec_tokens, "gap": selection_gap(p.t(), cap)}
        k = c["n_expert_used"]
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
        dropped = torch.zeros(T, k, dtype=torch.bool)
        if c["capacity_factor"] > 0:
            C = token_capacity(c)
            fill = [0] * E
            for t in range(T):
                if c["seq_len"] and t % c["seq_len"] == 0:
                    fill = [0] * E                         # a new capacity scope
                for j in range(k):
                    e = int(ids[t, j])
                    if fill[e] >= C:
                        dropped[t, j] = True
                    else:
                        fill[e] += 1
        return {"ids": ids, "dropped": dropped, "gap": gap}


def swiglu(x, wg, wu, wd):
    """x [N][D], wg/wu [F][D], wd [D][F] -> [N][D]."""
    return (torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()


def layer(c, P, sel):
    """Differentiable forward at a fixed selection. P: name -> tensor. Returns a dict."""
    x, Wr = P["x"], P["ffn_gate_inp"]
    T, E = x.shape[0], c["n_expert"]
    logits = x @ Wr.t()                                    # [T][E]
    out = {"logits": logits}
    combine = torch.zeros(T, E)                            # [T][E] weight of expert e for token t
    if c["router"] == "expert_choice":
        p = torch.softmax(logits, dim=-1)
        et = sel["ec_tokens"]                              # [E][c]
        ew = p.t().gather(1, et) * c["weights_scale"]      # [E][c]
        combine = combine.index_put((et.reshape(-1), torch.arange(E).repeat_interleave(et.shape[1])),
                                    ew.reshape(-1), accumulate=True)
        out.update(probs=p, ec_weights=ew, aux=torch.zeros(()))
        q = p
    else:
        ids, dropped = sel["ids"], sel["dropped"]
        if c["router"] == "softmax_topk":
            p = torch.softmax(logits, dim=-1)
            q = p
        else:
            p = torch.sigmoid(logits)
            q = p / p.sum(-1, keepdim=True)
        w = p.gather(1, ids)                               # [T][k]
        if c["norm_topk"]:
            w = w / w.sum(-1, keepdim=True)
        w = w * c["weights_scale"]
        kept = w * (~dropped).to(w.dtype)
        combine = combine.scatter_add(1, ids, kept)
        k = ids.shape[1]
        counts = torch.bincount(ids.reshape(-1), minlength=E).to(torch.float64)  # before dropping
        f = counts / (T * k)                               # constant
        Pm = q.mean(0)
        aux = c["aux_loss_coef"] * E * (f * Pm).sum()
        out.update(probs=p, expert_weights=w, aux=aux, tokens_per_expert=counts)
    z = c["z_loss_coef"] * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    y = torch.zeros_like(x)
    for e in range(E):
        y = y + combine[:, e:e + 1] * swiglu(x, P["ffn_gate_exps"][e], P["ffn_up_exps"][e],
                                             P["ffn_down_exps"][e])
    if c["n_expert_shared"]:
        sh = torch.zeros_like(x)
        for s in range(c["n_expert_shared"]):
            sh = sh + swiglu(x, P["ffn_gate_shexp"][s], P["ffn_up_shexp"][s], P["ffn_down_shexp"][s])
        if c["shared_gate"]:
            sh = torch.sigmoid(x @ P["ffn_gate_inp_shexp"])[:, None] * sh
        y = y + sh
    out.update(y=y, z=z, combine=combine, loss=(y * P["G"]).sum() + out["aux"] + z)
    return out


def run(c, inputs):
    """Full golden: selection, forward, backward. Returns (outputs dict, grads dict)."""
    P = {n: t.clone().requires_grad_(trainable(n)) for n, t in inputs.items()}
    with torch.no_grad():
        logits0 = P["x"] @ P["ffn_gate_inp"].t()
    sel = select(c, logits0, P.get("exp_probs_b"))
    o = layer(c, P, sel)
    names = [n for n in P if trainable(n)]
    grads = torch.autograd.grad(o["loss"], [P[n] for n in names])
    outs = {"y": o["y"], "aux": o["aux"].reshape(1), "z": o["z"].reshape(1), "loss": o["loss"].reshape(1),
            "logits": o["logits"], "probs": o["probs"], "combine": o["combine"]}
    if c["router"] == "expert_choice":
        outs["ec_tokens"] = sel["ec_tokens"].to(torch.float64)
        outs["ec_weights"] = o["ec_weights"]
    else:
        outs["expert_ids"] = sel["ids"].to(torch.float64)
        outs["expert_weights"] = o["expert_weights"]
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
    E = c["n_expert"]

    def ffn(v, wg, wu, wd):
        h = [0.0] * wg.shape[0]
        for f in range(wg.shape[0]):
            a = float(wg[f] @ v)
            b = float(wu[f] @ v)
            h[f] = a / (1 + math.exp(-a)) * b
        return [sum(float(wd[i, f]) * h[f] for f in range(len(h))) for i in range(wd.shape[0])]

    logits = [[float(inputs["ffn_gate_inp"][e] @ x[t]) for e in range(E)] for t in range(T)]
    lse = []
    probs = []
    for t in range(T):
        m = max(logits[t])
        s = sum(math.exp(l - m) for l in logits[t])
        lse.append(m + math.log(s))
        if c["router"] == "sigmoid_bias":
            probs.append([1 / (1 + math.exp(-l)) for l in logits[t]])
        else:
            probs.append([math.exp(l - m) / s for l in logits[t]])
    y = [[0.0] * D for _ in range(T)]
    aux = 0.0
    if c["router"] == "expert_choice":
        for e in range(E):
            for t in sel["ec_tokens"][e].tolist():
                o = ffn(x[t], inputs["ffn_gate_exps"][e], inputs["ffn_up_exps"][e], inputs["ffn_down_exps"][e])
                for i in range(D):
                    y[t][i] += probs[t][e] * c["weights_scale"] * o[i]
    else:
        k = c["n_expert_used"]
        count = [0] * E
        for t in range(T):
            ids = sel["ids"][t].tolist()
            ws = [probs[t][e] for e in ids]
            tot = sum(ws)
            for j, e in enumerate(ids):
                count[e] += 1
                w = (ws[j] / tot if c["norm_topk"] else ws[j]) * c["weights_scale"]
                if sel["dropped"][t, j]:
                    continue
                o = ffn(x[t], inputs["ffn_gate_exps"][e], inputs["ffn_up_exps"][e], inputs["ffn_down_exps"][e])
                for i in range(D):
                    y[t][i] += w * o[i]
        Pm = [0.0] * E
        for t in range(T):
            tot = sum(probs[t]) if c["router"] == "sigmoid_bias" else 1.0
            for e in range(E):
                Pm[e] += probs[t][e] / tot / T
        aux = c["aux_loss_coef"] * E * sum(count[e] / (T * k) * Pm[e] for e in range(E))
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
    return torch.tensor(y), aux, z


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def selftest_gradients(name, c):
    """Autograd gradients vs central differences at a fixed selection, every input entry."""
    inputs = generate_inputs(c)
    with torch.no_grad():
        logits0 = inputs["x"] @ inputs["ffn_gate_inp"].t()
    sel = select(c, logits0, inputs.get("exp_probs_b"))
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
    y, aux, z = naive_forward(c, inputs, sel)
    check(torch.allclose(outs["y"], y, rtol=1e-12, atol=1e-12), f"{name}: y differs from the scalar loop")
    check(abs(float(outs["aux"]) - aux) <= 1e-13 + 1e-12 * abs(aux), f"{name}: aux {float(outs['aux'])} vs {aux}")
    check(abs(float(outs["z"]) - z) <= 1e-12 * abs(z), f"{name}: z {float(outs['z'])} vs {z}")
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
    y, _, _ = naive_forward(c, inputs, {"ids": o["expert_ids"].long(), "dropped": o["dropped"].bool()})
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
    # Round trip through the exchange format: written inputs read back give the same golden.
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        _, o1, g1 = write_golden(d, "shared_gated", None)
        for n in o1:
            os.remove(os.path.join(d, n + ".bin"))
        _, o2, g2 = write_golden(d, None, None)
        man = json.load(open(os.path.join(d, "manifest.json")))
        check(all(torch.equal(o1[n], o2[n]) for n in o1) and all(torch.equal(g1[n], g2[n]) for n in g1),
              "exchange round trip")
        for e in man["outputs"]:
            check(os.path.getsize(os.path.join(d, e["file"])) == 8 * math.prod(e["shape"]), f"size of {e['file']}")
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
