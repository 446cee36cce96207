"""The built-in task suites: synthetic prompts with verifiable answers.

The embedded teacher learns these, the student must keep solving them after ZEDA, and
exact match is an unambiguous quality measure that needs no judge and no download.
Train and held-out examples are separated by a hash of the prompt, so no held-out prompt
can ever appear in training, whatever the seed or the number of examples drawn.

Two suites. `basic` (the default, unchanged) is easy enough that the tiny teacher solves it
with a wide margin, which also makes it forgiving: skipping half the expert slots with no
training at all barely hurts there, so it cannot show what ZEDA's training buys. `hard`
(4-digit additions with carries, 3- and 4-digit products by one digit) is arithmetic only,
the kind of family on which skipping expert slots hurt most in every teacher tried: its
teacher (zeda_rl.teacher.HARD_MODEL) loses about 20 points to untrained static half-K
(README, "A harder suite"). A character-map family (reverse then shift) was dropped because
skipping never touched it; look-ups over a context, because the teacher reached 2-3% on them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

VERSION = 1  # bump when a basic family changes: it is part of the teacher's cache key
FAMILIES: tuple[str, ...] = ("add", "reverse", "sort", "pattern")  # the basic suite (the default everywhere)
SUITES: dict[str, tuple[str, ...]] = {"basic": FAMILIES, "hard": ("add4", "mul", "mul4")}
VERSIONS = {"basic": VERSION, "hard": 4}  # bump a suite's entry when one of its families changes
LETTERS = "abcdefghijklmnopqrstuvwxyz"
HELDOUT_BUCKETS = 10  # one prompt in ten is held out


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str  # ends with "=": the completion starts right after it
    answer: str


def _add(rng: random.Random) -> Example:
    a, b = rng.randrange(100), rng.randrange(100)
    return Example("add", f"{a}+{b}=", str(a + b))


def _reverse(rng: random.Random) -> Example:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return Example("reverse", f"rev:{s}=", s[::-1])


def _sort(rng: random.Random) -> Example:
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
    return Example("sort", f"sort:{s}=", "".join(sorted(s)))


def _pattern(rng: random.Random) -> Example:
    unit = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 3)))
    shown = rng.randint(2 * len(unit), 3 * len(unit))
    seq = unit * 8
    return Example("pattern", f"pat:{seq[:shown]}=", seq[shown : shown + 4])


# ---- the hard suite ----------------------------------------------------------------------------


def _add4(rng: random.Random) -> Example:
    a, b = rng.randrange(1000, 10000), rng.randrange(1000, 10000)
    return Example("add4", f"{a}+{b}=", str(a + b))


def _times(family: str, digits: int):
    """A `digits`-digit number times one digit from 2 to 9 (mul: 3 digits, mul4: 4)."""

    def make(rng: random.Random) -> Example:
        a, b = rng.randrange(10 ** (digits - 1), 10**digits), rng.randrange(2, 10)
        return Example(family, f"{a}*{b}=", str(a * b))

    return make


_MAKERS = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "pattern": _pattern,
    "add4": _add4,
    "mul": _times("mul", 3),
    "mul4": _times("mul4", 4),
}


def families(suite: str = "basic") -> tuple[str, ...]:
    if suite not in SUITES:
        raise ValueError(f"task suite {suite!r} unknown; expected one of {sorted(SUITES)}")
    return SUITES[suite]


def is_heldout(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def sample(family: str, rng: random.Random, split: str = "train") -> Example:
    """One random example of `family` from `split` (rejection on the prompt hash)."""
    want = _split_flag(split)
    while True:
        ex = _MAKERS[family](rng)
        if is_heldout(ex.prompt) == want:
            return ex


def _split_flag(split: str) -> bool:
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r} unknown; expected 'train' or 'heldout'")
    return split == "heldout"


def make_split(split: str, n_per_family: int, seed: int = 0, suite: str = "basic") -> list[Example]:
    """`n_per_family` distinct examples of every family of `suite` from `split`, deterministic for a seed."""
    _split_flag(split)
    out = []
    for i, fam in enumerate(families(suite)):
        rng = random.Random(f"{split}:{seed}:{fam}")
        seen: dict[str, Example] = {}
        tries = 0
        while len(seen) < n_per_family:
            ex = sample(fam, rng, split)
            seen.setdefault(ex.prompt, ex)
            tries += 1
            if tries > 50 * n_per_family + 1000:
                raise ValueError(f"{split}: only {len(seen)} distinct {fam!r} examples exist, asked for {n_per_family}")
        out.extend(seen.values())
    return out


def score(example: Example, completion: str) -> bool:
    """Exact match: the completion, cut at the first end-of-sequence text or newline, stripped."""
    for stop in ("<eos>", "\n"):
        completion = completion.split(stop, 1)[0]
    return completion.strip() == example.answer
