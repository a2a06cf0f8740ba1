#!/usr/bin/python3
"""PyTorch golden for moe.cpp's whole MoE language model (forward, backward, AdamW), float64.

An independent plain-PyTorch implementation of the model that src/train/model_train.cc trains,
read from a GGUF file (F32 tensors) as moe.cpp reads it. A C++ test writes DIR/config.json, runs
this script, and compares its own logits, losses, gradients and AdamW trajectory with the files
written here. The MoE layer is tests/golden/moe_torch.py's (imported: its select() for the
discrete routing and layer() for the differentiable forward); the GGUF reader is
tests/conformance/ref_forward.py's (imported).

    /usr/bin/python3 tests/golden/model_torch.py --dir DIR         # write the golden
    /usr/bin/python3 tests/golden/model_torch.py --selftest        # check this script (~10 s)
    /usr/bin/python3 tests/golden/model_torch.py --check-run MOE   # compare with `MOE run
                                                                   #  --teacher-forcing` (needs
                                                                   #  the built moe binary)

Use /usr/bin/python3 (Debian python3-torch): a pyenv python3 on PATH may lack torch.

The model, for tokens [n_seq][L+1] (inputs = positions 0..L-1, targets = positions 1..L of each
sequence; N = n_seq * L rows, sequence-major; i = a row's position 0..L-1 in its sequence):

  x = token_embd[input]                              token_embd GGUF {D, V} = numpy [V][D]
  per block il:
    h1 = rmsnorm(x) * attn_norm                      rmsnorm(x) = x / sqrt(mean(x^2) + eps),
                                                     eps = <arch>.attention.layer_norm_rms_epsilon
    q, k, v = h1 Wq^T, h1 Wk^T, h1 Wv^T (+ attn_q/k/v.bias when the file has them)
    Q/K norm: olmoe  rmsnorm of the whole q [n_q] (k [n_k]) times attn_q_norm [n_q] (attn_k_norm)
              qwen3moe rmsnorm per head over head_dim times attn_q_norm [head_dim] (shared)
              llama, qwen2moe: none
    RoPE at position i: theta_j = i * base^(-2j/n_rot), j < n_rot/2, base = rope.freq_base;
      llama rotates the pairs (2j, 2j+1), qwen2moe / qwen3moe / olmoe (neox) (j, j + n_rot/2):
      x0' = x0 cos - x1 sin, x1' = x0 sin + x1 cos
    causal attention within each sequence, scale 1/sqrt(head_dim), query head h reads kv head
      h // (H / H_kv); x = x + att attn_output^T
    h2 = rmsnorm(x) * ffn_norm
    x = x + MoE_il(h2)                               (moe_torch semantics, below)
  logits = (rmsnorm(x) * output_norm) W^T,  W = output.weight, or token_embd when absent (tied)
  CE = mean over counted targets of -log softmax(logits)[target] (0 when none is counted)

The MoE layer of block il is moe_torch's with the config that the GGUF keys give (as
src/model/architectures.cc ReadRouter / ApplyArchTraits read them):
  router       <arch>.expert_router (absent: softmax_topk; expert_gating_func = 2 without it:
               sigmoid_bias); top_p = expert_router_top_p (absent: float32(0.4)); hash seed =
               expert_router_hash_seed (u64 or u32, absent 0)
  k            expert_used_count (top_p: k_max; expert_choice: all E experts may take a token)
  norm_topk    llama, qwen3moe: yes; qwen2moe, olmoe: no; never for hash and expert_choice
  groups       expert_group_count > 1 and expert_group_used_count: group-limited top-k for
               sigmoid_bias (moe_torch) and for softmax_topk (here, the same rule on the softmax
               probabilities: a group's score is the sum of its two best, the best
               expert_group_used_count groups stay eligible, ties to the lower index)
  scale        expert_weights_scale (absent or 0: 1)
  targets      expert_null_count, expert_zero_count, expert_copy_count, expert_const_count
  shared       ffn_gate_shexp / ffn_up_shexp {D, Fs}, ffn_down_shexp {Fs, D} are ONE shared
               expert of width Fs, gated by sigmoid(ffn_gate_inp_shexp . x) on qwen2moe only
  residual     expert_gating_residual: block il >= 1 adds ffn_gate_res [R][R] times block il-1's
               router logits (which include its own residual term; differentiable); block 0 none
  tensors      ffn_gate_inp {D,R} -> router [R][D] (ignored and not loaded for hash),
               exp_probs_b.bias [E] (selection-only bias), ffn_zc_mix {D,2,C} -> const_wc
               [C][2][D], ffn_zc_const {D,C} -> const_v [C][D], ffn_gate_res {R,R} -> gate_res
  The layer's tokens are all N rows of the call: the balance-loss scope and expert choice's
  capacity c = clamp(floor(N * ec_capacity_factor / E), 1, N) cover the call; the hash router
  reads the input token ids; capacity_factor = 0 (dropless).

Objective (what the gradients are of): L = CE + sum over blocks of (aux + z + entropy), the
layer losses with aux_loss_coef, z_loss_coef, entropy_loss_coef (negative: the router's default,
1e-4 for top_p, else 0) and zc_balance_tau from config.json. The routing is a discrete function
of detached router scores; L is differentiated at that fixed selection. Every GGUF tensor gets a
gradient except exp_probs_b.bias (moved only by the bias update).

AdamW (src/train/optimizer.cc, trainer.cc), step s = 0..S-1 on batch s:
  lr(s) = lr (s+1)/warmup for s < warmup, else with D = total_steps - warmup (total_steps = S):
          lr when D <= 1, else min_lr + (lr - min_lr)(1 + cos(pi min(1, (s - warmup)/(D - 1))))/2
  g *= clip / |g| when clip > 0 and |g| > clip (|g| = L2 norm over all trainable tensors)
  t = s + 1; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2
  w -= lr * weight_decay * w     (only matrices: token_embd, output, attn_q/k/v/output, experts,
                                  shared experts, ffn_gate_inp, ffn_zc_mix, ffn_zc_const,
                                  ffn_gate_res; not norms, biases, ffn_gate_inp_shexp)
  w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
  then, sigmoid_bias: exp_probs_b[e] += bias_update_rate * sign(mean(load) - load[e]), load = the
  step's active slots per expert of that block (before any dropping).

Input: DIR/config.json
  {"model": "/abs/model.gguf" (F32), "tokens": [[int] * (L+1)] * n_seq,
   "target_mask": optional [[0/1] * (L+1)] * n_seq (position i's token is a target when 1),
   "aux_loss_coef", "z_loss_coef", "entropy_loss_coef", "ec_capacity_factor" (defaults 1e-2,
   1e-3, -1, 2.0), "zc_balance_tau" (optional, default 1),
   "adamw": optional {"steps": S, "lr", "min_lr", "warmup", "beta1", "beta2", "eps",
            "weight_decay", "clip" (0 = off), "bias_update_rate" (defaults as AdamWConfig and
            MoeLayerConfig: 1e-3, 1e-4, 0, 0.9, 0.95, 1e-8, 0.1, 1.0, 1e-3),
            "total_steps" (optional, default S), "batches": [tokens [n_seq][L+1]] * S,
            "batch_masks": optional [target_mask or null] * S}}
Output files in DIR: raw little-endian float64, row-major (last index fastest), no header (the
convention of docs/golden-format.md; integers stored as exact float64 values):
  logits.bin [N][V]; loss.bin [1] (mean CE); moe_loss.bin [n_layer] (aux + z + entropy);
  objective.bin [1];
  grad/<gguf tensor name>.bin, every trainable tensor in numpy order (GGUF ne reversed, e.g.
    blk.0.ffn_gate_exps.weight {D, F, E} -> [E][F][D]);
  expert_ids/<block>.bin: token choice [N][k], the selected target ids best first, -1 for
    inactive top_p slots; expert choice [N][E], j where expert j took the row, else -1;
  selection_gap.bin [n_layer]: moe_torch's smallest selection margin per block (and, with
    groups, the margin between the last kept and the first dropped group); inf when none;
  with "adamw": adamw_losses.bin [S] (mean CE of batch s at the parameters after s updates) and
    adamw_final/<name>.bin, every tensor after the last step (exp_probs_b.bias included);
  manifest.json: {"format", "model", "arch", "n_seq", "seq_len", "n_layer", "layers" (the
    moe_torch config of each block; the bias update uses adamw's rate, not theirs),
    "files": [{"file", "shape"}]}.
Errors: one line on stderr, exit code 2.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "conformance"))
import moe_torch  # noqa: E402  (the MoE layer; sets float64 as torch's default dtype)
import ref_forward  # noqa: E402  (GGUF reader; the numpy reference forward for the selftest)

torch.set_default_dtype(torch.float64)

ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2")


class GoldenError(Exception):
    pass


def fail(msg):
    raise GoldenError(msg)


# ---------------------------------------------------------------------------------------------
# The model file: hyper-parameters from the GGUF keys, tensors as float64 torch arrays.

class Spec:
    """What moe.cpp's ReadConfig + ApplyArchTraits derive from the keys (the fields used here)."""


