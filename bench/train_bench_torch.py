#!/usr/bin/python3
"""Training speed of a whole MoE language model in PyTorch, the peer of `moe bench-train`.

A plain PyTorch implementation of the model and training step that moe.cpp's trainer runs
(src/train: StepEngine), loading its initial weights from the same GGUF file (an F32 llama file
written by `moe init`; read with tests/conformance/ref_forward.py's GGUF reader):

  x = token_embd[input]
  per block:  h = rmsnorm(x) * attn_norm                 rmsnorm(x) = x / sqrt(mean(x^2) + eps)
              q, k, v = h Wq^T, h Wk^T, h Wv^T          GQA: query head h reads kv head h // (H/Hkv)
              RoPE (llama "normal": pairs (2j, 2j+1), theta_j = pos * base^(-2j/n_rot))
              x += causal_softmax(q k^T / sqrt(head_dim)) v Wo^T
              h = rmsnorm(x) * ffn_norm
              router logits = h Wr^T [E], p = softmax, top-k by p, weights renormalised to sum 1
              x += sum over the k experts of w_e * W_down,e (silu(W_gate,e h) * W_up,e h)
  logits = (rmsnorm(x) * output_norm) W_out^T; CE = mean over all positions
  objective = CE + sum over blocks of (aux + z):
      aux = 0.01 * E * sum_i f_i P_i   f = share of the routed slots (constant), P = mean router
                                       probability, both over all tokens of the batch
      z   = 0.001 * mean logsumexp(router logits)^2
  AdamW: lr 1e-3 (constant here; moe's cosine schedule does not change the cost), betas
  0.9/0.95, eps 1e-8, decoupled weight decay 0.1 on matrices only (not the norms), gradients
  clipped to global norm 1.0.

Each step draws a fresh batch of --batch sequences of --seq + 1 uniform random token ids (seeded;
never one repeated token, which would route every token the same way): --seq inputs and --seq
next-token targets per sequence, so a step trains on batch * seq tokens, as moe bench-train.

MoE dispatch variants (both float32, expert weights as one tensor per expert, as the nn.Linear
modules of Hugging Face's Mixtral experts):
  loop    Hugging Face's Mixtral sparse block: one_hot expert mask, per expert torch.where for
          its (slot, token) pairs, run the expert on those rows, scale, index_add into the output.
  sorted  sort the batch's T*k slots by expert, gather the rows once, run each expert on its
          contiguous slab, scale, index_add back to the tokens.
Attention is matmul + additive causal mask + softmax (torch.nn.functional's fused
scaled_dot_product_attention with is_causal=True where this torch has it; 1.13 does not).
AdamW runs with foreach=True where supported.

Process settings (each a flag, since they must be in place before torch or even Python starts):
  --omp-wait passive  OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads sleep instead of spinning
                      between parallel regions (the spinning competes with OpenBLAS's own threads
                      and with anything else on 2 cores).
  --blas-wait passive OPENBLAS_THREAD_TIMEOUT=4: OpenBLAS's pthreads (Debian's libopenblas0-pthread,
                      PyTorch's BLAS here) sleep after 2^4 cycles instead of spinning for ~2^28.
  --openblas-coretype NAME
                      OPENBLAS_CORETYPE=NAME: which of OpenBLAS's kernels PyTorch's BLAS runs
                      (these machines' environment says Haswell, AVX2; SkylakeX is the AVX-512 one).
                      Every timing run first checks a few float32 products against float64 and
                      exits with code 3 when they disagree (a kernel that miscomputes here).
  --malloc tuned      glibc's malloc keeps freed memory (mmap_threshold 32 MiB, trim_threshold
                      1 GiB) and backs it with transparent huge pages (hugetlb=1): PyTorch allocates
                      fresh tensors every step, and on these VMs the first touch of a 4 KiB page
                      costs microseconds: a fresh 32 MiB tensor (the logits) took ~100 ms, 8193
                      page faults, against 3 ms for the same product into an existing one.
                      glibc reads GLIBC_TUNABLES at start-up: the script re-executes itself.

    train_bench_torch.py -m M.gguf [--batch 8 --seq 256 --steps 10 --warmup 2 --threads 2]
        prints one JSON line: {"loop": {"step_ms", "tokens_per_s", "first_loss", "last_loss"},
        "sorted": {...}, "torch", "threads", "omp_wait_policy", "attention", ...}; step_ms is
        the median over the --steps timed steps after --warmup untimed ones.
    train_bench_torch.py -m M.gguf --check TOKENS.json
        float64: the first step's losses at the file's weights (before any update) on the
        given batch, to compare with moe's own numbers: prints one JSON line {"loss" (mean CE),
        "aux_loss" (sum over blocks of aux + z), "objective", "grad_norm" (before clipping)}.
        TOKENS.json: [[ids] * (seq + 1)] * n_seq, or {"tokens": that}.

Run with /usr/bin/python3 (Debian python3-torch).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "conformance"))
import ref_forward  # noqa: E402  (the GGUF reader; numpy only)

# Imported in main(), after --omp-wait / --blas-wait / --openblas-coretype have set the environment
# (OpenMP and OpenBLAS read it when torch loads them).
torch = None
F = None

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
                   "glibc.malloc.trim_threshold=1073741824")
AUX_COEF = 0.01      # moe's trainer defaults (MoeLayerConfig; bench-train sets them explicitly)
Z_COEF = 0.001


class Model:
    """The llama MoE model of a GGUF file as trainable torch tensors of one dtype."""

    LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp")
    EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    # Keys of MoE options this peer does not implement: absent, or one of their neutral values.
    NEUTRAL_KEYS = {"expert_null_count": (0,), "expert_zero_count": (0,), "expert_copy_count": (0,),
                    "expert_const_count": (0,), "expert_shared_count": (0,), "expert_group_count": (0, 1),
                    "expert_weights_scale": (0.0, 1.0), "expert_gating_residual": (False,)}

    def __init__(self, path, dtype):
        g = ref_forward.Gguf(path)
        m = g.meta
        arch = m.get("general.architecture")
        if arch != "llama":
            raise SystemExit(f"train_bench_torch: {path}: architecture '{arch}', only llama is implemented")

        def key(s, default=None):
            v = m.get("llama." + s, default)
            if v is None:
                raise SystemExit(f"train_bench_torch: {path}: key llama.{s} is missing")
            return v[0] if isinstance(v, list) else v

        router = m.get("llama.expert_router", "softmax_topk")
        if router != "softmax_topk" or m.get("llama.expert_gating_func", 1) == 2:
            raise SystemExit(f"train_bench_torch: {path}: router '{router}', only softmax_topk is implemented")
        for k, neutral in self.NEUTRAL_KEYS.items():
            v = m.get("llama." + k, neutral[0])
            v = v[0] if isinstance(v, list) and v else v
            if v not in neutral:
                raise SystemExit(f"train_bench_torch: {path}: llama.{k} = {v} is not implemented here")
        self.L, self.D = int(key("block_count")), int(key("embedding_length"))
        self.H = int(key("attention.head_count"))
        self.Hkv = int(key("attention.head_count_kv", self.H))
        self.Dh = int(key("attention.key_length", self.D // self.H))
        self.n_rot = int(key("rope.dimension_count", self.Dh))
        self.base = float(key("rope.freq_base", 10000.0))
        self.eps = float(key("attention.layer_norm_rms_epsilon"))
        self.E, self.k = int(key("expert_count")), int(key("expert_used_count"))
        self.n_ctx = int(key("context_length"))
        self.dtype = dtype
        known = {"token_embd.weight", "output.weight", "output_norm.weight"} | {
            f"blk.{i}.{n}.weight" for i in range(self.L) for n in self.LAYER_TENSORS + self.EXPERT_TENSORS}
        for n in g.infos:
            if n not in known:
                raise SystemExit(f"train_bench_torch: {path}: tensor {n} is not implemented here")

        def t(name):
            return torch.from_numpy(g.tensor(name)).to(dtype).requires_grad_(True)

        self.embd = t("token_embd.weight")                                   # [V][D]
        self.V = self.embd.shape[0]
        self.out = t("output.weight") if g.has("output.weight") else self.embd  # [V][D] (tied if absent)
        self.out_norm = t("output_norm.weight")
        self.layers = []
        for i in range(self.L):
            p = f"blk.{i}."
            ly = {n: t(p + n + ".weight") for n in self.LAYER_TENSORS}
            for n in self.EXPERT_TENSORS:                                    # one tensor per expert
                w = g.tensor(p + n + ".weight")                               # [E][F][D] / [E][D][F]
                ly[n] = [torch.from_numpy(w[e]).to(dtype).requires_grad_(True) for e in range(self.E)]
            self.layers.append(ly)
        self._rope_cache = {}

    def named_params(self):
        """(name, tensor) of every trainable tensor, the tied output once."""
        out = [("token_embd.weight", self.embd), ("output_norm.weight", self.out_norm)]
        if self.out is not self.embd:
            out.append(("output.weight", self.out))
        for i, ly in enumerate(self.layers):
            for n, v in ly.items():
                for e, w in enumerate(v if isinstance(v, list) else [v]):
                    out.append((f"blk.{i}.{n}.weight" + (f"[{e}]" if isinstance(v, list) else ""), w))
        return out

    # -- the blocks ------------------------------------------------------------------------

    def rms_norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def rope_tables(self, T):
        """cos, sin [T][n_rot/2] and the additive causal mask [T][T], cached per length."""
        if T not in self._rope_cache:
            j = torch.arange(self.n_rot // 2, dtype=torch.float64)
            inv = self.base ** (-2.0 * j / self.n_rot)
            ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
            mask = torch.full((T, T), float("-inf"), dtype=self.dtype).triu(1)
            self._rope_cache[T] = (ang.cos().to(self.dtype), ang.sin().to(self.dtype), mask)
        return self._rope_cache[T]

    def rope(self, x, cos, sin):
        """x [B][T][heads][Dh]: rotates the pairs (2j, 2j+1) of the first n_rot dims."""
        r = x[..., :self.n_rot]
        x0, x1 = r[..., 0::2], r[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
        return rot if self.n_rot == self.Dh else torch.cat((rot, x[..., self.n_rot:]), dim=-1)

    def attention(self, ly, h):
        B, T, _ = h.shape
        H, Hkv, Dh = self.H, self.Hkv, self.Dh
        cos, sin, mask = self.rope_tables(T)
        q = self.rope(F.linear(h, ly["attn_q"]).view(B, T, H, Dh), cos, sin).transpose(1, 2)
        k = self.rope(F.linear(h, ly["attn_k"]).view(B, T, Hkv, Dh), cos, sin).transpose(1, 2)
        v = F.linear(h, ly["attn_v"]).view(B, T, Hkv, Dh).transpose(1, 2)
        if Hkv != H:                               # query head h reads kv head h // (H / Hkv)
            g = H // Hkv
            k = k[:, :, None].expand(B, Hkv, g, T, Dh).reshape(B, H, T, Dh)
            v = v[:, :, None].expand(B, Hkv, g, T, Dh).reshape(B, H, T, Dh)
        if hasattr(F, "scaled_dot_product_attention"):
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(Dh)) + mask
            att = torch.matmul(torch.softmax(s, dim=-1), v)
        return F.linear(att.transpose(1, 2).reshape(B, T, H * Dh), ly["attn_output"])

    def expert(self, ly, e, x):
        return F.linear(F.silu(F.linear(x, ly["ffn_gate_exps"][e])) * F.linear(x, ly["ffn_up_exps"][e]),
                        ly["ffn_down_exps"][e])

    def route(self, ly, x):
        """x [N][D] -> weights [N][k], expert ids [N][k], aux + z loss of the batch."""
        logits = F.linear(x, ly["ffn_gate_inp"])               # [N][E]
        p = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(p, self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        with torch.no_grad():
            f = torch.bincount(ids.reshape(-1), minlength=self.E).to(x.dtype) / ids.numel()
        aux = AUX_COEF * self.E * (f * p.mean(0)).sum()
        z = Z_COEF * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return w, ids, aux + z

    def moe_loop(self, ly, x):
        """Hugging Face Mixtral's dispatch: per expert, where() over the one_hot mask."""
        w, ids, loss = self.route(ly, x)
        y = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=self.E).permute(2, 1, 0)   # [E][k][N]
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            y.index_add_(0, tok, self.expert(ly, e, x[tok]) * w[tok, slot, None])
        return y, loss

    def moe_sorted(self, ly, x):
        """Slots sorted by expert: one gather, one contiguous slab per expert, one index_add."""
        w, ids, loss = self.route(ly, x)
        flat = ids.reshape(-1)                                 # slot t*k + j -> expert
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.E).tolist()
        tok = order // self.k
        xs = x[tok]
        outs = [self.expert(ly, e, slab) for e, slab in enumerate(torch.split(xs, counts)) if slab.shape[0]]
        ys = torch.cat(outs) * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tok, ys), loss

    def loss(self, tokens, dispatch):
        """tokens [B][T+1] -> (objective, mean CE, sum of the blocks' aux + z losses)."""
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        B, T = inp.shape
        x = F.embedding(inp, self.embd)                        # [B][T][D]
        moe_loss = 0
        for ly in self.layers:
            x = x + self.attention(ly, self.rms_norm(x, ly["attn_norm"]))
            y, l = dispatch(ly, self.rms_norm(x, ly["ffn_norm"]).reshape(B * T, self.D))
            x = x + y.view(B, T, self.D)
            moe_loss = moe_loss + l
        logits = F.linear(self.rms_norm(x, self.out_norm), self.out)
        ce = F.cross_entropy(logits.reshape(B * T, self.V), tgt.reshape(-1))
        return ce + moe_loss, ce, moe_loss


