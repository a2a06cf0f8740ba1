#!/usr/bin/python3
"""Writes small random MoE GGUF files (pure Python + numpy), independent of moe.cpp.

Used to check that llama.cpp (through node-llama-cpp) loads our idea of each
architecture and that tests/conformance/ref_forward.py reproduces llama.cpp's
logits, and to make benchmark models when `moe init` is not available.

Layout facts (see /work/shared/GGUF-MOE.md): a GGUF tensor info lists ne as
{ne0, ne1, ...} with ne0 contiguous, so a numpy array of shape (out, in) is
written with ne = [in, out]; expert tensors are numpy (X, out, in) -> ne
[in, out, X]. Counts are u32, eps f32; tensor data is written in info order,
each tensor padded to the alignment.

  tiny_gguf.py --arch llama --layers 2 --dim 64 --ffn 96 --experts 4 \
      --experts-used 2 --heads 4 --kv-heads 2 --vocab 128 --seed 1 -o m.gguf
"""
import argparse
import struct
import sys

import numpy as np

# GGUF metadata value types.
GGUF_U8, GGUF_I8, GGUF_U16, GGUF_I16, GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, \
    GGUF_STRING, GGUF_ARRAY, GGUF_U64, GGUF_I64, GGUF_F64 = range(13)

# ggml tensor types we can write.
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
GGML_BF16 = 30

ALIGNMENT = 32


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype, v):
    if vtype == GGUF_U32:
        return struct.pack("<I", v)
    if vtype == GGUF_I32:
        return struct.pack("<i", v)
    if vtype == GGUF_F32:
        return struct.pack("<f", v)
    if vtype == GGUF_BOOL:
        return struct.pack("<B", 1 if v else 0)
    if vtype == GGUF_STRING:
        return _str(v)
    if vtype == GGUF_U64:
        return struct.pack("<Q", v)
    raise ValueError("unsupported metadata type %d" % vtype)


def quantize_q8_0(a):
    """Q8_0 blocks of a float array whose last axis is a multiple of 32.

    Block = f16 d + 32 int8, d = amax / 127, q = round(x / d) (ggml's reference
    quantize_row_q8_0_ref: roundf, i.e. half away from zero).
    """
    a = np.asarray(a, dtype=np.float32)
    assert a.shape[-1] % 32 == 0, "Q8_0 rows must be multiples of 32"
    blocks = a.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = amax / np.float32(127.0)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    x = blocks * inv[:, None]
    q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


