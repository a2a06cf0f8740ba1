#!/usr/bin/python3
"""`moe quantize` against llama.cpp's own quantizer (llama_model_quantize in the libllama that
node-llama-cpp ships, loaded with ctypes; an oracle, never linked into moe).

For every case, `moe init` writes a model, then `moe quantize IN OUT --type MIX` and
llama_model_quantize (the same mix, as llama-quantize runs it) each write a file, and:
  - every tensor has the same type in both files (the mix rules: attention V/K/output and
    FFN-down bumps by layer, the 8-expert rule, the GQA rule, the output/tied-embedding rule,
    the fallback for rows that are not whole 256-blocks, norms and routers left alone),
  - every tensor's data is byte-identical (the quantizers are ggml's reference quantizers),
    except for the codebook i-quants, whose quantizer is moe's own,
  - general.file_type is the same.
With an importance matrix (cases marked imatrix, and the mixes llama.cpp only writes with one):
the script writes a random one in llama.cpp's imatrix GGUF format (per-expert counts, some
experts never used, columns whose importance spans orders of magnitude, some zero), moe reads
the file (--imatrix) and llama.cpp gets the same values (sums / counts, as llama-quantize loads
them): the types must agree (the mixes' imatrix rules), and the bytes as above (the weighted
quantizers are ggml's; q8_0, mxfp4 and f16 ignore the matrix in both).
Shapes cover 8 experts (Mixtral's rule), GQA 4 (qwen2moe with shared experts), enough layers
for the first-sixteenth and every-third-layer rules, expert widths that are not multiples of
256 (fallback types), tied output, and a quantized input (requantization).

  quantize_oracle.py --moe PATH [--only CASE] [--list] [-v]
Prints one line per case and ends with "N passed, M failed"; exits 1 on any failure.
"""
import argparse
import ctypes
import os
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_DIR = os.path.join(HERE, "..", "..", "third_party", "npm", "node_modules", "@node-llama-cpp",
                       "linux-x64", "bins", "linux-x64")

ALL_MIXES = ["IQ3_M", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
             "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "MXFP4_MOE", "F16", "BF16"]
# llama.cpp refuses these without an importance matrix; it then gets one of ones, and every
# tensor's type is compared but not the bytes (its quantizers weight by the matrix).
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}
# Types whose quantizer moe does not share with ggml (the codebook i-quants): types compared,
# bytes not (tests/kernels/ggml_oracle_test.cc compares their error instead).
OWN_QUANTIZER = {"iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m"}
FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
         "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
         "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32, "MXFP4_MOE": 38, "IQ2_XXS": 19, "IQ3_S": 26,
         "IQ3_M": 27, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29, "IQ1_S": 24, "IQ1_M": 31,
         "IQ3_XXS": 23, "IQ3_XS": 22, "Q2_K_S": 21}


def case(name, mixes, pure=False, source_type=None, overrides=None, imatrix=False, **init):
    return dict(name=name, mixes=mixes, pure=pure, source_type=source_type,
                overrides=overrides or [], imatrix=imatrix, init=init)


