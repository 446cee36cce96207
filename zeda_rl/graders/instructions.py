"""Instruction following (IFEval, IFBench) graded by `if-verifiable`'s checkers.

Records are {"key", "prompt", "instruction_id_list", "kwargs"} as the two benchmarks ship
them. The score of a response is prompt-level strict accuracy (every instruction followed,
the response taken as is) unless `metric` names another of if-verifiable's four.

Offline, three things are refused up front rather than left to surprise at grading time:
- instruction ids the library does not know (it would skip them silently and score the
  prompt on the rest);
- IFEval instructions whose checkers need NLTK data that is not installed: if-verifiable
  ships none, and `length_constraints:number_sentences` and
  `change_case:capital_word_frequency` tokenise with NLTK's `punkt_tab`. Each instruction
  used is probed once at load; a missing resource names the record, the instruction and
  the fix (`nltk_data: DIR` in the suite's grader options, or NLTK_DATA, pointing at a
  copy of the NLTK data). Every other IFEval instruction needs no data;
- IFBench as a whole when its NLTK data is missing, because importing its checkers calls
  `nltk.download` (a network fetch) for punkt, punkt_tab, the perceptron tagger and
  stopwords; we check for them first and never import it without them.
langdetect is seeded so `language:*` checks give the same answer on every run.
"""

from __future__ import annotations

from zeda_rl.graders.base import Grade, Problem, check_fields, pick, read_jsonl

ROLES = ("id", "prompt", "instruction_id_list", "kwargs")
METRICS = {
    "prompt_strict": "binary_strict",
    "prompt_loose": "binary_loose",
    "instruction_strict": "partial_strict",
    "instruction_loose": "partial_loose",
}
IFBENCH_NLTK = (
    "tokenizers/punkt",
    "tokenizers/punkt_tab",
    "taggers/averaged_perceptron_tagger_eng",
    "corpora/stopwords",
)
_PROBE = "This is a probe response. It has two sentences, and SOME capital words."


class InstructionGrader:
    template = "{prompt}"

    def __init__(self, benchmark: str = "ifeval", metric: str = "prompt_strict", nltk_data: str | None = None):
        if metric not in METRICS:
            raise ValueError(f"{benchmark} grader: metric {metric!r} unknown; expected one of {list(METRICS)}")
        self.name, self.benchmark, self.metric = benchmark, benchmark, metric
        import langdetect
        import nltk

        langdetect.DetectorFactory.seed = 0
        if nltk_data and nltk_data not in nltk.data.path:
            nltk.data.path.insert(0, str(nltk_data))
        self._registry = None

    def registry(self) -> dict:
        if self._registry is None:
            if self.benchmark == "ifbench":
                import nltk

                missing = []
                for res in IFBENCH_NLTK:
                    try:
                        nltk.data.find(res)
                    except LookupError:
                        missing.append(res)
                if missing:
                    raise ValueError(
                        f"ifbench grader: NLTK data {missing} not installed, and if-verifiable's IFBench checkers "
                        "would download it at import; put a copy of the NLTK data in a directory and name it with "
                        "the grader option nltk_data (or NLTK_DATA)"
                    )
                from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
            else:
                from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
            self._registry = INSTRUCTION_DICT
        return self._registry

    def load(self, path, fields: dict | None = None) -> list[Problem]:
        fields = check_fields(fields or {}, ROLES, self.name)
        registry, probed, out = self.registry(), set(), []
        for where, rec in read_jsonl(path):
            ids = pick(rec, where, "instruction_id_list", ("instruction_id_list",), fields, list)
            kwargs = pick(rec, where, "kwargs", ("kwargs",), fields, list)
            if len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
                raise ValueError(f"{where}: kwargs must be a list of {len(ids)} objects, one per instruction id")
            for iid, kw in zip(ids, kwargs):
                if iid not in registry:
                    raise ValueError(
                        f"{where}: instruction {iid!r} unknown to if-verifiable's {self.benchmark} checkers"
                    )
                if iid not in probed:
                    self._probe(where, iid, kw, rec)
                    probed.add(iid)
            prompt = pick(rec, where, "prompt", ("prompt",), fields)
            key = pick(rec, where, "id", ("key", "id"), fields, (str, int), required=False)
            out.append(
                Problem(
                    id=str(key if key is not None else len(out)),
                    prompt=prompt,
                    data={"instruction_id_list": ids, "kwargs": kwargs},
                    where=where,
                )
            )
        return out

    def _probe(self, where, iid, kw, rec):
        checker = self.registry()[iid](iid)
        try:
            checker.build_description(**{k: v for k, v in kw.items() if v is not None})
            args = checker.get_instruction_args()
            if args and "prompt" in args:
                checker.build_description(prompt=rec.get("prompt", ""))
            checker.check_following(_PROBE)
        except LookupError as err:
            resource = next((w.strip("'") for w in str(err).split() if w.startswith("'")), "NLTK data")
            raise ValueError(
                f"{where}: instruction {iid!r} needs NLTK resource {resource} which is not installed (no download "
                "at run time); name a directory holding the NLTK data with the grader option nltk_data (or NLTK_DATA)"
            ) from None
        except Exception as err:  # a checker that cannot take these kwargs
            raise ValueError(f"{where}: instruction {iid!r} with kwargs {kw}: {type(err).__name__}: {err}") from None

    def grade(self, problems: list[Problem], responses: list[str]) -> list[Grade]:
        from if_verifiable.common import evaluate_instructions

        out = []
        for p, r in zip(problems, responses, strict=True):
            try:
                results, scores = evaluate_instructions(
                    response=r,
                    instruction_id_list=p.data["instruction_id_list"],
                    kwargs_list=p.data["kwargs"],
                    prompt=p.prompt,
                    instruction_registry=self.registry(),
                )
            except Exception as err:  # counted, shown in the report, never hidden
                out.append(Grade(0.0, {"error": f"{type(err).__name__}: {err}"[:300]}))
                continue
            s = {m: getattr(scores, f) for m, f in METRICS.items()}
            out.append(Grade(float(s[self.metric]), {**s, "followed": [x.strict_pass for x in results]}))
        return out
