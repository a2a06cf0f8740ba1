#!/usr/bin/env python3
"""The moe CLI contract: exit codes, one-line errors, and the JSON fields tools rely on.

Bad input (corrupt file, wrong flag, impossible config) must give one line on stderr and a
non-zero exit (2 for bad input, 1 for a bad flag), never a crash. JSON outputs must carry the
fields of the issue's contract, with values consistent with the model (checked against
`moe inspect --json` and the file itself).
"""
import json
import math
import time
import os
import subprocess
import sys
import random
import tempfile
import urllib.request
import re

MOE = sys.argv[1] if len(sys.argv) > 1 else os.environ["MOE_CLI"]
failures = []
passed = 0


def run(*args):
    return subprocess.run([MOE, *args], capture_output=True, text=True, timeout=120)


def check(name, cond, detail=""):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(name)
        print("FAIL %s %s" % (name, detail))


def expect_error(name, args, code, needle):
    p = run(*args)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    check(name, p.returncode == code and len(lines) >= 1 and needle in p.stderr
          and (code != 2 or (len(lines) == 1 and lines[0].startswith("moe: error: "))),
          "rc=%d stderr=%r" % (p.returncode, p.stderr[:300]))


with tempfile.TemporaryDirectory() as d:
    m = os.path.join(d, "m.gguf")
    p = run("init", "--arch", "qwen2moe", "--layers", "2", "--dim", "64", "--ffn", "32",
            "--experts", "4", "--experts-used", "2", "--shared-ffn", "48", "--heads", "4",
            "--kv-heads", "2", "--vocab", "200", "--seed", "5", "-o", m)
    check("init", p.returncode == 0, p.stderr)

    info = json.loads(run("inspect", m, "--json").stdout)
    hp = info["hparams"]
    check("inspect hparams", (info["architecture"], hp["n_layer"], hp["n_embd"], hp["n_expert"],
                              hp["n_expert_used"], hp["n_ff_exp"], hp["n_ff_shexp"], hp["n_vocab"])
          == ("qwen2moe", 2, 64, 4, 2, 32, 48, 200), str(hp))
    check("inspect sizes", info["file_size"] == os.path.getsize(m)
          and sum(t["bytes"] for t in info["tensors"]) == info["tensor_bytes"])
    # bytes/expert: gate + up + down of one expert in f32
    check("inspect bytes_per_expert", info["bytes_per_expert"] == 3 * 64 * 32 * 4, str(info["bytes_per_expert"]))
    # A token's multiply-adds: every matrix's elements once (the output head; a tied head is the
    # embedding's matrix), the routed experts' at k of n_expert; vectors and the lookup are none.
    elems = {t["name"]: math.prod(t["shape"]) for t in info["tensors"] if len(t["shape"]) >= 2}
    head = elems.get("output.weight", elems["token_embd.weight"])
    macs = head + sum(n * (2 / 4 if "_exps." in k else 1) for k, n in elems.items()
                      if k not in ("token_embd.weight", "output.weight"))
    check("inspect macs_per_token", info["macs_per_token"] == macs
          and macs == 200 * 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 64 * 4 + 3 * 64 * 48 + 2 * 3 * 64 * 32),
          str((info["macs_per_token"], macs)))

    out = json.loads(run("run", "-m", m, "--prompt-ids", "3,1,4,1,5", "-n", "6", "--temp", "0",
                         "--json", "--top-logprobs", "4", "--ignore-eos").stdout)
    keys = {"prompt_tokens", "tokens", "text", "top_logprobs", "prefill_tokens_per_s",
            "decode_tokens_per_s", "peak_rss_bytes"}
    check("run json keys", keys <= out.keys(), str(out.keys()))
    check("run json values", out["prompt_tokens"] == [3, 1, 4, 1, 5] and len(out["tokens"]) == 6
          and len(out["top_logprobs"]) == 6 and all(len(t) == 4 for t in out["top_logprobs"]))
    # The penalties are accepted (their effect is checked in tests/runtime and tests/serve).
    pen = run("run", "-m", m, "--prompt-ids", "3,1,4,1,5", "-n", "6", "--temp", "0", "--json", "--ignore-eos",
              "--presence-penalty", "2", "--frequency-penalty", "2")
    check("run with penalties", pen.returncode == 0 and len(json.loads(pen.stdout)["tokens"]) == 6, pen.stderr[-300:])
    # greedy: each generated token is the top entry of its distribution; logprobs descend, < 0
    check("run greedy = top logprob", all(t == tl[0]["id"] for t, tl in zip(out["tokens"], out["top_logprobs"])))
    check("run logprobs sorted", all(tl[i]["logprob"] >= tl[i + 1]["logprob"] and tl[i]["logprob"] < 0
                                     for tl in out["top_logprobs"] for i in range(3)))
    # same seed, same sampled tokens; temperature sampling stays in the vocabulary
    a = json.loads(run("run", "-m", m, "--prompt-ids", "7", "-n", "8", "--seed", "9", "--json", "--ignore-eos").stdout)
    b = json.loads(run("run", "-m", m, "--prompt-ids", "7", "-n", "8", "--seed", "9", "--json", "--ignore-eos").stdout)
    check("run seeded sampling", a["tokens"] == b["tokens"] and all(0 <= t < 200 for t in a["tokens"]))
    bench = json.loads(run("bench", "-m", m, "-p", "8", "-n", "4", "--json").stdout)
    check("bench json", bench["prefill_tokens_per_s"] > 0 and bench["decode_tokens_per_s"] > 0
          and bench["weight_macs_per_token"] == info["macs_per_token"])
    # What a decoded token reads: the weights inspect counts, and the KV cache (f16 by default, as
    # llama.cpp's) of 2 layers x (2 kv heads x 16) keys and values at the decode's mean context 8 + 1.5.
    check("bench bytes per token", bench["weight_bytes_per_token"] == info["bytes_per_token"]
          and info["kv_bytes_per_token"] == 2 * 2 * 32 * 4 and info["kv_bytes_per_token_f16"] == 2 * 2 * 32 * 2
          and abs(bench["kv_bytes_per_token"] - 2 * 2 * 32 * 2 * 9.5) < 1e-6, str(bench))
    multi = json.loads(run("bench", "-m", m, "-p", "8", "-n", "4", "-s", "3", "--json").stdout)
    check("bench --sequences", multi["sequences"] == 3 and multi["decode_tokens_per_s"] > 0
          and multi["prefill_tokens_per_s"] > 0, str(multi))
    # An F32 cache: twice the KV bytes per token in the bench's accounting. With the F16 cache,
    # generation (through the engine) gives the distributions teacher forcing (one batch) gives for
    # the same tokens, and the default is that cache.
    b32 = json.loads(run("bench", "-m", m, "-p", "8", "-n", "4", "-s", "2", "--cache-type", "f32", "--json").stdout)
    check("bench --cache-type f32", abs(b32["kv_bytes_per_token"] - 2 * 2 * 32 * 4 * 9.5) < 1e-6
          and b32["decode_tokens_per_s"] > 0, str(b32))
    g16 = json.loads(run("run", "-m", m, "--prompt-ids", "3,1,4,1,5", "-n", "6", "--temp", "0", "--json",
                         "--top-logprobs", "1", "--ignore-eos", "--cache-type", "f16").stdout)
    t16 = json.loads(run("run", "-m", m, "--prompt-ids", ",".join(map(str, [3, 1, 4, 1, 5] + g16["tokens"][:-1])),
                         "--teacher-forcing", "--json", "--top-logprobs", "1", "--cache-type", "f16").stdout)
    check("run --cache-type f16: decode = teacher forcing",
          all(tl[0]["id"] == tt[0]["id"] and abs(tl[0]["logprob"] - tt[0]["logprob"]) < 1e-3
              for tl, tt in zip(g16["top_logprobs"], t16["teacher_logprobs"][4:])), str((g16, t16))[:300])
    # Teacher forcing past one chunk of 256: the positions of a shorter prompt are its positions
    # (the first chunk bit for bit), and each position reports how near its routing came to a
    # tie (routing_margin, a probability gap >= 0, for the conformance harness).
    long_ids = [(7 * i + 3) % 64 for i in range(300)]
    tf = {}
    for n in (300, 280):
        tf[n] = json.loads(run("run", "-m", m, "--prompt-ids", ",".join(map(str, long_ids[:n])), "--teacher-forcing",
                               "--json", "--top-logprobs", "2", "--ctx", "320").stdout)
    check("run --teacher-forcing over two chunks",
          len(tf[300]["teacher_logprobs"]) == 300 and tf[300]["teacher_logprobs"][:256] == tf[280]["teacher_logprobs"][:256]
          and all(abs(a[0]["logprob"] - b[0]["logprob"]) < 1e-4 and a[0]["id"] == b[0]["id"]
                  for a, b in zip(tf[300]["teacher_logprobs"][256:280], tf[280]["teacher_logprobs"][256:])),
          str(tf[300].get("teacher_logprobs", "")[:2]))
    margins = tf[300].get("routing_margin")
    check("run --teacher-forcing: routing_margin per position",
          isinstance(margins, list) and len(margins) == 300 and all(isinstance(x, float) and 0 <= x <= 1 for x in margins)
          and margins[:256] == tf[280]["routing_margin"][:256], str(margins)[:200])
    gd = json.loads(run("run", "-m", m, "--prompt-ids", "3,1,4,1,5", "-n", "6", "--temp", "0", "--json",
                        "--top-logprobs", "1", "--ignore-eos").stdout)
    check("run: the default cache is f16", gd["tokens"] == g16["tokens"] and gd["top_logprobs"] == g16["top_logprobs"],
          str((gd, g16))[:300])
    expect_error("bench --sequences bound", ["bench", "-m", m, "-s", "0"], 2, "--sequences")
    expect_error("bench context bound", ["bench", "-m", m, "-p", "2000000000", "-n", "4"], 2, "more than moe.cpp supports")
    mach = json.loads(run("bench-machine", "-t", "1", "--mib", "16", "-r", "1", "--json").stdout)
    check("bench-machine json", all(mach[k] > 0 for k in ("read_gbs", "read_gbs_1t", "fp32_gflops",
                                                          "fp32_gflops_1t", "int8_gops", "int8_gops_1t"))
          and mach["threads"] == 1, str(mach))
    expect_error("bench-machine threads bound", ["bench-machine", "-t", "100000"], 2, "--threads")
    expect_error("bench-machine mib bound", ["bench-machine", "--mib", "1"], 2, "--mib")
    layer = json.loads(run("bench-layer", "--router", "sigmoid_bias", "--tokens", "40", "--dim", "24",
                           "--ffn", "16", "--experts", "4", "--experts-used", "2", "--json").stdout)
    check("bench-layer json", layer["forward_ms"] > 0 and layer["forward_backward_ms"] >= layer["forward_ms"])

    data = open(m, "rb").read()
    trunc = os.path.join(d, "trunc.gguf")
    open(trunc, "wb").write(data[: len(data) // 2])
    expect_error("truncated file", ["run", "-m", trunc, "--prompt-ids", "1"], 2, "truncated")
    flipped = os.path.join(d, "flip.gguf")
    open(flipped, "wb").write(b"GGUX" + data[4:])
    expect_error("bad magic", ["inspect", flipped], 2, "not a GGUF file")
    expect_error("missing file", ["inspect", os.path.join(d, "nope.gguf")], 2, "cannot open")
    expect_error("no vocabulary", ["run", "-m", m, "-p", "hello"], 2, "--prompt-ids")
    expect_error("bad ids", ["run", "-m", m, "--prompt-ids", "1,,2"], 2, "not a token id")
    expect_error("id out of range", ["run", "-m", m, "--prompt-ids", "200"], 2, "out of range")
    # Hostile values (issue 11's list): validated once, one line each, nothing hangs.
    for name, args, needle in (
            ("threads bound (run)", ["--threads", "100000"], "--threads 100000"),
            ("threads negative", ["--threads", "-3"], "--threads -3"),
            ("temperature NaN", ["--temp", "nan"], "temperature nan"),
            ("temperature inf", ["--temp", "inf"], "temperature inf"),
            ("temperature negative", ["--temp", "-1"], "temperature -1"),
            ("top-p above 1", ["--top-p", "2"], "top_p 2"),
            ("top-p zero", ["--top-p", "0"], "top_p 0"),
            ("top-k negative", ["--top-k", "-1"], "top_k -1"),
            ("presence penalty above 2", ["--presence-penalty", "3"], "presence_penalty 3"),
            ("min-p above 1", ["--min-p", "2"], "min_p 2"),
            ("frequency penalty NaN", ["--frequency-penalty", "nan"], "frequency_penalty nan"),
            ("ctx negative", ["--ctx", "-1"], "context size -1"),
            ("ctx below the prompt", ["--ctx", "1"], "more than the context size 1"),
            ("absurd -n", ["-n", "2000000000"], "more than moe.cpp supports"),
            ("n negative", ["-n", "-5"], "must be >= 0"),
            ("top-logprobs beyond the vocabulary", ["--top-logprobs", "100000"], "top_logprobs 100000"),
            ("cache type", ["--cache-type", "q8_0"], "--cache-type q8_0: use f32 or f16")):
        expect_error(name, ["run", "-m", m, "--prompt-ids", "1,2"] + args, 2, needle)
    for cmd in (["bench", "-m", m, "-p", "4", "-n", "2"], ["eval", "-m", m, "--data", m],
                ["bench-layer", "--router", "softmax_topk", "--tokens", "8"]):
        expect_error("threads bound (%s)" % cmd[0], cmd + ["--threads", "100000"], 2, "--threads 100000")
    long_ctx = run("run", "-m", m, "--prompt-ids", "1,2", "-n", "1", "--ctx", "100000", "--json")
    check("a context beyond the training context warns", long_ctx.returncode == 0 and
          "longer than the model's training context" in long_ctx.stderr, long_ctx.stderr[-300:])
    fifo = os.path.join(d, "fifo")
    os.mkfifo(fifo)
    t0 = time.time()
    expect_error("inspect a FIFO", ["inspect", fifo], 2, "not a regular file")
    check("a FIFO is refused without waiting", time.time() - t0 < 10)
    tiny = ["init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32", "--experts", "2",
            "--experts-used", "1", "--vocab", "64"]
    link = os.path.join(d, "link.gguf")
    os.symlink(m, link)
    before = open(m, "rb").read()
    expect_error("init onto a symlink", tiny + ["-o", link], 2, "symbolic link")
    check("the symlink and its target are untouched", os.path.islink(link) and open(m, "rb").read() == before)
    expect_error("init onto a device", tiny + ["-o", "/dev/null"], 2, "not a regular file")
    stale = os.path.join(d, "fresh.gguf.tmp")
    open(stale, "w").write("someone's file")
    run(*(tiny + ["-o", os.path.join(d, "fresh.gguf")]))
    check("a file named like the temporary survives", open(stale).read() == "someone's file")
    check("no temporary is left behind", not [f for f in os.listdir(d) if f.startswith("fresh.gguf.tmp.")])
    expect_error("init too large for memory", ["init", "--arch", "llama", "--layers", "4000", "--dim", "4096",
                                               "--ffn", "14336", "--experts", "8", "--experts-used", "2",
                                               "-o", os.path.join(d, "huge.gguf")], 2, "more than this machine")
    expect_error("init too many layers", ["init", "--arch", "llama", "--layers", "1000000", "--dim", "32", "--ffn", "32",
                                          "--experts", "2", "--experts-used", "1", "-o", os.path.join(d, "x.gguf")],
                 2, "block_count 1000000")
    for name, args, needle in (("rope base 1e-45", ["--rope-base", "1e-45"], "rope.freq_base"),
                               ("rms epsilon 1e30", ["--eps", "1e30"], "layer_norm_rms_epsilon")):
        expect_error("init refuses " + name, tiny + args + ["-o", os.path.join(d, "x.gguf")], 2, needle)
    expect_error("unknown flag", ["run", "-m", m, "--prompt-ids", "1", "--frobnicate"], 1, "frobnicate")
    expect_error("unknown arch", ["init", "--arch", "gpt9", "--layers", "1", "--dim", "32", "--ffn", "32",
                                  "--experts", "2", "--experts-used", "1", "-o", os.path.join(d, "x.gguf")], 2, "gpt9")
    expect_error("k > E", ["init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32",
                           "--experts", "2", "--experts-used", "3", "-o", os.path.join(d, "x.gguf")], 2, "expert_used_count")
    expect_error("quant block", ["init", "--arch", "llama", "--layers", "1", "--dim", "96", "--ffn", "64",
                                 "--experts", "2", "--experts-used", "1", "--type", "q4_K",
                                 "-o", os.path.join(d, "x.gguf")], 2, "multiples of 256")
    expect_error("bad type", ["init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32",
                              "--experts", "2", "--experts-used", "1", "--type", "q9_K",
                              "-o", os.path.join(d, "x.gguf")], 2, "q9_K")
    # bench-layer runs every router; --json carries the layer telemetry.
    for router, k in (("hash", 2), ("top_p", 4)):
        lj = json.loads(run("bench-layer", "--router", router, "--tokens", "64", "--dim", "24", "--ffn", "16",
                            "--experts", "4", "--experts-used", str(k), "--json").stdout)
        tel = lj.get("telemetry", {})
        check("bench-layer %s telemetry" % router,
              lj["forward_backward_ms"] > 0 and tel.get("router") == router
              and sum(tel.get("routed_per_expert", [])) == round(tel.get("mean_experts_per_token", -1) * 64)
              and (router != "top_p" or 1 <= tel["mean_experts_per_token"] < k), str(tel)[:300])
    expect_error("unknown router", ["bench-layer", "--router", "magic", "--tokens", "8"], 2, "magic")
    # ---- routers by name: moe init --router, inspect, run -------------------------------------
    def init_router(name, *extra, path=None):
        path = path or os.path.join(d, "r_%s.gguf" % name)
        p = run("init", "--arch", "llama", "--layers", "2", "--dim", "32", "--ffn", "32",
                "--experts", "4", "--experts-used", "2", "--heads", "2", "--vocab", "100",
                "--seed", "3", "--router", name, *extra, "-o", path)
        return p, path

    default_bytes = open(init_router("softmax_topk")[1], "rb").read()
    check("default router writes no router keys",
          b"expert_router" not in default_bytes and b"expert_gating_func" not in default_bytes)
    p, implicit = init_router("softmax_topk", path=os.path.join(d, "r_implicit.gguf"))
    check("--router softmax_topk = no --router",
          run("init", "--arch", "llama", "--layers", "2", "--dim", "32", "--ffn", "32", "--experts", "4",
              "--experts-used", "2", "--heads", "2", "--vocab", "100", "--seed", "3",
              "-o", implicit).returncode == 0 and open(implicit, "rb").read() == default_bytes)
    params = {"softmax_topk": [], "sigmoid_bias": [], "hash": ["--hash-seed", "12345678901"],
              "top_p": ["--top-p", "0.7"]}
    for name, extra in params.items():
        p, path = init_router(name, *extra)
        check("init --router %s" % name, p.returncode == 0, p.stderr)
        ip = run("inspect", path, "--json")
        info = json.loads(ip.stdout) if ip.returncode == 0 else {}
        r = info.get("router", {})
        names = {t["name"] for t in info.get("tensors", [])}
        check("inspect router %s" % name, r.get("name") == name and r.get("servable") is True, str(r))
        if name == "top_p":
            check("inspect top_p", abs(r.get("top_p", 0) - 0.7) < 1e-6, str(r))
        if name == "hash":
            check("inspect hash_seed", r.get("hash_seed") == 12345678901 and "blk.0.ffn_gate_inp.weight" not in names, str(r))
        if name == "sigmoid_bias":
            check("inspect sigmoid_bias", r.get("gating") == "sigmoid" and "blk.1.exp_probs_b.bias" in names, str(r))
        rp = run("run", "-m", path, "--prompt-ids", "3,1,4,1,5", "-n", "4", "--temp", "0", "--json", "--ignore-eos")
        out = json.loads(rp.stdout) if rp.returncode == 0 else {}
        check("run --router %s" % name, rp.returncode == 0 and len(out.get("tokens", [])) == 4
              and all(0 <= t < 100 for t in out["tokens"]), rp.stderr[:300])
    # different routers route differently: the greedy continuations are not all the same
    conts = set()
    for name in params:
        rp = run("run", "-m", os.path.join(d, "r_%s.gguf" % name), "--prompt-ids", "3,1,4,1,5", "-n", "1",
                 "--temp", "0", "--json", "--top-logprobs", "3", "--ignore-eos")
        conts.add(json.dumps(json.loads(rp.stdout)["top_logprobs"]))
    check("routers change the output", len(conts) == len(params))

    p, ec = init_router("expert_choice")
    check("init --router expert_choice (training-only file)", p.returncode == 0, p.stderr)
    ip = run("inspect", ec, "--json")
    r = json.loads(ip.stdout)["router"] if ip.returncode == 0 else {}
    check("inspect expert_choice", {k: r.get(k) for k in ("name", "gating", "norm_topk", "servable")} ==
          {"name": "expert_choice", "gating": "softmax", "norm_topk": False, "servable": False} and
          "expert_choice" in r.get("llama_cpp_difference", ""), ip.stdout[:300])
    expect_error("run refuses expert_choice", ["run", "-m", ec, "--prompt-ids", "1,2"], 2, "expert_choice")
    expect_error("run refusal says training-only", ["run", "-m", ec, "--prompt-ids", "1,2"], 2, "training-only")
    expect_error("bench refuses expert_choice", ["bench", "-m", ec, "-p", "4", "-n", "2"], 2, "expert_choice")
    expect_error("unknown init router", ["init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32",
                                         "--experts", "2", "--experts-used", "1", "--router", "magic",
                                         "-o", os.path.join(d, "x.gguf")], 2, "magic")
    expect_error("--top-p needs top_p", ["init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32",
                                         "--experts", "2", "--experts-used", "1", "--router", "hash", "--top-p", "0.5",
                                         "-o", os.path.join(d, "x.gguf")], 2, "--top-p")
    expect_error("--top-p range", ["init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32",
                                   "--experts", "2", "--experts-used", "1", "--router", "top_p", "--top-p", "1.5",
                                   "-o", os.path.join(d, "x.gguf")], 2, "(0, 1]")
    # deepseek2's flags: checked once, each error naming the flag or key to change.
    ds = ["init", "--arch", "deepseek2", "--layers", "2", "--dim", "64", "--ffn", "32", "--experts", "4",
          "--experts-used", "2", "--heads", "2"]
    ds_out = ["-o", os.path.join(d, "ds.gguf")]
    expect_error("MLA flag on llama", ["init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32",
                                       "--experts", "2", "--experts-used", "1", "--kv-lora-rank", "16"] + ds_out,
                 2, "--kv-lora-rank applies to --arch deepseek2")
    expect_error("bad gating", ds + ["--gating", "tanh"] + ds_out, 2, "tanh")
    expect_error("odd qk-rope", ds + ["--qk-rope", "7"] + ds_out, 2, "rope.dimension_count")
    expect_error("all blocks dense", ds + ["--leading-dense", "2"] + ds_out, 2, "leading_dense_block_count")
    expect_error("no shared expert width", ds + ["--shared-experts", "2", "--shared-ffn", "40"] + ds_out, 2, "--shared-experts")
    expect_error("head-dim on deepseek2", ds + ["--head-dim", "16"] + ds_out, 2, "--qk-nope")
    expect_error("rope scale without scaling", ds + ["--rope-scale", "4"] + ds_out, 2, "--rope-scaling")
    expect_error("bad rope scaling", ds + ["--rope-scaling", "ntk"] + ds_out, 2, "ntk")
    run(*(ds + ["--leading-dense", "1", "--gating", "sigmoid", "--weights-norm"] + ds_out))
    info = json.loads(run("inspect", os.path.join(d, "ds.gguf"), "--json").stdout)
    check("deepseek2 inspect: latent KV bytes per token",
          info["kv_bytes_per_token"] == 2 * (info["hparams"]["kv_lora_rank"] + info["hparams"]["n_rot"]) * 4,
          str(info["kv_bytes_per_token"]))
    check("deepseek2 inspect: sigmoid gating", info["router"]["gating"] == "sigmoid", str(info["router"]))
    # --mla: a 40-token prompt is one chunk long enough for the expanded form, which auto takes
    # on this f32 file; all three give the same log-probs to float rounding.
    ds_ids = ",".join(str((7 * i) % 50 + 1) for i in range(40))
    tf = {}
    for form in ("absorbed", "expanded", "auto"):
        out = json.loads(run("run", "-m", os.path.join(d, "ds.gguf"), "--prompt-ids", ds_ids, "--teacher-forcing",
                             "--json", "--top-logprobs", "3", "--mla", form).stdout)
        tf[form] = [e["logprob"] for pos in out["teacher_logprobs"] for e in pos]
    gap = max(abs(a - b) for a, b in zip(tf["absorbed"], tf["expanded"]))
    check("--mla absorbed and expanded agree", len(tf["absorbed"]) == 120 and 0 < gap < 1e-4, str(gap))
    check("--mla auto expands an f32 file's prompt", tf["auto"] == tf["expanded"])
    expect_error("bad --mla", ["run", "-m", os.path.join(d, "ds.gguf"), "--prompt-ids", "1,2", "--mla", "latent"], 2,
                 "--mla latent: use auto, absorbed or expanded")
    txt = os.path.join(d, "ds.txt")
    with open(txt, "w") as fh:
        fh.write("some training text\n" * 50)
    run(*(ds + ["--mla-legacy", "-o", os.path.join(d, "dsl.gguf")]))
    expect_error("training a legacy MLA file", ["train", "-m", os.path.join(d, "dsl.gguf"), "--data", txt,
                                                "--out", os.path.join(d, "dst"), "--steps", "1"],
                 2, "legacy attn_kv_b layout")
    run(*(ds + ["--rope-scaling", "yarn", "--rope-scale", "4", "-o", os.path.join(d, "dsy.gguf")]))
    expect_error("training with YaRN", ["train", "-m", os.path.join(d, "dsy.gguf"), "--data", txt,
                                        "--out", os.path.join(d, "dst"), "--steps", "1"], 2, "RoPE scaling")
    ec = json.loads(run("bench-layer", "--router", "expert_choice", "--tokens", "40", "--dim", "24",
                        "--ffn", "16", "--experts", "4", "--json").stdout)
    check("bench-layer expert_choice", ec["forward_backward_ms"] > 0)

    # ---- moe quantize: mixes, inspect's type mix, bad input leaves files as they were -------
    import struct
    big = os.path.join(d, "big.gguf")
    check("init 256", run("init", "--arch", "llama", "--layers", "2", "--dim", "256", "--ffn", "256",
                          "--experts", "8", "--experts-used", "2", "--heads", "4", "--kv-heads", "2",
                          "--vocab", "300", "-o", big).returncode == 0)
    q = os.path.join(d, "q.gguf")
    p = run("quantize", big, q, "--type", "Q4_K_M", "--threads", "2")
    check("quantize Q4_K_M", p.returncode == 0 and "blk.1.ffn_down_exps.weight" in p.stderr
          and "bits per weight" in p.stderr, p.stderr[-300:])
    qi = json.loads(run("inspect", q, "--json").stdout)
    by_name = {t["name"]: t["type"] for t in qi["tensors"]}
    # Mixtral's rules: q8_0 attention V and K (8 experts), q5_K attention output, q6_K output
    # and the last layer's ffn_down, f32 norms and router.
    check("quantize Q4_K_M types", (by_name["blk.0.attn_v.weight"], by_name["blk.0.attn_k.weight"],
                                    by_name["blk.0.attn_output.weight"], by_name["output.weight"],
                                    by_name["blk.1.ffn_down_exps.weight"], by_name["blk.0.ffn_up_exps.weight"],
                                    by_name["blk.0.ffn_gate_inp.weight"], by_name["blk.0.attn_norm.weight"])
          == ("q8_0", "q8_0", "q5_K", "q6_K", "q6_K", "q4_K", "f32", "f32"), str(by_name))
    check("inspect type mix", qi["file_type"] == 15 and set(qi["types"]) == {"f32", "q4_K", "q5_K", "q6_K", "q8_0"}
          and sum(v["bytes"] for v in qi["types"].values()) == qi["tensor_bytes"]
          and abs(qi["bits_per_weight"] - 8 * qi["tensor_bytes"] / qi["n_params"]) < 1e-9
          and 4.5 < qi["bits_per_weight"] < 6.5, str(qi["types"]))
    out = json.loads(run("run", "-m", q, "--prompt-ids", "1,2,3", "-n", "4", "--json", "--ignore-eos").stdout)
    check("run quantized", len(out["tokens"]) == 4)
    pq = run("quantize", big, os.path.join(d, "pure.gguf"), "--type", "q3_K", "--pure", "-q")
    pi = json.loads(run("inspect", os.path.join(d, "pure.gguf"), "--json").stdout)
    check("quantize --pure", pq.returncode == 0 and set(pi["types"]) == {"f32", "q3_K"}, str(pi.get("types")))
    before = open(q, "rb").read()
    expect_error("quantize unknown type", ["quantize", big, q, "--type", "Q7_K"], 2, "not a quantization type")
    expect_error("quantize ternary mix", ["quantize", big, q, "--type", "TQ1_0"], 2, "cannot write this mix yet")
    expect_error("quantize onto input", ["quantize", q, q, "--type", "Q8_0"], 2, "replace the input")
    expect_error("quantize threads", ["quantize", big, q, "--type", "Q8_0", "--threads", "100000"], 2, "--threads")
    expect_error("quantize missing input", ["quantize", os.path.join(d, "none.gguf"), q, "--type", "Q8_0"], 2, "cannot open")
    # A NaN weight: an error naming the tensor, and the old output survives.
    nan = bytearray(open(big, "rb").read())
    bi = json.loads(run("inspect", big, "--json").stdout)
    up = next(t for t in bi["tensors"] if t["name"] == "blk.1.ffn_up_exps.weight")
    nan[up["offset"] + 4 * 1000: up["offset"] + 4 * 1001] = struct.pack("<f", float("nan"))
    nan_path = os.path.join(d, "nan.gguf")
    open(nan_path, "wb").write(bytes(nan))
    expect_error("quantize NaN weight", ["quantize", nan_path, q, "--type", "Q4_K_M", "-q"], 2,
                 "blk.1.ffn_up_exps.weight")
    check("failed quantize keeps the old output", open(q, "rb").read() == before and not os.path.exists(q + ".tmp"))
    # A tensor in a type moe.cpp does not read: the error names the type and the tensor.
    raw = bytearray(before)
    pos = 24
    def rd(fmt):
        global pos
        v = struct.unpack_from("<" + fmt, raw, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return v
    def skip_value(t):
        global pos
        if t == 8:
            n = rd("Q")
            pos += n
        elif t == 9:
            et, n = rd("I"), rd("Q")
            for _ in range(n):
                skip_value(et)
        else:
            pos += {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}[t]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    for _ in range(n_kv):
        n = rd("Q")
        pos += n
        skip_value(rd("I"))
    while True:
        n = rd("Q")
        name = raw[pos: pos + n].decode()
        pos += n
        nd = rd("I")
        pos += 8 * nd
        if name == "blk.0.attn_q.weight":
            struct.pack_into("<I", raw, pos, 34)  # tq1_0
            break
        pos += 4 + 8
    iq = os.path.join(d, "iq.gguf")
    open(iq, "wb").write(bytes(raw))
    expect_error("run names an unsupported type", ["run", "-m", iq, "--prompt-ids", "1"], 2,
                 "blk.0.attn_q.weight")
    expect_error("run names the type", ["run", "-m", iq, "--prompt-ids", "1"], 2, "tq1_0")

    # A model with a vocabulary: -f, and --chat (a conversation on stdin through the chat
    # template, plain here; each turn's prompt is the whole conversation, its cached whole chunks
    # of 256 reused, and the answer the one a fresh run of that prompt gives).
    words = ("the jury said that the city executive committee which had charge of the election "
             "deserves the praise and thanks of the people for the manner in which it was conducted").split()
    rng = random.Random(4)
    text = os.path.join(d, "text.txt")
    with open(text, "w") as f:
        for _ in range(400):
            f.write(" ".join(rng.choice(words) for _ in range(12)) + ".\n")
    tokfile, vm = os.path.join(d, "tok.gguf"), os.path.join(d, "vocab_model.gguf")
    check("tokenizer for the chat model", run("tokenizer", "train", "--data", text, "--vocab", "300", "-o",
                                              tokfile).returncode == 0)
    check("chat model", run("init", "--arch", "llama", "--layers", "2", "--dim", "64", "--ffn", "64", "--experts", "4",
                            "--experts-used", "2", "--heads", "4", "--tokenizer", tokfile, "--ctx", "1024",
                            "--seed", "3", "-o", vm).returncode == 0)
    prompt_file = os.path.join(d, "prompt.txt")
    with open(prompt_file, "w") as f:
        f.write("the city said that\nthe jury")
    by_file = run("run", "-m", vm, "-f", prompt_file, "-n", "6", "--temp", "0", "--json", "--ignore-eos")
    by_text = run("run", "-m", vm, "-p", "the city said that\nthe jury", "-n", "6", "--temp", "0", "--json",
                  "--ignore-eos")
    check("run -f reads the prompt from a file", by_file.returncode == 0 and
          json.loads(by_file.stdout)["tokens"] == json.loads(by_text.stdout)["tokens"], by_file.stderr[-300:])
    expect_error("run -f a missing file", ["run", "-m", vm, "-f", os.path.join(d, "none.txt")], 2, "prompt file")
    t0 = time.time()
    expect_error("run -f a FIFO", ["run", "-m", vm, "-f", fifo], 2, "not a regular file")
    expect_error("run -f a folder", ["run", "-m", vm, "-f", d], 2, "a directory")
    expect_error("train --data a FIFO", ["train", "-m", vm, "--data", fifo, "--steps", "1", "--out",
                                         os.path.join(d, "fifo_run")], 2, "not a regular file")
    check("FIFO inputs are refused without waiting", time.time() - t0 < 30)
    system = " ".join(rng.choice(words) for _ in range(160))
    chat = subprocess.run([MOE, "run", "-m", vm, "--chat", "--system", system, "-n", "6", "--temp", "0", "--json",
                           "--ignore-eos"], input="what did the jury say\n\nand the city\n", capture_output=True,
                          text=True, timeout=120)
    turns = [json.loads(line) for line in chat.stdout.splitlines()] if chat.returncode == 0 else []
    check("chat: a turn per line (empty lines skipped)", len(turns) == 2 and all(len(t["tokens"]) == 6 for t in turns),
          chat.stderr[-300:])
    if len(turns) == 2:
        first, second = turns
        check("chat: the next turn's prompt extends the conversation", first["prompt_tokens"][:200] ==
              second["prompt_tokens"][:200] and len(first["prompt_tokens"]) > 256, str(len(first["prompt_tokens"])))
        check("chat: the next turn reuses the first prompt's whole chunks",
              first["cached_tokens"] == 0 and second["cached_tokens"] == len(first["prompt_tokens"]) // 256 * 256,
              str((first["cached_tokens"], second["cached_tokens"])))
        fresh = run("run", "-m", vm, "--prompt-ids", ",".join(map(str, second["prompt_tokens"])), "-n", "6", "--temp",
                    "0", "--json", "--ignore-eos")
        check("chat: a turn's answer is a fresh run's", fresh.returncode == 0 and
              json.loads(fresh.stdout)["tokens"] == second["tokens"], fresh.stderr[-300:])
    # moe serve --no-prompt-cache: a conversation's next turn evaluates its whole prompt.
    srv = subprocess.Popen([MOE, "serve", "-m", vm, "--port", "0", "--no-prompt-cache", "--chunk", "16"],
                           stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in srv.stderr:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        cached = []
        base = list(range(1, 41))  # with chunks of 16, the second request could reuse 32 of these
        for prompt in (base, base + [5]):
            req = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port, json.dumps(
                {"prompt": prompt, "max_tokens": 1}).encode(), {"Content-Type": "application/json"})
            cached.append(json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]["prompt_tokens_details"]
                          ["cached_tokens"])
        check("serve --no-prompt-cache reuses nothing", cached == [0, 0], str(cached))
    finally:
        srv.terminate()
        srv.wait()
    # Past the context the oldest exchanges leave the conversation; a message alone too long fails.
    lines = "".join(" ".join(rng.choice(words) for _ in range(5)) + "\n" for _ in range(6))
    small = subprocess.run([MOE, "run", "-m", vm, "--chat", "-n", "6", "--temp", "0", "--json", "--ignore-eos", "--ctx",
                            "64"], input=lines, capture_output=True, text=True, timeout=120)
    small_turns = [json.loads(line) for line in small.stdout.splitlines()] if small.returncode == 0 else []
    check("chat: the oldest exchanges leave a full context", len(small_turns) == 6 and
          all(len(t["prompt_tokens"]) + 6 <= 64 for t in small_turns) and "left the conversation" in small.stderr,
          small.stderr[-300:])
    too_long = subprocess.run([MOE, "run", "-m", vm, "--chat", "-n", "6", "--ctx", "64"],
                              input=" ".join(rng.choice(words) for _ in range(80)) + "\n", capture_output=True,
                              text=True, timeout=120)
    check("chat: a message longer than the context fails", too_long.returncode == 2 and
          "do not fit the context of 64 tokens" in too_long.stderr, too_long.stderr[-300:])
    expect_error("chat needs a vocabulary", ["run", "-m", m, "--chat"], 2, "needs a model with a vocabulary")
    expect_error("--system needs --chat", ["run", "-m", vm, "-p", "a", "--system", "b"], 1, "--chat")

print("%d passed, %d failed" % (passed, len(failures)))
sys.exit(1 if failures else 0)