CASES = [
    # Mixtral-like: 8 experts, 9 layers (n/8 = 1: the first/last eighth and every third layer).
    case("llama_8x_9l", ALL_MIXES, arch="llama", layers=9, dim=256, ffn=256, experts=8,
         experts_used=2, heads=4, kv_heads=2, vocab=512, seed=11),
    # Qwen1.5-MoE-like: shared experts, GQA 4 (Q2_K's attn_v rule), 17 layers (n/16 = 1).
    case("qwen2moe_gqa4_17l", ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS",
                               "IQ2_XXS"],
         arch="qwen2moe", layers=17, dim=256, ffn=256, experts=4, experts_used=2,
         shared_ffn=512, heads=8, kv_heads=2, vocab=512, seed=12),
    # Expert width 160 and dim 256: ffn_down rows of 160 fall back to 32-block types.
    case("qwen3moe_ffn160_tied", ["Q2_K", "Q3_K_L", "Q4_K_M", "Q5_K_S", "Q6_K", "Q4_1", "IQ4_XS",
                                  "IQ2_XXS", "IQ3_M", "IQ3_S", "IQ2_M", "IQ1_S"],
         arch="qwen3moe", layers=4, dim=256, ffn=160, experts=6, experts_used=2, heads=4,
         kv_heads=1, head_dim=64, vocab=512, tie_output=True, seed=13),
    # Rows of 96: no 256-block type fits anywhere (q8_0 output, 32-block fallbacks).
    case("olmoe_dim96", ["Q4_K_M", "Q3_K_S", "Q2_K", "Q5_K_M", "IQ4_XS", "IQ4_NL", "MXFP4_MOE",
                         "IQ2_XS", "IQ2_S", "IQ1_S"], arch="olmoe", layers=3,
         dim=96, ffn=64, experts=4, experts_used=2, heads=4, vocab=256, seed=14),
    case("llama_pure", ["Q4_K_M", "Q3_K_M", "Q2_K"], pure=True, arch="llama", layers=3, dim=256,
         ffn=160, experts=8, experts_used=2, heads=4, kv_heads=2, vocab=512, seed=15),
    # --tensor-type PATTERN=TYPE (llama.cpp's tensor overrides): the first match wins, the rules'
    # counters skip overridden tensors, the fallback still applies.
    case("llama_overrides", ["Q4_K_M", "Q3_K_M"], overrides=[("attn_v", "q5_0"), ("blk\\.1\\.ffn_down", "q8_0"),
                                                             ("ffn_up_exps", "q2_K")],
         arch="llama", layers=4, dim=256, ffn=160, experts=4, experts_used=2, heads=4, kv_heads=2,
         vocab=512, seed=17),
    # A quantized input is dequantized and quantized again, as llama.cpp does when allowed.
    case("olmoe_from_q8_0", ["Q4_K_M", "Q3_K_L"], source_type="q8_0", arch="olmoe", layers=2,
         dim=256, ffn=256, experts=4, experts_used=2, heads=4, vocab=512, seed=16),
    # With an importance matrix: the weighted quantizers byte for byte, and the mixes' imatrix
    # rules (IQ4_XS/IQ4_NL keep q5_K off the first ffn_down, Q4_0/Q5_0 bump it to q4_1/q5_1,
    # IQ3_XXS's attention V and ffn_down). 17 layers: n/8 = 2.
    case("qwen2moe_imatrix_17l", ["Q4_K_M", "Q5_K_S", "Q6_K", "Q4_0", "Q5_0", "Q4_1", "Q5_1",
                                  "IQ4_XS", "IQ4_NL", "Q3_K_M", "Q8_0", "IQ3_XXS"], imatrix=True,
         arch="qwen2moe", layers=17, dim=256, ffn=256, experts=4, experts_used=2,
         shared_ffn=512, heads=8, kv_heads=4, vocab=512, seed=18),
    # deepseek2: the MLA tensors (attn_kv_a_mqa, attn_k_b / attn_v_b per head, the q_lora pair),
    # a leading dense block and shared experts; qk_nope 64 puts attn_k_b on a 32-block fallback.
    case("deepseek2_mla", ["Q4_K_M", "Q3_K_M", "Q5_K_M", "Q2_K", "Q6_K", "IQ4_XS", "IQ2_XXS"],
         arch="deepseek2", layers=4, dim=256, ffn=256, experts=8, experts_used=2, heads=4,
         qk_nope=64, qk_rope=32, v_head_dim=64, kv_lora_rank=256, q_lora_rank=256,
         leading_dense=1, shared_experts=2, vocab=512, seed=20),
    case("llama_8x_imatrix_ffn160", ["Q4_K_M", "IQ4_XS", "Q5_K_M", "IQ3_XXS", "IQ3_XS", "IQ1_M",
                                     "Q2_K_S"],
         imatrix=True, arch="llama", layers=4, dim=256, ffn=160, experts=8, experts_used=2,
         heads=4, kv_heads=1, vocab=512, seed=19),
]