def make_optimizer(model, a):
    """AdamW as moe's trainer: decay on matrices only; foreach where this torch has it."""
    named = model.named_params()
    decay = [p for n, p in named if not n.endswith("_norm.weight")]
    keep = [p for n, p in named if n.endswith("_norm.weight")]
    kw = {"lr": a.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    try:
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": keep, "weight_decay": 0.0}], foreach=True, **kw)
        return opt, True
    except TypeError:                                          # a torch without foreach
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": keep, "weight_decay": 0.0}], **kw), False


def train_step(model, opt, tokens, dispatch, params):
    opt.zero_grad(set_to_none=True)
    obj, ce, _ = model.loss(tokens, dispatch)
    obj.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(ce)


def time_variant(a, name):
    """A fresh model from the file, then warmup + steps training steps; medians."""
    model = Model(a.model, torch.float32)
    dispatch = {"loop": model.moe_loop, "sorted": model.moe_sorted}[name]
    opt, foreach = make_optimizer(model, a)
    params = [p for _, p in model.named_params()]
    gen = torch.Generator().manual_seed(a.seed)                # the same batches for every variant
    ms, losses = [], []
    for s in range(a.warmup + a.steps):
        tokens = torch.randint(0, model.V, (a.batch, a.seq + 1), generator=gen)
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, tokens, dispatch, params))
        if s >= a.warmup:
            ms.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(ms)
    return {"step_ms": round(step_ms, 2), "tokens_per_s": round(a.batch * a.seq / (step_ms / 1e3), 1),
            "first_loss": round(losses[0], 5), "last_loss": round(losses[-1], 5)}, foreach


