"""Build the bundled sample corpus from the Python 3.11 documentation sources (PSF licence).

Run once, offline, from Debian's ``python3.11-doc`` package (it ships the reStructuredText sources):

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python pipelines/data/build_sample.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources pipelines/data

It writes two Parquet files:
- ``corpus.parquet``  (``id``, ``text``, ``source``): passages from the FAQ answers, the glossary and paragraphs of
  the library reference, tutorial, how-tos and language reference;
- ``queries.parquet`` (``query_id``, ``query``, ``positive_ids``, ``source``): every FAQ question, whose positives
  are the passages its answer was cut into, and one question per glossary term, whose positive is its definition.

The reStructuredText is cleaned by hand with a few regexes rather than docutils: docutils would need the Sphinx
roles and directives registered to parse these files, and the sample only needs readable prose, not a faithful
rendering. The output is deterministic (sorted files, stable ids), so rebuilding gives the same bytes of text.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HEADING_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>])\1{2,}\s*$")
MAX_PASSAGE_WORDS = 160
MIN_PARAGRAPH_WORDS = 25
DOC_PARAGRAPHS = 2600  # keeps the corpus a few thousand passages, ~1 MB of Parquet

_ROLE = re.compile(r":[\w:+-]+:`(?:~|!)?([^`<]*?)(?:\s*<[^`]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`]*>`_{1,2}")
_REF = re.compile(r"`([^`]+)`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_SUBST = re.compile(r"\|([^|\s]+)\|")


def clean_inline(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1).strip(), text)
    text = _LINK.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _SUBST.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def blocks(lines: list[str]) -> list[tuple[str, str]]:
    """Split RST lines into ('heading', title) and ('para', text) blocks; drop directives, code and tables."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        # A title line followed by an underline of punctuation (over-lined titles have the line above too).
        if i + 1 < n and HEADING_UNDERLINE.match(lines[i + 1]) and not HEADING_UNDERLINE.match(line):
            out.append(("heading", clean_inline(line)))
            i += 2
            continue
        if HEADING_UNDERLINE.match(line):
            i += 1
            continue
        para = []
        while i < n and lines[i].strip():
            para.append(lines[i])
            i += 1
        first = para[0]
        indented = first.startswith((" ", "\t"))
        ends_code = para[-1].rstrip().endswith("::")
        if first.lstrip().startswith(("..", ">>>", "+-", "==", "|")) or indented:
            continue
        text = clean_inline(" ".join(p.strip() for p in para))
        if ends_code:
            text = text[:-1] if text.endswith("::") else text
        out.append(("para", text))
    return out


def chunk_words(paragraphs: list[str], max_words: int) -> list[str]:
    """Greedy-pack paragraphs into passages of at most ``max_words`` words (a longer paragraph stands alone)."""
    chunks: list[str] = []
    cur: list[str] = []
    cur_words = 0
    for p in paragraphs:
        w = len(p.split())
        if cur and cur_words + w > max_words:
            chunks.append(" ".join(cur))
            cur, cur_words = [], 0
        cur.append(p)
        cur_words += w
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def stable_id(prefix: str, *parts: str) -> str:
    return prefix + hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:12]


def faq_records(src: Path):
    passages, queries = [], []
    for f in sorted((src / "faq").glob("*.rst.txt")):
        if f.name == "index.rst.txt":
            continue
        question, answer = None, []

        def flush():
            if question and question.endswith("?") and answer:
                pids = []
                for k, chunk in enumerate(chunk_words(answer, MAX_PASSAGE_WORDS)):
                    pid = stable_id("faq-", f.name, question, str(k))
                    passages.append((pid, chunk, f"faq/{f.name.removesuffix('.rst.txt')}"))
                    pids.append(pid)
                queries.append((stable_id("q-", f.name, question), question, pids, f"faq/{f.name[:-8]}"))

        for kind, text in blocks(f.read_text(encoding="utf-8").splitlines()):
            if kind == "heading":
                flush()
                question, answer = text, []
            elif text:
                answer.append(text)
        flush()
    return passages, queries


def glossary_records(src: Path):
    passages, queries = [], []
    lines = (src / "glossary.rst.txt").read_text(encoding="utf-8").splitlines()
    term, body = None, []

    def flush():
        if term and body:
            text = clean_inline(" ".join(body))
            if len(text.split()) >= 8:
                pid = stable_id("glo-", term)
                passages.append((pid, f"{term}: {text}", "glossary"))
                queries.append((stable_id("q-glo-", term), f"What does '{term}' mean in Python?", [pid], "glossary"))

    for line in lines:
        # Glossary terms sit at three spaces of indent, their definitions at six.
        if re.match(r"^   \S", line):
            flush()
            term, body = clean_inline(line.strip()), []
        elif re.match(r"^      \S", line) and term and not line.strip().startswith(("..", ">>>")):
            body.append(line.strip())
        elif re.match(r"^      (\.\.|>>>)", line):
            body.append("\0")  # marks the end of the prose part of a definition
    flush()
    # Keep only the prose before the first code sample or directive.
    passages = [(pid, t.split("\0")[0].strip(), s) for pid, t, s in passages]
    return passages, queries


def doc_records(src: Path):
    passages = []
    for sub in ("tutorial", "library", "howto", "reference"):
        for f in sorted((src / sub).glob("*.rst.txt")):
            for kind, text in blocks(f.read_text(encoding="utf-8").splitlines()):
                words = len(text.split())
                if kind == "para" and MIN_PARAGRAPH_WORDS <= words <= 220:
                    rel = f"{sub}/{f.name.removesuffix('.rst.txt')}"
                    passages.append((stable_id("doc-", rel, text), text, rel))
    # A deterministic spread over all documents, not the first N of the alphabet.
    passages.sort(key=lambda p: p[0])
    return sorted(passages[:DOC_PARAGRAPHS], key=lambda p: (p[2], p[0]))


def main(src_dir: str, out_dir: str) -> None:
    src, out = Path(src_dir), Path(out_dir)
    faq_p, faq_q = faq_records(src)
    glo_p, glo_q = glossary_records(src)
    doc_p = doc_records(src)
    seen, corpus = set(), []
    for pid, text, source in faq_p + glo_p + doc_p:
        if pid not in seen and text:
            seen.add(pid)
            corpus.append((pid, text, source))
    queries = [q for q in faq_q + glo_q if all(p in seen for p in q[2])]
    pq.write_table(
        pa.table({k: [r[i] for r in corpus] for i, k in enumerate(("id", "text", "source"))}),
        out / "corpus.parquet",
        compression="zstd",
    )
    pq.write_table(
        pa.table({k: [r[i] for r in queries] for i, k in enumerate(("query_id", "query", "positive_ids", "source"))}),
        out / "queries.parquet",
        compression="zstd",
    )
    print(f"{len(corpus)} passages, {len(queries)} queries -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
