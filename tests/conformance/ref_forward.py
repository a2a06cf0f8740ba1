#!/usr/bin/python3
"""Reference forward pass, in float64 numpy, of MoE GGUF files.

An independent reading of llama.cpp's conventions (src/models/{llama,qwen2moe,
olmoe,qwen3moe}.cpp and llm_graph_context::build_moe_ffn), checked against
llama.cpp's own log-probabilities by check_numpy_ref.py:

- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, eps inside the square root
  (<arch>.attention.layer_norm_rms_epsilon).
- RoPE: theta_i = pos * base^(-2i/n_rot). llama (Mixtral) uses NORM rope,
  rotating adjacent pairs (x[2i], x[2i+1]); qwen2moe, qwen3moe and olmoe use
  NEOX rope, rotating (x[i], x[i + n_rot/2]).
- Attention: causal softmax(q.k / sqrt(head_dim)) v; GQA maps query head h to
  kv head h // (H / Hkv) (contiguous groups).
- olmoe: RMSNorm over the whole projected q and k (weights {H*D}) before the
  head split; qwen3moe: per-head RMSNorm of q and k (weights {D}) before rope.
- MoE: p = softmax(router logits) over all experts, top-k by p; llama and
  qwen3moe renormalise the k weights to sum 1 (sum clamped at 6.1e-5),
  qwen2moe and olmoe use the raw softmax weights. Experts are SwiGLU:
  down(silu(gate x) * up x).
- qwen2moe adds a shared expert scaled by sigmoid(ffn_gate_inp_shexp . x).
- Logits: output(RMSNorm(x)); output tied to token_embd when absent (llama,
  qwen3moe).

  ref_forward.py MODEL.gguf 1,2,3     prints the top-5 log-probabilities after
                                      every prefix of the given ids
"""
import mmap
import struct
import sys

import numpy as np

GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 8, 30


