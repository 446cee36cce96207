"""SFT records tokenized once, in parallel, into a token file; each step reads only its own rows.

Why: SFT used to pack every record into one dense array padded to the longest record, on the
driver: rows x longest x 14 bytes, about 31 GB for the paper's 60k records at 36,864 tokens,
built on one core before the first step. Here a large source is read as a stream (a bounded
number of records in flight), its records are put through the chat template by a pool of
worker processes, and the token ids of every usable record are appended to one flat int32
file. The driver keeps three ints per record (offset, prompt length, length: 1.4 MB for 60k
records) and each step reads its batch's rows from the file (`pread`, nothing stays mapped)
and pads them to the batch's own longest row. So the driver's memory does not grow with the
data set, and a step's batch is the same as before (rows in file order, the same keys, dtypes
and padding as `pack_samples` of those rows).

The token file is a cache: `<cache>/sft-tokens/<key>/`, where the key hashes the source files
(paths, sizes, modification times), the tokenizer (vocabulary and merges), the chat template,
enable_thinking, the stop ids and the length caps. It is written under a temporary name and
renamed when complete, so a resumed run (or the next run on the same data) reads it back in
a fraction of a second instead of tokenizing again, and a killed build leaves nothing that
looks whole. Building a new entry for a source removes that source's older entries.

A small source (under `IN_MEMORY_BYTES` of files: the tests, the tiny CPU runs) is tokenized
in this process and kept in memory: starting worker processes would cost more than it saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from zeda_rl.chat import ChatFormat, TemplateError
from zeda_rl.data import SHARD_SUFFIXES, DataError, Fields, Record, iter_rows, to_record

CACHE_VERSION = 1
META_COUNTS = ("records", "cut", "too_long", "template", "template_first")  # kept with a token file
IN_MEMORY_BYTES = 64 << 20  # sources with fewer bytes of files are tokenized here and kept in memory
CHUNK_RECORDS = 64  # records per task of a tokenizer worker ...
CHUNK_CHARS = 8 << 20  # ... or fewer when they are long
DENSE_LIMIT = 1 << 26  # cells (rows x longest) the whole-set view (`SftSet[key]`) may build
BATCH_KEYS = (
    "tokens",
    "attention_mask",
    "loss_mask",
    "behaviour_logprobs",
    "teacher_logprobs",
    "policy_version",
    "sample_ids",
)


def cache_dir() -> Path:
    """Where token files go: $ZEDA_CACHE/sft-tokens (default ~/.cache/zeda-rl/sft-tokens).

    The same root as `zeda_rl.teacher.cache_root` (not imported from there: that module loads torch).
    """
    return Path(os.environ.get("ZEDA_CACHE") or Path.home() / ".cache" / "zeda-rl") / "sft-tokens"


def default_procs() -> int:
    """Tokenizer worker processes: $ZEDA_TOKENIZE_PROCS, else one per CPU this process may use (at most 32)."""
    if os.environ.get("ZEDA_TOKENIZE_PROCS"):
        return max(1, int(os.environ["ZEDA_TOKENIZE_PROCS"]))
    return max(1, min(len(os.sched_getaffinity(0)), 32))


class SftSet:
    """The usable SFT records as token ids; row i is the i-th usable record of the source, in file order.

    `take(rows)` is one training batch (`pack_samples`' keys and dtypes, padded to its own longest
    row, loss on the answer tokens only, `sample_ids` = the rows). `set[key]` packs the whole set
    as one batch, as SFT data was held before: for tests and small sets only (refused above
    DENSE_LIMIT cells).
    """

    def __init__(self, tokens, offsets: np.ndarray, prompt_lens: np.ndarray, lengths: np.ndarray, pad_id: int = 0):
        self._tokens = tokens  # an int32 array, or the path of a flat int32 file
        self._fd: int | None = None
        self.offsets, self.prompt_lens, self.lengths = offsets, prompt_lens, lengths
        self.pad_id = int(pad_id)
        self._dense: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def on_disk(self) -> bool:
        return not isinstance(self._tokens, np.ndarray)

    def _read_into(self, out: np.ndarray, offset: int) -> None:
        if not self.on_disk:
            out[:] = self._tokens[offset : offset + len(out)]
            return
        if self._fd is None:
            self._fd = os.open(self._tokens, os.O_RDONLY)
        view, pos = memoryview(out).cast("B"), offset * 4
        while len(view):
            n = os.preadv(self._fd, [view], pos)
            if n <= 0:
                raise DataError(f"{self._tokens}: the token file ends early (at byte {pos}); delete it to rebuild")
            view, pos = view[n:], pos + n

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids, answer ids) of row i."""
        ids = np.empty(int(self.lengths[i]), dtype=np.int32)
        self._read_into(ids, int(self.offsets[i]))
        p = int(self.prompt_lens[i])
        return ids[:p], ids[p:]

    def take(self, rows) -> dict[str, np.ndarray]:
        """Rows `rows` as one training batch, right-padded to their own longest row."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows):
            raise ValueError("SftSet.take: no rows")
        lens, plens = self.lengths[rows], self.prompt_lens[rows]
        b, n = len(rows), int(lens.max())
        tokens = np.full((b, n), self.pad_id, dtype=np.int32)
        attn = np.zeros((b, n), dtype=np.uint8)
        loss_mask = np.zeros((b, n), dtype=np.uint8)
        for i, r in enumerate(rows):
            length = int(lens[i])
            self._read_into(tokens[i, :length], int(self.offsets[r]))
            attn[i, :length] = 1
            loss_mask[i, int(plens[i]) : length] = 1
        return {
            "tokens": tokens,
            "attention_mask": attn,
            "loss_mask": loss_mask,
            "behaviour_logprobs": np.zeros((b, n), dtype=np.float32),
            "teacher_logprobs": np.zeros((b, n), dtype=np.float32),
            "policy_version": np.zeros(b, dtype=np.int64),
            "sample_ids": rows.copy(),
        }

    def keys(self) -> tuple[str, ...]:
        return BATCH_KEYS

    def __contains__(self, key) -> bool:
        return key in BATCH_KEYS

    def __getitem__(self, key: str) -> np.ndarray:
        if self._dense is None:
            cells = len(self) * int(self.lengths.max())
            if cells > DENSE_LIMIT:
                raise ValueError(
                    f"SftSet[{key!r}]: packing all {len(self)} rows would take {cells} cells per array "
                    f"(limit {DENSE_LIMIT}); read batches with take(rows)"
                )
            self._dense = self.take(np.arange(len(self)))
        return self._dense[key]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}


class _Encoder:
    """Records to (flat token ids, prompt lengths, lengths, over the caps): one worker task."""

    def __init__(self, fmt: ChatFormat, max_prompt_tokens: int, max_response_tokens: int):
        self.fmt, self.max_prompt, self.max_response = fmt, max_prompt_tokens, max_response_tokens

    def __call__(self, records: list[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, tuple[int, str]]:
        """... and (records the chat template refused, the first refusal): one odd answer among 60k (GLM renders
        an answer with an empty thinking block as no continuation of its prompt) is left out, not the whole set."""
        ids, plens, lens, refused, first = [], [], [], 0, ""
        for rec in records:
            try:
                p, a = self.fmt.sft_ids(rec)
            except TemplateError as err:
                refused, first = refused + 1, first or str(err)
                continue
            if len(p) > self.max_prompt or len(a) > self.max_response:
                continue
            ids.append(np.asarray(p, dtype=np.int32))
            ids.append(np.asarray(a, dtype=np.int32))
            plens.append(len(p))
            lens.append(len(p) + len(a))
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
        over = len(records) - len(lens) - refused
        return flat, np.asarray(plens, dtype=np.int64), np.asarray(lens, dtype=np.int64), over, (refused, first)


_WORKER: _Encoder | None = None


def _start_worker(tokenizer, enable_thinking: bool, stops: tuple[int, ...], caps: tuple[int, int]) -> None:
    global _WORKER
    _WORKER = _Encoder(ChatFormat(tokenizer, enable_thinking=enable_thinking, stops=stops), *caps)


def _work(records: list[Record]):
    return _WORKER(records)


def _source_files(source: Path) -> list[Path]:
    """The files `iter_rows` reads for `source` (what the cache key and the size threshold look at)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        return []
    if any((source / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return sorted(p for p in source.rglob("*") if p.is_file())
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix in SHARD_SUFFIXES)


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str().encode() if backend is not None else pickle.dumps(tokenizer)
    return hashlib.sha256(blob).hexdigest()


def cache_key(source: Path, files: list[Path], fmt: ChatFormat, fields: Fields, caps: tuple[int, int]) -> str:
    """What the token file depends on: the source's files, the tokenizer, the template, the stops and the caps."""
    h = hashlib.sha256()
    parts = {
        "version": CACHE_VERSION,
        "source": str(source.resolve()),
        "files": [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files],
        "tokenizer": _tokenizer_digest(fmt.tokenizer),
        "template": getattr(fmt.tokenizer, "chat_template", None),
        "enable_thinking": fmt.enable_thinking,
        "stops": list(fmt.stop_ids),
        "fields": [fields.prompt, fields.messages, fields.response, fields.id],
        "caps": list(caps),
    }
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _records(source: Path, fields: Fields, counts: dict, progress=None):
    """Usable records of `source`, streamed (as `read_records` checks them: shape, unique ids);
    answers cut at the token cap (`finish_reason: length`) are counted in `counts`, not given.
    `progress`: a `zeda_rl.progress.Progress` advanced by one for every record read."""
    seen: dict[str, str] = {}
    for where, default_id, row in iter_rows(source):
        rec = to_record(row, where, default_id, fields, need_response=True)
        if rec.id in seen:
            raise DataError(f"{where}: id {rec.id!r} already used at {seen[rec.id]}; ids must be unique")
        seen[rec.id] = where
        counts["records"] += 1
        if progress is not None:
            progress.advance()
        if rec.extra.get("finish_reason") == "length":
            counts["cut"] += 1
            continue
        yield rec
    if not seen:
        raise DataError(f"{source}: no records")


def _chunks(records, max_records: int = CHUNK_RECORDS, max_chars: int = CHUNK_CHARS):
    chunk, chars = [], 0
    for rec in records:
        chunk.append(rec)
        chars += len(rec.response) + sum(len(m.get("content", "")) for m in rec.messages)
        if len(chunk) >= max_records or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _count_rows(files: list[Path]) -> int:
    """About how many records `files` hold, cheaply (lines of JSONL, parquet's row count; other formats
    are not counted): the progress bar's total, never a check."""
    n = 0
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            with f.open("rb") as fh:
                n += sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            n += pq.ParquetFile(f).metadata.num_rows
    return n


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=out[1:])
    return out