def check_blas():
    """Exits with code 3 when PyTorch's float32 products disagree with float64 (a BLAS kernel
    that miscomputes on this CPU), in the layouts and sizes this model multiplies."""
    gen = torch.Generator().manual_seed(7)
    for m, k, n in ((1024, 256, 256), (517, 256, 512), (509, 512, 256), (300, 256, 4096)):
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        for got, ref in ((F.linear(x, w), x.double() @ w.double().t()),
                         (x.t() @ x[:, :min(k, 64)], x.double().t() @ x.double()[:, :min(k, 64)])):
            err = float((got.double() - ref).abs().max() / ref.abs().max())
            if not err < 1e-4:
                print(f"train_bench_torch: float32 products are wrong (relative error {err:.1e} at "
                      f"{m}x{k}x{n}) with OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}",
                      file=sys.stderr)
                sys.exit(3)


def check_same(a):
    """The two dispatches are one model: the same loss and gradients on a small batch (float64)."""
    model = Model(a.model, torch.float64)
    gen = torch.Generator().manual_seed(a.seed + 1)
    tokens = torch.randint(0, model.V, (2, min(a.seq, 32) + 1), generator=gen)
    res = []
    for dispatch in (model.moe_loop, model.moe_sorted):
        params = [p for _, p in model.named_params()]
        for p in params:
            p.grad = None
        obj, _, _ = model.loss(tokens, dispatch)
        obj.backward()
        res.append([obj.detach()] + [p.grad.clone() for p in params])
    for u, v in zip(*res):
        if not torch.allclose(u, v, rtol=1e-10, atol=1e-12):
            raise SystemExit("train_bench_torch: the loop and sorted dispatches disagree")


