"""Synthetic text tasks generated from a seed, for experiments where experts have a reason to specialise.

- ``arithmetic``: lines ``a+b=c`` and ``a*b=c`` with operands of 1 to ``max_digits`` digits.
- ``mixture``: arithmetic, copying (``copy:abc>abc``), sorting (``sort:cab>abc``) and snippets of the
  standard library's source, interleaved line by line. Each task has its own format, so a router can learn
  to send each to different experts.

Every generator is a pure function of its seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import random
import string

__all__ = ["arithmetic_line", "copy_line", "sort_line", "arithmetic_text", "mixture_text", "TASKS"]

TASKS = ("add", "mul", "copy", "sort", "text")


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def arithmetic_line(rng: random.Random, max_digits: int, op: str | None = None) -> str:
    """One ``a+b=c`` or ``a*b=c`` line (operator drawn when not given)."""
    op = op or rng.choice("+*")
    a, b = _number(rng, max_digits), _number(rng, max_digits)
    return f"{a}{op}{b}={a + b if op == '+' else a * b}\n"


def _word(rng: random.Random, low: int = 3, high: int = 12) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def copy_line(rng: random.Random) -> str:
    w = _word(rng)
    return f"copy:{w}>{w}\n"


def sort_line(rng: random.Random) -> str:
    w = _word(rng)
    return f"sort:{w}>{''.join(sorted(w))}\n"


def arithmetic_text(seed: int, num_bytes: int, max_digits: int = 4) -> bytes:
    """About ``num_bytes`` bytes of arithmetic lines (whole lines only)."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < num_bytes:
        line = arithmetic_line(rng, max_digits)
        lines.append(line)
        total += len(line)
    return "".join(lines).encode("ascii")


def _snippet(rng: random.Random, text: bytes, low: int = 64, high: int = 256) -> bytes:
    """A run of whole lines from ``text`` of about ``low``..``high`` bytes."""
    start = text.find(b"\n", rng.randrange(max(1, len(text) - high))) + 1
    end = text.rfind(b"\n", start, start + rng.randint(low, high))
    return text[start:end + 1] if end > start else text[start:start + low] + b"\n"


def mixture_text(seed: int, num_bytes: int, source_text: bytes, max_digits: int = 4) -> bytes:
    """About ``num_bytes`` bytes of the interleaved tasks; ``source_text`` feeds the ``text`` task."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < num_bytes:
        task = rng.choice(TASKS)
        if task == "add" or task == "mul":
            part = arithmetic_line(rng, max_digits, "+" if task == "add" else "*").encode("ascii")
        elif task == "copy":
            part = copy_line(rng).encode("ascii")
        elif task == "sort":
            part = sort_line(rng).encode("ascii")
        else:
            part = _snippet(rng, source_text) if len(source_text) > 300 else b""
        parts.append(part)
        total += len(part)
    return b"".join(parts)
