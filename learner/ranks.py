"""Collective calls on the learner ranks, and what a dead rank does to them.

Every rank takes part in each collective call (a training step, a save...), so one rank
lost (its process killed, its node gone) leaves the others blocked in a gloo/nccl
collective until the process group's timeout (minutes), and `ray.get` of all their
results would wait as long. `collect` waits for the ranks one at a time instead: the first
result that says a rank's actor died ends the call at once with `RankLost`, which names
the rank and the call, so the driver can stop the run with a clear message while the
last checkpoint is still the resumable state. A rank that only raised (e.g. gloo's
"connection closed by peer" on a survivor) gets `grace_s` for the dead rank's death to
be reported first, since that is the cause worth naming.
"""

from __future__ import annotations

import ray


class RankLost(RuntimeError):
    """A learner rank's actor died: the group cannot take another collective step."""

    def __init__(self, ranks: list[int], world_size: int, what: str, cause: str):
        self.ranks, self.world_size, self.what, self.cause = ranks, world_size, what, cause
        who = ", ".join(str(r) for r in ranks)
        super().__init__(
            f"learner rank{'s' if len(ranks) > 1 else ''} {who} of {world_size} died during {what}: {cause}"
        )


def cause(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " ".join(lines)[:300] or type(err).__name__


def collect(refs: list, what: str, world_size: int | None = None, grace_s: float = 10.0) -> list:
    """Each rank's result of one call (refs in rank order from rank 0); RankLost as soon as a rank is dead."""
    index = {ref: i for i, ref in enumerate(refs)}
    out: list = [None] * len(refs)
    pending, failed = list(refs), None
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=None if failed is None else grace_s)
        if not done:  # the others are stuck in a collective with the rank that raised
            break
        ref = done[0]
        try:
            out[index[ref]] = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            raise RankLost([index[ref]], world_size or len(refs), what, cause(err)) from err
        except ray.exceptions.RayError as err:
            failed = failed or err
    if failed is not None:
        inner = getattr(failed, "cause", None)
        if isinstance(inner, OSError):  # a full disk, a read-only directory: the path and the cause, not a traceback
            raise inner from failed
        raise failed
    return out
