#!/usr/bin/env python3
"""Trains small tokenizer vocabularies on a built-in multilingual corpus and writes them as
vocab-only GGUF files (general.architecture = llama plus the hparams llama.cpp reads), so the
tokenizer can be checked against llama.cpp without downloading anything.

  python3 make_vocab.py OUT_DIR

writes OUT_DIR/<name>.gguf for every vocabulary and OUT_DIR/manifest.json:
  {"vocabs": [{"name", "path", "model", "pre"}...], "texts": [...]}
Pure Python 3, standard library only. Deterministic: the same files on every run.
"""
import heapq
import json
import os
import re
import struct
import sys
import unicodedata
from collections import Counter, defaultdict

# ---------------------------------------------------------------------------------------------
# Corpus: English prose, code, numbers, punctuation, whitespace runs, accents, CJK, emoji.

CORPUS = r"""
The quick brown fox jumps over the lazy dog. The dog didn't care; it's a lazy dog, and it'll
sleep until noon. We've seen this before: they're always like that, aren't they? I'm sure
you'd agree. THE QUICK BROWN FOX! DON'T WAKE THE DOG. I'LL BE BACK. She's here, he's there.
Once upon a time, in a land far, far away, there lived a king who loved numbers: 1, 2, 3,
42, 100, 256, 1024, 65536, 3.14159, 2.71828, 1,000,000 and 1234567890. The year 2024 came
after 2023, and 1999 was before 2000. Call 555-0123 or +1 (800) 123-4567 before 12:30 PM.
Prices: $19.99, EUR 5,50, 100% sure, 3/4 cup, 2^10 = 1024, x_1 + x_2 = 10.

    Indented lines keep their spaces.
		Tabs too, and trailing spaces   
Multiple   spaces    between     words.

def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"{i}: {fibonacci(i)}")  # prints the first ten numbers

int main(int argc, char** argv) {
  std::vector<int> values = {1, 2, 3};
  for (const auto& v : values) { std::cout << v << "\n"; }
  if (argc > 1 && argv[1] != nullptr) return 0;
  return values.size() == 3 ? 0 : 1;
}

const x = (a, b) => a ?? b; let y = x?.z || {}; // arrow functions
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
<html><body class="main"><p>Hello, world!</p></body></html>
{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}
!!! ??? ... --- *** ### @@@ &&& ||| ~~~ ``` ^^^ $$$ %%% +++ === <<< >>> ((( ))) [[[ ]]] {{{ }}}

Le café est très bon à Paris. Noël, garçon, naïve, résumé, déjà vu, où est la bibliothèque?
El niño comió jalapeños en la montaña. ¿Dónde está el baño? ¡Qué día más bonito! Mañana.
Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Größe, schön, Mädchen, Bär.
Português: ação, coração, não, são. Čeština: příliš žluťoučký kůň úpěl ďábelské ódy.
Русский язык: привет, мир! Как дела? Ελληνικά: γεια σου κόσμε. Türkçe: İstanbul, ığdır.
العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก

中文：你好，世界！今天天气很好，我们去公园散步吧。中文字符测试，中国人民，学习中文。
人工智能和机器学习正在改变世界。数据、模型、训练、推理。你好你好你好。
日本語：こんにちは世界。今日はいい天気ですね。カタカナ、ひらがな、漢字。東京、大阪。
日本語のテキストを処理します。ありがとうございます。すみません。
한국어: 안녕하세요 세계. 오늘 날씨가 좋네요. 감사합니다. 한국어 텍스트.
Emoji: 🙂 😀 👍 👍🏽 🚀 🔥 ❤️ 🎉 ✨ 🙂🙂 👍👍 — mixed with text 🙂 here and 🚀 there.
“Curly quotes” and ‘single quotes’ — em dashes… ellipses • bullets © ® ™ € £ ¥ ° ± × ÷
ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ　１２３！？ and ideographic　space, non-breaking space.
Mixed: English + 中文 + 日本語 + 한국어 + Русский + émoji 🙂 in one line, 2024年1月1日.
"""
CORPUS += "Windows line endings\r\nand old Mac ones\rand Unix ones\n\r\n\r\n"

# Training repeats the corpus with a few frequent fragments so merges form for them.
EXTRA_TRAINING = [
    "the quick brown fox", " hello world", "Hello, World!", "    return", "\n\n", "\t\t",
    "1234567", "2024", "don't", "I'LL", "中文", "日本語", "🙂👍🏽", "café", "niño", "über",
    " `code`", " `x` and `y`",
] * 6

TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "Hello world ",
    "  Hello   world  ",
    "\tTabs\tand\nnewlines\n\n\nend\n",
    "line one\r\nline two\r\n\r\n  \n",
    "   ",
    "\n",
    " \n \n",
    "trailing spaces   ",
    "1234567",
    "1 12 123 1234 12345 123456 1234567 12345678 123456789",
    "3.14159 2024-01-01 1,000,000 007 0x1F ½ ² ٣ ४",
    "!!! ??? ... --- ((())) {}[]<> ;;; ,,,",
    "a+b=c; x->y; a::b; i++; --j; a!=b; a<=b; `code` ~x ^y |z $w",
    "Punctuation!!!Runs???Everywhere...Now",
    "don't, I'LL, we've, they're, she'd, it's, I'm, DON'T, 'S, 'T, '",
    "café naïve résumé El niño über Straße ação",
    "cafe\u0301 combining: e\u0301 n\u0303 a\u0308",
    "中文字符测试，你好世界！",
    "日本語のテキスト、カタカナ。ひらがな",
    "한국어 텍스트입니다",
    "🙂👍🏽 emoji 🚀🔥 ❤️",
    "👨\u200d👩\u200d👧 family",
    "Mixed: English, Русский, Ελληνικά, العربية, हिन्दी, ไทย, 中文, 日本語",
    "def f(x):\n    return x**2  # square\n",
    "int main() {\n\treturn 0;\n}\n",
    "if (a && b || !c) { x += 1; } else { y -= 2; }",
    "<|endoftext|>",
    "Hello<|im_start|>user\nhi<|im_end|>\n",
    "call <tool_call>{\"a\": 1}</tool_call> now",
    "<tool_call>",
    " <tool_call> spaced ",
    "  unmergeable supercalifragilistic unmergeable",
    "ＡＢＣ１２３！？　全角",
    "“quotes” ‘single’ — dash… ellipsis",
    "\u3000ideographic space\u00a0nbsp\u2009thin",
    "ctrl\x00nul\x07bell\x7fdel\x1bescape",
    "aaaaaaaaaaaaaaaaaaaaaaaa",
    "the the the the the the",
    "Once upon a time, in a land far, far away, there lived a king who loved numbers.",
    "Le café est très bon à Paris. ¿Dónde está el baño?",
    "       leading spaces then text",
    "x" * 200,
    CORPUS[:600],
]

# ---------------------------------------------------------------------------------------------
# Approximate pre-tokenizers for *training* (the vocab only needs plausible merges; the test
# compares moe.cpp against llama.cpp on whatever vocabulary results).

