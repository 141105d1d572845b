"""Rebuild the shipped tasks' data files (data/*.jsonl and data/MANIFEST.json), deterministically.

    python -m elastic_megatron.eval_tasks.build            # write them
    python -m elastic_megatron.eval_tasks.build --check    # rebuild in memory, compare with the files

Every item comes from text the demo chain and the benchmarks hold out of training:

- Python tasks: the documents of the embedded corpus (the running Python's standard library,
  cut as tools/preprocess_data.py --input python-stdlib cuts it) in the validation split of
  the demo's data (recipes/data/embedded.yaml, split "98,2,0": Megatron-Core gives the last
  2% of the documents to validation). The standard library differs between Python versions,
  so the committed files are the reference: MANIFEST.json records the Python they were built
  with, and --check under another Python reports that instead of a mismatch.
- English task: the last 100 KB of the shipped tinyshakespeare (inside the last 10% of its
  documents that benchmarks/fidelity.py holds out); the same on every machine.

Tasks (one JSON object per line; "context lines" are the 4 lines before the line in question):
- stdlib_cloze, shakespeare_cloze: {"context", "choices", "label"}: the context lines and the
  line up to a word (an identifier / a word of >= 3 letters); the choices are that word and 3
  other words of the same document (for Shakespeare: within 40 lines), none a prefix of
  another, shuffled.
- stdlib_identifier: {"prompt", "answer"}: the context lines and the line cut inside an
  identifier of >= 5 characters after >= 2 of them; the answer is the rest (>= 2 chars).
- stdlib_assign: {"prompt", "trace", "answer"}: the context lines and the start of an
  assignment line, cut 2-6 characters into its target; the model finishes the target up to
  " = " (the trace, " = " its delimiter), then writes the value: the answer is the value's
  first word.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import re
import sys
from collections import Counter

from elastic_megatron.eval_tasks.loader import DATA_DIR

SEED = 29
CONTEXT_LINES = 4
N_CHOICES = 4
PY_VALID_SPLIT = (0.98, 1.0)  # recipes/data/embedded.yaml split "98,2,0": the validation documents
SHAKESPEARE_TAIL_BYTES = 100_000
COUNTS = {"stdlib_cloze": 150, "stdlib_identifier": 200, "stdlib_assign": 150, "shakespeare_cloze": 150}
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
WORD = re.compile(r"[A-Za-z]{3,}")
# an assignment line: indentation, target (a name, dotted, maybe one subscript), " = ", the value's first word
ASSIGN = re.compile(r"^([ \t]*)([A-Za-z_][\w.]*(?:\[[^\]=]*\])?) = ([A-Za-z_][A-Za-z0-9_]*)")


def python_heldout_documents() -> list[str]:
    """The embedded corpus's documents in the demo data's validation split."""
    from elastic_megatron.data.indexed import stdlib_documents

    docs = list(stdlib_documents())
    begin, end = (int(round(f * len(docs))) for f in PY_VALID_SPLIT)
    return docs[begin:end]


def shakespeare_heldout_documents() -> list[str]:
    """The last SHAKESPEARE_TAIL_BYTES of tinyshakespeare, from its first paragraph start, as paragraphs."""
    from elastic_megatron.data.text import shipped_text

    tail = shipped_text("tinyshakespeare").read_text(encoding="utf-8")[-SHAKESPEARE_TAIL_BYTES:]
    tail = tail[tail.index("\n\n") + 2:]
    return [p for p in tail.split("\n\n") if p.strip()]


def _python_line_ok(line: str) -> bool:
    s = line.strip()
    return 10 <= len(s) <= 80 and not s.startswith("#") and any(c.isalpha() for c in s)


def _verse_line_ok(line: str) -> bool:
    s = line.strip()
    speaker = s.endswith(":") and s[:-1].replace(" ", "").isupper()
    return 12 <= len(s) <= 70 and not speaker


def _positions(docs: list[list[str]], ok) -> list[tuple[int, int]]:
    """(document, line) of every line that `ok` takes, with CONTEXT_LINES lines before it, at
    least 2 of them not blank."""
    out = []
    for d, lines in enumerate(docs):
        for j in range(CONTEXT_LINES, len(lines)):
            if ok(lines[j]) and sum(1 for x in lines[j - CONTEXT_LINES:j] if x.strip()) >= 2:
                out.append((d, j))
    return out


def _context(lines: list[str], j: int) -> str:
    return "".join(x + "\n" for x in lines[j - CONTEXT_LINES:j])


def cloze_items(docs: list[list[str]], ok, words: re.Pattern, n: int, rng: random.Random, near: int = 0) -> list[dict]:
    """`n` multiple-choice items: the context lines and a line up to one of its `words`; the
    choices are that word and N_CHOICES - 1 other words of the same document (`near` > 0:
    of the lines within `near` of it), no choice a prefix of another."""
    items, positions = [], _positions(docs, ok)
    for d, j in rng.sample(positions, len(positions)):
        line, lines = docs[d][j], docs[d]
        found = [m for m in words.finditer(line.split("#")[0]) if len(m.group()) >= 3]
        if not found:
            continue
        m = rng.choice(found)
        scope = lines[max(0, j - near):j + near + 1] if near else lines
        pool = sorted({w for x in scope for w in words.findall(x)
                       if len(w) >= 3 and not w.startswith(m.group()) and not m.group().startswith(w)})
        others: list[str] = []
        for w in rng.sample(pool, len(pool)):
            if not any(w.startswith(o) or o.startswith(w) for o in others):
                others.append(w)
            if len(others) == N_CHOICES - 1:
                break
        if len(others) < N_CHOICES - 1:
            continue
        choices = [m.group()] + others
        order = list(range(N_CHOICES))
        rng.shuffle(order)
        items.append({"context": _context(lines, j) + line[: m.start()], "choices": [choices[i] for i in order],
                      "label": order.index(0)})
        if len(items) == n:
            break
    return items


def identifier_items(docs: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    positions = _positions(docs, _python_line_ok)
    items = []
    for d, j in rng.sample(positions, len(positions)):
        line = docs[d][j]
        words = [m for m in IDENT.finditer(line.split("#")[0]) if len(m.group()) >= 5]
        if not words:
            continue
        m = rng.choice(words)
        cut = rng.randint(2, len(m.group()) - 2)
        items.append({"prompt": _context(docs[d], j) + line[: m.start() + cut], "answer": m.group()[cut:]})
        if len(items) == n:
            break
    return items


def assign_items(docs: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    items = []
    positions = _positions(docs, lambda x: ASSIGN.match(x) is not None)
    for d, j in rng.sample(positions, len(positions)):
        m = ASSIGN.match(docs[d][j])
        indent, target, value = m.groups()
        if len(target) < 4:
            continue
        cut = rng.randint(2, min(len(target) - 1, 6))
        items.append({"prompt": _context(docs[d], j) + indent + target[:cut], "trace": target[cut:] + " = ", "answer": value})
        if len(items) == n:
            break
    return items


def build() -> dict[str, list[dict]]:
    py = [d.split("\n") for d in python_heldout_documents()]
    verse = [p.split("\n") for p in shakespeare_heldout_documents()]
    verse = ["\n\n".join("\n".join(p) for p in verse).split("\n")]  # one document: distractors come from nearby lines
    return {
        "stdlib_cloze": cloze_items(py, _python_line_ok, IDENT, COUNTS["stdlib_cloze"], random.Random(SEED)),
        "stdlib_identifier": identifier_items(py, COUNTS["stdlib_identifier"], random.Random(SEED + 1)),
        "stdlib_assign": assign_items(py, COUNTS["stdlib_assign"], random.Random(SEED + 2)),
        "shakespeare_cloze": cloze_items(verse, _verse_line_ok, WORD, COUNTS["shakespeare_cloze"], random.Random(SEED + 3),
                                         near=40),
    }


def serialise(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def manifest(files: dict[str, bytes], tasks: dict[str, list[dict]]) -> dict:
    """What the files were built from, with what, and the majority-answer rate of each
    exact-match task (the accuracy of always answering the most frequent answer)."""
    majority = {}
    for name, rows in tasks.items():
        if rows and "answer" in rows[0]:
            majority[name] = Counter(r["answer"] for r in rows).most_common(1)[0][1] / len(rows)
    return {
        "built_by": "python -m elastic_megatron.eval_tasks.build",
        "python": platform.python_version(),
        "sources": {"stdlib_*": f"embedded corpus documents in split {list(PY_VALID_SPLIT)} (recipes/data/embedded.yaml)",
                    "shakespeare_cloze": f"last {SHAKESPEARE_TAIL_BYTES} bytes of tinyshakespeare"},
        "items": {name: len(rows) for name, rows in tasks.items()},
        "majority_answer_rate": majority,
        "sha256": {f"{name}.jsonl": hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="rebuild in memory and compare with the shipped files")
    args = ap.parse_args(argv)
    tasks = build()
    files = {name: serialise(rows) for name, rows in tasks.items()}
    man = manifest(files, tasks)
    if args.check:
        shipped = json.loads((DATA_DIR / "MANIFEST.json").read_text())
        differ = [f for f, h in man["sha256"].items() if shipped["sha256"].get(f) != h]
        if not differ:
            print(f"the shipped task data are what this Python ({man['python']}) builds")
            return 0
        why = ("" if shipped["python"] == man["python"] else
               f"; they were built with Python {shipped['python']}, this is {man['python']}, whose standard library differs")
        print(f"differ from a rebuild: {', '.join(differ)}{why}", file=sys.stderr)
        return 1
    DATA_DIR.mkdir(exist_ok=True)
    for name, data in files.items():
        (DATA_DIR / f"{name}.jsonl").write_bytes(data)
    (DATA_DIR / "MANIFEST.json").write_text(json.dumps(man, indent=1) + "\n")
    for name, rows in tasks.items():
        print(f"{name}: {len(rows)} items, {len(files[name]):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