def f32(v):
    """A float as the C++ side holds it after reading an f32 key (float32, widened exactly)."""
    return float(np.float32(v))


def uniform(meta, key, default=None):
    """A per-layer key (scalar or array) that must hold one value for all layers."""
    if key not in meta:
        if default is None:
            fail(f"required key '{key}' is missing")
        return default
    v = meta[key]
    if isinstance(v, list):
        if not v or any(x != v[0] for x in v):
            fail(f"key '{key}' varies per layer")
        v = v[0]
    return v


def read_spec(meta, names):
    s = Spec()
    a = meta.get("general.architecture")
    if a not in ARCHS:
        fail(f"general.architecture '{a}' is not one of {ARCHS}")
    s.arch = a

    def key(suffix):
        return a + "." + suffix

    s.mla = a == "deepseek2"
    s.n_layer = int(meta[key("block_count")])
    s.D = int(meta[key("embedding_length")])
    s.n_ctx = int(meta[key("context_length")])
    s.H = int(uniform(meta, key("attention.head_count")))
    s.Hkv = int(uniform(meta, key("attention.head_count_kv"), s.H))
    s.Dh = int(meta.get(key("attention.key_length"), s.D // s.H))
    s.n_rot = int(meta.get(key("rope.dimension_count"), s.Dh))
    s.base = f32(meta.get(key("rope.freq_base"), 10000.0))
    s.eps = f32(meta[key("attention.layer_norm_rms_epsilon")])
    s.E = int(meta[key("expert_count")])
    s.k = int(meta[key("expert_used_count")])
    s.dense = 0
    if s.mla:  # the MLA head sizes; key_length / value_length describe the latent cache
        if key("attention.key_length_mla") not in meta:
            fail("deepseek2: only the split attn_k_b / attn_v_b layout is supported here")
        s.Dh = int(meta[key("attention.key_length_mla")])
        s.Dv = int(meta[key("attention.value_length_mla")])
        s.Kr = int(meta[key("attention.kv_lora_rank")])
        s.Rq = int(meta.get(key("attention.q_lora_rank"), 0))
        s.Dn = s.Dh - s.n_rot
        s.dense = int(meta.get(key("leading_dense_block_count"), 0))
        s.Hkv = s.H
    if s.H % s.Hkv or s.n_rot > s.Dh or s.n_rot % 2:
        fail(f"heads {s.H} / kv heads {s.Hkv} / rotated dims {s.n_rot} of head dim {s.Dh} do not fit")
    s.neox = a not in ("llama", "deepseek2")
    s.qk_norm = {"olmoe": "full", "qwen3moe": "head"}.get(a, "none")
    # Router keys (ReadRouter).
    router = meta.get(key("expert_router"))
    gating = meta.get(key("expert_gating_func"))
    if router is None:
        router = "sigmoid_bias" if gating == 2 else "softmax_topk"
    elif gating == 2 and router != "sigmoid_bias":
        fail(f"key '{key('expert_gating_func')}' = 2 (sigmoid) contradicts router {router}")
    if router not in moe_torch.ROUTERS:
        fail(f"router '{router}' is not one of {moe_torch.ROUTERS}")
    s.router = router
    s.top_p = f32(meta.get(key("expert_router_top_p"), 0.4))
    s.hash_seed = int(meta.get(key("expert_router_hash_seed"), 0))
    groups = int(meta.get(key("expert_group_count"), 0))
    s.n_group = groups if groups > 1 else 0
    s.topk_group = int(meta.get(key("expert_group_used_count"), 0)) if s.n_group else 0
    ws = f32(meta.get(key("expert_weights_scale"), 1.0))
    s.weights_scale = ws if ws != 0 else 1.0                  # llama.cpp: 0 = not set
    s.n_null = int(meta.get(key("expert_null_count"), 0))
    s.n_zero = int(meta.get(key("expert_zero_count"), 0))
    s.n_copy = int(meta.get(key("expert_copy_count"), 0))
    s.n_const = int(meta.get(key("expert_const_count"), 0))
    s.gating_residual = bool(meta.get(key("expert_gating_residual"), False))
    s.norm_topk = a in ("llama", "qwen3moe") and router not in ("hash", "expert_choice")
    if s.mla:  # deepseek2 reads the normalisation from the file
        s.norm_topk = bool(meta.get(key("expert_weights_norm"), False)) and router not in ("hash", "expert_choice")
    s.R = s.E + s.n_null + s.n_zero + s.n_copy + s.n_const
    s.tied = "output.weight" not in names
    s.shared_gate = a == "qwen2moe"
    return s


def is_trainable(name):
    return not name.endswith("exp_probs_b.bias")


def decays(name):
    """optimizer.cc DecaysWeights by the tensor's role: matrices yes; norms, biases, the
    qwen2moe shared-expert gate vector no."""
    if name.endswith(".bias") or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp_shexp.weight"):
        return False
    return True


def load_model(path):
    """(spec, tensors): tensors name -> float64 torch array in numpy order, GGUF order."""
    try:
        g = ref_forward.Gguf(path)
    except (OSError, ValueError) as e:
        fail(f"cannot read model '{path}': {e}")
    s = read_spec(g.meta, g.infos)
    W = {}
    for name, (ne, gtype, _) in g.infos.items():
        if gtype != ref_forward.GGML_F32:
            fail(f"{path}: tensor '{name}' is not F32 (type {gtype}); the golden reads F32 models")
        if s.router == "hash" and name.endswith("ffn_gate_inp.weight"):
            continue                                          # hash has no learned router
        W[name] = torch.from_numpy(np.array(g.tensor(name), dtype=np.float64))
    check_tensors(s, W)
    return s, W


def check_tensors(s, W):
    def need(name, shape):
        if name not in W:
            fail(f"the model has no tensor '{name}'")
        if list(W[name].shape) != list(shape):
            fail(f"tensor '{name}' has numpy shape {list(W[name].shape)}, expected {list(shape)}")

    s.V = W["token_embd.weight"].shape[0] if "token_embd.weight" in W else fail("no token_embd.weight")
    D, nq, nk = s.D, s.H * s.Dh, s.Hkv * s.Dh
    need("token_embd.weight", [s.V, D])
    need("output_norm.weight", [D])
    if not s.tied:
        need("output.weight", [s.V, D])
    p0 = f"blk.{s.dense}."  # the first MoE block
    s.F = W[p0 + "ffn_gate_exps.weight"].shape[1] if p0 + "ffn_gate_exps.weight" in W else 1
    s.Fs = W[p0 + "ffn_gate_shexp.weight"].shape[0] if p0 + "ffn_gate_shexp.weight" in W else 0
    s.Fd = W["blk.0.ffn_gate.weight"].shape[0] if s.dense else 0
    for il in range(s.n_layer):
        p = f"blk.{il}."
        need(p + "attn_norm.weight", [D])
        if s.mla:
            H, Dk, Dv, Kr, Rq, Dn = s.H, s.Dh, s.Dv, s.Kr, s.Rq, s.Dn
            if Rq:
                need(p + "attn_q_a.weight", [Rq, D])
                need(p + "attn_q_a_norm.weight", [Rq])
                need(p + "attn_q_b.weight", [H * Dk, Rq])
            else:
                need(p + "attn_q.weight", [H * Dk, D])
            need(p + "attn_kv_a_mqa.weight", [Kr + s.n_rot, D])
            need(p + "attn_kv_a_norm.weight", [Kr])
            need(p + "attn_k_b.weight", [H, Kr, Dn])
            need(p + "attn_v_b.weight", [H, Dv, Kr])
            need(p + "attn_output.weight", [D, H * Dv])
            need(p + "ffn_norm.weight", [D])
            if il < s.dense:
                need(p + "ffn_gate.weight", [s.Fd, D])
                need(p + "ffn_up.weight", [s.Fd, D])
                need(p + "ffn_down.weight", [D, s.Fd])
                continue
        else:
            need(p + "attn_q.weight", [nq, D])
            need(p + "attn_k.weight", [nk, D])
            need(p + "attn_v.weight", [nk, D])
            need(p + "attn_output.weight", [D, nq])
        if p + "attn_q.bias" in W:
            need(p + "attn_q.bias", [nq])
            need(p + "attn_k.bias", [nk])
            need(p + "attn_v.bias", [nk])
        if s.qk_norm == "full":
            need(p + "attn_q_norm.weight", [nq])
            need(p + "attn_k_norm.weight", [nk])
        elif s.qk_norm == "head":
            need(p + "attn_q_norm.weight", [s.Dh])
            need(p + "attn_k_norm.weight", [s.Dh])
        need(p + "ffn_norm.weight", [D])
        if s.router != "hash":
            need(p + "ffn_gate_inp.weight", [s.R, D])
        need(p + "ffn_gate_exps.weight", [s.E, s.F, D])
        need(p + "ffn_up_exps.weight", [s.E, s.F, D])
        need(p + "ffn_down_exps.weight", [s.E, D, s.F])
        if s.router == "sigmoid_bias" and (not s.mla or p + "exp_probs_b.bias" in W):
            need(p + "exp_probs_b.bias", [s.E])
        if s.n_const:
            need(p + "ffn_zc_mix.weight", [s.n_const, 2, D])
            need(p + "ffn_zc_const.weight", [s.n_const, D])
        if s.gating_residual and il > 0:
            need(p + "ffn_gate_res.weight", [s.R, s.R])
        if s.Fs:
            need(p + "ffn_gate_shexp.weight", [s.Fs, D])
            need(p + "ffn_up_shexp.weight", [s.Fs, D])
            need(p + "ffn_down_shexp.weight", [D, s.Fs])
            if s.shared_gate:
                need(p + "ffn_gate_inp_shexp.weight", [D])


def layer_config(s, il, n_tokens, coefs):
    """moe_torch's config of block il (validated by moe_torch.full_config)."""
    sig_groups = s.router == "sigmoid_bias" and s.n_group
    return moe_torch.full_config({
        "router": s.router, "n_tokens": n_tokens, "n_embd": s.D, "n_ff_exp": s.F,
        "n_expert": s.E, "n_expert_used": s.k, "norm_topk": s.norm_topk,
        "weights_scale": s.weights_scale,
        # softmax_topk groups are selected here (moe_torch has them for sigmoid_bias only).
        "n_group": s.n_group if sig_groups else 0, "topk_group": s.topk_group if sig_groups else 0,
        "ec_capacity_factor": coefs["ec_capacity_factor"], "capacity_factor": 0.0, "seq_len": 0,
        "n_expert_shared": 1 if s.Fs else 0, "n_ff_shexp": s.Fs,
        "shared_gate": bool(s.Fs and s.shared_gate),
        "aux_loss_coef": coefs["aux_loss_coef"], "z_loss_coef": coefs["z_loss_coef"],
        "entropy_loss_coef": coefs["entropy_loss_coef"], "zc_balance_tau": coefs["zc_balance_tau"],
        "hash_seed": s.hash_seed, "top_p": s.top_p, "n_null": s.n_null, "n_zero": s.n_zero,
        "n_copy": s.n_copy, "n_const": s.n_const, "gating_residual": s.gating_residual and il > 0,
    })


# ---------------------------------------------------------------------------------------------
# Forward.

def rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, s):
    """x [N][heads][Dh], pos [N]: rotates the first n_rot dims of every head."""
    half = s.n_rot // 2
    inv = torch.tensor([s.base ** (-2.0 * j / s.n_rot) for j in range(half)])
    ang = pos.to(torch.float64)[:, None] * inv[None, :]       # [N][half]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    if s.neox:
        x0, x1 = x[..., :half], x[..., half:s.n_rot]
        rot = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    else:
        x0, x1 = x[..., 0:s.n_rot:2], x[..., 1:s.n_rot:2]
        rot = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([rot, x[..., s.n_rot:]], dim=-1)


def attention(s, W, p, h, n_seq, L):
    N = n_seq * L
    q = h @ W[p + "attn_q.weight"].t()
    k = h @ W[p + "attn_k.weight"].t()
    v = h @ W[p + "attn_v.weight"].t()
    if p + "attn_q.bias" in W:
        q = q + W[p + "attn_q.bias"]
        k = k + W[p + "attn_k.bias"]
        v = v + W[p + "attn_v.bias"]
    if s.qk_norm == "full":
        q = rmsnorm(q, W[p + "attn_q_norm.weight"], s.eps)
        k = rmsnorm(k, W[p + "attn_k_norm.weight"], s.eps)
    q = q.reshape(N, s.H, s.Dh)
    k = k.reshape(N, s.Hkv, s.Dh)
    v = v.reshape(N, s.Hkv, s.Dh)
    if s.qk_norm == "head":
        q = rmsnorm(q, W[p + "attn_q_norm.weight"], s.eps)
        k = rmsnorm(k, W[p + "attn_k_norm.weight"], s.eps)
    pos = torch.arange(N) % L
    q, k = rope(q, pos, s), rope(k, pos, s)
    group = s.H // s.Hkv
    q = q.reshape(n_seq, L, s.H, s.Dh).transpose(1, 2)                     # [n_seq][H][L][Dh]
    k = k.reshape(n_seq, L, s.Hkv, s.Dh).transpose(1, 2).repeat_interleave(group, dim=1)
    v = v.reshape(n_seq, L, s.Hkv, s.Dh).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(s.Dh)                  # [n_seq][H][L][L]
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, -math.inf), dim=-1)
    att = (probs @ v).transpose(1, 2).reshape(N, s.H * s.Dh)
    return att @ W[p + "attn_output.weight"].t()