class CaseError(Exception):
    pass


# ---- the oracle ----

class ImatrixData(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)),
                ("size", ctypes.c_size_t)]


class TensorOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("type", ctypes.c_int)]


class QuantParams(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int),
                ("output_tensor_type", ctypes.c_int), ("token_embedding_type", ctypes.c_int),
                ("allow_requantize", ctypes.c_bool), ("quantize_output_tensor", ctypes.c_bool),
                ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
                ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool),
                ("imatrix", ctypes.c_void_p), ("kv_overrides", ctypes.c_void_p),
                ("tt_overrides", ctypes.c_void_p), ("prune_layers", ctypes.c_void_p),
                ("max_buf_size", ctypes.c_size_t)]


def load_llama():
    names = [f for f in os.listdir(LIB_DIR) if f.startswith("libllama.") and f.endswith(".so")]
    if not names:
        raise CaseError("no libllama in " + LIB_DIR)
    lib = ctypes.CDLL(os.path.join(LIB_DIR, names[0]))
    lib.llama_model_quantize_default_params.restype = QuantParams
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p,
                                         ctypes.POINTER(QuantParams)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_backend_init()
    return lib


def f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]


def random_imatrix(src, path, seed):
    """Writes a random importance matrix for the matrices of `src` in llama.cpp's imatrix GGUF
    format (no output.weight, as llama-imatrix) and returns {name: values}, the values
    llama-quantize derives from the file (sums / count per matrix, ones for a count of 0)."""
    import random
    rng = random.Random(seed)
    _, tensors = read_gguf(src)
    entries, values = [], {}
    for name in sorted(tensors):
        t = tensors[name]
        if len(t["ne"]) < 2 or name == "output.weight" or "_norm" in name:
            continue
        ne0, n_mat = t["ne"][0], (t["ne"][2] if len(t["ne"]) > 2 else 1)
        counts = [0.0 if n_mat > 1 and rng.random() < 0.25 else float(rng.randint(1, 900))
                  for _ in range(n_mat)]
        sums, vals = [], []
        for c in counts:
            for _ in range(ne0):
                s = 0.0 if c == 0 or rng.random() < 0.05 else f32(c * 2.0 ** rng.uniform(-8, 4))
                sums.append(s)
                vals.append(f32(s / c) if c > 0 else 1.0)
        entries.append((name, ne0, n_mat, sums, counts))
        values[name] = vals
    kvs = [("general.type", 8, "imatrix"), ("imatrix.datasets", 9, ["random"]),
           ("imatrix.chunk_count", 4, 1), ("imatrix.chunk_size", 4, 512)]
    infos, blobs, off = [], [], 0
    for name, ne0, n_mat, sums, counts in entries:
        for suffix, ne, data in ((".in_sum2", [ne0, n_mat], sums), (".counts", [1, n_mat], counts)):
            raw = struct.pack("<%df" % len(data), *data)
            infos.append((name + suffix, ne, off))
            blobs.append(raw + b"\0" * ((-len(raw)) % 32))
            off += len(raw) + (-len(raw)) % 32

    def gstr(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    out = struct.pack("<IIQQ", 0x46554747, 3, len(infos), len(kvs))
    for k, t, v in kvs:
        out += gstr(k) + struct.pack("<I", t)
        if t == 8:
            out += gstr(v)
        elif t == 9:
            out += struct.pack("<IQ", 8, len(v)) + b"".join(gstr(x) for x in v)
        else:
            out += struct.pack("<I", v)
    for name, ne, o in infos:
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        out += struct.pack("<IQ", 0, o)
    out += b"\0" * ((-len(out)) % 32)
    with open(path, "wb") as fh:
        fh.write(out + b"".join(blobs))
    return values


def imatrix_arg(values):
    """llama_model_quantize's imatrix parameter for {name: values}."""
    keep = []
    entries = []
    for name, vals in values.items():
        buf = (ctypes.c_float * len(vals))(*vals)
        keep.append(buf)
        entries.append(ImatrixData(name.encode(), ctypes.cast(buf, ctypes.POINTER(ctypes.c_float)), len(vals)))
    entries.append(ImatrixData(None, None, 0))
    arr = (ImatrixData * len(entries))(*entries)
    keep.append(arr)
    return arr, keep


def llama_quantize(lib, src, dst, mix, pure, overrides=(), imatrix=None):
    p = lib.llama_model_quantize_default_params()
    if overrides:
        ids = {v: k for k, v in GGML_NAMES.items()}
        ov = (TensorOverride * (len(overrides) + 1))(
            *[TensorOverride(pat.encode(), ids[t]) for pat, t in overrides], TensorOverride(None, 0))
        p.tt_overrides = ctypes.cast(ov, ctypes.c_void_p)
    p.ftype = FTYPE[mix]
    p.nthread = 2
    p.allow_requantize = True
    p.pure = pure
    if imatrix is not None:
        arr, keep = imatrix_arg(imatrix)
        p.imatrix = ctypes.cast(arr, ctypes.c_void_p)
    # llama.cpp logs every tensor to stderr; keep it out of the test output.
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        rc = lib.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    if rc != 0:
        raise CaseError("llama_model_quantize(%s) returned %d" % (mix, rc))


# ---- a minimal GGUF reader: metadata values we need, tensor infos, data ----

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}


