"""HumanEval-format code: the candidate runs against the benchmark's tests in the sandbox.

Records are {"task_id", "prompt", "test", "entry_point"} (HumanEval, HumanEval+ in that
layout), optionally "canonical_solution" (a function body, as HumanEval ships it). The
program is the prompt, the candidate, the tests and `check(entry_point)`; it passes when
it exits 0 within the limits. A chat model usually answers with the whole function in a
fenced block, which is appended after the prompt (the prompt's imports and helper
functions stay defined, the candidate's definition wins); an answer that does not define
the entry point is taken as a body completing the prompt, as the original HumanEval does.
Programs run in parallel threads, each waiting on its own sandboxed subprocess.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from zeda_rl.graders.base import Grade, Problem, check_fields, pick, read_jsonl
from zeda_rl.graders.sandbox import Limits, run_python

ROLES = ("id", "prompt", "test", "entry_point", "solution")
TEMPLATE = (
    "Complete the following Python function. Answer with the complete function in a ```python code block.\n"
    "```python\n{prompt}```"
)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(response: str, entry_point: str) -> tuple[str, bool]:
    """(code, defines_entry_point): the fenced block defining the function, else the last block, else the text."""
    blocks = _FENCE.findall(response)
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
    for block in blocks:
        if defines.search(block):
            return block, True
    code = blocks[-1] if blocks else response
    return code, bool(defines.search(code))


def program(problem: Problem, response: str) -> str:
    d = problem.data
    code, full = extract_code(response, d["entry_point"])
    body = d["prompt"] + ("\n" + code if full else code)
    return f"{body}\n\n{d['test']}\n\ncheck({d['entry_point']})\n"


class CodeGrader:
    name = "code"
    template = TEMPLATE

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, workers: int | None = None):
        self.limits = Limits(timeout_s=float(timeout_s), memory_mb=int(memory_mb))
        self.workers = int(workers or os.cpu_count() or 1)

    def load(self, path, fields: dict | None = None) -> list[Problem]:
        fields = check_fields(fields or {}, ROLES, self.name)
        out = []
        for where, rec in read_jsonl(path):
            prompt = pick(rec, where, "prompt", ("prompt",), fields)
            solution = pick(rec, where, "solution", ("canonical_solution",), fields, required=False)
            out.append(
                Problem(
                    id=str(pick(rec, where, "id", ("task_id",), fields, (str, int))),
                    prompt=prompt,
                    data={
                        "prompt": prompt,
                        "test": pick(rec, where, "test", ("test",), fields),
                        "entry_point": pick(rec, where, "entry_point", ("entry_point",), fields),
                    },
                    reference=None if solution is None else f"```python\n{prompt}{solution}```",
                    where=where,
                )
            )
        return out

    def grade(self, problems: list[Problem], responses: list[str]) -> list[Grade]:
        if len(problems) != len(responses):
            raise ValueError(f"code grader: {len(problems)} problems but {len(responses)} responses")
        with ThreadPoolExecutor(self.workers) as pool:
            runs = list(pool.map(lambda pr: run_python(program(*pr), self.limits), zip(problems, responses)))
        return [
            Grade(
                float(r.status == "passed"),
                {
                    "status": r.status,
                    "seconds": round(r.seconds, 3),
                    "network_isolated": r.network_isolated,
                    **(
                        {"stderr": r.stderr.strip().splitlines()[-1][:300]}
                        if r.status != "passed" and r.stderr.strip()
                        else {}
                    ),
                },
            )
            for r in runs
        ]