def mla_attention(s, W, p, h, n_seq, L):
    """deepseek2's multi-head latent attention, written out in the plain form: q through the
    q_lora bottleneck (or attn_q); the latent c = rmsnorm(kv_a x)[:Kr] and the shared rotated key
    part; head h's key [c A_h | k_pe] (A_h = attn_k_b[h] [Kr][Dn]) and value c B_h^T (B_h =
    attn_v_b[h] [Dv][Kr]); RoPE on the last qk_rope dims of each query head (adjacent pairs);
    scores / sqrt(qk_nope + qk_rope)."""
    N, H, Dk, Dn, Dr, Dv, Kr = n_seq * L, s.H, s.Dh, s.Dn, s.n_rot, s.Dv, s.Kr
    if s.Rq:
        qa = rmsnorm(h @ W[p + "attn_q_a.weight"].t(), W[p + "attn_q_a_norm.weight"], s.eps)
        q = qa @ W[p + "attn_q_b.weight"].t()
    else:
        q = h @ W[p + "attn_q.weight"].t()
    q = q.reshape(N, H, Dk)
    kva = h @ W[p + "attn_kv_a_mqa.weight"].t()
    c = rmsnorm(kva[:, :Kr], W[p + "attn_kv_a_norm.weight"], s.eps)          # [N][Kr]
    pos = torch.arange(N) % L
    kpe = rope(kva[:, None, Kr:], pos, s)                                   # [N][1][Dr]
    q = torch.cat([q[..., :Dn], rope(q[..., Dn:], pos, s)], dim=-1)
    k_nope = torch.einsum("nr,hrd->nhd", c, W[p + "attn_k_b.weight"])
    v = torch.einsum("nr,hvr->nhv", c, W[p + "attn_v_b.weight"])
    k = torch.cat([k_nope, kpe.expand(N, H, Dr)], dim=-1)                    # [N][H][Dk]
    q = q.reshape(n_seq, L, H, Dk).transpose(1, 2)
    k = k.reshape(n_seq, L, H, Dk).transpose(1, 2)
    v = v.reshape(n_seq, L, H, Dv).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dk)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, -math.inf), dim=-1)
    att = (probs @ v).transpose(1, 2).reshape(N, H * Dv)
    return att @ W[p + "attn_output.weight"].t()