def read_gguf(path):
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(_SCALAR[t])

    magic, version, n_tensors, n_kv = take("I"), take("I"), take("Q"), take("Q")
    if magic != 0x46554747:
        raise CaseError(path + ": not a GGUF file")
    kv = {}
    for _ in range(n_kv):
        k = string()
        kv[k] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        nd = take("I")
        ne = [take("Q") for _ in range(nd)]
        infos.append((name, ne, take("I"), take("Q")))
    align = kv.get("general.alignment", 32)
    base = (pos + align - 1) // align * align
    offsets = sorted(off for _, _, _, off in infos)
    tensors = {}
    for name, ne, t, off in infos:
        # A tensor's bytes run to the next tensor's offset (padding included) or the file end;
        # compared as the unpadded prefix both files share, of the exact size below.
        nxt = [o for o in offsets if o > off]
        end = base + (nxt[0] if nxt else len(data) - base)
        tensors[name] = dict(ne=ne, type=t, data=data[base + off:end])
    return kv, tensors


GGML_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0",
              10: "q2_K", 11: "q3_K", 12: "q4_K", 13: "q5_K", 14: "q6_K", 20: "iq4_nl",
              23: "iq4_xs", 30: "bf16", 39: "mxfp4", 16: "iq2_xxs", 18: "iq3_xxs", 21: "iq3_s",
              17: "iq2_xs", 22: "iq2_s", 19: "iq1_s", 29: "iq1_m"}