def load_sft_set(
    source: str | Path,
    fmt: ChatFormat,
    fields: Fields,
    max_prompt_tokens: int,
    max_response_tokens: int,
    *,
    procs: int | None = None,
    cache: str | Path | None = None,
    in_memory_bytes: int = IN_MEMORY_BYTES,
) -> tuple[SftSet, dict]:
    """The usable records of `source` as an SftSet, and counts {records, cut, too_long, from_cache}.

    `cut`: answers the teacher was cut off in (finish_reason: length); `too_long`: records over
    `max_prompt_tokens` / `max_response_tokens`; both are left out. An SftSet of no rows is
    returned when nothing is usable (never cached): the caller says why.
    """
    source = Path(source)
    files = _source_files(source)
    caps = (int(max_prompt_tokens), int(max_response_tokens))
    pad = fmt.tokenizer.pad_token_id or 0
    counts = {"records": 0, "cut": 0, "too_long": 0, "template": 0, "template_first": "", "from_cache": False}
    if sum(f.stat().st_size for f in files) < in_memory_bytes:
        encode = _Encoder(fmt, *caps)
        parts = [encode(chunk) for chunk in _chunks(_records(source, fields, counts))]
        return _in_memory(parts, counts, source, pad)

    root = Path(cache) if cache is not None else cache_dir()
    key = cache_key(source, files, fmt, fields, caps)
    entry = root / key
    meta = _read_meta(entry)
    if meta is not None:
        counts.update({k: meta.get(k, counts[k]) for k in META_COUNTS}, from_cache=True)
        index = np.load(entry / "index.npy")
        return SftSet(str(entry / "tokens.i32"), _offsets(index[:, 1]), index[:, 0], index[:, 1], pad), counts

    if entry.exists():  # incomplete or damaged (a complete one was read above): build it again
        shutil.rmtree(entry, ignore_errors=True)
    tmp = root / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise DataError(
            f"{source}: cannot write its token file under {root} ({err}); set ZEDA_CACHE to a writable directory"
        ) from None
    from zeda_rl.progress import Progress

    try:
        # a 60k-record build takes minutes: a bar on a terminal, a line every 10 s elsewhere (records read)
        with Progress(f"tokenize {source.name}", _count_rows(files), "records") as bar:
            records = _records(source, fields, counts, bar)
            index = _tokenize_to(tmp / "tokens.i32", records, fmt, caps, procs, counts)
        _check_template(counts, source)
        if not len(index):
            return SftSet(np.zeros(0, dtype=np.int32), *(np.zeros(0, dtype=np.int64),) * 3, pad), counts
        np.save(tmp / "index.npy", index)
        meta = {
            "version": CACHE_VERSION,
            "source": str(source.resolve()),
            "files": _fingerprint(files),
            "rows": len(index),
            "tokens": int(index[:, 1].sum()),
            **{k: counts[k] for k in META_COUNTS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first: use theirs
            if _read_meta(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, key, str(source.resolve()), _fingerprint(files))
    return SftSet(str(entry / "tokens.i32"), _offsets(index[:, 1]), index[:, 0], index[:, 1], pad), counts


def _count_refused(counts: dict, refused: tuple[int, str]) -> None:
    counts["template"] += refused[0]
    counts["template_first"] = counts["template_first"] or refused[1]


def _check_template(counts: dict, source: Path) -> None:
    """A few answers the template refuses are data; most of them is a template or config that does not fit."""
    if counts["template"] and 2 * counts["template"] > counts["records"] - counts["cut"]:
        raise TemplateError(
            f"{source}: the chat template refuses {counts['template']} of {counts['records'] - counts['cut']} "
            f"answers; the first: {counts['template_first']}"
        )


def _in_memory(parts, counts: dict, source: Path, pad: int) -> tuple[SftSet, dict]:
    counts["too_long"] = sum(p[3] for p in parts)
    for p in parts:
        _count_refused(counts, p[4])
    _check_template(counts, source)
    if not parts:
        parts = [(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0)]
    tokens = np.concatenate([p[0] for p in parts])
    plens, lens = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    return SftSet(tokens, _offsets(lens), plens, lens, pad), counts


def _tokenize_to(path: Path, records, fmt: ChatFormat, caps, procs: int | None, counts: dict) -> np.ndarray:
    """Tokenize `records` in worker processes (`procs=0`: in this one), appending each chunk's ids to
    `path` in order; returns the [rows, 2] index (prompt length, length). At most 2 chunks per worker
    are in flight, so the records held here do not grow with the source."""
    procs = default_procs() if procs is None else procs
    index: list[np.ndarray] = []
    with path.open("wb") as out:

        def write(result) -> None:
            flat, plens, lens, over, refused = result
            out.write(flat.tobytes())
            index.append(np.stack([plens, lens], axis=1))
            counts["too_long"] += over
            _count_refused(counts, refused)

        if procs == 0:
            encode = _Encoder(fmt, *caps)
            for chunk in _chunks(records):
                write(encode(chunk))
        else:
            _in_workers(records, fmt, caps, procs, write)
    return np.concatenate(index) if index else np.zeros((0, 2), dtype=np.int64)


def _in_workers(records, fmt: ChatFormat, caps, procs: int, write) -> None:
    import multiprocessing

    pending: deque = deque()
    with ProcessPoolExecutor(
        procs,
        mp_context=multiprocessing.get_context("spawn"),  # no fork of a driver with Ray's threads
        initializer=_start_worker,
        initargs=(fmt.tokenizer, fmt.enable_thinking, fmt.stop_ids, caps),
    ) as pool:
        try:
            for chunk in _chunks(records):
                pending.append(pool.submit(_work, chunk))
                while len(pending) > 2 * procs:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _read_meta(entry: Path) -> dict | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    tokens = entry / "tokens.i32"
    if meta.get("version") != CACHE_VERSION or not tokens.is_file() or tokens.stat().st_size != 4 * meta["tokens"]:
        return None
    return meta


def _fingerprint(files: list[Path]) -> list:
    return [[str(f), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def _prune(root: Path, keep: str, source: str, files: list) -> None:
    """Remove the other complete entries of the same source written from other versions of its files (stale).
    Entries of the same files under another tokenizer, template or caps stay: another run may be reading them."""
    for d in root.iterdir():
        if d.name != keep and not d.name.startswith("."):
            meta = _read_meta(d)
            if meta is not None and meta.get("source") == source and meta.get("files", files) != files:
                shutil.rmtree(d, ignore_errors=True)