def dense_ffn(W, p, h2):
    """A leading dense block's SwiGLU FFN (deepseek2)."""
    g = h2 @ W[p + "ffn_gate.weight"].t()
    u = h2 @ W[p + "ffn_up.weight"].t()
    return (torch.nn.functional.silu(g) * u) @ W[p + "ffn_down.weight"].t()


def moe_inputs(s, W, p, h2, prev_logits, gating_residual):
    """moe_torch's tensor dict of a block (its fixed upstream G / dlogits are zeros: the model's
    objective uses y and the losses directly)."""
    P = {"x": h2,
         "ffn_gate_exps": W[p + "ffn_gate_exps.weight"],
         "ffn_up_exps": W[p + "ffn_up_exps.weight"],
         "ffn_down_exps": W[p + "ffn_down_exps.weight"],
         "G": torch.zeros_like(h2.detach())}
    if s.router != "hash":
        P["ffn_gate_inp"] = W[p + "ffn_gate_inp.weight"]
    if s.router == "sigmoid_bias":
        P["exp_probs_b"] = W[p + "exp_probs_b.bias"].detach()
    if s.Fs:
        P["ffn_gate_shexp"] = W[p + "ffn_gate_shexp.weight"][None]
        P["ffn_up_shexp"] = W[p + "ffn_up_shexp.weight"][None]
        P["ffn_down_shexp"] = W[p + "ffn_down_shexp.weight"][None]
        if s.shared_gate:
            P["ffn_gate_inp_shexp"] = W[p + "ffn_gate_inp_shexp.weight"]
    if s.n_const:
        P["const_wc"] = W[p + "ffn_zc_mix.weight"]
        P["const_v"] = W[p + "ffn_zc_const.weight"]
    if gating_residual:
        P["gate_res"] = W[p + "ffn_gate_res.weight"]
        P["prev_logits"] = prev_logits
        P["dlogits"] = torch.zeros_like(prev_logits.detach())
    return P


