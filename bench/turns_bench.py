#!/usr/bin/env python3
"""`moe serve` on a conversation: time to first token of each turn with the cached prompt prefix
reused, against the same request evaluating its whole prompt (`cache_prompt: false`).

A conversation of --turns requests: the first prompt is --system random token ids (a system
prompt and a first question), and each later prompt is the one before plus --append new ids (the
answer and the next question). Each turn is sent twice, alternating which goes first: once with
cache_prompt true (the server finds the previous turn's whole prompt chunks in a cache and
evaluates the rest) and once false (the whole prompt). Both must give the same tokens and
log-probabilities (the server's batch invariance; checked here on every pair). Per turn: the
prompt length, the tokens reused and the medians of --rounds conversations' TTFT. Results go to
the top of bench/RESULTS.md with the command and the machine.

  turns_bench.py --moe build/bin/moe [--model FILE] [--system 1024] [--append 96] [--turns 6]
                 [--max-tokens 16] [--rounds 3] [-t 2] [--chunk 64]
"""
import argparse
import datetime
import http.client
import os
import platform
import random
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stream(port, body):
    """One streaming completion: (ttft seconds, [(token text, logprob)])."""
    t0 = time.perf_counter()
    ttft, tokens = None, []
    for t, c, _ in benchutil.stream_chunks(port, body):
        ttft = ttft if ttft is not None else t - t0
        tokens += list(zip(c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"]))
    return ttft, tokens


def cached_total(port):
    """The server's count of reused prompt tokens (/metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return int(re.search(r"^moe_prompt_tokens_cached_total (\d+)$", text, re.M).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", required=True)
    ap.add_argument("--model", default=os.path.join(ROOT, "build", "bench", "medium-q4_0.gguf"))
    ap.add_argument("--system", type=int, default=1024, help="prompt tokens of the first turn")
    ap.add_argument("--append", type=int, default=96, help="tokens each later turn adds")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    a = ap.parse_args()
    if not os.path.exists(a.model):
        raise SystemExit(f"{a.model} is missing: bench/compare.py writes the medium models (or give --model)")
    vocab = benchutil.model_vocab(a.moe, a.model)
    ctx = a.system + (a.turns - 1) * a.append + a.max_tokens + 8
    srv, port = benchutil.start_server(a.moe, "-m", a.model, "--parallel", "4", "--ctx-size", str(ctx), "-t", str(a.t),
                                       "--chunk", str(a.chunk))
    rng = random.Random(1)
    ttft = {True: [[] for _ in range(a.turns)], False: [[] for _ in range(a.turns)]}
    reused = [[] for _ in range(a.turns)]
    lengths = []
    try:
        stream(port, {"prompt": [rng.randrange(vocab) for _ in range(32)], "max_tokens": 4, "stream": True,
                      "logprobs": 1})  # warm-up
        for r in range(a.rounds):
            prompt = [rng.randrange(vocab) for _ in range(a.system)]
            for turn in range(a.turns):
                if turn:
                    prompt = prompt + [rng.randrange(vocab) for _ in range(a.append)]
                if r == 0:
                    lengths.append(len(prompt))
                body = {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0.8, "seed": 7 + turn,
                        "stream": True, "logprobs": 1, "ignore_eos": True}
                got = {}
                for reuse in ((True, False) if (r + turn) % 2 == 0 else (False, True)):
                    before = cached_total(port)
                    t, tokens = stream(port, dict(body, cache_prompt=reuse))
                    got[reuse] = tokens
                    ttft[reuse][turn].append(t)
                    if reuse:
                        reused[turn].append(cached_total(port) - before)
                if got[True] != got[False]:
                    raise SystemExit(f"round {r} turn {turn}: the reused prefix changed the result")
                print(f"round {r} turn {turn}: {len(prompt)} prompt tokens, {reused[turn][-1]} reused; TTFT "
                      f"{ttft[True][turn][-1] * 1e3:.0f} ms reused, {ttft[False][turn][-1] * 1e3:.0f} ms whole",
                      flush=True)
    finally:
        srv.terminate()
        srv.wait()
    date = datetime.date.today().isoformat()
    cmd = (f"bench/turns_bench.py --model {os.path.relpath(a.model, ROOT)} --system {a.system} --append {a.append} "
           f"--turns {a.turns} --max-tokens {a.max_tokens} --rounds {a.rounds} -t {a.t} --chunk {a.chunk}")
    lines = [f"## Serving: a conversation's turns with the prompt prefix reused ({date})", "",
             f"Machine: {benchutil.cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}. "
             f"Command: `{cmd}`. `moe serve --parallel 4 --chunk {a.chunk}` on {a.t} threads, one client. A "
             f"conversation of {a.turns} turns: the first prompt {a.system} random token ids, each later one the "
             f"one before and {a.append} more; each turn sent twice, alternating the order, with `cache_prompt` "
             "true (the previous turn's whole prompt chunks found in a cache) and false (the whole prompt "
             f"evaluated), {a.max_tokens} tokens at temperature 0.8 with a seed; the two answers were the same "
             f"tokens and log-probabilities every time. TTFT medians of {a.rounds} conversations.", "",
             "| turn | prompt tokens | reused | TTFT reused ms | TTFT whole prompt ms | speed-up |",
             "|---|---|---|---|---|---|"]
    for turn in range(a.turns):
        on, off = statistics.median(ttft[True][turn]), statistics.median(ttft[False][turn])
        lines.append(f"| {turn + 1} | {lengths[turn]} | {statistics.median(reused[turn]):.0f} | {on * 1e3:.0f} | "
                     f"{off * 1e3:.0f} | {off / on:.2f}x |")
    section = "\n".join(lines) + "\n"
    print(section)
    benchutil.write_section(a.out, section)


if __name__ == "__main__":
    main()