L = r"[^\W\d_]"
GPT2_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?%s+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""" % L)
LLAMA3_RE = re.compile(
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?%s+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+""" % L)
QWEN2_RE = re.compile(
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?%s+|\d| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+""" % L)
CJK_RE = re.compile(r"[\u4e00-\u9fa5\u3040-\u30ff]+|[^\u4e00-\u9fa5\u3040-\u30ff]+")


def split_with(regex, text):
    return regex.findall(text)


def pre_split(pre, text):
    if pre in ("default", "olmo", "gpt-2", "starcoder"):
        return split_with(GPT2_RE, text)
    if pre in ("llama-bpe", "dbrx"):
        return split_with(LLAMA3_RE, text)
    if pre in ("qwen2", "qwen35", "deepseek-llm", "deepseek-coder"):
        return split_with(QWEN2_RE, text)
    if pre == "deepseek-v3":
        out = []
        for chunk in CJK_RE.findall(text):
            out.extend(split_with(LLAMA3_RE, chunk))
        return out
    raise ValueError(pre)


# ---------------------------------------------------------------------------------------------
# BPE training (byte-level or character-level), with incremental pair counts.

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + \
        list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = bytes_to_unicode()


def byte_encode(word):
    return "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))


def train_bpe(word_counts, n_merges):
    """word_counts: {tuple of symbols: count}. Returns the merges [(a, b)] in rank order."""
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    pair_count = Counter()
    where = defaultdict(set)
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += counts[i]
            where[(a, b)].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < 2:
            break
        merges.append(pair)
        a, b = pair
        changed = set()
        for i in sorted(where[pair]):
            w = words[i]
            c = counts[i]
            for x, y in zip(w, w[1:]):
                pair_count[(x, y)] -= c
                changed.add((x, y))
            out = []
            k = 0
            while k < len(w):
                if k + 1 < len(w) and w[k] == a and w[k + 1] == b:
                    out.append(a + b)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            words[i] = out
            for x, y in zip(out, out[1:]):
                pair_count[(x, y)] += c
                where[(x, y)].add(i)
                changed.add((x, y))
        del pair_count[pair]
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            elif p in pair_count:
                del pair_count[p]
    return merges


def training_text():
    """The corpus plus deterministic recombinations of its words, numbers and separators, so
    that well over a thousand merges have counts >= 2."""
    state = 12345

    def rand(n):  # small LCG: the same text on every run and Python version
        nonlocal state
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        return (state >> 8) % n

    words = CORPUS.split()
    seps = [" ", " ", " ", " ", ", ", ". ", "\n", "  ", "\t", " - ", "; ", "! ", "? ", "\n\n"]
    parts = [CORPUS, "\n".join(EXTRA_TRAINING)]
    for _ in range(2500):
        k = 3 + rand(8)
        line = ""
        for _ in range(k):
            line += words[rand(len(words))] + seps[rand(len(seps))]
        if rand(4) == 0:
            line += str(rand(10 ** (1 + rand(7))))
        parts.append(line)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# GGUF writer (v3, metadata only).

T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY = 4, 5, 6, 7, 8, 9


def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(kind, v):
    if kind == "u32":
        return struct.pack("<I", T_U32) + struct.pack("<I", v)
    if kind == "f32":
        return struct.pack("<I", T_F32) + struct.pack("<f", v)
    if kind == "bool":
        return struct.pack("<I", T_BOOL) + struct.pack("<B", 1 if v else 0)
    if kind == "str":
        return struct.pack("<I", T_STRING) + gguf_str(v)
    if kind == "str[]":
        return struct.pack("<IIQ", T_ARRAY, T_STRING, len(v)) + b"".join(gguf_str(s) for s in v)
    if kind == "f32[]":
        return struct.pack("<IIQ", T_ARRAY, T_F32, len(v)) + struct.pack("<%df" % len(v), *v)
    if kind == "i32[]":
        return struct.pack("<IIQ", T_ARRAY, T_I32, len(v)) + struct.pack("<%di" % len(v), *v)
    raise ValueError(kind)


def write_gguf(path, kvs):
    body = b"".join(gguf_str(k) + gguf_value(kind, v) for k, kind, v in kvs)
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + body
    data += b"\0" * ((-len(data)) % 32)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def llama_hparams(n_vocab, name):
    return [
        ("general.architecture", "str", "llama"),
        ("general.name", "str", name),
        ("llama.context_length", "u32", 256),
        ("llama.embedding_length", "u32", 64),
        ("llama.block_count", "u32", 1),
        ("llama.feed_forward_length", "u32", 128),
        ("llama.attention.head_count", "u32", 4),
        ("llama.attention.head_count_kv", "u32", 4),
        ("llama.attention.layer_norm_rms_epsilon", "f32", 1e-5),
        ("llama.rope.dimension_count", "u32", 16),
        ("llama.vocab_size", "u32", n_vocab),
    ]


# ---------------------------------------------------------------------------------------------
# Vocabularies.

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# name, pre, extra flags. Specials vary so that each file has one unambiguous EOT candidate or
# an explicit eot id (llama.cpp picks among several candidates in hash-map order).
BPE_VOCABS = [
    ("bpe_default", "default", {}),
    ("bpe_llama3", "llama-bpe", {}),
    ("bpe_qwen2", "qwen2", {"add_bos": False}),
    ("bpe_qwen35", "qwen35", {}),
    ("bpe_olmo", "olmo", {"no_im": True}),
    ("bpe_deepseek_llm", "deepseek-llm", {"add_bos": True}),
    ("bpe_deepseek_v3", "deepseek-v3", {"add_bos": True, "add_eos": True}),
    ("bpe_deepseek_coder", "deepseek-coder", {}),
    ("bpe_starcoder", "starcoder", {}),
    ("bpe_dbrx", "dbrx", {}),
]


def make_bpe(pre, n_merges, flags):
    counts = Counter()
    for w in pre_split(pre, training_text()):
        counts[tuple(byte_encode(w))] += 1
    merges = train_bpe(counts, n_merges)
    tokens = [BYTE_TO_CHAR[b] for b in range(256)]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    types = [NORMAL] * len(tokens)
    # Words only reachable as whole tokens (llama3's ignore_merges takes them directly).
    for extra in (" unmergeable", " supercalifragilistic"):
        t = byte_encode(extra)
        if t not in seen:
            seen.add(t)
            tokens.append(t)
            types.append(NORMAL)
    specials = [("<|endoftext|>", CONTROL), ("<|begin_of_text|>", CONTROL),
                ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<|unused_0|>", CONTROL),
                ("<tool_call>", USER_DEFINED), ("</tool_call>", USER_DEFINED)]
    if flags.get("no_im"):
        specials = [s for s in specials if "im_" not in s[0]]
    ids = {}
    for text, kind in specials:
        ids[text] = len(tokens)
        tokens.append(text)
        types.append(kind)
    kvs = [
        ("tokenizer.ggml.model", "str", "gpt2"),
        ("tokenizer.ggml.pre", "str", pre),
        ("tokenizer.ggml.tokens", "str[]", tokens),
        ("tokenizer.ggml.token_type", "i32[]", types),
        ("tokenizer.ggml.merges", "str[]", ["%s %s" % m for m in merges]),
        ("tokenizer.ggml.bos_token_id", "u32", ids["<|begin_of_text|>"]),
        ("tokenizer.ggml.eos_token_id", "u32", ids["<|endoftext|>"]),
    ]
    if "<|im_end|>" in ids:
        kvs.append(("tokenizer.ggml.eot_token_id", "u32", ids["<|im_end|>"]))
    if "add_bos" in flags:
        kvs.append(("tokenizer.ggml.add_bos_token", "bool", flags["add_bos"]))
    if "add_eos" in flags:
        kvs.append(("tokenizer.ggml.add_eos_token", "bool", flags["add_eos"]))
    return tokens, kvs


def make_spm(n_merges, flags):
    text = training_text().replace(" ", "\u2581")
    # SentencePiece-like units: a word with its leading U+2581s (long runs cut to bound the
    # training time), or a run of newlines.
    units = re.findall(r"\u2581*[^\u2581\n]{1,12}|\n+|\u2581+", "\u2581" + text)
    counts = Counter(tuple(u) for u in units)
    merges = train_bpe(counts, n_merges)
    char_freq = Counter(ch for u, c in counts.items() for ch in u for _ in range(c))
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    seen = set(tokens)
    for rank, (a, b) in enumerate(merges):
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            types.append(NORMAL)
            scores.append(-float(rank))
    # Single characters seen at least twice; rarer ones are spelled with byte fallback.
    chars = sorted((ch for ch, c in char_freq.items() if c >= 2), key=lambda ch: (-char_freq[ch], ch))
    for k, ch in enumerate(chars):
        if ch not in seen:
            seen.add(ch)
            tokens.append(ch)
            types.append(NORMAL)
            scores.append(-float(len(merges) + k))
    # "<|endoftext|>" also because llama.cpp's phi-3 rules (general.name) require it.
    specials = {}
    for text, kind in (("<tool_call>", USER_DEFINED), ("<|im_end|>", CONTROL),
                       ("<|endoftext|>", CONTROL)):
        specials[text] = len(tokens)
        tokens.append(text)
        types.append(kind)
        scores.append(0.0)
    kvs = [
        ("tokenizer.ggml.model", "str", "llama"),
        ("tokenizer.ggml.tokens", "str[]", tokens),
        ("tokenizer.ggml.scores", "f32[]", scores),
        ("tokenizer.ggml.token_type", "i32[]", types),
        ("tokenizer.ggml.bos_token_id", "u32", 1),
        ("tokenizer.ggml.eos_token_id", "u32", 2),
        ("tokenizer.ggml.unknown_token_id", "u32", 0),
        ("tokenizer.ggml.eot_token_id", "u32", specials["<|im_end|>"]),
    ]
    if "add_space_prefix" in flags:
        kvs.append(("tokenizer.ggml.add_space_prefix", "bool", flags["add_space_prefix"]))
    if "add_eos" in flags:
        kvs.append(("tokenizer.ggml.add_eos_token", "bool", flags["add_eos"]))
    return tokens, kvs


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_vocab.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    vocabs = []
    for name, pre, flags in BPE_VOCABS:
        tokens, kvs = make_bpe(pre, 1500, flags)
        path = os.path.join(out_dir, name + ".gguf")
        write_gguf(path, llama_hparams(len(tokens), flags.get("name", name)) + kvs)
        vocabs.append({"name": name, "path": path, "model": "gpt2", "pre": pre})
    for name, flags in (("spm", {}),
                        ("spm_noprefix", {"add_space_prefix": False, "add_eos": True,
                                          "name": "Phi-3 strip rules"})):
        tokens, kvs = make_spm(1200, flags)
        path = os.path.join(out_dir, name + ".gguf")
        write_gguf(path, llama_hparams(len(tokens), flags.get("name", name)) + kvs)
        vocabs.append({"name": name, "path": path, "model": "llama", "pre": ""})
    manifest = {"vocabs": vocabs, "texts": TEXTS,
                "unicode_version": unicodedata.unidata_version}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