class Gguf:
    """Minimal GGUF v3 reader: metadata dict and dequantised tensors."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        magic, version = self._unpack("<II")
        if magic != 0x46554747 or version not in (2, 3):
            raise ValueError("%s: not a GGUF v2/v3 file" % path)
        n_tensors, n_kv = self._unpack("<QQ")
        self.meta = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.meta[key] = self._value(vtype)
        self.infos = {}
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            ne = list(self._unpack("<%dQ" % n_dims))
            gtype, offset = self._unpack("<IQ")
            self.infos[name] = (ne, gtype, offset)
        align = self.meta.get("general.alignment", 32)
        self.data_start = (self.pos + align - 1) // align * align

    def _unpack(self, fmt):
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals

    def _string(self):
        (n,) = self._unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    _SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
               7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def _value(self, vtype):
        if vtype in self._SCALAR:
            return self._unpack(self._SCALAR[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, n = self._unpack("<IQ")
            return [self._value(etype) for _ in range(n)]
        raise ValueError("unknown GGUF value type %d" % vtype)

    def has(self, name):
        return name in self.infos

    def tensor(self, name):
        """Float64 array in numpy order: ne [in, out, X] -> shape (X, out, in)."""
        ne, gtype, offset = self.infos[name]
        n = int(np.prod(ne))
        start = self.data_start + offset
        if gtype == GGML_F32:
            a = np.frombuffer(self.buf, "<f4", n, start)
        elif gtype == GGML_F16:
            a = np.frombuffer(self.buf, "<f2", n, start)
        elif gtype == GGML_BF16:
            a = (np.frombuffer(self.buf, "<u2", n, start).astype(np.uint32) << 16).view(np.float32)
        elif gtype == GGML_Q8_0:
            blk = np.frombuffer(self.buf, np.uint8, n // 32 * 34, start).reshape(-1, 34)
            d = blk[:, :2].copy().view("<f2").astype(np.float32)
            q = blk[:, 2:].copy().view(np.int8).astype(np.float32)
            a = d * q
        elif gtype == GGML_Q4_0:
            blk = np.frombuffer(self.buf, np.uint8, n // 32 * 18, start).reshape(-1, 18)
            d = blk[:, :2].copy().view("<f2").astype(np.float32)
            qs = blk[:, 2:]
            q = np.concatenate([(qs & 0x0F), (qs >> 4)], axis=1).astype(np.float32) - 8.0
            a = d * q
        else:
            raise ValueError("%s: tensor type %d not supported by the reference" % (name, gtype))
        return np.asarray(a, dtype=np.float64).reshape(list(reversed(ne)))


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, n_rot, base, neox):
    """x: [T, heads, D]; rotates the first n_rot dims of each head."""
    half = n_rot // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)  # [half]
    ang = pos[:, None].astype(np.float64) * inv[None, :]              # [T, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    y = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        y[..., :half] = a * cos - b * sin
        y[..., half:n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        y[..., 0:n_rot:2] = a * cos - b * sin
        y[..., 1:n_rot:2] = a * sin + b * cos
    return y


def silu(x):
    return x / (1.0 + np.exp(-x))


class RefModel:
    ARCHS = ("llama", "qwen2moe", "olmoe", "qwen3moe")

    def __init__(self, path):
        g = Gguf(path)
        self.g = g
        a = g.meta["general.architecture"]
        if a not in self.ARCHS:
            raise ValueError("reference supports %s, not %s" % (self.ARCHS, a))
        self.arch = a
        m = g.meta
        self.E = m[a + ".embedding_length"]
        self.L = m[a + ".block_count"]
        self.H = m[a + ".attention.head_count"]
        self.Hkv = m.get(a + ".attention.head_count_kv", self.H)
        self.D = m.get(a + ".attention.key_length", self.E // self.H)
        self.n_rot = m.get(a + ".rope.dimension_count", self.D)
        self.base = m.get(a + ".rope.freq_base", 10000.0)
        self.eps = m[a + ".attention.layer_norm_rms_epsilon"]
        self.k = m[a + ".expert_used_count"]
        self.neox = a != "llama"
        self.norm_w = a in ("llama", "qwen3moe")
        t = g.tensor
        self.embd = t("token_embd.weight")                       # [V, E]
        self.out_norm = t("output_norm.weight")                  # [E]
        self.out = t("output.weight") if g.has("output.weight") else self.embd  # [V, E]
        self.layers = []
        for i in range(self.L):
            p = "blk.%d." % i
            ly = {n: t(p + n + ".weight") for n in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
            for n in ("attn_q_norm", "attn_k_norm", "ffn_gate_inp_shexp", "ffn_gate_shexp",
                      "ffn_up_shexp", "ffn_down_shexp"):
                if g.has(p + n + ".weight"):
                    ly[n] = t(p + n + ".weight")
            for n in ("attn_q", "attn_k", "attn_v"):
                if g.has(p + n + ".bias"):
                    ly[n + ".bias"] = t(p + n + ".bias")
            self.layers.append(ly)

    def _attention(self, ly, h):
        T = h.shape[0]
        H, Hkv, D = self.H, self.Hkv, self.D
        q = h @ ly["attn_q"].T                                   # [T, H*D]
        k = h @ ly["attn_k"].T                                   # [T, Hkv*D]
        v = h @ ly["attn_v"].T                                   # [T, Hkv*D]
        for n, x in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
            if n + ".bias" in ly:
                x += ly[n + ".bias"]
        if self.arch == "olmoe":
            q = rms_norm(q, ly["attn_q_norm"], self.eps)
            k = rms_norm(k, ly["attn_k_norm"], self.eps)
        q = q.reshape(T, H, D)
        k = k.reshape(T, Hkv, D)
        v = v.reshape(T, Hkv, D)
        if self.arch == "qwen3moe":
            q = rms_norm(q, ly["attn_q_norm"], self.eps)
            k = rms_norm(k, ly["attn_k_norm"], self.eps)
        pos = np.arange(T)
        q = rope(q, pos, self.n_rot, self.base, self.neox)
        k = rope(k, pos, self.n_rot, self.base, self.neox)
        group = H // Hkv
        kk = np.repeat(k, group, axis=1)                         # [T, H, D]
        vv = np.repeat(v, group, axis=1)
        s = np.einsum("thd,shd->hts", q, kk) / np.sqrt(D)        # [H, T, T]
        s = s + np.triu(np.full((T, T), -np.inf), 1)[None]
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, vv).reshape(T, H * D)  # [T, H*D]
        return o @ ly["attn_output"].T

    def _moe(self, ly, h):
        logits = h @ ly["ffn_gate_inp"].T                        # [T, X]
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        sel = np.argsort(-p, axis=-1, kind="stable")[:, :self.k]  # [T, k]
        w = np.take_along_axis(p, sel, axis=-1)                  # [T, k]
        if self.norm_w:
            w = w / np.maximum(w.sum(axis=-1, keepdims=True), 6.103515625e-5)
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            for j in range(self.k):
                e = sel[t, j]
                g = ly["ffn_gate_exps"][e] @ h[t]
                u = ly["ffn_up_exps"][e] @ h[t]
                out[t] += w[t, j] * (ly["ffn_down_exps"][e] @ (silu(g) * u))
        if "ffn_gate_shexp" in ly:
            g = h @ ly["ffn_gate_shexp"].T
            u = h @ ly["ffn_up_shexp"].T
            s = (silu(g) * u) @ ly["ffn_down_shexp"].T
            gate = 1.0 / (1.0 + np.exp(-(h @ ly["ffn_gate_inp_shexp"])))  # [T]
            out += s * gate[:, None]
        return out

    def logits(self, ids):
        """[T, V] logits after each prefix of ids (causal, one pass)."""
        x = self.embd[np.asarray(ids)]                           # [T, E]
        for ly in self.layers:
            x = x + self._attention(ly, rms_norm(x, ly["attn_norm"], self.eps))
            x = x + self._moe(ly, rms_norm(x, ly["ffn_norm"], self.eps))
        return rms_norm(x, self.out_norm, self.eps) @ self.out.T

    def logprobs(self, ids):
        z = self.logits(ids)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    def greedy(self, ids, n):
        """Greedy continuation: (tokens, [T-th logprob rows])."""
        ids = list(ids)
        toks, rows = [], []
        for _ in range(n):
            lp = self.logprobs(ids)[-1]
            t = int(np.argmax(lp))
            toks.append(t)
            rows.append(lp)
            ids.append(t)
        return toks, rows


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    m = RefModel(sys.argv[1])
    ids = [int(s) for s in sys.argv[2].split(",")]
    lp = m.logprobs(ids)
    for i, row in enumerate(lp):
        top = np.argsort(-row)[:5]
        print(i, " ".join("%d:%.5f" % (t, row[t]) for t in top))


if __name__ == "__main__":
    main()
