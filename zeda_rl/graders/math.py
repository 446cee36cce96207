"""Math answers (GSM8K, MATH-500, AIME-style records) graded by `math-verify`.

The gold comes from the record's answer field: a GSM8K solution keeps what follows its
`####`, a MATH solution is parsed for its `\\boxed{}`, a bare answer is read as LaTeX. The
response is parsed the same way math-verify's own evaluation does (boxed first, then any
LaTeX or plain expression) and compared symbolically.
"""

from __future__ import annotations

import threading

from zeda_rl.graders.base import Grade, Problem, check_fields, pick, read_jsonl

ROLES = ("id", "prompt", "answer")
PROMPT_NAMES = ("problem", "question", "prompt")
ANSWER_NAMES = ("answer", "solution")
TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."


def gold_text(answer: str) -> str:
    """The gold answer as math-verify's parser reads it best."""
    if "####" in answer:  # GSM8K: worked solution, then "#### 18"
        answer = answer.rpartition("####")[2]
    answer = (
        answer.strip().replace(",", "") if answer.replace(",", "").strip().lstrip("-").isdigit() else answer.strip()
    )
    if "\\boxed" in answer or answer.startswith("$"):
        return answer
    return f"${answer}$"


class MathGrader:
    name = "math"
    template = TEMPLATE

    def __init__(self, timeout_s: int = 5):
        self.timeout_s = int(timeout_s)

    def load(self, path, fields: dict | None = None) -> list[Problem]:
        fields = check_fields(fields or {}, ROLES, self.name)
        out = []
        for where, rec in read_jsonl(path):
            answer = pick(rec, where, "answer", ANSWER_NAMES, fields, (str, int, float))
            gold = gold_text(str(answer))
            if not self._parse(gold):
                raise ValueError(f"{where}: math-verify finds no answer in the gold {str(answer)[:80]!r}")
            pid = pick(rec, where, "id", ("id", "unique_id", "task_id"), fields, (str, int), required=False)
            out.append(
                Problem(
                    id=str(pid if pid is not None else len(out)),
                    prompt=pick(rec, where, "prompt", PROMPT_NAMES, fields),
                    data={"gold": gold},
                    reference=gold if "\\boxed" in gold else f"The answer is \\boxed{{{gold.strip('$')}}}.",
                    where=where,
                )
            )
        return out

    def grade(self, problems: list[Problem], responses: list[str]) -> list[Grade]:
        from math_verify import verify

        out = []
        for p, r in zip(problems, responses, strict=True):
            gold, pred = self._parse(p.data["gold"]), self._parse(r)
            ok = bool(pred) and verify(gold, pred, timeout_seconds=self._timeout())
            out.append(Grade(float(ok), {"pred": [str(x) for x in pred[-1:]]}))
        return out

    def _parse(self, text: str):
        from math_verify import parse

        return parse(text, parsing_timeout=self._timeout())

    def _timeout(self):
        # math-verify times out with SIGALRM, which only the main thread may set
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None
