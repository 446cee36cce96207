"""What every grader shares: the problem record, the grade, JSONL reading, thinking removal."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the user turn, before the chat template
    data: dict  # what grading needs: the gold answer, the tests, the instructions
    reference: str | None = None  # a known-right response where the record has one (for sanity checks)
    where: str = ""  # file:line, for messages


@dataclass(frozen=True)
class Grade:
    score: float  # in [0, 1]
    detail: dict = field(default_factory=dict)


def strip_thinking(text: str, opened: bool = False) -> str:
    """The answer part of a response, as the official evaluation of thinking models grades it.

    Everything up to and including the last `</think>` goes. A response that opened a
    thinking block and never closed it (cut off while thinking) has no answer: "". `opened`: the
    prompt itself ends in `<think>` (GLM-4.7-Flash's generation prompt), so the response starts inside
    the block: without a `</think>` all of it is thinking, a `\\boxed{4}` in passing included.
    """
    if "</think>" in text:
        return text.rpartition("</think>")[2].strip()
    if opened or text.lstrip().startswith("<think>"):
        return ""
    return text.strip()


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(file:line, record) for every non-blank line (gzipped if it ends in .gz); a line that is not a JSON object is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: benchmark file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def pick(
    rec: dict,
    where: str,
    role: str,
    names: tuple[str, ...],
    fields: dict[str, str],
    kind: type | tuple = str,
    required: bool = True,
):
    """The value of `role` in a record: the field the suite names for it, else the first usual name present."""
    candidates = (fields[role],) if role in fields else names
    for name in candidates:
        if name in rec and rec[name] is not None:
            value = rec[name]
            if not isinstance(value, kind):
                want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise ValueError(f"{where}: field {name!r} ({role}) must be {want}, got {type(value).__name__}")
            return value
    if not required:
        return None
    raise ValueError(
        f"{where}: no {role} field; expected one of {list(candidates)} (set fields.{role} in the suite to name another)"
    )


def check_fields(fields: dict[str, str], roles: tuple[str, ...], grader: str) -> dict[str, str]:
    unknown = sorted(set(fields) - set(roles))
    if unknown:
        raise ValueError(f"grader {grader!r}: fields {unknown} unknown; it reads {list(roles)}")
    return dict(fields)
