#!/usr/bin/python3
"""Speed of one MoE layer (router + SwiGLU experts) in PyTorch, the peer of `moe bench-layer`.

Two ways PyTorch code commonly dispatches tokens to experts, both float32:
  loop    the per-expert loop of Hugging Face's Mixtral sparse block: for each expert, find the
          (token, slot) pairs routed to it, run the expert on those rows, scale by the routing
          weight and index_add the result back into the output.
  sorted  sort the T*k slots by expert, gather the tokens into one buffer, run each expert on
          its contiguous slab (split by counts), scale, scatter back to slot order and sum the
          k slots of each token.

Timed: forward (no autograd) and forward + backward of L = sum(y * G) with respect to x, the
router and the expert weights. Each repeat draws fresh random x and G (never one repeated
input: routing would then be the same every step). Medians over --repeats after --warmup.
Prints one JSON line: {"loop": {"forward_ms", "forward_backward_ms"}, "sorted": {...}, ...}.

Run with /usr/bin/python3 (Debian python3-torch).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

# Imported in main(), after --omp-wait has set OMP_WAIT_POLICY (OpenMP reads it at start-up).
torch = None
F = None


class Layer:
    def __init__(self, a, gen):
        D, Fd, E = a.dim, a.ffn, a.experts

        def param(*shape, fan_in):
            return (torch.randn(*shape, generator=gen) / math.sqrt(fan_in)).requires_grad_(True)

        self.router = param(E, D, fan_in=D)            # [E][D]
        self.gate = param(E, Fd, D, fan_in=D)          # [E][F][D]
        self.up = param(E, Fd, D, fan_in=D)            # [E][F][D]
        self.down = param(E, D, Fd, fan_in=Fd)         # [E][D][F]
        self.bias = torch.randn(E, generator=gen) * 0.1  # sigmoid_bias selection bias
        self.a = a

    def params(self):
        return [self.router, self.gate, self.up, self.down]

    def expert(self, e, h):
        return F.linear(F.silu(F.linear(h, self.gate[e])) * F.linear(h, self.up[e]), self.down[e])

    def route(self, x):
        """Returns weights [T][k] and expert ids [T][k]."""
        logits = F.linear(x, self.router)              # [T][E]
        k = self.a.experts_used
        if self.a.router == "softmax_topk":
            p = torch.softmax(logits, dim=-1)
            w, ids = torch.topk(p, k, dim=-1)
        else:                                          # sigmoid_bias: bias selects, s weighs
            s = torch.sigmoid(logits)
            ids = torch.topk(s + self.bias, k, dim=-1).indices
            w = s.gather(1, ids)
        if self.a.norm:
            w = w / w.sum(-1, keepdim=True)
        return w, ids

    def forward_loop(self, x):
        T, D = x.shape
        w, ids = self.route(x)
        y = torch.zeros_like(x)
        # [E][k][T] mask, as the Mixtral block builds it with one_hot.permute
        mask = F.one_hot(ids, num_classes=self.a.experts).permute(2, 1, 0)
        for e in range(self.a.experts):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            out = self.expert(e, x[tok]) * w[tok, slot, None]
            y.index_add_(0, tok, out)
        return y

    def forward_sorted(self, x):
        T, D = x.shape
        k = self.a.experts_used
        w, ids = self.route(x)
        flat = ids.reshape(-1)                         # [T*k] expert of slot t*k+j
        order = torch.argsort(flat, stable=True)       # slots grouped by expert
        counts = torch.bincount(flat, minlength=self.a.experts).tolist()
        xs = x[order // k]                             # [T*k][D] contiguous per expert
        outs = [self.expert(e, slab) for e, slab in enumerate(torch.split(xs, counts)) if slab.shape[0]]
        ys = torch.cat(outs) if outs else xs.new_zeros(0, D)
        unsorted = torch.empty_like(ys)
        unsorted[order] = ys                           # back to slot order
        return (unsorted.view(T, k, D) * w.unsqueeze(-1)).sum(1)


def time_variant(layer, fwd, a, gen):
    f_ms, fb_ms = [], []
    for r in range(a.warmup + a.repeats):
        x = torch.randn(a.tokens, a.dim, generator=gen)
        g = torch.randn(a.tokens, a.dim, generator=gen)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fwd(x)
        t1 = time.perf_counter()
        xr = x.requires_grad_(True)
        for p in layer.params():
            p.grad = None
        t2 = time.perf_counter()
        y = fwd(xr)
        (y * g).sum().backward()
        t3 = time.perf_counter()
        if r >= a.warmup:
            f_ms.append((t1 - t0) * 1e3)
            fb_ms.append((t3 - t2) * 1e3)
    return {"forward_ms": round(statistics.median(f_ms), 3),
            "forward_backward_ms": round(statistics.median(fb_ms), 3)}


def check_same(layer, a, gen):
    """The two variants are the same layer: outputs and gradients agree (float32 rounding)."""
    x = torch.randn(min(a.tokens, 256), a.dim, generator=gen)
    res = []
    for fwd in (layer.forward_loop, layer.forward_sorted):
        xr = x.clone().requires_grad_(True)
        for p in layer.params():
            p.grad = None
        y = fwd(xr)
        y.sum().backward()
        res.append([y.detach(), xr.grad] + [p.grad.clone() for p in layer.params()])
    for u, v in zip(*res):
        if not torch.allclose(u, v, rtol=1e-4, atol=1e-4 * float(u.abs().max() + 1e-30)):
            raise SystemExit("layer_bench_torch: loop and sorted variants disagree")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router", default="softmax_topk", choices=["softmax_topk", "sigmoid_bias"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--experts-used", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-norm", dest="norm", action="store_false",
                    help="do not renormalise the k weights (default: renormalise, as Mixtral)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="loop,sorted")
    ap.add_argument("--omp-wait", choices=["passive", "active"],
                    help="set OMP_WAIT_POLICY for PyTorch's OpenMP threads (default: leave it as is). "
                         "On a busy machine the default spin-waiting can make 2 threads 10x slower "
                         "than 1; passive waiting avoids that")
    a = ap.parse_args()
    if a.omp_wait:
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait.upper()
    global torch, F
    import torch
    import torch.nn.functional as F
    if not 1 <= a.experts_used <= a.experts:
        ap.error(f"--experts-used {a.experts_used} must be in [1, --experts {a.experts}]")
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(True)
    gen = torch.Generator().manual_seed(a.seed)
    layer = Layer(a, gen)
    check_same(layer, a, gen)
    fns = {"loop": layer.forward_loop, "sorted": layer.forward_sorted}
    out = {}
    for v in a.variants.split(","):
        if v not in fns:
            ap.error(f"unknown variant '{v}' (loop, sorted)")
        out[v] = time_variant(layer, fns[v], a, gen)
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
