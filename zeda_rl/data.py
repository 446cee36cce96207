"""Prompt and rollout records from files, each with a stable id and the place it came from.

A run's data is whatever a post-training set ships: a JSONL file, Parquet, a `datasets`
dataset saved with `save_to_disk`, or a directory of *.jsonl / *.parquet shards (what
`zeda rollouts` writes). Every row becomes a `Record`: the prompt conversation, and the
assistant answer when the row carries one (SFT data). Rows come in two shapes,
`{"prompt": str}` (ZEDA-prompts-60k; `prompt`/`response` for answered ones) and
`{"messages": [{"role", "content"}, ...]}` (released rollouts, AceReason, Nemotron), with
field names configurable. A row of any other shape is refused with its file and line (or
row) and what was expected, because a silently skipped or misread row is a silently
different training set.

Ids are stable across runs and machines (the row's own id field, else "<file name>:<line>")
so a job that resumes can tell which prompts it has already done.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SHARD_SUFFIXES = (".jsonl", ".parquet")
EMBEDDED = "embedded"


class DataError(ValueError):
    """A data file or row that cannot be read as what the run asked for."""


@dataclass(frozen=True)
class Fields:
    """Which keys of a row hold what (post-training sets disagree on the names)."""

    prompt: str = "prompt"
    messages: str = "messages"
    response: str = "response"
    id: str = "id"


@dataclass(frozen=True, eq=False)
class Record:
    """One prompt, and for SFT data the assistant's answer to it.

    `messages` is the conversation up to the point where the assistant speaks: it never
    ends with an assistant turn. `response` is that assistant turn's content, or None.
    """

    id: str
    where: str  # "path:line" (JSONL) or "path row N" (Parquet, saved datasets), for error messages
    messages: tuple[dict, ...]
    response: str | None = None
    extra: dict = field(default_factory=dict)  # the row's other fields (a label, sampling settings...)


def read_records(source: str | Path, fields: Fields = Fields(), need_response: bool = False) -> list[Record]:
    """Every row of `source` (file or directory) as a Record; `need_response`: SFT data, each row must answer.

    Ids must be unique: two rows with the same id would make a resumed job skip one of them.
    """
    out, seen = [], {}
    for where, default_id, row in iter_rows(source):
        rec = to_record(row, where, default_id, fields, need_response)
        if rec.id in seen:
            raise DataError(f"{where}: id {rec.id!r} already used at {seen[rec.id]}; ids must be unique")
        seen[rec.id] = where
        out.append(rec)
    if not out:
        raise DataError(f"{source}: no records")
    return out


def iter_rows(source: str | Path) -> Iterator[tuple[str, str, object]]:
    """(where, default id, row) for every row of a file, a shard directory or a saved dataset, in order."""
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or directory (expected a .jsonl or .parquet file, a directory of them, "
            "or a dataset saved with datasets' save_to_disk)"
        )
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            yield from _saved_dataset_rows(path)
            return
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SHARD_SUFFIXES)
        if not shards:
            raise DataError(f"{path}: a directory with no *.jsonl or *.parquet shards and no saved dataset")
        for shard in shards:
            yield from _file_rows(shard)
        return
    yield from _file_rows(path)


def _file_rows(path: Path) -> Iterator[tuple[str, str, object]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path}:{n}: not valid JSON ({err})") from None
                yield f"{path}:{n}", f"{path.name}:{n}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        n = 0
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path} row {n}", f"{path.name}:{n}", row
                n += 1
    else:
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; expected .jsonl or .parquet "
            "(or a directory of them, or a dataset saved with save_to_disk)"
        )


def _saved_dataset_rows(path: Path) -> Iterator[tuple[str, str, object]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has {sorted(ds)}); save the split to use")
        ds = ds["train"]
    for n, row in enumerate(ds):
        yield f"{path} row {n}", f"{path.name}:{n}", row


def to_record(
    row: object, where: str, default_id: str, fields: Fields = Fields(), need_response: bool = False
) -> Record:
    """Check one row's shape and normalise it; the error says where and what was expected."""
    expected = f"a {{{fields.prompt!r}: str}} or {{{fields.messages!r}: [{{'role', 'content'}}, ...]}} object" + (
        f" with an answer ({fields.response!r}, or messages ending with an assistant turn)" if need_response else ""
    )
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected {expected}, got a {type(row).__name__}")
    rid = row.get(fields.id)
    rid = default_id if rid is None else str(rid)
    if row.get(fields.messages) is not None:
        messages = _messages(row[fields.messages], where, fields.messages)
        used = {fields.messages, fields.id}
    elif isinstance(row.get(fields.prompt), list):  # chat-style prompt column (verl and friends)
        messages = _messages(row[fields.prompt], where, fields.prompt)
        used = {fields.prompt, fields.id}
    elif isinstance(row.get(fields.prompt), str):
        messages = [{"role": "user", "content": row[fields.prompt]}]
        used = {fields.prompt, fields.id}
    else:
        got = {k: type(v).__name__ for k, v in row.items()}
        raise DataError(f"{where}: expected {expected}, got keys {got}")
    response = None
    if messages[-1]["role"] == "assistant":
        response = messages.pop()["content"]
    if isinstance(row.get(fields.response), str) and fields.response not in used:
        if response is not None:
            raise DataError(f"{where}: both {fields.response!r} and a final assistant turn: which one is the answer?")
        response = row[fields.response]
        used.add(fields.response)
    if not messages or messages[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: the prompt must end with a user (or system/tool) turn, got "
            f"{[m['role'] for m in messages] or 'no turns'}"
        )
    if need_response and response is None:
        raise DataError(f"{where}: expected {expected}; this row has no answer")
    extra = {k: v for k, v in row.items() if k not in used}
    return Record(id=rid, where=where, messages=tuple(messages), response=response, extra=extra)


def _messages(value: object, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} objects, got {type(value).__name__}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            shown = {k: type(v).__name__ for k, v in m.items()} if isinstance(m, dict) else type(m).__name__
            raise DataError(f"{where}: {key}[{i}] must be {{'role': str, 'content': str}}, got {shown}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def embedded_records(split: str, n_per_family: int, seed: int, suite: str = "basic") -> list[Record]:
    """The built-in tasks of `suite` as records (the embedded teacher's data), in `make_split`'s order."""
    from zeda_rl.tasks import make_split

    return [
        Record(
            id=f"{EMBEDDED}:{e.prompt}",
            where=f"{EMBEDDED}:{split}:{i}",
            messages=({"role": "user", "content": e.prompt},),
            extra={"family": e.family, "answer": e.answer},
        )
        for i, e in enumerate(make_split(split, n_per_family, seed=seed, suite=suite))
    ]
