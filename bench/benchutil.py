"""Helpers shared by the bench/ comparison scripts."""
import http.client
import json
import os
import platform
import re
import subprocess
import threading
import time


def cpu_name():
    """The CPU's model name, for the machine line of bench/RESULTS.md, with its family and model
    numbers where the name alone does not tell the core (a VM's "AMD EPYC" has been Zen 4 and
    Zen 5 hosts: family 25 and 26, whose vector units differ by 2x per cycle)."""
    name, fam, model = None, None, None
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and name is None:
                name = value
            elif key == "cpu family" and fam is None:
                fam = value
            elif key == "model" and model is None:
                model = value
    except OSError:
        pass
    if not name:
        return platform.processor()
    return f"{name} (family {fam}, model {model})" if fam and model else name


RESULTS_HEADER = "# Benchmark results\n\nEach section is one run of the command it names; newest first.\n\n"


def write_section(path, text):
    """Puts text at the top of bench/RESULTS.md, under its header (newest first)."""
    old = ""
    if os.path.exists(path):
        old = open(path).read()
        old = old[len(RESULTS_HEADER):] if old.startswith(RESULTS_HEADER) else old
    with open(path, "w") as f:
        f.write(RESULTS_HEADER + text + "\n" + old)


def run_json(cmd, what):
    """Runs cmd; its last output line, parsed as JSON. Exits with a clear message on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr.strip()[-2000:]}")
    lines = p.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"{what}: the last output line is not JSON: {' '.join(cmd)}\n{p.stdout[-2000:]}")


def start_server(moe, *args):
    """Starts `moe serve --port 0 ARGS`; returns (process, port) once it listens, its stderr drained
    in the background. Exits with a message when it does not start."""
    srv = subprocess.Popen([moe, "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True)
    port = None
    for line in srv.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        raise SystemExit("moe serve did not start")
    threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
    return srv, port


def model_vocab(moe, model):
    """The model's vocabulary size (`moe inspect --json`)."""
    info = json.loads(subprocess.run([moe, "inspect", model, "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    return info["hparams"]["n_vocab"]


def stream_chunks(port, body):
    """POSTs a streaming /v1/completions request to the server on port; yields (receive time
    (time.perf_counter), the chunk's first choice, its number of tokens) for every chunk that
    carries tokens. A chunk can carry several (text held back until its UTF-8 sequence is whole),
    and the last one can come with the finish_reason: with "logprobs" in the request they are
    counted from the chunk's logprobs, else each chunk without a finish_reason counts as one.
    Exits with a message on a non-200 answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"request failed: {r.status} {r.read()[:300]}")
    for raw in r:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        lp = choice.get("logprobs")
        n = len(lp["tokens"]) if lp else int(choice.get("finish_reason") is None)
        if n:
            yield time.perf_counter(), choice, n
    conn.close()
