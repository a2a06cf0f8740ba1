#!/usr/bin/python3
"""Conformance of the moe CLI against llama.cpp (tests/conformance/oracle.mjs).

For every case: `moe init` writes a random model, then `moe run --json` and
llama.cpp (node-llama-cpp, F32 KV cache, no flash attention) evaluate the same
token ids on the same file.

  exact   F32 files: greedy tokens identical for 32 steps from 3 prompts (1, 8
          and 20 ids), top-5 log-probabilities within 1e-3 at every generated
          position, and teacher-forced top-5 within 1e-3 at every position of
          the 20-id prompt.
  close   F16/BF16 files: teacher-forced top-5 within the case's tolerance
          (llama.cpp rounds activations to the weight type before products);
          and F16 KV caches on both sides (cache="f16": moe run --cache-type f16).
  quant   quantized files (every weight type, and files that `moe quantize`
          wrote in llama.cpp's mixes): teacher-forced top-5 within 0.1 nats at
          every position of 2 prompts (12 and 40 ids).
  margin  quantized files with planted margins (--plant-margin, --embd-scale):
          greedy tokens identical for all 24 steps, from 3 prompts.

Top-5 lists are compared by token id; an id that is in one engine's top 5 but
not the other's must lie within the tolerance of the other's 5th value (a near
tie at the cut-off), else the difference counts. A greedy split is forgiven
only at a near tie (llama.cpp's top-2 margin < 1e-4 in exact cases); the
comparison stops there. Likewise a teacher-forced prompt whose first position
over tol is one where moe's routing came within 1e-5 of a tie (moe run
--teacher-forcing's routing_margin) is compared up to that position.

  run_conformance.py [--moe PATH] [--only NAME] [--list] [--keep DIR] [-v]
                     [--random N [--random-seed S]]

--random N draws N cases nobody listed (architecture, shape, router options, weight type or
llama.cpp mix, prompts of 1 to 300 ids, moe's thread count) from seed S and runs them with the
same checks; quantized ones allow the rounding drift that long prompts show (teacher_verdict).
It is a search for bugs outside the listed shapes, not part of `make test`.
The moe binary: --moe, else the first positional argument, else $MOE_CLI.
Prints one line per case (PASS/FAIL, the max difference) and ends with
"N passed, M failed"; exits 1 on any failure.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ORACLE = os.path.join(HERE, "oracle.mjs")
THREADS = 2
TOP_N = 5
EXACT_TOL = 1e-3
QUANT_TOL = 0.1
NEAR_TIE = 1e-4
# A routing choice this near a tie (moe's routing_margin: the gap between a chosen and an
# unchosen expert's selection score, in probability units) can go either way by float rounding:
# the engines' router probabilities differ by about 1e-7 on F32 files.
NEAR_ROUTE_TIE = 1e-5
LOG_FLT_MIN = -87.33654  # ln of the smallest normal float32


def case(name, kind, tol=None, prompts=None, steps=None, need=None, mix=None, cache=None, **init):
    defaults = {
        "exact": (EXACT_TOL, (1, 8, 20), 32, 32),
        "close": (None, (8, 24), 0, 0),
        "quant": (QUANT_TOL, (12, 40), 0, 0),
        "margin": (None, (1, 5, 17), 24, 24),
        "text": (EXACT_TOL, (), 32, 32),
    }[kind]
    return dict(name=name, kind=kind, tol=tol if tol is not None else defaults[0],
                prompts=prompts or defaults[1], steps=steps if steps is not None else defaults[2],
                need=need if need is not None else defaults[3], mix=mix, cache=cache, init=init)


# Shapes: odd widths (72, 96, 104) where head sizes allow; 3+ layers; 4-8
# experts, k = 1..3; GQA and MQA (olmoe's {dim} k-norm rules GQA out in
# llama.cpp); qwen2moe with and without --shared-ffn; qwen3moe with head_dim
# != dim/heads. Quantized rows must be multiples of 32 (q8_0, q4_0, q4_1, q5_0,
# q5_1) or 256 (k-quants), ffn_down's row included, hence dim 256 / ffn 512 for
# the k-quants.
CASES = [
    case("llama_72_gqa", "exact", arch="llama", layers=3, dim=72, ffn=104, experts=4,
         experts_used=2, heads=6, kv_heads=2, vocab=256, seed=101),
    case("llama_96_k1", "exact", arch="llama", layers=3, dim=96, ffn=64, experts=8,
         experts_used=1, heads=8, kv_heads=2, vocab=320, seed=102),
    case("llama_128_k3_mqa", "exact", arch="llama", layers=4, dim=128, ffn=96, experts=6,
         experts_used=3, heads=4, kv_heads=1, vocab=512, seed=103),
    case("qwen2moe_96_shared", "exact", arch="qwen2moe", layers=3, dim=96, ffn=48, experts=6,
         experts_used=2, shared_ffn=160, heads=6, kv_heads=2, vocab=300, seed=201),
    case("qwen2moe_64_k3", "exact", arch="qwen2moe", layers=3, dim=64, ffn=32, experts=8,
         experts_used=3, heads=4, kv_heads=4, vocab=256, seed=202),
    case("olmoe_96", "exact", arch="olmoe", layers=3, dim=96, ffn=64, experts=8,
         experts_used=2, heads=6, vocab=256, seed=301),
    case("olmoe_72_k1", "exact", arch="olmoe", layers=3, dim=72, ffn=48, experts=4,
         experts_used=1, heads=4, vocab=200, seed=302),
    case("qwen3moe_96_hd32", "exact", arch="qwen3moe", layers=3, dim=96, ffn=48, experts=8,
         experts_used=2, heads=4, kv_heads=2, head_dim=32, vocab=256, seed=401),
    case("qwen3moe_64_k3_hd16", "exact", arch="qwen3moe", layers=3, dim=64, ffn=40, experts=6,
         experts_used=3, heads=8, kv_heads=2, head_dim=16, vocab=512, seed=402),
    case("qwen3moe_128_k1", "exact", arch="qwen3moe", layers=3, dim=128, ffn=64, experts=4,
         experts_used=1, heads=4, kv_heads=4, vocab=256, seed=403),
    # deepseek2: V2-style (softmax, plain attn_q, a leading dense block, 2 shared experts) and
    # V3-style (sigmoid + selection bias + 4 groups of which 2 compete, normalised and scaled
    # weights, the q_lora bottleneck) multi-head latent attention. Their third prompts are long
    # enough for moe.cpp's expanded form (a chunk of 32 or more tokens over f32 attn_k_b /
    # attn_v_b; Forward::MlaForm), which decode then continues in the absorbed one.
    case("deepseek2_v2", "exact", prompts=(1, 8, 72), arch="deepseek2", layers=3, dim=128, ffn=64, experts=8,
         experts_used=2, heads=4, qk_nope=32, qk_rope=16, v_head_dim=32, kv_lora_rank=64,
         leading_dense=1, shared_experts=2, vocab=512, seed=601),
    case("deepseek2_v3", "exact", prompts=(1, 8, 48), arch="deepseek2", layers=3, dim=96, ffn=48, experts=8,
         experts_used=3, heads=6, qk_nope=16, qk_rope=8, v_head_dim=24, kv_lora_rank=40,
         q_lora_rank=48, leading_dense=1, shared_experts=1, gating="sigmoid", weights_norm=True,
         n_group=4, topk_group=2, weights_scale=2.5, vocab=384, seed=602),
    # The pre-split layout (one attn_kv_b; llama.cpp runs it as plain multi-head attention,
    # moe.cpp from the same latent cache), and YaRN as DeepSeek-V2 files carry it (a 4x
    # extension of a 32-token context, mscale_all_dim 0.707), so the ramp bends the low
    # frequencies within the test's positions; qwen3moe with YaRN and llama with linear scaling.
    case("deepseek2_legacy_kv_b", "exact", arch="deepseek2", layers=2, dim=64, ffn=48, experts=6,
         experts_used=2, heads=4, qk_nope=16, qk_rope=8, v_head_dim=16, kv_lora_rank=32,
         shared_experts=1, mla_legacy=True, vocab=256, seed=603),
    case("deepseek2_yarn", "exact", arch="deepseek2", layers=2, dim=96, ffn=64, experts=8,
         experts_used=2, heads=4, qk_nope=24, qk_rope=16, v_head_dim=24, kv_lora_rank=48,
         leading_dense=1, shared_experts=2, rope_scaling="yarn", rope_scale=4, rope_orig_ctx=32,
         yarn_log_mul=0.0707, vocab=256, seed=604),
    case("qwen3moe_yarn", "exact", arch="qwen3moe", layers=2, dim=64, ffn=48, experts=4,
         experts_used=2, heads=4, kv_heads=2, head_dim=32, rope_scaling="yarn", rope_scale=8,
         rope_orig_ctx=16, vocab=256, seed=404),
    case("llama_linear_rope", "exact", arch="llama", layers=2, dim=64, ffn=48, experts=4,
         experts_used=2, heads=4, kv_heads=2, rope_scaling="linear", rope_scale=3, vocab=256,
         seed=104),
    case("llama_f16", "close", tol=0.03, arch="llama", layers=3, dim=96, ffn=64, experts=4,
         experts_used=2, heads=4, kv_heads=2, vocab=256, type="f16", seed=501),
    # F16 KV caches (moe run --cache-type f16) against llama.cpp's default F16 cache. moe rounds
    # keys and values to half precision as it stores them and computes in F32; llama.cpp also
    # rounds the queries and the probabilities to half precision. Measured: at most 9e-4 on
    # these two files. The V3-routed file with seed 604 had one position 0.28 nats apart: a
    # routing choice there was closer to a tie than that rounding difference. So these cases
    # hold for these files, not for every seed.
    case("llama_kv_f16", "close", tol=5e-3, prompts=(8, 40, 100), cache="f16", arch="llama", layers=3,
         dim=96, ffn=64, experts=4, experts_used=2, heads=4, kv_heads=2, vocab=256, seed=503),
    case("deepseek2_kv_f16", "close", tol=5e-3, prompts=(8, 40, 100), cache="f16", arch="deepseek2",
         layers=3, dim=96, ffn=48, experts=8, experts_used=3, heads=6, qk_nope=16, qk_rope=8, v_head_dim=24,
         kv_lora_rank=40, q_lora_rank=48, leading_dense=1, shared_experts=1, gating="sigmoid",
         weights_norm=True, n_group=4, topk_group=2, weights_scale=2.5, vocab=384, seed=602),
    case("qwen3moe_bf16", "close", tol=0.15, arch="qwen3moe", layers=3, dim=64, ffn=64,
         experts=4, experts_used=2, heads=4, kv_heads=2, head_dim=32, vocab=256, type="bf16",
         seed=502),
    case("llama_q8_0", "quant", arch="llama", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="q8_0", seed=601),
    case("qwen2moe_q4_0", "quant", arch="qwen2moe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, shared_ffn=256, heads=4, kv_heads=2, vocab=512, type="q4_0", seed=602),
    case("qwen3moe_q4_K", "quant", arch="qwen3moe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, type="q4_K", seed=603),
    case("olmoe_q6_K", "quant", arch="olmoe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, vocab=512, type="q6_K", seed=604),
    case("llama_q5_K", "quant", arch="llama", layers=2, dim=256, ffn=512, experts=8,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="q5_K", seed=605),
    case("qwen2moe_q3_K", "quant", arch="qwen2moe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, shared_ffn=256, heads=4, kv_heads=2, vocab=512, type="q3_K", seed=608),
    case("olmoe_q2_K", "quant", arch="olmoe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, vocab=512, type="q2_K", seed=609),
    case("qwen3moe_iq4_xs", "quant", arch="qwen3moe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, type="iq4_xs", seed=614),
    case("llama_iq4_nl", "quant", arch="llama", layers=2, dim=96, ffn=160, experts=6,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="iq4_nl", seed=615),
    case("llama_iq2_xxs", "quant", arch="llama", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="iq2_xxs", seed=619),
    case("olmoe_iq2_xs", "quant", arch="olmoe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, vocab=512, type="iq2_xs", seed=625),
    case("qwen3moe_iq2_s", "quant", arch="qwen3moe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, type="iq2_s", seed=626),
    case("llama_iq1_s", "quant", arch="llama", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="iq1_s", seed=628),
    case("olmoe_iq1_m", "quant", arch="olmoe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, vocab=512, type="iq1_m", seed=630),
    case("qwen2moe_iq3_xxs", "quant", arch="qwen2moe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, shared_ffn=256, heads=4, kv_heads=2, vocab=512, type="iq3_xxs", seed=620),
    case("qwen3moe_iq3_s", "quant", arch="qwen3moe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, type="iq3_s", seed=621),
    case("olmoe_mxfp4", "quant", arch="olmoe", layers=2, dim=128, ffn=96, experts=4,
         experts_used=2, heads=4, vocab=512, type="mxfp4", seed=617),
    # Files written by moe quantize in llama.cpp's mixes (several types per file: the 8-expert
    # rule's q8_0 attention V/K and q5_K output, q6_K ffn_down / output, fallback q5_0 rows).
    case("llama_mix_Q4_K_M", "quant", arch="llama", layers=3, dim=256, ffn=256, experts=8,
         experts_used=2, heads=4, kv_heads=2, vocab=512, seed=610, mix="Q4_K_M"),
    case("deepseek2_q8_0", "quant", arch="deepseek2", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, qk_nope=64, qk_rope=32, v_head_dim=64, kv_lora_rank=128,
         q_lora_rank=128, leading_dense=1, shared_experts=1, vocab=512, type="q8_0", seed=612),
    case("deepseek2_mix_Q4_K_M", "quant", arch="deepseek2", layers=3, dim=256, ffn=256, experts=8,
         experts_used=2, heads=4, qk_nope=64, qk_rope=32, v_head_dim=64, kv_lora_rank=256,
         leading_dense=1, shared_experts=2, vocab=512, seed=613, mix="Q4_K_M"),
    case("qwen2moe_mix_Q3_K_M", "quant", arch="qwen2moe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, shared_ffn=512, heads=8, kv_heads=2, vocab=512, seed=611, mix="Q3_K_M"),
    case("qwen3moe_mix_Q5_K_M_ffn160", "quant", arch="qwen3moe", layers=2, dim=256, ffn=160,
         experts=6, experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, seed=612,
         mix="Q5_K_M"),
    case("qwen2moe_mix_IQ4_XS_ffn160", "quant", arch="qwen2moe", layers=2, dim=256, ffn=160,
         experts=4, experts_used=2, shared_ffn=256, heads=8, kv_heads=2, vocab=512, seed=616,
         mix="IQ4_XS"),
    case("qwen3moe_mix_MXFP4_MOE", "quant", arch="qwen3moe", layers=2, dim=256, ffn=256,
         experts=8, experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, seed=618,
         mix="MXFP4_MOE"),
    # (seed 625: seed 624's file put a layer-0 attention output within 6e-7 of a q8_K rounding
    # step of attn_output's activations, so the float summation order of attn_k/attn_v, which
    # differs between any two kernels, moved one quant and, through the KV cache and a routing
    # choice, a later position by 0.27 nats: llama.cpp agreed with one order of moe's q4_K
    # products and not with the other.)
    case("llama_mix_IQ2_XXS", "quant", arch="llama", layers=2, dim=256, ffn=256, experts=8,
         experts_used=2, heads=4, kv_heads=2, vocab=512, seed=625, mix="IQ2_XXS"),
    case("qwen2moe_mix_IQ3_M_ffn160", "quant", arch="qwen2moe", layers=2, dim=256, ffn=160,
         experts=4, experts_used=2, shared_ffn=256, heads=8, kv_heads=2, vocab=512, seed=623,
         mix="IQ3_M"),
    case("olmoe_mix_IQ2_M", "quant", arch="olmoe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, vocab=512, seed=627, mix="IQ2_M"),
    case("qwen3moe_mix_IQ1_S", "quant", arch="qwen3moe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, seed=629, mix="IQ1_S"),
    case("llama_mix_IQ1_M", "quant", arch="llama", layers=2, dim=256, ffn=256, experts=8,
         experts_used=2, heads=4, kv_heads=2, vocab=512, seed=631, mix="IQ1_M"),
    case("qwen2moe_mix_IQ3_XXS", "quant", arch="qwen2moe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, shared_ffn=256, heads=4, kv_heads=2, vocab=512, seed=632, mix="IQ3_XXS"),
    case("qwen3moe_mix_IQ3_XS", "quant", arch="qwen3moe", layers=8, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, seed=633, mix="IQ3_XS"),
    case("olmoe_mix_Q2_K", "quant", arch="olmoe", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, vocab=512, seed=613, mix="Q2_K"),
    # Block-32 types on widths that are not multiples of 256 (as llama.cpp's fallback writes).
    case("olmoe_q4_1", "quant", arch="olmoe", layers=2, dim=128, ffn=96, experts=4,
         experts_used=2, heads=4, vocab=512, type="q4_1", seed=606),
    case("qwen3moe_q5_0", "quant", arch="qwen3moe", layers=2, dim=96, ffn=160, experts=6,
         experts_used=2, heads=4, kv_heads=2, head_dim=32, vocab=512, type="q5_0", seed=607),
    case("llama_q5_1_margin", "margin", arch="llama", layers=2, dim=160, ffn=96, experts=4,
         experts_used=2, heads=5, kv_heads=1, vocab=512, type="q5_1", plant_margin=30.0,
         embd_scale=4.0, seed=706),
    case("llama_q4_K_margin", "margin", arch="llama", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="q4_K", plant_margin=30.0, embd_scale=4.0, seed=701),
    case("qwen2moe_q8_0_margin", "margin", arch="qwen2moe", layers=2, dim=256, ffn=512,
         experts=4, experts_used=2, shared_ffn=256, heads=4, kv_heads=2, vocab=512, type="q8_0",
         plant_margin=30.0, embd_scale=4.0, seed=702),
    case("qwen3moe_q6_K_margin", "margin", arch="qwen3moe", layers=2, dim=256, ffn=512,
         experts=4, experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, type="q6_K",
         plant_margin=30.0, embd_scale=4.0, seed=703),
    case("qwen2moe_q5_K_margin", "margin", arch="qwen2moe", layers=2, dim=256, ffn=512,
         experts=4, experts_used=2, shared_ffn=256, heads=4, kv_heads=2, vocab=512, type="q5_K",
         plant_margin=30.0, embd_scale=4.0, seed=705),
    case("llama_q3_K_margin", "margin", arch="llama", layers=2, dim=256, ffn=512, experts=8,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="q3_K", plant_margin=30.0,
         embd_scale=4.0, seed=707),
    case("qwen3moe_q2_K_margin", "margin", arch="qwen3moe", layers=2, dim=256, ffn=512,
         experts=4, experts_used=2, heads=4, kv_heads=2, head_dim=64, vocab=512, type="q2_K",
         plant_margin=30.0, embd_scale=4.0, seed=708),
    case("olmoe_iq4_xs_margin", "margin", arch="olmoe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, vocab=512, type="iq4_xs", plant_margin=30.0, embd_scale=4.0,
         seed=709),
    case("llama_iq3_xxs_margin", "margin", arch="llama", layers=2, dim=256, ffn=256, experts=4,
         experts_used=2, heads=4, kv_heads=2, vocab=512, type="iq3_xxs", plant_margin=30.0,
         embd_scale=4.0, seed=710),
    case("olmoe_q4_0_margin", "margin", arch="olmoe", layers=2, dim=256, ffn=512, experts=4,
         experts_used=2, heads=4, vocab=512, type="q4_0", plant_margin=30.0, embd_scale=4.0, seed=704),
    # Text prompts through trained vocabularies: moe's tokenization must give llama.cpp's ids,
    # then greedy decoding from them must agree as for the id-only models.
    case("qwen2moe_text_bpe", "text", arch="qwen2moe", layers=3, dim=96, ffn=64, experts=6,
         experts_used=2, shared_ffn=64, heads=4, kv_heads=2, seed=801, tokenizer="bpe_qwen2"),
    case("llama_text_spm", "text", arch="llama", layers=3, dim=64, ffn=96, experts=4,
         experts_used=2, heads=4, kv_heads=2, seed=802, tokenizer="spm"),
]

# --random N: cases nobody wrote down. Shapes, routers, weight types, prompt lengths (up to a
# few hundred ids, so prefill takes the blocked attention path and several chunks) and moe's
# thread count are drawn from --random-seed; each case prints the moe init line that rebuilds it.
BLOCK32 = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
BLOCK256 = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s")
MIXES = ("Q4_K_M", "Q5_K_M", "Q3_K_M", "Q6_K", "IQ4_XS", "Q2_K")


def random_case(rng, i):
    pick = lambda xs: xs[int(rng.integers(len(xs)))]
    arch = pick(("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2"))
    kind = pick(("exact", "exact", "quant", "quant"))
    wtype, mix = "f32", None
    if kind == "quant":
        r = rng.random()
        wtype = pick(BLOCK32) if r < 0.4 else (pick(BLOCK256) if r < 0.75 else "f32")
        if wtype == "f32":
            mix = pick(MIXES)
        if arch == "deepseek2":  # its narrow latent matrices: block-32 types only
            wtype, mix = pick(("q8_0", "q4_0", "q5_0")), None
    # F16 caches on both sides for a quarter of the F32 files: teacher-forced only, within 5e-3
    # (both engines round keys and values, llama.cpp also queries and probabilities), with the
    # drift rule for a routing choice that the rounding tips.
    cache = "f16" if kind == "exact" and rng.random() < 0.25 else None
    unit = 256 if (wtype in BLOCK256 or mix) else (32 if wtype in BLOCK32 else 8)
    dim = int(unit * rng.integers(1, 3)) if unit == 256 else int(unit * rng.integers(max(1, 64 // unit), 192 // unit + 1))
    ffn = int(unit * rng.integers(1, 3)) if unit == 256 else int(unit * rng.integers(max(1, 32 // unit), 160 // unit + 1))
    experts = int(rng.integers(2, 17))
    init = dict(arch=arch, layers=int(rng.integers(1, 5)), dim=dim, ffn=ffn, experts=experts,
                experts_used=int(rng.integers(1, min(4, experts) + 1)),
                vocab=int(rng.integers(200, 1200)), seed=int(rng.integers(1 << 20)))
    if wtype != "f32":
        init["type"] = wtype
    if arch == "deepseek2":
        heads = pick((2, 4, 6))
        nope = pick((32, 64)) if kind == "quant" else pick((16, 24, 32))
        init.update(heads=heads, qk_nope=nope, qk_rope=pick((8, 16, 32)),
                    v_head_dim=pick((32, 64)) if kind == "quant" else pick((16, 24, 32)),
                    kv_lora_rank=pick((64, 128)) if kind == "quant" else pick((32, 48, 64)),
                    leading_dense=int(rng.integers(0, min(2, init["layers"]))),
                    shared_experts=int(rng.integers(0, 3)))
        if rng.random() < 0.5:
            init["q_lora_rank"] = pick((64, 128)) if kind == "quant" else pick((32, 48))
        if rng.random() < 0.5:
            init.update(gating="sigmoid", weights_norm=True, weights_scale=pick((1.0, 2.5)))
            groups = [g for g in (2, 4) if experts % g == 0 and g < experts]
            if groups and rng.random() < 0.6:
                g = pick(groups)
                # every selected expert must fit in the groups that compete
                used = [u for u in range(1, g) if u * (experts // g) >= init["experts_used"]]
                if used:
                    init.update(n_group=g, topk_group=pick(used))
    else:
        head_dim = pick((16, 32, 64)) if kind == "exact" else (64 if unit == 256 else pick((32, 64)))
        if arch == "qwen3moe":
            heads = max(1, pick((2, 4, 8)) if unit != 256 else 256 // head_dim * int(rng.integers(1, 3)))
            init["head_dim"] = head_dim
        else:
            divs = [h for h in range(1, 17) if dim % h == 0 and (dim // h) % 2 == 0 and dim // h >= 8]
            heads = pick(divs)
        kv = [k for k in range(1, heads + 1) if heads % k == 0]
        init["heads"] = heads
        if arch != "olmoe":  # olmoe's {dim} k-norm: no GQA in llama.cpp
            init["kv_heads"] = pick(kv)
        if arch == "qwen2moe" and rng.random() < 0.6:
            init["shared_ffn"] = int(unit * rng.integers(1, 3)) if unit == 256 else pick((32, 64, 96))
        # Tied output: logits spread over ~100 nats, so a rounding flip moves the low top-5
        # entries by more than 0.1 (and F16 rounding of the cache by 1e-2); only F32 files with
        # F32 caches compare those.
        if arch in ("llama", "qwen3moe") and kind == "exact" and not cache and rng.random() < 0.3:
            init["tie_output"] = True
    prompts = (int(rng.integers(1, 4)), int(rng.integers(20, 70)), int(rng.integers(90, 300)))
    if cache:
        kind = "close"
    c = case("random_%d_%s_%s%s" % (i, arch, mix or wtype, "_kv16" if cache else ""), kind, mix=mix,
             cache=cache, **init)
    if cache:
        c["tol"], c["prompts"], c["drift"] = 5e-3, prompts[1:], True
    elif kind == "exact":
        c["prompts"], c["steps"], c["need"] = prompts, 24, 24
    else:
        c["prompts"], c["drift"] = prompts[1:], True
    c["threads"] = int(rng.integers(1, 4))
    return c


TEXT_PROMPTS = ["The experts of a mixture route 1234567 tokens, don't they?",
                "  Caf\u00e9 na\u00efve \u2014 \u4e2d\u6587 and emoji \U0001f642\tend",
                "x"]
_VOCAB_DIR = {}


def vocab_path(tmp, name):
    if "dir" not in _VOCAB_DIR:
        d = os.path.join(tmp, "vocabs")
        run_cmd([sys.executable, os.path.join(HERE, "..", "tokenizer", "make_vocab.py"), d],
                "make_vocab.py", 300)
        _VOCAB_DIR["dir"] = d
    return os.path.join(_VOCAB_DIR["dir"], name + ".gguf")


class CaseError(Exception):
    pass


def run_cmd(argv, what, timeout):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CaseError("%s timed out after %ds" % (what, timeout))
    except OSError as e:
        raise CaseError("%s: cannot run %s: %s" % (what, argv[0], e))
    if p.returncode != 0:
        err = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()
        raise CaseError("%s exited %d: %s" % (what, p.returncode, " | ".join(err[-3:])[:400]))
    return p


def moe_init(moe, c, path):
    argv = [moe, "init"]
    for k, v in c["init"].items():
        argv += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    argv += ["-o", path]
    run_cmd(argv, "moe init", 300)
    return argv


def moe_json(moe, argv, what):
    p = run_cmd([moe] + argv, what, 300)
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise CaseError("%s: stdout is not one JSON object (%s): %r" % (what, e, p.stdout[:200]))


def oracle(jobs_doc):
    p = subprocess.run(["node", ORACLE], input=json.dumps(jobs_doc), capture_output=True,
                       text=True, timeout=600)
    out = None
    if p.stdout.strip():
        try:
            out = json.loads(p.stdout.strip().splitlines()[-1])
        except json.JSONDecodeError:
            pass
    if p.returncode != 0 or out is None or "error" in out:
        msg = (out or {}).get("error") or " | ".join(p.stderr.strip().splitlines()[-3:]) \
            or "exit %d" % p.returncode
        raise CaseError("llama.cpp oracle failed: " + msg[:400])
    return out["results"]


def top_diff(ref, got, tol, where):
    """Max difference of two top-N lists of {id, logprob}, matched by id."""
    if not isinstance(got, list) or not got:
        raise CaseError("%s: moe gave no top logprobs" % where)
    try:
        g = {int(e["id"]): float(e["logprob"]) for e in got}
    except (KeyError, TypeError, ValueError):
        raise CaseError("%s: top logprobs are not {id, logprob} objects: %r" % (where, got[:2]))
    # llama.cpp hands out float probabilities: below the smallest normal float they are
    # denormals (a few significant bits, so ln p is off by up to 0.3 near -103) or 0 (the
    # oracle's -Infinity, null in JSON). Values down there only compare as "below it".
    r = {e["id"]: LOG_FLT_MIN if e["logprob"] is None else max(e["logprob"], LOG_FLT_MIN) for e in ref}
    g = {i: max(v, LOG_FLT_MIN) for i, v in g.items()}
    if len(g) != len(r):
        raise CaseError("%s: moe gave %d top logprobs, llama.cpp %d" % (where, len(g), len(r)))
    worst = 0.0
    for i in r.keys() & g.keys():
        worst = max(worst, abs(r[i] - g[i]))
    # An id missing from one list must lie below that list's cut-off (within tol).
    rmin, gmin = min(r.values()), min(g.values())
    for i in r.keys() - g.keys():
        worst = max(worst, r[i] - gmin)
    for i in g.keys() - r.keys():
        worst = max(worst, g[i] - rmin)
    return worst


def prompt_ids(c):
    rng = np.random.default_rng([c["init"]["seed"], 12345])
    return [rng.integers(0, c["init"]["vocab"], n).tolist() for n in c["prompts"]]


def check_greedy(c, prompts, ref_results, moe, path):
    """Greedy tokens and top-5 logprobs; returns (summary, ok)."""
    worst, same, total, notes, ok, ties = 0.0, 0, 0, [], True, 0
    for pi, (p, ref) in enumerate(zip(prompts, ref_results)):
        what = "moe run (prompt %d)" % pi
        out = moe_json(moe, ["run", "-m", path, "--prompt-ids", ",".join(map(str, p)),
                             "-n", str(c["steps"]), "--temp", "0", "--threads", str(c.get("threads", THREADS)),
                             "--cache-type", c.get("cache") or "f32",
                             "--ignore-eos", "--json", "--top-logprobs", str(TOP_N)], what)
        toks, tops = out.get("tokens"), out.get("top_logprobs")
        if not isinstance(toks, list) or len(toks) != c["steps"]:
            raise CaseError("%s: expected %d tokens, got %r" % (what, c["steps"], toks))
        if not isinstance(tops, list) or len(tops) != len(toks):
            raise CaseError("%s: top_logprobs has %s entries for %d tokens" %
                            (what, len(tops) if isinstance(tops, list) else tops, len(toks)))
        n, tie = 0, False
        for i, (a, b) in enumerate(zip(ref["tokens"], toks)):
            if c["kind"] in ("exact", "text"):
                worst = max(worst, top_diff(ref["top_logprobs"][i], tops[i], c["tol"],
                                            "%s step %d" % (what, i)))
            if a != b:
                lp = [e["logprob"] for e in ref["top_logprobs"][i]]
                margin = lp[0] - lp[1] if len(lp) > 1 else float("inf")
                if c["kind"] in ("exact", "text") and margin < NEAR_TIE:
                    # Float rounding may decide a near tie either way: the split is accepted,
                    # and the count below reports only the tokens that are identical.
                    notes.append("prompt %d: near tie at step %d (margin %.1e)" % (pi, i, margin))
                    tie = True
                    ties += 1
                else:
                    notes.append("prompt %d: tokens split at step %d (llama.cpp %d, moe %d, "
                                 "llama.cpp margin %.3g)" % (pi, i, a, b, margin))
                break
            n += 1
        same += n
        total += c["steps"]
        if n < c["need"] and not tie:
            ok = False
    summary = "tokens %d/%d identical" % (same, total)
    if ties:
        summary += " (%d prompt(s) split at a near tie)" % ties
    if c["kind"] in ("exact", "text"):
        summary += ", max |dlogprob| %.2e" % worst
        ok = ok and worst <= c["tol"]
    return summary, ok, worst, notes


def check_teacher(c, prompts, ref_results, moe, path):
    """Per-position top-5 differences of teacher-forced distributions, and notes. A prompt whose
    first position over tol is one where moe's routing came within NEAR_ROUTE_TIE of a tie
    (routing_margin) is compared up to that position only: float rounding may choose the experts
    either way there, and the other choice stays in the KV cache (the greedy check's near-tie
    rule, for routing). Quantized cases with drift have their own rule (teacher_verdict)."""
    diffs, notes = [], []
    for pi, (p, ref) in enumerate(zip(prompts, ref_results)):
        what = "moe run --teacher-forcing (prompt %d)" % pi
        out = moe_json(moe, ["run", "-m", path, "--prompt-ids", ",".join(map(str, p)),
                             "--teacher-forcing", "--threads", str(c.get("threads", THREADS)), "--json",
                             "--cache-type", c.get("cache") or "f32",
                             "--top-logprobs", str(TOP_N)], what)
        tl = out.get("teacher_logprobs")
        if not isinstance(tl, list) or len(tl) != len(p):
            raise CaseError("%s: teacher_logprobs has %s entries for %d prompt ids" %
                            (what, len(tl) if isinstance(tl, list) else tl, len(p)))
        d = np.array([top_diff(r, g, c["tol"], "%s position %d" % (what, i))
                      for i, (r, g) in enumerate(zip(ref["teacher_logprobs"], tl))])
        if c.get("verbose"):  # where the engines part, and by how much
            first = np.nonzero(d > 1e-4)[0]
            print("  prompt %d (%d ids): first positions over 1e-4: %s" % (
                pi, len(p), ", ".join("%d (%.2g)" % (j, d[j]) for j in first[:6]) or "none"), flush=True)
        margins = out.get("routing_margin")
        over = np.nonzero(d > c["tol"])[0]
        if len(over) and not c.get("drift") and isinstance(margins, list) and len(margins) == len(p):
            j = int(over[0])
            if margins[j] is not None and margins[j] < NEAR_ROUTE_TIE:
                notes.append("prompt %d: routing near tie at position %d (margin %.1e)" % (pi, j, margins[j]))
                d = d[:j]
        diffs.extend(d.tolist())
    return np.array(diffs), notes


def teacher_verdict(c, d):
    """(ok, text): every position within tol, for every kind (quantized files too: moe converts
    activations by llama.cpp's rules, so the listed prompts see no rounding flips).

    Random quantized cases (c["drift"]) have prompts of up to 300 ids. Both engines round the
    same float activations to int8, but the floats differ in the last bit (summation order), and
    a value that close to a rounding boundary rounds the other way: measured on the random
    shapes, one position in 10 to 50 moves by 0.005-0.04 nats that way, and the difference stays
    in the KV cache for the rest of the prompt, where it can later tip a routing choice (up to
    0.75 nats at one position). There a case passes when the median stays under tol / 3 and at
    most 3% of positions exceed tol: a wrong kernel or layout moves nearly every position."""
    if len(d) == 0:  # every prompt cut at its first position (a routing near tie there)
        return True, "teacher: no position before a routing near tie"
    over = int((d > c["tol"]).sum())
    med = float(np.median(d))
    text = "teacher max |dlogprob| %.2e, median %.2e, %d/%d positions over tol" % (
        d.max(), med, over, len(d))
    if c.get("drift"):
        return med <= c["tol"] / 3 and over <= 0.05 * len(d), text + " (drift allowed)"
    return over == 0, text


def run_text_case(moe, c, tmp, path):
    ref_tok = oracle({"model": path, "threads": THREADS,
                      "jobs": [{"mode": "tokenize", "texts": TEXT_PROMPTS}]})[0]
    prompts = []
    for text, ids in zip(TEXT_PROMPTS, ref_tok["tokens"]):
        out = moe_json(moe, ["run", "-m", path, "-p", text, "-n", "0", "--json"], "moe run -p")
        got = out.get("prompt_tokens")
        # llama.cpp's tokenize() adds no BOS; moe run -p adds the vocabulary's BOS when its
        # add_bos flag says so (checked against llama.cpp in tests/tokenizer).
        if got != ids and got[1:] != ids:
            raise CaseError("tokenization of %r differs: moe %s, llama.cpp %s" % (text, got, ids))
        prompts.append(got)
    return prompts


def run_case(moe, c, tmp, verbose):
    path = os.path.join(tmp, c["name"] + ".gguf")
    if c["kind"] == "text":
        c = dict(c, init=dict(c["init"], tokenizer=vocab_path(tmp, c["init"]["tokenizer"])))
        c["init"].pop("vocab", None)
    c = dict(c, verbose=verbose)
    argv = moe_init(moe, c, path)
    if verbose or c["name"].startswith("random_"):
        print("  " + " ".join(argv) + ("  (moe --threads %d)" % c["threads"] if "threads" in c else ""), flush=True)
    if c["mix"]:  # an F32 file rewritten by moe quantize in a llama.cpp mix
        qpath = os.path.join(tmp, "%s.%s.gguf" % (c["name"], c["mix"]))
        run_cmd([moe, "quantize", path, qpath, "--type", c["mix"], "-q"], "moe quantize", 300)
        path = qpath
    prompts = run_text_case(moe, c, tmp, path) if c["kind"] == "text" else prompt_ids(c)
    jobs = []
    greedy = c["kind"] in ("exact", "margin", "text")
    teacher_prompts = [prompts[-1]] if c["kind"] == "exact" else ([] if greedy else prompts)
    if greedy:
        jobs += [{"mode": "greedy", "prompt_ids": p, "n_predict": c["steps"], "top_n": TOP_N}
                 for p in prompts]
    jobs += [{"mode": "teacher", "prompt_ids": p, "top_n": TOP_N} for p in teacher_prompts]
    ref = oracle({"model": path, "threads": THREADS, "kv_type": c.get("cache") or "f32", "jobs": jobs})
    parts, ok, notes = [], True, []
    if greedy:
        s, g_ok, _, notes = check_greedy(c, prompts, ref[:len(prompts)], moe, path)
        parts.append(s)
        ok = ok and g_ok
        if verbose:
            for p, r in zip(prompts, ref[:len(prompts)]):
                print("  llama.cpp from %d ids: %s" % (len(p), r["tokens"]), flush=True)
    if teacher_prompts:
        d, t_notes = check_teacher(c, teacher_prompts, ref[-len(teacher_prompts):], moe, path)
        t_ok, text = teacher_verdict(c, d)
        parts.append(text + (" (%d prompt(s) cut at a routing near tie)" % len(t_notes) if t_notes else ""))
        notes += t_notes
        ok = ok and t_ok
    if c["kind"] != "margin":
        parts.append("tol %.0e" % c["tol"] if c["tol"] < 0.01 else "tol %.2g" % c["tol"])
    else:
        parts.append("need %d/%d per prompt" % (c["need"], c["steps"]))
    return ok, ", ".join(parts) + ("; " + "; ".join(notes[:3]) if notes else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("moe_pos", nargs="?", help="moe binary (same as --moe)")
    ap.add_argument("--moe", help="moe binary (default $MOE_CLI)")
    ap.add_argument("--only", action="append", help="run only this case (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", help="write the models into this directory and keep them")
    ap.add_argument("--random", type=int, default=0, metavar="N",
                    help="run N randomly drawn cases instead of the listed ones")
    ap.add_argument("--random-seed", type=int, default=1, metavar="S")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    if a.list:
        for c in CASES:
            print("%-24s %-6s %s" % (c["name"], c["kind"],
                                     " ".join("--%s %s" % (k.replace("_", "-"), v)
                                              for k, v in c["init"].items())))
        return 0
    moe = a.moe or a.moe_pos or os.environ.get("MOE_CLI")
    if not moe:
        ap.error("give the moe binary: --moe PATH, a positional argument or $MOE_CLI")
    moe = os.path.abspath(moe) if os.path.exists(moe) else (shutil.which(moe) or moe)
    cases = CASES
    if a.random:
        rng = np.random.default_rng(a.random_seed)
        cases = [random_case(rng, i) for i in range(a.random)]
    if a.only:
        names = {c["name"] for c in cases}
        bad = [n for n in a.only if n not in names]
        if bad:
            ap.error("unknown case(s) %s; --list shows them" % ", ".join(bad))
        cases = [c for c in cases if c["name"] in a.only]
    passed = failed = 0
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="moe_conformance_") as tmpd:
        tmp = a.keep or tmpd
        os.makedirs(tmp, exist_ok=True)
        for c in cases:
            t0 = time.time()
            try:
                ok, msg = run_case(moe, c, tmp, a.verbose)
            except CaseError as e:
                ok, msg = False, str(e)
            except Exception as e:  # a harness bug in one case must not hide the others
                ok, msg = False, "%s: %s" % (type(e).__name__, e)
            print("%s %s: %s [%.1fs]" % ("PASS" if ok else "FAIL", c["name"], msg,
                                         time.time() - t0), flush=True)
            passed += ok
            failed += not ok
    if a.verbose:
        print("total %.1fs" % (time.time() - t_all))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