def compare(moe_path, ref_path):
    kv_m, t_m = read_gguf(moe_path)
    kv_r, t_r = read_gguf(ref_path)
    if kv_m.get("general.file_type") != kv_r.get("general.file_type"):
        raise CaseError("general.file_type %s, llama.cpp %s" % (kv_m.get("general.file_type"),
                                                               kv_r.get("general.file_type")))
    if set(t_m) != set(t_r):
        raise CaseError("tensor names differ: %s" % sorted(set(t_m) ^ set(t_r))[:4])
    types = {}
    for name in sorted(t_r):
        a, b = t_m[name], t_r[name]
        if a["type"] != b["type"]:
            raise CaseError("%s: moe wrote %s, llama.cpp %s" % (
                name, GGML_NAMES.get(a["type"], a["type"]), GGML_NAMES.get(b["type"], b["type"])))
        n = min(len(a["data"]), len(b["data"]))
        tname = GGML_NAMES.get(a["type"], str(a["type"]))
        if tname not in OWN_QUANTIZER and a["data"][:n] != b["data"][:n]:
            first = next(i for i in range(n) if a["data"][i] != b["data"][i])
            raise CaseError("%s (%s): data differs from byte %d" % (
                name, GGML_NAMES.get(a["type"], a["type"]), first))
        tn = GGML_NAMES.get(a["type"], str(a["type"]))
        types[tn] = types.get(tn, 0) + 1
    return types


def run(argv, what, timeout=600):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise CaseError("%s exited %d: %s" % (what, p.returncode, p.stderr.strip()[-300:]))


def run_case(moe, lib, c, tmp, verbose):
    src = os.path.join(tmp, c["name"] + ".gguf")
    argv = [moe, "init"]
    for k, v in c["init"].items():
        if v is True:
            argv.append("--" + k.replace("_", "-"))
        else:
            argv += ["--" + k.replace("_", "-"), str(v)]
    if c["source_type"]:
        argv += ["--type", c["source_type"]]
    run(argv + ["-o", src], "moe init")
    notes = []
    im_path = os.path.join(tmp, c["name"] + ".imatrix.gguf")
    im_values = None
    if c["imatrix"] or any(m in NEEDS_IMATRIX for m in c["mixes"]):
        im_values = random_imatrix(src, im_path, c["init"].get("seed", 1))
    for mix in c["mixes"]:
        use_im = c["imatrix"] or mix in NEEDS_IMATRIX
        out_m = os.path.join(tmp, "%s.%s.moe.gguf" % (c["name"], mix))
        out_r = os.path.join(tmp, "%s.%s.llama.gguf" % (c["name"], mix))
        qargv = [moe, "quantize", src, out_m, "--type", mix, "--threads", "2", "-q"]
        if c["pure"]:
            qargv.append("--pure")
        for pat, t in c["overrides"]:
            qargv += ["--tensor-type", "%s=%s" % (pat, t)]
        if use_im:
            qargv += ["--imatrix", im_path]
        run(qargv, "moe quantize --type " + mix)
        llama_quantize(lib, src, out_r, mix, c["pure"], c["overrides"], im_values if use_im else None)
        try:
            types = compare(out_m, out_r)
        except CaseError as e:
            raise CaseError("%s: %s" % (mix, e))
        notes.append("%s{%s}" % (mix, ",".join("%s:%d" % kv for kv in sorted(types.items()))))
        os.remove(out_m)
        os.remove(out_r)
    return "; ".join(notes) if verbose else "%d mixes identical" % len(c["mixes"])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", default=os.environ.get("MOE_CLI"), help="moe binary")
    ap.add_argument("--only", action="append")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    if a.list:
        for c in CASES:
            print(c["name"], " ".join(c["mixes"]))
        return 0
    if not a.moe:
        ap.error("give the moe binary: --moe PATH or $MOE_CLI")
    moe = os.path.abspath(a.moe)
    lib = load_llama()
    cases = [c for c in CASES if not a.only or c["name"] in a.only]
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="moe_quantize_oracle_") as tmp:
        for c in cases:
            t0 = time.time()
            try:
                msg, ok = run_case(moe, lib, c, tmp, a.verbose), True
            except CaseError as e:
                msg, ok = str(e), False
            except Exception as e:  # a harness bug in one case must not hide the others
                msg, ok = "%s: %s" % (type(e).__name__, e), False
            print("%s %s: %s [%.1fs]" % ("PASS" if ok else "FAIL", c["name"], msg,
                                         time.time() - t0), flush=True)
            passed += ok
            failed += not ok
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