def check(a):
    """--check: the first step's losses and gradient norm on a given batch, float64."""
    torch.set_default_dtype(torch.float64)
    data = json.load(open(a.check))
    tokens = torch.tensor(data["tokens"] if isinstance(data, dict) else data, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise SystemExit("train_bench_torch: --check wants [[ids] * (seq + 1)] * n_seq")
    model = Model(a.model, torch.float64)
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.V:
        raise SystemExit(f"train_bench_torch: --check token ids must be in [0, {model.V})")
    obj, ce, moe_loss = model.loss(tokens, model.moe_sorted)
    obj.backward()
    params = [p for _, p in model.named_params()]
    gnorm = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in params))
    print(json.dumps({"loss": float(ce), "aux_loss": float(moe_loss), "objective": float(obj),
                      "grad_norm": gnorm, "n_seq": tokens.shape[0], "seq": tokens.shape[1] - 1}), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="F32 llama GGUF file (moe init)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default="loop,sorted")
    ap.add_argument("--omp-wait", choices=["passive", "active"],
                    help="set OMP_WAIT_POLICY for PyTorch's OpenMP threads (default: leave it as is)")
    ap.add_argument("--blas-wait", choices=["passive"],
                    help="passive: OPENBLAS_THREAD_TIMEOUT=4, OpenBLAS's threads sleep at once when idle")
    ap.add_argument("--openblas-coretype", metavar="NAME",
                    help="set OPENBLAS_CORETYPE (OpenBLAS's kernel family, e.g. Haswell, SkylakeX)")
    ap.add_argument("--malloc", choices=["default", "tuned"], default="default",
                    help="tuned: run under GLIBC_TUNABLES=" + MALLOC_TUNABLES)
    ap.add_argument("--check", metavar="TOKENS.json",
                    help="print the first step's float64 losses on this batch instead of timing")
    ap.add_argument("--no-check-same", dest="check_same", action="store_false",
                    help="skip the start-up check that the two dispatches agree")
    a = ap.parse_args()
    if a.malloc == "tuned" and MALLOC_TUNABLES not in os.environ.get("GLIBC_TUNABLES", ""):
        old = os.environ.get("GLIBC_TUNABLES")
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES + (":" + old if old else "")
        os.execv(sys.executable, [sys.executable] + sys.argv)   # glibc reads them at start-up only
    if a.omp_wait:
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait.upper()
    if a.blas_wait:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    if a.openblas_coretype:
        os.environ["OPENBLAS_CORETYPE"] = a.openblas_coretype
    global torch, F
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(a.threads)
    if a.check:
        return check(a)
    if a.batch < 1 or a.seq < 1 or a.steps < 1 or a.warmup < 0:
        ap.error("--batch, --seq and --steps must be >= 1, --warmup >= 0")
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in ("loop", "sorted"):
            ap.error(f"unknown variant '{v}' (loop, sorted)")
    check_blas()
    if a.check_same:
        check_same(a)
    out = {}
    foreach = False
    for v in variants:
        out[v], foreach = time_variant(a, v)
    out.update({"torch": torch.__version__, "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT", ""),
                "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "malloc_tunables": MALLOC_TUNABLES,
                "attention": "sdpa" if hasattr(F, "scaled_dot_product_attention") else "matmul",
                "adamw_foreach": foreach, "batch": a.batch, "seq": a.seq, "steps": a.steps,
                "warmup": a.warmup})
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