class GgufWriter:
    """Collects metadata and tensors, then writes a GGUF v3 file."""

    def __init__(self):
        self.kvs = []      # (key, vtype, value)
        self.tensors = []  # (name, ne list, ggml type, bytes)

    def add(self, key, vtype, value):
        self.kvs.append((key, vtype, value))

    def add_tensor(self, name, arr, ggml_type=GGML_F32):
        arr = np.asarray(arr)
        ne = list(reversed(arr.shape))  # numpy (.., out, in) -> ne [in, out, ..]
        if ggml_type == GGML_F32:
            data = arr.astype("<f4").tobytes()
        elif ggml_type == GGML_F16:
            data = arr.astype("<f2").tobytes()
        elif ggml_type == GGML_BF16:
            u = arr.astype("<f4").view(np.uint32)
            # round to nearest even, as ggml's fp32->bf16
            u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype("<u2")
            data = u.tobytes()
        elif ggml_type == GGML_Q8_0:
            data = quantize_q8_0(arr)
        else:
            raise ValueError("unsupported tensor type %d" % ggml_type)
        self.tensors.append((name, ne, ggml_type, data))

    def write(self, path):
        out = bytearray()
        out += struct.pack("<IIQQ", 0x46554747, 3, len(self.tensors), len(self.kvs))
        for key, vtype, value in self.kvs:
            out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
        offset = 0
        for name, ne, gtype, data in self.tensors:
            assert len(name) < 64, name
            out += _str(name) + struct.pack("<I", len(ne))
            out += struct.pack("<%dQ" % len(ne), *ne)
            out += struct.pack("<IQ", gtype, offset)
            offset += (len(data) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        out += b"\0" * ((-len(out)) % ALIGNMENT)
        with open(path, "wb") as f:
            f.write(out)
            for _, _, _, data in self.tensors:
                f.write(data)
                f.write(b"\0" * ((-len(data)) % ALIGNMENT))


ARCHS = ("llama", "qwen2moe", "olmoe", "qwen3moe", "qwen3")  # llama and qwen3 also dense (experts = 0)


def make_model(path, arch="llama", layers=2, dim=64, ffn=96, experts=4,
               experts_used=2, heads=4, kv_heads=None, head_dim=None,
               vocab=128, ctx=512, shared_ffn=None, seed=0, wtype="f32",
               logit_scale=1.0, eps=1e-5, rope_base=10000.0, plant_margin=0.0,
               embd_scale=1.0, log=None):
    """Writes a random model; returns nothing (read it back with ref_forward).

    plant_margin C > 0 makes greedy decoding robust to quantization noise:
    output row perm[t] gets C * e_t / |e_t| added (e_t = token t's embedding),
    so after token t the token perm[t] leads by about C * cos(h, e_t) logits.
    embd_scale S multiplies the embeddings, so the residual stream (and the
    final hidden state) stays close to e_t whatever the layers add. Scaling
    the output weights alone (logit_scale) does not help: it scales the noise
    with the margins.
    """
    if arch not in ARCHS:
        raise ValueError("arch must be one of %s" % (ARCHS,))
    dense = experts == 0
    if dense != (arch == "qwen3") and not (dense and arch == "llama"):
        raise ValueError("dense models (experts = 0) are llama or qwen3; qwen3 is dense only")
    kv_heads = kv_heads or heads
    if head_dim is None:
        head_dim = dim // heads
    if arch in ("llama", "qwen2moe", "olmoe") and head_dim * heads != dim:
        # These loaders build attn_output as {H*D, E} with H*D = E (olmoe and
        # qwen2moe hard-code {E, E}); only qwen3moe reads key_length freely.
        if arch != "llama":
            raise ValueError("%s needs heads * head_dim == dim" % arch)
    if arch == "olmoe" and kv_heads != heads:
        raise ValueError("olmoe's attn_k_norm is {dim}: needs kv_heads == heads")
    rng = np.random.default_rng(seed)
    qtype = {"f32": GGML_F32, "f16": GGML_F16, "bf16": GGML_BF16,
             "q8_0": GGML_Q8_0}[wtype]
    E, H, Hkv, D, F, X = dim, heads, kv_heads, head_dim, ffn, experts

    def mat(out_dim, in_dim, gain=1.0):
        # (out, in); std 1/sqrt(in) keeps activations O(1) through the stack.
        return (rng.standard_normal((out_dim, in_dim), dtype=np.float32)
                * np.float32(gain / np.sqrt(in_dim)))

    def experts_mat(out_dim, in_dim):
        return (rng.standard_normal((X, out_dim, in_dim), dtype=np.float32)
                * np.float32(1.0 / np.sqrt(in_dim)))

    def norm_w(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = GgufWriter()
    a = arch
    w.add("general.architecture", GGUF_STRING, a)
    w.add("general.name", GGUF_STRING, "tiny-%s" % a)
    w.add("general.alignment", GGUF_U32, ALIGNMENT)
    w.add("general.file_type", GGUF_U32, {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[wtype])
    w.add(a + ".vocab_size", GGUF_U32, vocab)
    w.add(a + ".context_length", GGUF_U32, ctx)
    w.add(a + ".embedding_length", GGUF_U32, E)
    w.add(a + ".block_count", GGUF_U32, layers)
    w.add(a + ".feed_forward_length", GGUF_U32, F)
    w.add(a + ".attention.head_count", GGUF_U32, H)
    w.add(a + ".attention.head_count_kv", GGUF_U32, Hkv)
    if D * H != E:
        w.add(a + ".attention.key_length", GGUF_U32, D)
        w.add(a + ".attention.value_length", GGUF_U32, D)
    w.add(a + ".attention.layer_norm_rms_epsilon", GGUF_F32, eps)
    w.add(a + ".rope.dimension_count", GGUF_U32, D)
    w.add(a + ".rope.freq_base", GGUF_F32, rope_base)
    if not dense:
        w.add(a + ".expert_count", GGUF_U32, X)
        w.add(a + ".expert_used_count", GGUF_U32, experts_used)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add(a + ".expert_feed_forward_length", GGUF_U32, F)
    Fs = shared_ffn or F
    if arch == "qwen2moe":
        w.add(a + ".expert_shared_feed_forward_length", GGUF_U32, Fs)
    w.add("tokenizer.ggml.model", GGUF_STRING, "none")

    # Norms and the router stay F32 (as llama-quantize leaves them).
    def big(name, arr):
        w.add_tensor(name, arr, qtype)

    # Embedding rows ~ N(0,1): the first RMSNorm makes the scale irrelevant.
    embd = rng.standard_normal((vocab, E), dtype=np.float32)
    big("token_embd.weight", embd * np.float32(embd_scale))
    w.add_tensor("output_norm.weight", norm_w(E))
    out = mat(vocab, E, gain=3.0)
    if plant_margin > 0:
        perm = rng.permutation(vocab)
        # The final RMSNorm gives |h| ~ sqrt(E): scale the unit row by 1/sqrt(E).
        out[perm] += (np.float32(plant_margin / np.sqrt(E))
                      * embd / np.linalg.norm(embd, axis=1, keepdims=True))
    big("output.weight", out * np.float32(logit_scale))
    for i in range(layers):
        p = "blk.%d." % i
        w.add_tensor(p + "attn_norm.weight", norm_w(E))
        big(p + "attn_q.weight", mat(H * D, E))
        big(p + "attn_k.weight", mat(Hkv * D, E))
        big(p + "attn_v.weight", mat(Hkv * D, E))
        if arch == "qwen2moe":  # Qwen1.5-MoE has q/k/v biases (optional in the loader)
            for n, width in (("attn_q", H * D), ("attn_k", Hkv * D), ("attn_v", Hkv * D)):
                w.add_tensor(p + n + ".bias", (0.1 * rng.standard_normal(width)).astype(np.float32))
        big(p + "attn_output.weight", mat(E, H * D))
        if arch == "olmoe":
            w.add_tensor(p + "attn_q_norm.weight", norm_w(H * D))
            w.add_tensor(p + "attn_k_norm.weight", norm_w(Hkv * D))
        if arch in ("qwen3moe", "qwen3"):
            w.add_tensor(p + "attn_q_norm.weight", norm_w(D))
            w.add_tensor(p + "attn_k_norm.weight", norm_w(D))
        w.add_tensor(p + "ffn_norm.weight", norm_w(E))
        if dense:  # one FFN per layer (the upcycling tests' starting points)
            big(p + "ffn_gate.weight", mat(F, E))
            big(p + "ffn_up.weight", mat(F, E))
            big(p + "ffn_down.weight", mat(E, F))
            continue
        # Router gain 2: clear expert choices (random routers are near-uniform).
        w.add_tensor(p + "ffn_gate_inp.weight", mat(X, E, gain=2.0))
        big(p + "ffn_gate_exps.weight", experts_mat(F, E))
        big(p + "ffn_up_exps.weight", experts_mat(F, E))
        big(p + "ffn_down_exps.weight", experts_mat(E, F))
        if arch == "qwen2moe":
            w.add_tensor(p + "ffn_gate_inp_shexp.weight",
                         (rng.standard_normal(E, dtype=np.float32) / np.sqrt(E)).astype(np.float32))
            big(p + "ffn_gate_shexp.weight", mat(Fs, E))
            big(p + "ffn_up_shexp.weight", mat(Fs, E))
            big(p + "ffn_down_shexp.weight", mat(E, Fs))
        if log:
            log("layer %d/%d" % (i + 1, layers))
    w.write(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=96)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--experts-used", type=int, default=2)
    ap.add_argument("--shared-ffn", type=int, default=None)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--type", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    ap.add_argument("--logit-scale", type=float, default=1.0)
    ap.add_argument("--plant-margin", type=float, default=0.0,
                    help="planted next-token margin (logits), e.g. 30 for quantized greedy tests")
    ap.add_argument("--embd-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    make_model(a.output, arch=a.arch, layers=a.layers, dim=a.dim, ffn=a.ffn,
               experts=a.experts, experts_used=a.experts_used, heads=a.heads,
               kv_heads=a.kv_heads, head_dim=a.head_dim, vocab=a.vocab, ctx=a.ctx,
               shared_ffn=a.shared_ffn, seed=a.seed, wtype=a.type,
               logit_scale=a.logit_scale, plant_margin=a.plant_margin,
               embd_scale=a.embd_scale, log=(lambda s: print(s, file=sys.stderr)) if a.verbose else None)


if __name__ == "__main__":
    main()