def group_gap(score, n_group, topk_group):
    """Smallest margin between the topk_group-th and the next group score (sum of a group's two
    best scores) over the rows: where a group flip would change the eligible experts."""
    T, E = score.shape
    gs = torch.sort(score.reshape(T, n_group, E // n_group), dim=-1, descending=True).values[..., :2].sum(-1)
    return moe_torch.selection_gap(gs, topk_group)


def select_softmax_groups(s, c, logits):
    """Group-limited top-k on the softmax probabilities (routing.cc RouterSelect, n_group > 1)."""
    with torch.no_grad():
        p = torch.softmax(logits, dim=-1)
        T, E = p.shape
        ng, tg = s.n_group, s.topk_group
        gscore = torch.sort(p.reshape(T, ng, E // ng), dim=-1, descending=True).values[..., :2].sum(-1)
        keep = moe_torch.topk_stable(gscore, tg)
        gmask = torch.zeros(T, ng, dtype=torch.bool).scatter_(1, keep, True)
        score = p.masked_fill(~gmask.repeat_interleave(E // ng, dim=1), -math.inf)
        k = c["n_expert_used"]
        ids = moe_torch.topk_stable(score, k)
        gap = min(moe_torch.selection_gap(score, k), group_gap(p, ng, tg))
        return {"ids": ids, "active": torch.ones(T, k, dtype=torch.bool),
                "dropped": torch.zeros(T, k, dtype=torch.bool), "gap": gap}


def select_layer(s, c, P, token_ids):
    with torch.no_grad():
        logits = moe_torch.router_logits(c, P)
    if s.n_group and s.router == "softmax_topk":
        return select_softmax_groups(s, c, logits)
    sel = moe_torch.select(c, logits, P.get("exp_probs_b"), token_ids)
    if s.n_group and s.router == "sigmoid_bias":
        with torch.no_grad():
            score = torch.sigmoid(logits) + P["exp_probs_b"]
        sel["gap"] = min(sel["gap"], group_gap(score, s.n_group, s.topk_group))
    return sel


def check_tokens(s, tokens, what):
    t = torch.as_tensor(tokens, dtype=torch.long) if not isinstance(tokens, torch.Tensor) else tokens
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 2:
        fail(f"{what}: need [n_seq >= 1][L + 1 >= 2] token ids, got shape {list(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= s.V:
        fail(f"{what}: token ids must be in [0, {s.V})")
    if t.shape[1] - 1 > s.n_ctx:
        fail(f"{what}: sequence length {t.shape[1] - 1} is longer than the model's context ({s.n_ctx})")
    return t


def forward(s, W, tokens, mask, coefs, sels=None):
    """The model on tokens [n_seq][L+1] (LongTensor), mask [n_seq][L+1] bool or None.
    With sels (a previous call's "sels") the routing is held at that selection. Returns a dict:
    logits [N][V], ce, moe [n_layer] (aux + z + entropy tensors), objective, sels, outs (each
    block's moe_torch output dict), cfgs."""
    n_seq, L = tokens.shape[0], tokens.shape[1] - 1
    N = n_seq * L
    inp = tokens[:, :-1].reshape(-1)
    tgt = tokens[:, 1:].reshape(-1)
    counted = mask[:, 1:].reshape(-1).to(torch.float64) if mask is not None else torch.ones(N)
    x = W["token_embd.weight"][inp]
    prev_logits = None
    new_sels, outs, cfgs, moe = [], [], [], []
    for il in range(s.n_layer):
        p = f"blk.{il}."
        att = mla_attention if s.mla else attention
        x = x + att(s, W, p, rmsnorm(x, W[p + "attn_norm.weight"], s.eps), n_seq, L)
        h2 = rmsnorm(x, W[p + "ffn_norm.weight"], s.eps)
        if il < s.dense:  # no routing: no selection, no balance terms
            x = x + dense_ffn(W, p, h2)
            new_sels.append(None)
            outs.append(None)
            cfgs.append(None)
            moe.append(torch.zeros(()))
            continue
        c = layer_config(s, il, N, coefs)
        P = moe_inputs(s, W, p, h2, prev_logits, c["gating_residual"])
        sel = sels[il] if sels is not None else select_layer(s, c, P, inp)
        o = moe_torch.layer(c, P, sel)
        x = x + o["y"]
        prev_logits = o.get("logits")
        new_sels.append(sel)
        outs.append(o)
        cfgs.append(c)
        moe.append(o["aux"] + o["z"] + o["entropy"])
    head = W["token_embd.weight"] if s.tied else W["output.weight"]
    logits = rmsnorm(x, W["output_norm.weight"], s.eps) @ head.t()
    nll = -torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0]
    n_counted = int(counted.sum())
    ce = (nll * counted).sum() / max(1, n_counted)
    objective = ce + sum(moe)
    return {"logits": logits, "ce": ce, "moe": moe, "objective": objective, "sels": new_sels,
            "outs": outs, "cfgs": cfgs}


def gradients(s, W, tokens, mask, coefs, sels=None):
    """(forward result, {name: dObjective/dname}) for every trainable tensor."""
    P = {n: t.detach().clone().requires_grad_(is_trainable(n)) for n, t in W.items()}
    r = forward(s, P, tokens, mask, coefs, sels)
    names = [n for n in P if is_trainable(n)]
    gs = torch.autograd.grad(r["objective"], [P[n] for n in names], allow_unused=True)
    return r, {n: (g.detach() if g is not None else torch.zeros_like(P[n].detach())) for n, g in zip(names, gs)}


def expert_ids(sel, c, N):
    if c["router"] == "expert_choice":
        out = torch.full((N, c["n_expert"]), -1.0)
        for e, toks in enumerate(sel["ec_tokens"].tolist()):
            out[toks, e] = float(e)
        return out
    ids = sel["ids"].to(torch.float64).clone()
    ids[~sel["active"]] = -1.0
    return ids


# ---------------------------------------------------------------------------------------------
# AdamW (src/train/optimizer.cc) and the trainer's step (src/train/trainer.cc).

ADAMW_DEFAULTS = {"lr": 1e-3, "min_lr": 1e-4, "warmup": 0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                  "weight_decay": 0.1, "clip": 1.0, "bias_update_rate": 1e-3}


def learning_rate(a, step):
    if a["warmup"] > 0 and step < a["warmup"]:
        return a["lr"] * (step + 1) / a["warmup"]
    decay = a["total_steps"] - a["warmup"]
    if decay <= 1:
        return a["lr"]
    progress = min(1.0, (step - a["warmup"]) / (decay - 1))
    return a["min_lr"] + 0.5 * (a["lr"] - a["min_lr"]) * (1.0 + math.cos(math.pi * progress))


def adamw_run(s, W, a, coefs):
    """Runs the steps; returns (losses [S], final tensors)."""
    W = {n: t.detach().clone() for n, t in W.items()}
    m = {n: torch.zeros_like(t) for n, t in W.items() if is_trainable(n)}
    v = {n: torch.zeros_like(t) for n, t in W.items() if is_trainable(n)}
    losses = []
    for step, tokens in enumerate(a["batches"]):
        mask = a["batch_masks"][step]
        r, g = gradients(s, W, tokens, mask, coefs)
        losses.append(float(r["ce"]))
        norm = math.sqrt(sum(float((t * t).sum()) for t in g.values()))
        if not math.isfinite(norm) or not math.isfinite(losses[-1]):
            fail(f"adamw step {step}: the loss or the gradient is not finite")
        scale = a["clip"] / norm if a["clip"] > 0 and norm > a["clip"] else 1.0
        lr = learning_rate(a, step)
        t = step + 1
        bc1, bc2 = 1.0 - a["beta1"] ** t, 1.0 - a["beta2"] ** t
        for n in m:
            gi = g[n] * scale
            m[n] = a["beta1"] * m[n] + (1.0 - a["beta1"]) * gi
            v[n] = a["beta2"] * v[n] + (1.0 - a["beta2"]) * gi * gi
            w = W[n]
            if decays(n):
                w = w - lr * a["weight_decay"] * w
            W[n] = w - (lr / bc1) * m[n] / (torch.sqrt(v[n] / bc2) + a["eps"])
        if s.router == "sigmoid_bias":
            for il, o in enumerate(r["outs"]):
                if o is None:
                    continue
                load = o["tokens_per_expert"][:s.E]
                name = f"blk.{il}.exp_probs_b.bias"
                W[name] = W[name] + a["bias_update_rate"] * torch.sign(load.mean() - load)
    return losses, W


# ---------------------------------------------------------------------------------------------
# The exchange directory.

def write_bin(path, t):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.ascontiguousarray(t.detach().numpy() if isinstance(t, torch.Tensor) else t, dtype="<f8")
    with open(path, "wb") as f:
        f.write(arr.tobytes())
    return list(arr.shape)


def read_config(d):
    path = os.path.join(d, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")
    if not isinstance(cfg, dict) or "model" not in cfg or "tokens" not in cfg:
        fail(f"{path}: needs an object with 'model' and 'tokens'")
    known = {"model", "tokens", "target_mask", "aux_loss_coef", "z_loss_coef", "entropy_loss_coef",
             "ec_capacity_factor", "zc_balance_tau", "adamw"}
    if set(cfg) - known:
        fail(f"{path}: unknown keys {sorted(set(cfg) - known)}")
    return cfg


def coefs_of(cfg):
    return {"aux_loss_coef": float(cfg.get("aux_loss_coef", 1e-2)),
            "z_loss_coef": float(cfg.get("z_loss_coef", 1e-3)),
            "entropy_loss_coef": float(cfg.get("entropy_loss_coef", -1.0)),
            "ec_capacity_factor": float(cfg.get("ec_capacity_factor", 2.0)),
            "zc_balance_tau": float(cfg.get("zc_balance_tau", 1.0))}


def mask_of(m, tokens, what):
    if m is None:
        return None
    t = torch.as_tensor(m, dtype=torch.long)
    if list(t.shape) != list(tokens.shape) or bool(((t != 0) & (t != 1)).any()):
        fail(f"{what}: must be 0/1 of the tokens' shape {list(tokens.shape)}")
    return t.bool()


def adamw_config(cfg, s):
    a = dict(ADAMW_DEFAULTS)
    a.update(cfg)
    if "steps" not in a or "batches" not in a:
        fail("adamw: needs 'steps' and 'batches'")
    S = int(a["steps"])
    if S < 1 or len(a["batches"]) != S:
        fail(f"adamw: steps {S} needs as many batches (got {len(a['batches'])})")
    a["total_steps"] = int(a.get("total_steps", S))
    a["batches"] = [check_tokens(s, b, f"adamw batch {i}") for i, b in enumerate(a["batches"])]
    masks = a.get("batch_masks") or [None] * S
    if len(masks) != S:
        fail("adamw: batch_masks needs one entry (or null) per batch")
    a["batch_masks"] = [mask_of(mk, b, f"adamw batch_masks[{i}]") for i, (mk, b) in enumerate(zip(masks, a["batches"]))]
    unknown = set(a) - set(ADAMW_DEFAULTS) - {"steps", "batches", "batch_masks", "total_steps"}
    if unknown:
        fail(f"adamw: unknown keys {sorted(unknown)}")
    return a


def write_golden(d):
    cfg = read_config(d)
    s, W = load_model(cfg["model"])
    coefs = coefs_of(cfg)
    tokens = check_tokens(s, cfg["tokens"], "tokens")
    mask = mask_of(cfg.get("target_mask"), tokens, "target_mask")
    n_seq, L = tokens.shape[0], tokens.shape[1] - 1
    N = n_seq * L
    r, grads = gradients(s, W, tokens, mask, coefs)
    files = []

    def put(rel, t):
        files.append({"file": rel, "shape": write_bin(os.path.join(d, rel), t)})

    put("logits.bin", r["logits"])
    put("loss.bin", r["ce"].reshape(1))
    put("moe_loss.bin", torch.stack([m.reshape(()) for m in r["moe"]]))
    put("objective.bin", r["objective"].reshape(1))
    for n, g in grads.items():
        put(f"grad/{n}.bin", g)
    for il, (sel, c) in enumerate(zip(r["sels"], r["cfgs"])):
        if sel is not None:  # dense blocks route nothing
            put(f"expert_ids/{il}.bin", expert_ids(sel, c, N))
    put("selection_gap.bin", torch.tensor([float(sel["gap"]) if sel is not None else math.inf
                                           for sel in r["sels"]]))
    if cfg.get("adamw") is not None:
        a = adamw_config(cfg["adamw"], s)
        losses, final = adamw_run(s, W, a, coefs)
        put("adamw_losses.bin", torch.tensor(losses))
        for n, t in final.items():
            put(f"adamw_final/{n}.bin", t)
    manifest = {"format": "moe.cpp golden v1: raw little-endian float64, row-major",
                "model": cfg["model"], "arch": s.arch, "router": s.router, "n_seq": n_seq,
                "seq_len": L, "n_layer": s.n_layer, "n_vocab": s.V, "tied_output": s.tied,
                "coefs": coefs, "layers": r["cfgs"], "files": files}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return r, grads, manifest


# ---------------------------------------------------------------------------------------------
# Self-test: this script against independent routes (ref_forward.py's numpy forward, central
# differences at a fixed selection, hand-computed schedule and first AdamW step).

def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def write_random_gguf(path, arch="llama", layers=2, dim=8, ffn=4, experts=4, used=2, heads=2,
                      kv_heads=None, vocab=13, ctx=32, router=None, top_p=None, hash_seed=None,
                      groups=0, groups_used=0, weights_scale=None, shared_ffn=0, n_null=0,
                      n_zero=0, n_copy=0, n_const=0, gating_residual=False, tied=False,
                      qkv_bias=None, router_gain=2.0, seed=0):
    """A random F32 model written with tiny_gguf's writer (independent of `moe init`)."""
    import tiny_gguf as tg
    rng = np.random.default_rng(seed)
    kv_heads = kv_heads or heads
    Dh = dim // heads
    R = experts + n_null + n_zero + n_copy + n_const
    w = tg.GgufWriter()
    a = arch
    w.add("general.architecture", tg.GGUF_STRING, a)
    w.add("general.alignment", tg.GGUF_U32, tg.ALIGNMENT)
    for k, v in (("context_length", ctx), ("embedding_length", dim), ("block_count", layers),
                 ("feed_forward_length", ffn), ("attention.head_count", heads),
                 ("attention.head_count_kv", kv_heads), ("rope.dimension_count", Dh),
                 ("expert_count", experts), ("expert_used_count", used), ("vocab_size", vocab)):
        w.add(f"{a}.{k}", tg.GGUF_U32, v)
    w.add(f"{a}.attention.layer_norm_rms_epsilon", tg.GGUF_F32, 1e-5)
    w.add(f"{a}.rope.freq_base", tg.GGUF_F32, 10000.0)
    if router:
        w.add(f"{a}.expert_router", tg.GGUF_STRING, router)
    if router == "sigmoid_bias":
        w.add(f"{a}.expert_gating_func", tg.GGUF_U32, 2)
    if top_p is not None:
        w.add(f"{a}.expert_router_top_p", tg.GGUF_F32, top_p)
    if hash_seed is not None:
        w.add(f"{a}.expert_router_hash_seed", tg.GGUF_U64, hash_seed)
    if groups:
        w.add(f"{a}.expert_group_count", tg.GGUF_U32, groups)
        w.add(f"{a}.expert_group_used_count", tg.GGUF_U32, groups_used)
    if weights_scale is not None:
        w.add(f"{a}.expert_weights_scale", tg.GGUF_F32, weights_scale)
    for k, v in (("expert_null_count", n_null), ("expert_zero_count", n_zero),
                 ("expert_copy_count", n_copy), ("expert_const_count", n_const)):
        if v:
            w.add(f"{a}.{k}", tg.GGUF_U32, v)
    if gating_residual:
        w.add(f"{a}.expert_gating_residual", tg.GGUF_BOOL, True)

    def mat(*shape, gain=1.0):
        return (gain * rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, dim)).astype(np.float32))
    w.add_tensor("output_norm.weight", norm(dim))
    if not tied:
        w.add_tensor("output.weight", mat(vocab, dim, gain=2.0))
    nq, nk = heads * Dh, kv_heads * Dh
    if qkv_bias is None:
        qkv_bias = arch == "qwen2moe"
    for il in range(layers):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm(dim))
        w.add_tensor(p + "attn_q.weight", mat(nq, dim))
        w.add_tensor(p + "attn_k.weight", mat(nk, dim))
        w.add_tensor(p + "attn_v.weight", mat(nk, dim))
        if qkv_bias:
            for n, width in (("attn_q", nq), ("attn_k", nk), ("attn_v", nk)):
                w.add_tensor(p + n + ".bias", (0.3 * rng.standard_normal(width)).astype(np.float32))
        w.add_tensor(p + "attn_output.weight", mat(dim, nq))
        if arch == "olmoe":
            w.add_tensor(p + "attn_q_norm.weight", norm(nq))
            w.add_tensor(p + "attn_k_norm.weight", norm(nk))
        if arch == "qwen3moe":
            w.add_tensor(p + "attn_q_norm.weight", norm(Dh))
            w.add_tensor(p + "attn_k_norm.weight", norm(Dh))
        w.add_tensor(p + "ffn_norm.weight", norm(dim))
        if router != "hash":
            w.add_tensor(p + "ffn_gate_inp.weight", mat(R, dim, gain=router_gain))
        if n_const:
            w.add_tensor(p + "ffn_zc_mix.weight", mat(n_const, 2, dim))
            w.add_tensor(p + "ffn_zc_const.weight", mat(n_const, dim, gain=math.sqrt(dim)))
        if gating_residual and il > 0:
            w.add_tensor(p + "ffn_gate_res.weight", mat(R, R, gain=0.5))
        if router == "sigmoid_bias":
            w.add_tensor(p + "exp_probs_b.bias", (0.1 * rng.standard_normal(experts)).astype(np.float32))
        w.add_tensor(p + "ffn_gate_exps.weight", mat(experts, ffn, dim))
        w.add_tensor(p + "ffn_down_exps.weight", mat(experts, dim, ffn))
        w.add_tensor(p + "ffn_up_exps.weight", mat(experts, ffn, dim))
        if shared_ffn:
            if arch == "qwen2moe":
                w.add_tensor(p + "ffn_gate_inp_shexp.weight", mat(dim))
            w.add_tensor(p + "ffn_gate_shexp.weight", mat(shared_ffn, dim))
            w.add_tensor(p + "ffn_down_shexp.weight", mat(dim, shared_ffn))
            w.add_tensor(p + "ffn_up_shexp.weight", mat(shared_ffn, dim))
    w.write(path)


def selftest_ref_forward(tmp):
    """Logits of one sequence vs ref_forward.py's numpy forward (itself checked against
    llama.cpp) for the four architectures with their default routing."""
    import tiny_gguf as tg
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    cases = [("llama", dict(heads=4, kv_heads=2)), ("qwen2moe", dict(heads=4, kv_heads=2, shared_ffn=12)),
             ("qwen3moe", dict(heads=4, kv_heads=2)), ("olmoe", dict(heads=4))]
    worst = 0.0
    for arch, kw in cases:
        path = os.path.join(tmp, f"ref_{arch}.gguf")
        tg.make_model(path, arch=arch, layers=2, dim=16, ffn=8, experts=4, experts_used=2, vocab=24,
                      ctx=32, seed=7, **kw)
        want = ref_forward.RefModel(path).logits(ids)
        s, W = load_model(path)
        got = forward(s, W, torch.tensor([ids + [0]]), None, coefs_of({}))["logits"].numpy()
        err = float(np.abs(got - want).max())
        check(err < 1e-9, f"{arch}: logits differ from ref_forward.py by {err:.3g}")
        worst = max(worst, err)
    # Tied output, GQA, one block at one position.
    path = os.path.join(tmp, "ref_tied.gguf")
    write_random_gguf(path, arch="qwen3moe", layers=1, dim=16, heads=4, kv_heads=1, tied=True)
    s, W = load_model(path)
    for seq in ([5], [5, 7, 2, 11]):
        want = ref_forward.RefModel(path).logits(seq)
        got = forward(s, W, torch.tensor([seq + [0]]), None, coefs_of({}))["logits"].numpy()
        err = float(np.abs(got - want).max())
        check(err < 1e-9, f"tied qwen3moe: logits differ from ref_forward.py by {err:.3g}")
        worst = max(worst, err)
    return worst


GRAD_CASES = {
    "llama_softmax_tied_mask": dict(arch="llama", heads=2, kv_heads=1, tied=True, weights_scale=1.5),
    "qwen2moe_top_p_null_zc_residual": dict(arch="qwen2moe", router="top_p", top_p=0.6, used=3, layers=3,
                                            n_null=1, n_zero=1, n_copy=1, n_const=1,
                                            gating_residual=True, shared_ffn=6),
    "qwen3moe_sigmoid_groups": dict(arch="qwen3moe", router="sigmoid_bias", experts=6, used=2,
                                    groups=3, groups_used=2, shared_ffn=4),
    "olmoe_hash": dict(arch="olmoe", router="hash", hash_seed=2 ** 64 - 59, used=2),
    "llama_expert_choice": dict(arch="llama", router="expert_choice", layers=2),
    "llama_softmax_groups_residual": dict(arch="llama", experts=6, used=2, groups=3, groups_used=1,
                                          gating_residual=True, qkv_bias=True),
    "qwen3moe_top_p_norm_null": dict(arch="qwen3moe", router="top_p", top_p=0.5, used=3, n_null=2,
                                     heads=2, kv_heads=1),
    "olmoe_shared_scale_const": dict(arch="olmoe", weights_scale=2.5, shared_ffn=4, n_const=2,
                                     n_copy=1, used=2),
    "llama_sigmoid_norm": dict(arch="llama", router="sigmoid_bias", experts=4, used=2, layers=1),
}
GRAD_COEFS = {"aux_loss_coef": 0.3, "z_loss_coef": 0.05, "entropy_loss_coef": 0.1,
              "ec_capacity_factor": 1.5, "zc_balance_tau": 0.5}


def selftest_gradients(tmp, name, kw):
    """Autograd vs central differences of the objective at a fixed selection: a few entries of
    every tensor, and one random direction through all of them."""
    path = os.path.join(tmp, f"grad_{name}.gguf")
    write_random_gguf(path, seed=sorted(GRAD_CASES).index(name) + 11, **kw)
    s, W = load_model(path)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, s.V, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = False
    r, grads = gradients(s, W, tokens, mask, GRAD_COEFS)
    sels = r["sels"]

    def obj(Wp):
        with torch.no_grad():
            return float(forward(s, Wp, tokens, mask, GRAD_COEFS, sels)["objective"])

    h, worst = 1e-5, 0.0
    rng = np.random.default_rng(3)
    for n, t in W.items():
        if not is_trainable(n):
            continue
        flat = t.reshape(-1)
        for i in rng.choice(flat.numel(), size=min(4, flat.numel()), replace=False):
            def at(delta):
                q = flat.clone()
                q[i] += delta
                return obj({**W, n: q.reshape(t.shape)})
            num = (at(h) - at(-h)) / (2 * h)
            ana = float(grads[n].reshape(-1)[i])
            err = abs(num - ana) / max(1.0, abs(num))
            worst = max(worst, err)
            check(err < 1e-6, f"{name}: d objective / d {n}[{i}]: autograd {ana:.10g}, central {num:.10g}")
    dirs = {n: torch.randn(t.shape, generator=g) for n, t in W.items() if is_trainable(n)}
    num = (obj({**W, **{n: W[n] + h * d for n, d in dirs.items()}})
           - obj({**W, **{n: W[n] - h * d for n, d in dirs.items()}})) / (2 * h)
    ana = sum(float((grads[n] * d).sum()) for n, d in dirs.items())
    err = abs(num - ana) / max(1.0, abs(num))
    check(err < 1e-6, f"{name}: directional derivative: autograd {ana:.10g}, central {num:.10g}")
    worst = max(worst, err)
    # The features are reached: router losses present where the router has them, a residual
    # that carries gradient, active null / zc targets.
    moe = [float(m) for m in r["moe"]]
    if s.router == "hash":
        check(all(m == 0 for m in moe), f"{name}: hash has no router losses")
    else:
        check(all(m > 0 for m in moe), f"{name}: router losses {moe}")
    if s.gating_residual:
        check(float(grads["blk.1.ffn_gate_res.weight"].abs().max()) > 0, f"{name}: no residual gradient")
    if s.n_null + s.n_zero + s.n_copy + s.n_const:
        used = set()
        for sel in sels:
            used |= set(sel["ids"][sel["active"]].tolist())
        check(any(e >= s.E for e in used), f"{name}: no null / zero-computation target used")
    return worst


def selftest_groups_and_batches(tmp):
    # Softmax group-limited top-k on a crafted row: E = 6 in 3 groups, 1 group kept, k = 2. The
    # best single expert (5) is in group 2, but group 0's pair sum is larger.
    s = Spec()
    s.n_group, s.topk_group = 3, 1
    p = torch.tensor([[0.2, 0.2, 0.05, 0.05, 0.0, 0.3]]) + 0.03
    logits = torch.log(p / p.sum())
    c = {"n_expert_used": 2}
    sel = select_softmax_groups(s, c, logits)
    check(sel["ids"][0].tolist() == [0, 1], f"softmax groups pick {sel['ids'].tolist()}")
    # Token-choice routing: a sequence's logits do not depend on the other sequences of the
    # call; expert choice: they may (the experts choose across the call).
    path = os.path.join(tmp, "batch.gguf")
    write_random_gguf(path, arch="qwen2moe", router="top_p", top_p=0.5, used=3, shared_ffn=4, n_null=1)
    s, W = load_model(path)
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, s.V, (3, 7), generator=g)
    both = forward(s, W, tokens, None, coefs_of({}))["logits"].detach()
    for b in range(3):
        one = forward(s, W, tokens[b:b + 1], None, coefs_of({}))["logits"].detach()
        check(torch.allclose(both[6 * b:6 * b + 6], one, rtol=0, atol=1e-12), f"sequence {b} depends on the batch")


def selftest_adamw(tmp):
    a = {"lr": 1e-2, "min_lr": 1e-3, "warmup": 2, "total_steps": 6}
    want = [5e-3, 1e-2, 1e-2, 1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi / 3)),
            1e-3 + 0.5 * 9e-3 * (1 + math.cos(2 * math.pi / 3)), 1e-3]
    got = [learning_rate(a, i) for i in range(6)]
    check(all(abs(x - y) < 1e-15 for x, y in zip(got, want)), f"schedule {got}")
    check(learning_rate({"lr": 0.5, "min_lr": 0, "warmup": 0, "total_steps": 1}, 0) == 0.5, "one step: lr")
    # Decay roles.
    for n, d in (("token_embd.weight", True), ("output.weight", True), ("blk.0.attn_q.weight", True),
                 ("blk.0.attn_q.bias", False), ("blk.0.attn_q_norm.weight", False),
                 ("blk.0.ffn_norm.weight", False), ("blk.0.ffn_gate_inp.weight", True),
                 ("blk.0.ffn_gate_inp_shexp.weight", False), ("blk.0.ffn_up_shexp.weight", True),
                 ("blk.0.ffn_zc_mix.weight", True), ("blk.0.ffn_gate_res.weight", True),
                 ("blk.0.ffn_down_exps.weight", True), ("output_norm.weight", False)):
        check(decays(n) == d, f"decay of {n}")
    # The first step through the exchange directory: m / sqrt(v) = g / |g| after bias correction,
    # so w1 = w0 (1 - lr wd) - lr g / (|g| + eps) (decayed tensors), clipping or not; the sigmoid
    # bias moves by +-rate (0 where the load is the mean) and gets no gradient.
    path = os.path.join(tmp, "adamw.gguf")
    write_random_gguf(path, arch="llama", router="sigmoid_bias", experts=4, used=2, shared_ffn=4)
    d = os.path.join(tmp, "adamw_dir")
    os.makedirs(d)
    tokens = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    lr, wd, eps, rate = 1e-2, 0.1, 1e-8, 0.25
    cfg = {"model": path, "tokens": tokens, "aux_loss_coef": 0.1, "z_loss_coef": 0.01,
           "entropy_loss_coef": 0.0, "ec_capacity_factor": 2.0,
           "adamw": {"steps": 1, "lr": lr, "min_lr": 0.0, "warmup": 0, "beta1": 0.9, "beta2": 0.95,
                     "eps": eps, "weight_decay": wd, "clip": 0.5, "bias_update_rate": rate,
                     "batches": [tokens]}}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    r, grads, man = write_golden(d)
    s, W = load_model(path)
    for e in man["files"]:
        size = os.path.getsize(os.path.join(d, e["file"]))
        check(size == 8 * math.prod(e["shape"]), f"size of {e['file']}")
    check("grad/blk.0.exp_probs_b.bias.bin" not in [e["file"] for e in man["files"]], "no bias gradient")

    def read(rel, shape):
        return torch.from_numpy(np.fromfile(os.path.join(d, rel), dtype="<f8").reshape(shape))

    norm = math.sqrt(sum(float((gr * gr).sum()) for gr in grads.values()))
    scale = 0.5 / norm
    check(scale < 1, f"the clip (0.5) does not clip (gradient norm {norm})")
    for n, w0 in W.items():
        w1 = read(f"adamw_final/{n}.bin", w0.shape)
        if not is_trainable(n):
            load = r["outs"][int(n.split(".")[1])]["tokens_per_expert"]
            want = w0 + rate * torch.sign(load.mean() - load)
        else:
            gr = grads[n] * scale
            want = (w0 * (1 - lr * wd) if decays(n) else w0) - lr * gr / (gr.abs() + eps)
        check(torch.allclose(w1, want, rtol=0, atol=1e-12), f"first AdamW step of {n}")
    check(abs(float(read("adamw_losses.bin", [1])[0]) - float(r["ce"])) < 1e-15, "step 0 loss = the loss")
    check(float(read("loss.bin", [1])[0]) == float(r["ce"]), "loss.bin")
    # Training on one repeated batch lowers its loss.
    a = adamw_config({"steps": 8, "lr": 3e-2, "min_lr": 3e-3, "warmup": 1, "batches": [tokens] * 8}, s)
    losses, _ = adamw_run(s, W, a, coefs_of({}))
    check(losses[-1] < losses[0] - 0.1, f"AdamW does not train: {losses}")


def selftest():
    import time
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        worst = selftest_ref_forward(tmp)
        print(f"logits vs ref_forward.py (4 archs, 2 blocks, 8 positions; tied GQA): ok (max diff {worst:.1e})")
        for name, kw in GRAD_CASES.items():
            worst = selftest_gradients(tmp, name, kw)
            print(f"gradients {name}: ok (worst relative error {worst:.1e})")
        selftest_groups_and_batches(tmp)
        print("softmax group-limited top-k; sequences independent under token choice: ok")
        selftest_adamw(tmp)
        print("AdamW schedule, decay roles, first step, bias update, exchange files: ok")
    print(f"selftest passed ({time.time() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------
# Cross-check against the C++ inference path: `moe run --teacher-forcing` top-5 log-probs.

def opts(text):
    """'--a 1 --flag --b x' -> {'--a': '1', '--flag': None, '--b': 'x'}."""
    toks, out, j = text.split(), {}, 0
    while j < len(toks):
        has_value = j + 1 < len(toks) and not toks[j + 1].startswith("--")
        out[toks[j]] = toks[j + 1] if has_value else None
        j += 2 if has_value else 1
    return out


RUN_BASE = opts("--layers 2 --dim 32 --ffn 16 --experts 4 --experts-used 2 --heads 4 --vocab 50 --ctx 64")
RUN_CASES = [                                          # `moe init` options over RUN_BASE
    ("llama softmax_topk", "--arch llama --kv-heads 2"),
    ("llama sigmoid_bias", "--arch llama --kv-heads 2 --router sigmoid_bias"),
    ("llama sigmoid_bias groups", "--arch llama --kv-heads 2 --router sigmoid_bias --experts 8 --expert-groups 4 --groups-used 2"),
    ("llama softmax groups", "--arch llama --kv-heads 2 --experts 8 --expert-groups 4 --groups-used 2"),
    ("llama hash", "--arch llama --kv-heads 2 --router hash --hash-seed 18446744073709551557"),
    ("llama top_p", "--arch llama --kv-heads 2 --router top_p --top-p 0.5 --experts-used 3"),
    ("llama null+zc+residual", "--arch llama --kv-heads 2 --null-experts 2 --const-experts 2 --zero-experts 1 --copy-experts 1 --gating-residual"),
    ("llama shared, scale, tied", "--arch llama --kv-heads 2 --shared-ffn 12 --weights-scale 1.5 --tie-output"),
    ("qwen2moe softmax_topk", "--arch qwen2moe --kv-heads 2 --shared-ffn 12"),
    ("qwen2moe top_p+null+zc+residual", "--arch qwen2moe --kv-heads 2 --shared-ffn 12 --router top_p --experts-used 3 --null-experts 1 --zero-experts 1 --copy-experts 1 --const-experts 2 --gating-residual"),
    ("qwen3moe softmax_topk", "--arch qwen3moe --kv-heads 2"),
    ("qwen3moe sigmoid_bias tied", "--arch qwen3moe --kv-heads 2 --router sigmoid_bias --tie-output"),
    ("qwen3moe hash", "--arch qwen3moe --kv-heads 2 --router hash --hash-seed 7"),
    ("olmoe softmax_topk", "--arch olmoe"),
    ("olmoe top_p", "--arch olmoe --router top_p --top-p 0.3 --experts-used 4"),
    ("olmoe hash", "--arch olmoe --router hash --hash-seed 99"),
]


def check_run(moe):
    """Models from `moe init` for every architecture and token-choice router: this script's
    log-probabilities of one sequence vs the top-5 of `moe run --teacher-forcing` (the C++
    inference path, float32). Returns (worst difference, whether every top-5 id set agreed)."""
    ids = [1, 2, 3, 4, 17, 42, 9, 30]
    worst_all, all_same = 0.0, True
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(RUN_CASES):
            path = os.path.join(tmp, f"m{i}.gguf")
            args = [x for kv in {**RUN_BASE, **opts(extra)}.items() for x in kv if x is not None]
            subprocess.run([moe, "init", *args, "--seed", str(i + 1), "-o", path], check=True,
                           stdout=subprocess.DEVNULL)
            out = subprocess.run([moe, "run", "-m", path, "--prompt-ids", ",".join(map(str, ids)),
                                  "--teacher-forcing", "--json", "--top-logprobs", "5", "-t", "1", "--cache-type", "f32"],
                                 check=True, capture_output=True, text=True).stdout
            theirs = json.loads(out)["teacher_logprobs"]
            s, W = load_model(path)
            r = forward(s, W, torch.tensor([ids + [0]]), None, coefs_of({}))
            lp = torch.log_softmax(r["logits"].detach(), dim=-1)
            worst, same = 0.0, len(theirs) == len(ids)
            for pos, row in enumerate(theirs):
                same = same and set(torch.topk(lp[pos], 5).indices.tolist()) == {e["id"] for e in row}
                for e in row:
                    worst = max(worst, abs(float(lp[pos, e["id"]]) - e["logprob"]))
            gap = min(float(sel["gap"]) for sel in r["sels"])
            worst_all, all_same = max(worst_all, worst), all_same and same
            print(f"{name:34s} max |logprob diff| {worst:.2e}  top-5 ids {'same' if same else 'DIFFER'}"
                  f"  min selection gap {gap:.2e}")
    print(f"worst over all cases: {worst_all:.2e}")
    return worst_all, all_same


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="exchange directory holding config.json")
    ap.add_argument("--selftest", action="store_true", help="check this script")
    ap.add_argument("--check-run", metavar="MOE", help="compare with MOE run --teacher-forcing")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.selftest:
        selftest()
        return 0
    if a.check_run:
        worst, same = check_run(a.check_run)
        return 0 if worst < 1e-4 and same else 1
    if not a.dir:
        ap.error("give --dir DIR (or --selftest, --check-run MOE)")
    try:
        r, _, man = write_golden(a.dir)
    except GoldenError as e:
        print(f"model_torch.py: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:                                   # moe_torch's config checks
        if isinstance(e.code, int) or e.code is None:
            raise
        print(f"model_torch.py: {e.code}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        print(f"model_torch.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"golden written to {a.dir}: {man['arch']} {man['router']}, loss {float(r['ce']):.12g}, "
          f"{len(man['files'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
