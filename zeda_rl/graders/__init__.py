"""Benchmark graders: each reads its benchmark's records and scores responses in [0, 1].

A grader is the one place that knows a benchmark family's record shape and what a right
answer is, so the suite runner (`zeda_rl.suites`) stays generic: it renders
`problem.prompt`, samples, strips the thinking block and hands the answers back here.
"""

from __future__ import annotations

from zeda_rl.graders.base import Grade, Problem, strip_thinking

GRADERS = ("math", "code", "ifeval", "ifbench")


def make_grader(name: str, **options):
    """The grader called `name` in a suite file; options are its own keyword arguments."""
    if name == "math":
        from zeda_rl.graders.math import MathGrader as cls
    elif name == "code":
        from zeda_rl.graders.code import CodeGrader as cls
    elif name in ("ifeval", "ifbench"):
        from zeda_rl.graders.instructions import InstructionGrader

        return _build(InstructionGrader, name, options, benchmark=name)
    else:
        raise ValueError(f"grader {name!r} unknown; expected one of {list(GRADERS)}")
    return _build(cls, name, options)


def _build(cls, name, options, **fixed):
    try:
        return cls(**fixed, **options)
    except TypeError as err:  # an option the grader does not take
        raise ValueError(f"grader {name!r}: {err}") from None


__all__ = ["GRADERS", "Grade", "Problem", "make_grader", "strip_thinking"]
