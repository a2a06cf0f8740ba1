#!/usr/bin/env python3
"""Writes src/tensor/iq_tables.h: the codebooks ("grids") of ggml's i-quant types, format facts
read from ggml-common.h of the llama.cpp source that node-llama-cpp bundles
(third_party/npm/node_modules/node-llama-cpp/llama/gitRelease.bundle, a git bundle).

  scripts/gen_iq_tables.py [--ggml-common PATH] [-o src/tensor/iq_tables.h]

Without --ggml-common the bundle is cloned into a temporary folder. The output is committed:
the build does not depend on npm.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = [  # (ggml name, our name, C type)
    ("iq2xxs_grid", "kIQ2XXSGrid", "uint64_t"),
    ("iq2xs_grid", "kIQ2XSGrid", "uint64_t"),
    ("iq2s_grid", "kIQ2SGrid", "uint64_t"),
    ("iq3xxs_grid", "kIQ3XXSGrid", "uint32_t"),
    ("iq3s_grid", "kIQ3SGrid", "uint32_t"),
    ("iq1s_grid", "kIQ1SGrid", "uint64_t"),
]


def read_tables(text):
    out = {}
    for m in re.finditer(r"GGML_TABLE_BEGIN\((\w+),\s*(\w+),\s*(\w+)\)(.*?)GGML_TABLE_END\(\)", text, re.S):
        ctype, name, _, body = m.groups()
        if name in out:  # the first definition (the CPU one; later ones are GPU variants)
            continue
        vals = [v for v in re.split(r"[\s,]+", body.strip()) if v]
        out[name] = (ctype, vals)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ggml-common")
    ap.add_argument("-o", default=os.path.join(ROOT, "src", "tensor", "iq_tables.h"))
    a = ap.parse_args()
    path = a.ggml_common
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        bundle = os.path.join(ROOT, "third_party", "npm", "node_modules", "node-llama-cpp", "llama",
                              "gitRelease.bundle")
        subprocess.run(["git", "clone", "-q", bundle, os.path.join(tmp.name, "src")], check=True)
        path = os.path.join(tmp.name, "src", "ggml", "src", "ggml-common.h")
    tables = read_tables(open(path).read())
    lines = ["// The codebooks of ggml's i-quant types (format facts from ggml-common.h), written by",
             "// scripts/gen_iq_tables.py. Each entry packs one group of quant magnitudes, one byte per",
             "// element (iq2/iq1 grids: 8 elements, iq3 grids: 4), lowest element in the lowest byte.",
             "#pragma once", "", "#include <cstdint>", "", "namespace moe {", ""]
    for gname, name, ctype in TABLES:
        t, vals = tables[gname]
        if t != ctype:
            sys.exit(f"{gname}: type {t}, expected {ctype}")
        lines.append(f"inline constexpr {ctype} {name}[{len(vals)}] = {{")
        per = 4 if ctype == "uint64_t" else 8
        for i in range(0, len(vals), per):
            lines.append("    " + ", ".join(vals[i:i + per]) + ",")
        lines.append("};")
        lines.append("")
    lines.append("}  // namespace moe")
    open(a.o, "w").write("\n".join(lines) + "\n")
    print(f"wrote {a.o}: " + ", ".join(f"{n}[{len(tables[g][1])}]" for g, n, _ in TABLES))


if __name__ == "__main__":
    main()
