"""A run's training data, built from its config and tokenizer alone (no Ray, no actors).

The pipeline builds its SFT prompts (or SFT records) and its OPD prompt stream here before
it starts anything, so bad data fails in seconds, not after the cluster is up, and tests
build exactly what a run would train on. Records too long for `data.max_prompt_tokens` /
`data.max_response_tokens` are dropped and counted (metrics event
`data/dropped_too_long/<source>`), never cut mid-answer.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zeda_rl.chat import ChatFormat
from zeda_rl.data import EMBEDDED, DataError, Fields, Record, embedded_records, read_records
from zeda_rl.sft_data import SftSet, load_sft_set


class PackedIds(Sequence):
    """Many prompts' token ids in one int32 array and their offsets; `ids[i]` is prompt i's list.

    A list of lists costs about 36 bytes a token (a pointer and an int object each): 100M prompt tokens of a real
    OPD set would hold 3.6 GB in the driver, twice when SFT and OPD share the file. Packed, they take 4 bytes a token.
    """

    def __init__(self, rows=()):
        flat, ends = array("i"), array("q")
        for row in rows:
            flat.extend(row)
            ends.append(len(flat))
        self.flat, self.starts = np.frombuffer(flat, np.int32), np.concatenate([[0], np.frombuffer(ends, np.int64)])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt {i} of {len(self)}")
        i %= len(self)
        return self.flat[self.starts[i] : self.starts[i + 1]].tolist()


class PromptStream:
    """Prompts as token ids, cycled in a seeded random order.

    Its whole position is `position` (prompts taken so far): `seek(position)` on a stream
    built the same way continues where another one stopped, so a resumed run takes the
    next prompts instead of the first ones again.
    """

    def __init__(self, records: list[Record], ids: Sequence[list[int]], seed: int):
        self.records, self.ids, self.seed = records, ids, seed
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0  # prompts taken so far; also the next prompt's sample id
        self.again: list[tuple[int, int]] = []  # (position, index) to give again before new ones: `reissue`

    def _draw(self) -> int:
        if not self.order:
            self.order = list(range(len(self.ids)))
            self.rng.shuffle(self.order)
        self.position += 1
        return self.order.pop()

    def next_index(self) -> int:
        """Index into `records` / `ids` of the next prompt (for jobs that need the record, not just its ids)."""
        return self._draw()

    def take(self, n: int) -> tuple[list[list[int]], list[int]]:
        """n prompts and their positions in the stream (the sample ids of what is generated from them):
        the ones to give again first (`reissue`), then new ones."""
        prompts, positions = [], []
        while len(prompts) < n:
            position, index = self.again.pop(0) if self.again else (self.position, self._draw())
            prompts.append(self.ids[index])
            positions.append(position)
        return prompts, positions

    def pending(self) -> list[int]:
        """Positions given back by `reissue` and not taken yet: still owed to training (a checkpoint lists them)."""
        return [p for p, _ in self.again]

    def reissue(self, positions: list[int]) -> None:
        """Give the prompts at these earlier positions again, under the same positions, before any new one:
        a resumed run re-admits what was in flight when its checkpoint was written."""
        if any(p >= self.position or p < 0 for p in positions):
            raise ValueError(f"reissue: positions {positions} must be below the stream's position {self.position}")
        wanted, copy = set(positions), PromptStream(self.records, self.ids, self.seed)
        at = {}
        while wanted - at.keys():
            position = copy.position
            index = copy._draw()
            if position in wanted:
                at[position] = index
        self.again.extend((p, at[p]) for p in sorted(wanted))

    def seek(self, position: int) -> None:
        """Continue from `position`, as reached by a stream built the same way."""
        if position < self.position:
            raise ValueError(f"prompt stream at {self.position} cannot go back to {position}")
        while self.position < position:
            self._draw()

    def record_at(self, position: int) -> Record:
        """The record the stream gives at `position` (replays the order on a copy)."""
        copy = PromptStream(self.records, self.ids, self.seed)
        copy.seek(position)
        return self.records[copy._draw()]


@dataclass
class RunData:
    """What a run trains on: SFT prompts to answer (or ready SFT records) and the OPD prompt stream."""

    format: ChatFormat
    opd: PromptStream
    sft: PromptStream | None = None  # prompts the teacher answers ...
    sft_count: int = 0  # ... this many of them
    sft_records: SftSet | None = None  # or given teacher answers, tokenized (data.sft_rollouts)
    dropped: dict[str, int] | None = None  # too-long records per source


def chat_format(cfg, tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer, enable_thinking=cfg.data.enable_thinking)


def _fields(cfg) -> Fields:
    return Fields(**cfg.data.fields.model_dump())


def _prompt_stream(
    cfg, fmt: ChatFormat, source: str, n_embedded: int, seed: int, key: str, dropped: dict, cache: dict | None = None
) -> PromptStream:
    """`cache`: one read and tokenization per file when SFT and OPD share it (60k templated prompts take seconds)."""
    if source == EMBEDDED:  # the built-in tasks, balanced over the families (what the embedded teacher learned)
        kept, ids, n_dropped = _encode(cfg, fmt, _embedded(n_embedded, seed, key, cfg.data.tasks))
    elif cache is not None and source in cache:
        kept, ids, n_dropped = cache[source]
    else:
        kept, ids, n_dropped = _encode(cfg, fmt, read_records(source, _fields(cfg)))
        if cache is not None:
            cache[source] = kept, ids, n_dropped
    dropped[key] = n_dropped
    if not kept:
        raise DataError(
            f"data.{key} ({source}): every one of its {n_dropped} prompts is longer than "
            f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens})"
        )
    return PromptStream(kept, ids, seed)


def _embedded(n: int, seed: int, key: str, suite: str = "basic") -> list[Record]:
    from zeda_rl.tasks import families

    try:
        return embedded_records("train", max(1, n // len(families(suite))), seed, suite)
    except ValueError as err:
        raise DataError(
            f"data.{key}: embedded: {n} prompts asked of the built-in tasks ({err}); "
            "lower sft.prompts or point the source at a prompt file"
        ) from None


def _encode(cfg, fmt: ChatFormat, records: list[Record]) -> tuple[list[Record], PackedIds, int]:
    """(records within data.max_prompt_tokens, their prompt ids, how many were dropped)."""
    kept = []

    def fitting():
        for rec in records:
            p = fmt.prompt_ids(rec)
            if len(p) <= cfg.data.max_prompt_tokens:
                kept.append(rec)
                yield p

    ids = PackedIds(fitting())
    return kept, ids, len(records) - len(kept)


def sft_prompts(
    cfg, fmt: ChatFormat, dropped: dict | None = None, cache: dict | None = None
) -> tuple[PromptStream, int]:
    """The prompts the teacher answers for SFT, and how many of them (sft.prompts; None: all once)."""
    dropped = {} if dropped is None else dropped
    stream = _prompt_stream(
        cfg, fmt, cfg.data.sft_prompts, cfg.sft.prompts or 0, cfg.seed, "sft_prompts", dropped, cache
    )
    if cfg.data.sft_prompts == EMBEDDED:
        return stream, cfg.sft.prompts
    n = cfg.sft.prompts if cfg.sft.prompts is not None else len(stream.ids)
    if n > len(stream.ids):
        raise DataError(
            f"sft.prompts is {n} but data.sft_prompts ({cfg.data.sft_prompts}) has {len(stream.ids)} prompts"
            + (
                f" within data.max_prompt_tokens ({dropped['sft_prompts']} longer ones dropped)"
                if dropped["sft_prompts"]
                else ""
            )
            + ": lower sft.prompts, or set it to null to answer every prompt once"
        )
    return stream, n


def opd_prompts(cfg, fmt: ChatFormat, dropped: dict | None = None, cache: dict | None = None) -> PromptStream:
    """The OPD prompt stream (seeded apart from SFT's, so OPD does not replay SFT's order)."""
    dropped = {} if dropped is None else dropped
    return _prompt_stream(
        cfg, fmt, cfg.data.opd_prompts, max(cfg.sft.prompts or 0, 64), cfg.seed + 1, "opd_prompts", dropped, cache
    )


def sft_records(cfg, fmt: ChatFormat, dropped: dict | None = None, source: str | None = None, **load) -> SftSet:
    """Teacher answers (data.sft_rollouts, or `source`) as token ids: loss only on the answer tokens.

    Tokenized once, in worker processes, into a token file the SFT steps read their batches from
    (`zeda_rl.sft_data`), so the driver holds three ints a record, not a padded copy of the data.
    Answers the teacher was cut off in (`finish_reason: length`, as `zeda rollouts` marks them)
    and records over the length caps are dropped and counted apart, never trained on half.
    `load`: `load_sft_set`'s options (procs, cache, in_memory_bytes).
    """
    dropped = {} if dropped is None else dropped
    source = source or cfg.data.sft_rollouts
    records, counts = load_sft_set(
        source, fmt, _fields(cfg), cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, **load
    )
    cut = counts["cut"]
    dropped["sft_rollouts"] = counts["too_long"]
    if cut:
        dropped["sft_rollouts_cut_at_max_new_tokens"] = cut
    if counts["template"]:  # answers the chat template renders as no continuation of their prompt
        dropped["sft_rollouts_refused_by_template"] = counts["template"]
        from launch.runlog import console

        console.print(
            f"[yellow]{source}: {counts['template']} answer(s) left out, refused by the chat template; the first: "
            f"{counts['template_first'][:400]}"
        )
    if not len(records):
        raise DataError(
            f"data.sft_rollouts ({source}): none of its {counts['records']} records is usable: {cut} were cut at "
            f"the token cap, {counts['template']} refused by the chat template, the rest are longer than "
            f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) or data.max_response_tokens "
            f"({cfg.data.max_response_tokens})"
        )
    return records


def build(cfg, tokenizer, log=None) -> RunData:
    """Everything the run's config asks to train on, checked and tokenized; drops logged to `log`."""
    fmt = chat_format(cfg, tokenizer)
    dropped: dict[str, int] = {}
    cache: dict = {}
    data = RunData(format=fmt, opd=opd_prompts(cfg, fmt, dropped, cache), dropped=dropped)
    if cfg.data.sft_rollouts:
        data.sft_records = sft_records(cfg, fmt, dropped)
    elif cfg.sft.steps:
        data.sft, data.sft_count = sft_prompts(cfg, fmt, dropped, cache)
    if log is not None:
        for key, n in dropped.items():
            log.log("data", f"dropped_too_long/{key}", n)
    return data
