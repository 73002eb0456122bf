"""Robust QA data and metrics (spec §39): cloze span-QA examples from standard-library docstrings, EDA
augmentation, and SQuAD exact match / token F1. The model and the fine-tune are in :mod:`moekit.apps.robust_qa`,
which re-exports everything here.

Data (built here, no download): paragraphs of Python standard-library docstrings
(:func:`moekit.analysis.text.module_docstrings`). A question is one sentence of
the paragraph with a 1–3 word span replaced by "what" (a cloze question); the answer is that span in the
paragraph. In-domain modules (text, numbers, data structures) give the training and in-domain test examples;
systems/network modules (os, socket, email, ...) give the out-of-domain test. **EDA** (Wei & Zou 2019) augments
the training questions: synonym replacement from a small fixed table in this module (choice: no WordNet is
installed offline), random insertion of such a synonym, random swap and random deletion, each with probability
``eda_alpha`` per word; the question word "what" is never touched (the answer span is not in the question).

Metrics: SQuAD exact match and token F1 (lower-cased, punctuation and articles removed).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter

from ..analysis.text import module_docstrings

__all__ = ["IN_DOMAIN", "OUT_OF_DOMAIN", "STOPWORDS", "SYNONYMS", "eda", "exact_match", "f1_score",
           "make_examples"]

IN_DOMAIN = ("collections", "json", "re", "string", "textwrap", "functools", "itertools", "datetime", "decimal",
             "fractions", "statistics", "random", "csv", "heapq", "bisect", "difflib", "calendar", "pprint",
             "copy", "operator", "enum", "dataclasses", "typing", "inspect", "ast", "argparse", "configparser",
             "numbers", "math", "array", "struct", "codecs", "unicodedata", "locale", "gettext", "textwrap")
OUT_OF_DOMAIN = ("os", "pathlib", "shutil", "tempfile", "subprocess", "threading", "queue", "socket", "email",
                 "http.client", "urllib.parse", "urllib.request", "zipfile", "tarfile", "gzip", "hashlib", "hmac",
                 "secrets", "logging", "sqlite3", "uuid", "unittest", "contextlib", "selectors", "signal", "ssl",
                 "mailbox", "smtplib", "ftplib", "multiprocessing", "asyncio", "concurrent.futures", "io")

# A small fixed synonym table for EDA (choice: WordNet needs a download); symmetric use, lower-case words.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "return": ("give", "yield"), "returns": ("gives", "yields"), "create": ("make", "build"),
    "creates": ("makes", "builds"), "object": ("instance", "item"), "objects": ("instances", "items"),
    "value": ("quantity", "result"), "values": ("quantities", "results"), "list": ("sequence", "array"),
    "string": ("text", "str"), "number": ("count", "figure"), "file": ("document", "path"),
    "new": ("fresh", "novel"), "given": ("supplied", "specified"), "default": ("standard", "fallback"),
    "raise": ("throw", "signal"), "raised": ("thrown", "signalled"), "use": ("employ", "apply"),
    "used": ("employed", "applied"), "set": ("assign", "collection"), "get": ("fetch", "obtain"),
    "called": ("invoked", "run"), "call": ("invoke", "run"), "method": ("function", "routine"),
    "function": ("callable", "routine"), "argument": ("parameter", "input"), "arguments": ("parameters", "inputs"),
    "first": ("initial", "leading"), "last": ("final", "trailing"), "large": ("big", "huge"),
    "small": ("little", "tiny"), "same": ("identical", "equal"), "each": ("every", "all"),
    "if": ("when", "whenever"), "true": ("yes", "correct"), "false": ("no", "wrong"), "data": ("content", "bytes"),
    "name": ("label", "identifier"), "names": ("labels", "identifiers"), "type": ("kind", "class"),
    "time": ("moment", "clock"), "empty": ("blank", "vacant"), "error": ("fault", "failure"),
    "contain": ("hold", "include"), "contains": ("holds", "includes"), "only": ("just", "solely"),
    "must": ("should", "has to"), "may": ("can", "might"), "also": ("too", "additionally"),
}
STOPWORDS = frozenset("a an the of to in on at for by with and or is are be been was were this that it its as "
                      "from not no if else then than which who what when where how can may must will should "
                      "into over under all any each some such only also use used using".split())



# ----------------------------------------------------------------------------------------------------------- data

def _paragraphs(modules: tuple[str, ...]) -> list[str]:
    """Docstring paragraphs (whitespace collapsed) of ``modules``, in a fixed order, without doctest lines."""
    out: dict[str, None] = {}
    for doc in module_docstrings(modules):
        for para in re.split(r"\n\s*\n", doc):
            if ">>>" in para or "::" in para:
                continue
            text = re.sub(r"\s+", " ", para).strip()
            if 60 <= len(text) <= 300:
                out.setdefault(text, None)
    return list(out)


_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")


def make_examples(modules: tuple[str, ...], n: int, seed: int) -> list[dict]:
    """Up to ``n`` cloze QA examples ``{"question", "context", "answer", "answer_start"}`` from ``modules``.

    The answer is 1–3 consecutive words of one sentence (starting and ending on a non-stopword); the question is
    that sentence with the span replaced by "what" and a question mark.
    """
    rng = random.Random(seed)
    paras = _paragraphs(modules)
    rng.shuffle(paras)
    out = []
    for para in paras:
        sentences = [(m.start(), m.group()) for m in re.finditer(r"[^.!?]+[.!?]?", para)]
        sentences = [(s + len(t) - len(t.lstrip()), t.strip()) for s, t in sentences if 6 <= len(t.split()) <= 20]
        if not sentences:
            continue
        s0, sent = rng.choice(sentences)
        words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(sent)]
        starts = [i for i, w in enumerate(words) if w[2].lower() not in STOPWORDS and len(w[2]) > 2]
        if not starts:
            continue
        i = rng.choice(starts)
        length = rng.choice((1, 2, 3))
        j = i + length - 1
        while j > i and (j >= len(words) or words[j][2].lower() in STOPWORDS):
            j -= 1
        a0, a1 = words[i][0], words[j][1]
        question = (sent[:a0] + "what" + sent[a1:]).rstrip(".!? ") + "?"
        out.append({"question": question, "context": para, "answer": sent[a0:a1], "answer_start": s0 + a0})
        if len(out) >= n:
            break
    return out


def eda(question: str, rng: random.Random, alpha: float) -> str:
    """EDA on a question: synonym replacement, random insertion, random swap, random deletion.

    Each operation touches about ``alpha · (number of words)`` words (at least one when ``alpha > 0``); the word
    "what" is never replaced, swapped or deleted. ``alpha = 0`` returns the question unchanged.
    """
    if alpha <= 0:
        return question
    end = "?" if question.endswith("?") else ""
    words = question.rstrip("?").split()
    n = max(1, round(alpha * len(words)))
    keep = [i for i, w in enumerate(words) if w.lower() != "what"]
    # synonym replacement
    cand = [i for i in keep if words[i].lower() in SYNONYMS]
    for i in rng.sample(cand, min(n, len(cand))):
        words[i] = rng.choice(SYNONYMS[words[i].lower()])
    # random insertion of a synonym of a word in the question
    for _ in range(n):
        syn = [SYNONYMS[w.lower()] for w in words if w.lower() in SYNONYMS]
        if syn:
            words.insert(rng.randrange(len(words) + 1), rng.choice(rng.choice(syn)))
    # random swap (two non-"what" words)
    for _ in range(n):
        idx = [i for i, w in enumerate(words) if w.lower() != "what"]
        if len(idx) >= 2:
            a, b = rng.sample(idx, 2)
            words[a], words[b] = words[b], words[a]
    # random deletion with probability alpha (never "what", never everything)
    kept = [w for w in words if w.lower() == "what" or rng.random() >= alpha]
    words = kept if len(kept) > 1 else words
    return " ".join(words) + end


# ------------------------------------------------------------------------------------------------------ metrics

def _normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def exact_match(prediction: str, truth: str) -> float:
    """SQuAD exact match: 1.0 when the normalised strings are equal."""
    return float(_normalize(prediction) == _normalize(truth))


def f1_score(prediction: str, truth: str) -> float:
    """SQuAD token F1 between normalised prediction and truth."""
    p, t = _normalize(prediction), _normalize(truth)
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)
