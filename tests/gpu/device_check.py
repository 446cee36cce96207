"""One prepared GPU check for the lent device machine (one H100 or H200, no network): issue 24, item 4.

    python3 tests/gpu/device_check.py [--steps moe_layer,model,copy,learner] [--out DIR] [--budget 540]
    bash tests/gpu/run_device_check.sh            # the same, through the thin wrapper

Steps (each one runs in its own Python process, under a timeout, so a crash, an out-of-memory or a hang
in one leaves the others running and frees the GPU for the next one):
- `moe_layer` (a): one zero-expert MoE layer at Qwen3-30B-A3B's shape (128 experts + 64 zero slots, top-8,
  hidden 2048, expert width 768, bf16) through the `zeda_skip` experts path (zeda_rl/skip.py) and through
  transformers' grouped_mm: teacher (use_zce_mask on, 8 real experts a token) vs ZEDA (4 real + 4 zero
  slots a token: 50% skipped), prefill of 4,096 tokens and decode at batch 1, 16, 64. CUDA-event medians,
  the speed-up against its physical limit 1/(1 - skipped share).
- `model` (b): zeda_rl's Qwen3MoePlusPlusForCausalLM with 2 layers at real width (random weights, fixed
  seed): greedy tokens on CUDA (fp32) equal to the CPU reference on the same weights, teacher (mask on) and
  ZEDA; then bf16 prefill time and decode tokens/s, teacher vs ZEDA, at batch 1 and 16.
- `copy` (d): host-to-device (pageable, pinned), device-to-device and device-to-host copy of 1 GiB of
  weight buckets (32 x 32 MiB).
- `learner` (c): two Qwen3-30B-A3B-shaped Megatron MoE layers in bf16 with full recompute through the
  project's learner (learner.train.Learner, learner.model.build_model): step time and peak memory against
  `zeda plan`'s prediction (launch.plan.make_plan) for the same config and shape.
- `nccl`: 1 GiB of buckets broadcast and all-reduced between two GPUs (needs a second GPU).
- `sglang`: tests/gpu/test_sglang_real.py (needs SGLang, which the image lacks).
A step that needs what the machine lacks reports "skipped" with the reason; the run stops starting steps
when a step's estimate no longer fits the global time budget (default 540 s, under the device tool's
600 s limit). Results: device_check.json and device_check.md (and device_check.log, every step's output)
in --out, default $OUT (the device tool's folder that comes back), else runs/device_check.

Wheels: every *.whl in --wheels (default wheels/ at the repository root) is pip-installed with --no-deps
into a private folder put first on the steps' PYTHONPATH, unless that very version is already importable
(tests/gpu/README.md lists them and how to fetch them). `--rehearse` runs the CUDA steps on the CPU at tiny
shapes: a rehearsal of the code paths, not a measurement.

This module imports only the standard library at import time; torch and the project are imported inside
the step functions, in the step's own process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
JSON_NAME = "device_check.json"
MD_NAME = "device_check.md"
LOG_NAME = "device_check.log"
DEFAULT_BUDGET_S = 540.0  # the device tool stops a command at 600 s: stop starting steps before ~9 minutes
GRACE_S = 30.0  # a running step may overrun the budget by this much before it is killed
ENV_TIMEOUT_S = 180.0
PIP_TIMEOUT_S = 180.0
NO_CUDA = "no CUDA device"
GIB = 1 << 30

# Qwen3-30B-A3B's shape: the project's copy of its published config.json; N_Z = N/2 as ZEDA converts it
QWEN3_30B_A3B_CONFIG = ROOT / "tests" / "fixtures" / "configs" / "qwen3-30b-a3b.json"
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
)
ZERO_EXPERTS = 64
TINY = dict(  # --rehearse: the same structure at a size a CPU runs in seconds
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=16,
    num_experts_per_tok=4,
    vocab_size=512,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
TINY_ZERO = 8

# what a missing module is shipped as (tests/gpu/README.md)
WHEEL_HINTS = {
    "megatron.core": "megatron-core==0.16.1",
    "pydantic": "pydantic==2.14.4 with pydantic_core==2.50.5, annotated-types, typing-inspection, typing_extensions",
    "zmq": "pyzmq==27.3.0",
    "yaml": "PyYAML",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "msgpack": "msgpack",
}
VERSIONS = (  # distributions whose versions the report records
    "torch",
    "triton",
    "transformers",
    "safetensors",
    "msgpack",
    "numpy",
    "megatron-core",
    "pydantic",
    "pydantic_core",
    "pyzmq",
    "huggingface_hub",
    "sglang",
    "ray",
)
PROBED_MODULES = (
    "torch",
    "transformers",
    "safetensors",
    "msgpack",
    "yaml",
    "megatron.core",
    "pydantic",
    "zmq",
    "sglang",
)


@dataclass(frozen=True)
class Step:
    name: str
    part: str  # the brief's item: (a) .. (d), or "extra"
    title: str
    estimate_s: float  # expected time including its imports: a step is started only when this fits the budget
    cap_s: float  # the step's own timeout (the budget's end plus GRACE_S can cut it shorter)
    needs_cuda: bool = True
    min_gpus: int = 1
    modules: tuple[str, ...] = ()  # import names the step needs
    missing_note: str = ""  # what to say when a module is missing, instead of the wheel hint


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step(
            "moe_layer",
            "(a)",
            "one zero-expert MoE layer at Qwen3-30B-A3B's shape: zeda_skip and grouped_mm, teacher vs ZEDA",
            75,
            180,
            modules=("transformers", "safetensors"),
        ),
        Step(
            "model",
            "(b)",
            "Qwen3MoePlusPlusForCausalLM (2 layers, real width): greedy tokens CUDA == CPU, tokens/s",
            120,
            270,
            modules=("transformers", "safetensors"),
        ),
        Step("copy", "(d)", "host-to-device and device-to-device copy of 1 GiB of weight buckets", 30, 120),
        Step(
            "learner",
            "(c)",
            "two Qwen3-30B-A3B-shaped Megatron MoE layers, bf16 + full recompute: step time and peak memory vs zeda plan",
            200,
            360,
            modules=("transformers", "safetensors", "yaml", "megatron.core", "pydantic", "zmq"),
        ),
        Step(
            "nccl",
            "extra",
            "NCCL broadcast and all-reduce of 1 GiB of buckets between two GPUs",
            60,
            150,
            min_gpus=2,
        ),
        Step(
            "sglang",
            "extra",
            "the real SGLang engine and plugin (tests/gpu/test_sglang_real.py)",
            300,
            480,
            modules=("sglang",),
            missing_note="SGLang is not installed: the image has none, and it cannot travel within the 64 MiB of wheels "
            "a device call carries",
        ),
    )
}
DEFAULT_STEPS = tuple(STEPS)


# ---- arguments ------------------------------------------------------------------------------------


def parse_steps(text: str) -> list[str]:
    """Comma-separated step names, in the order given; an unknown or repeated name is refused naming the known ones."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no step named; known steps: {', '.join(STEPS)}")
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown step{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}; "
            f"known steps: {', '.join(STEPS)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"step {', '.join(repr(r) for r in repeated)} named twice")
    return names


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="device_check",
        description="zeda-rl's prepared GPU check (tests/gpu/README.md): MoE layer, model, copies, learner",
    )
    ap.add_argument(
        "--steps",
        type=parse_steps,
        default=list(DEFAULT_STEPS),
        help=f"comma-separated steps to run, in order (default: all: {','.join(DEFAULT_STEPS)})",
    )
    ap.add_argument("--out", default=None, help="results folder (default: $OUT, else runs/device_check)")
    ap.add_argument(
        "--budget",
        type=positive_seconds,
        default=DEFAULT_BUDGET_S,
        help=f"global time budget in seconds: no step starts whose estimate would overrun it (default {DEFAULT_BUDGET_S:g})",
    )
    ap.add_argument("--wheels", default=None, help="folder of wheels to install when missing (default: wheels/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rehearse",
        action="store_true",
        help="run the CUDA steps on the CPU at tiny shapes: checks the code paths, measures nothing",
    )
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    # the step processes this script starts
    ap.add_argument("--worker", default=None, choices=["env", *STEPS], help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=positive_seconds, default=None, help=argparse.SUPPRESS)
    return ap


def out_dir(arg: str | None, environ: dict | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(arg or environ.get("OUT") or ROOT / "runs" / "device_check")


# ---- budget ---------------------------------------------------------------------------------------


class Budget:
    """The global time budget of one run: which steps may still start, and how long a started one may run."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic, grace_s: float = GRACE_S):
        self.total_s, self.grace_s, self.clock = float(total_s), float(grace_s), clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        """A step expected to take `estimate_s` may start: it would end inside the budget."""
        return estimate_s <= self.left()

    def timeout_for(self, cap_s: float) -> float:
        """A started step's timeout: its own cap, cut at the budget's end plus the grace."""
        return max(1.0, min(float(cap_s), self.left() + self.grace_s))

    def refusal(self, step: Step) -> str:
        return (
            f"time budget: {max(self.left(), 0):.0f} s of {self.total_s:.0f} s left, "
            f"the step needs ~{step.estimate_s:.0f} s"
        )


# ---- environment and skip reasons ---------------------------------------------------------------


def skip_reason(step: Step, env: dict, rehearse: bool = False, wheels_dir: str = "wheels") -> str | None:
    """Why `step` cannot run on the machine `env` describes (None: it can). No CUDA comes first, alone."""
    if step.needs_cuda and not rehearse and not env.get("cuda"):
        if env.get("error"):  # the probe itself failed: say why CUDA could not be seen
            return f"{NO_CUDA} (the environment probe failed: {str(env['error']).strip().splitlines()[-1][:200]})"
        if env.get("torch_error"):
            return f"{NO_CUDA} (torch did not import: {env['torch_error'][:200]})"
        return NO_CUDA
    gpus = int(env.get("gpus") or 0)
    if step.min_gpus > 1 and not rehearse and gpus < step.min_gpus:
        return f"needs {step.min_gpus} GPUs, this machine has {gpus}"
    modules = env.get("modules") or {}
    missing = [m for m in step.modules if not modules.get(m)]
    if missing:
        if step.missing_note:
            return step.missing_note
        hints = "; ".join(f"{m} (ship {WHEEL_HINTS.get(m, m)})" for m in missing)
        return (
            f"not importable: {hints}. No wheel for it was shipped in {wheels_dir}/ or it did not install: "
            "see tests/gpu/README.md"
        )
    return None


def probe_env() -> dict:
    """The machine as the steps will see it (run in a step process: it imports torch)."""
    import importlib.metadata as md
    import importlib.util
    import platform

    out: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cuda": False,
        "gpus": 0,
        "devices": [],
    }
    versions = {}
    for dist in VERSIONS:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    out["versions"] = versions
    modules = {}
    for mod in PROBED_MODULES:
        try:
            modules[mod] = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            modules[mod] = False
    out["modules"] = modules
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda"] = bool(torch.cuda.is_available())
        if out["cuda"]:
            out["gpus"] = torch.cuda.device_count()
            for i in range(out["gpus"]):
                p = torch.cuda.get_device_properties(i)
                out["devices"].append(
                    dict(
                        name=p.name,
                        memory_gib=round(p.total_memory / GIB, 1),
                        capability=f"sm_{p.major}{p.minor}",
                        multiprocessors=p.multi_processor_count,
                    )
                )
    except Exception as err:  # a torch that does not import is reported, not fatal
        out["torch_error"] = f"{type(err).__name__}: {err}"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if smi.returncode == 0:
            out["nvidia_smi"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ---- wheels ---------------------------------------------------------------------------------------


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"{path.name}: not a wheel file name (name-version-python-abi-platform.whl)")
    return parts[0].lower().replace("_", "-").replace(".", "-"), parts[1]


def installed_version(dist: str) -> str | None:
    import importlib.metadata as md

    for name in {dist, dist.replace("-", "_")}:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def prepare_wheels(wheels_dir: Path, target: Path, python: str = sys.executable) -> dict:
    """pip-install (--no-deps, --no-index) each wheel in `wheels_dir` whose version is not already installed."""
    info: dict = {"dir": str(wheels_dir), "target": None, "present": [], "installed": [], "error": None}
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    todo: list[tuple[str, Path]] = []
    for w in wheels:
        try:
            dist, version = wheel_name(w)
        except ValueError as err:
            info["error"] = str(err)
            continue
        have = installed_version(dist)
        if have == version:
            info["present"].append(f"{dist}=={version}")
        else:
            todo.append((f"{dist}=={version}" + (f" (over {have})" if have else ""), w))
    if not todo:
        return info
    target.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    cmd += ["--disable-pip-version-check", "--upgrade", "--target", str(target), *(str(w) for _, w in todo)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if proc.returncode != 0:
            info["error"] = f"pip install failed (rc {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}"
            return info
    except (OSError, subprocess.SubprocessError) as err:
        info["error"] = f"pip install failed: {err}"
        return info
    info["target"] = str(target)
    info["installed"] = [name for name, _ in todo]
    return info


def child_environ(wheels: dict, environ: dict | None = None) -> dict:
    env = dict(os.environ if environ is None else environ)
    paths = [p for p in (wheels.get("target"), str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ---- running the steps ----------------------------------------------------------------------------


def run_worker(
    name: str, timeout_s: float, args: argparse.Namespace, environ: dict, log_path: Path | None
) -> tuple[dict | None, str, float]:
    """Run one step in its own process; (its JSON answer or None, the end of its output, seconds)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"device-check-{name}-"))
    result = tmp / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result)]
    cmd += ["--seconds", f"{timeout_s:.0f}", "--seed", str(args.seed)] + (["--rehearse"] if args.rehearse else [])
    try:
        return _run_worker(name, timeout_s, cmd, result, tmp, environ, log_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_worker(
    name: str, timeout_s: float, cmd: list[str], result: Path, tmp: Path, environ: dict, log_path: Path | None
) -> tuple[dict | None, str, float]:
    t0 = time.monotonic()
    log = tmp / "output.log"
    with open(log, "wb") as fh:
        # its own process group (not a new session: the device tool still ends it with the command)
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=fh, stderr=subprocess.STDOUT, **group)
        _ACTIVE["pid"] = proc.pid
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group (NCCL ranks included)
            except ProcessLookupError:
                pass
            proc.wait()
        finally:
            _ACTIVE.pop("pid", None)
    seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    if log_path is not None:
        with open(log_path, "a") as fh:
            fh.write(f"\n===== {name} (rc {proc.returncode}, {seconds:.1f} s) =====\n{text}")
    answer = None
    if result.is_file():
        try:
            answer = json.loads(result.read_text())
        except json.JSONDecodeError:
            answer = None
    if timed_out:
        answer = {"error": f"timed out after {timeout_s:.0f} s and was killed", **(answer or {})}
    elif answer is None:
        answer = {"error": f"the step process exited with rc {proc.returncode} without an answer"}
    return answer, text[-4000:], seconds


_ACTIVE: dict[str, int] = {}  # the step process in flight


def _stop(signum, frame) -> None:
    """SIGTERM / SIGINT: end the step in flight (its whole process group), then unwind to write the report."""
    pid = _ACTIVE.pop("pid", None)
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def step_record(step: Step) -> dict:
    return dict(name=step.name, part=step.part, title=step.title, status="pending", reason=None, seconds=None)


def settle(rec: dict, answer: dict, tail: str, seconds: float) -> dict:
    """A step's record from its process's answer: ok, partial (some parts failed), failed."""
    rec["seconds"] = round(seconds, 1)
    if answer.get("error"):
        rec.update(status="failed", reason=answer["error"].strip().splitlines()[-1][:300], error=answer["error"])
        rec["log_tail"] = tail[-3000:]
    else:
        result = answer.get("result") or {}
        rec["result"] = result
        rec["status"] = "partial" if result.get("errors") else "ok"
        if result.get("errors"):
            rec["reason"] = "failed parts: " + ", ".join(result["errors"])
    return rec


def run_checks(
    names: list[str],
    env: dict,
    budget: Budget,
    runner: Callable[[str, float], tuple[dict, str, float]],
    rehearse: bool = False,
    wheels_dir: str = "wheels",
    on_update: Callable[[list[dict]], None] | None = None,
    records: list[dict] | None = None,
) -> list[dict]:
    """Every named step: skipped (with its reason), refused by the budget, or run through `runner`.

    `records` (appended to, step by step) lets the caller report the step in flight if the run is stopped."""
    records = [] if records is None else records
    for name in names:
        step = STEPS[name]
        rec = step_record(step)
        records.append(rec)
        reason = skip_reason(step, env, rehearse, wheels_dir)
        if reason is None and not budget.allows(step.estimate_s):
            reason = budget.refusal(step)
        if reason is not None:
            rec.update(status="skipped", reason=reason)
        else:
            print(f"[device_check] {name}: running (timeout {budget.timeout_for(step.cap_s):.0f} s)", flush=True)
            rec["status"] = "running"
            try:
                settle(rec, *runner(name, budget.timeout_for(step.cap_s)))
            except Exception:  # the runner itself broke: record it and go on
                rec.update(status="failed", reason="runner error", error=traceback.format_exc())
        print(f"[device_check] {name}: {status_text(rec)}", flush=True)
        if on_update is not None:
            on_update(records)
    return records


# ---- the report -----------------------------------------------------------------------------------


def status_text(rec: dict) -> str:
    return f"{rec['status']}: {rec['reason']}" if rec.get("reason") else rec["status"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: list, rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _env_line(env: dict) -> str:
    devs = env.get("devices") or []
    gpu = ", ".join(f"{d['name']} ({d['memory_gib']} GiB, {d['capability']})" for d in devs) or "no CUDA device"
    v = env.get("versions") or {}
    soft = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "megatron-core", "sglang") if v.get(k))
    cuda = f" (CUDA {env['torch_cuda']})" if env.get("torch_cuda") else ""
    return f"{gpu}; Python {env.get('python', '?')}; {soft}{cuda}"


def render_markdown(report: dict) -> str:
    """The readable summary of a report (the JSON's content, for people)."""
    env, steps = report.get("env") or {}, report.get("steps") or []
    lines = [
        "# zeda-rl device check",
        "",
        f"- machine: {_env_line(env)}",
        f"- run: {report.get('started', '?')}, {report.get('elapsed_s', 0):.0f} s of a {report.get('budget_s', 0):.0f} s "
        f"budget{'; REHEARSAL on the CPU at tiny shapes: no measurement' if report.get('rehearse') else ''}",
    ]
    w = report.get("wheels") or {}
    if w.get("installed") or w.get("present") or w.get("error"):
        lines.append(
            f"- wheels ({w.get('dir')}): installed {', '.join(w.get('installed') or []) or 'none'}; "
            f"already there {', '.join(w.get('present') or []) or 'none'}"
            + (f"; error: {w['error']}" if w.get("error") else "")
        )
    if env.get("error"):
        lines.append(f"- environment probe failed: {env['error']}")
    lines += ["", "## Steps", ""]
    lines += _table(
        ["step", "part", "status", "seconds", "result"],
        [
            [s["name"], s["part"], status_text(s), s.get("seconds"), (s.get("result") or {}).get("headline", "")]
            for s in steps
        ],
    )
    for s in steps:
        result = s.get("result")
        if not result and not s.get("error"):
            continue
        lines += ["", f"## {s['part']} {s['name']}: {s['title']}", ""]
        if result:
            if result.get("headline"):
                lines += [result["headline"], ""]
            for t in result.get("tables") or []:
                body = _table(t["columns"], t["rows"]) if t.get("rows") else ["(nothing measured)"]
                lines += [f"**{t['title']}**", ""] + body + [""]
            flat = (str, int, float, bool, type(None))
            scalars = {
                k: ", ".join(_cell(x) for x in v) if isinstance(v, list) else _cell(v)
                for k, v in result.items()
                if k not in ("headline", "tables", "errors", "notes")
                and (isinstance(v, flat) or (isinstance(v, list) and all(isinstance(x, flat) for x in v)))
            }
            lines += [f"- {k}: {v}" for k, v in scalars.items()]
            lines += [f"- note: {n}" for n in result.get("notes") or []]
            for part, err in (result.get("errors") or {}).items():
                lines += ["", f"failed part `{part}`:", "", "```", err.strip()[-1500:], "```"]
        if s.get("error"):
            lines += ["", "```", s["error"].strip()[-2000:], "```"]
        if s.get("log_tail"):
            lines += ["", "output (end):", "", "```", s["log_tail"].strip()[-2000:], "```"]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """device_check.json and device_check.md in `out` (written whole each time: a killed run keeps the last)."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / JSON_NAME, out / MD_NAME
    tmp = out / f".{JSON_NAME}.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(js)
    tmp = out / f".{MD_NAME}.tmp"
    tmp.write_text(render_markdown(report))
    tmp.replace(md)
    return js, md


def _git() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        return {
            "commit": head.stdout.strip() or None,
            "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.list:
        for s in STEPS.values():
            print(f"{s.name:10s} {s.part:6s} ~{s.estimate_s:.0f} s  {s.title}")
        return 0
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _stop)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        return _run(args, argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    budget = Budget(args.budget)
    out = out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    log_path.write_text("")
    wheels_dir = Path(args.wheels) if args.wheels else ROOT / "wheels"
    report = dict(
        check="zeda-rl device check",
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv[1:] if argv is None else list(argv),
        budget_s=budget.total_s,
        rehearse=bool(args.rehearse),
        git=_git(),
        wheels={},
        env={},
        steps=[],
        elapsed_s=0.0,
    )

    def update(records: list[dict]) -> None:
        report["steps"], report["elapsed_s"] = records, round(budget.elapsed(), 1)
        write_report(report, out)

    wheels = prepare_wheels(wheels_dir, Path(tempfile.gettempdir()) / "zeda-device-check-site")
    report["wheels"] = wheels
    environ = child_environ(wheels)
    answer, tail, _ = run_worker("env", min(ENV_TIMEOUT_S, budget.timeout_for(ENV_TIMEOUT_S)), args, environ, log_path)
    env = answer.get("result") or {"error": answer.get("error", "no answer"), "log_tail": tail[-2000:]}
    report["env"] = env
    print(f"[device_check] machine: {_env_line(env)}", flush=True)
    update([])
    records: list[dict] = []
    try:
        run_checks(
            args.steps,
            env,
            budget,
            lambda name, timeout: run_worker(name, timeout, args, environ, log_path),
            rehearse=args.rehearse,
            wheels_dir=str(wheels_dir),
            on_update=update,
            records=records,
        )
    except BaseException as stop:  # stopped from outside (SIGTERM, Ctrl-C): report what there is
        for rec in records:
            if rec["status"] in ("pending", "running"):
                rec.update(status="failed", reason=f"stopped ({type(stop).__name__} {stop}) while running")
        report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        update(records)
        raise
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    update(records)
    print(f"[device_check] wrote {out / JSON_NAME} and {out / MD_NAME}", flush=True)
    return 1 if any(r["status"] == "failed" for r in records) else 0


# ---- inside a step's process ----------------------------------------------------------------------


class Ctx:
    """What a step function gets: where to run, its seed, and when to stop repeating."""

    def __init__(self, seconds: float | None, seed: int = 0, rehearse: bool = False):
        self.rehearse, self.seed = rehearse, seed
        self.t0 = time.monotonic()
        self.deadline = self.t0 + (seconds or 600.0) - max(10.0, 0.1 * (seconds or 600.0))
        import torch

        self.cuda = torch.cuda.is_available() and not rehearse
        self.device = "cuda" if self.cuda else "cpu"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def worker_main(args: argparse.Namespace) -> int:
    time.sleep(float(os.environ.get("ZEDA_DEVICE_CHECK_SLEEP") or 0))  # tests: a step that overruns its timeout
    try:
        if args.worker == "env":
            result = probe_env()
        else:
            result = WORKERS[args.worker](Ctx(args.seconds, args.seed, args.rehearse))
        answer = {"result": result}
        rc = 0
    except Exception:
        answer, rc = {"error": traceback.format_exc()}, 1
    if args.result:
        Path(args.result).write_text(json.dumps(answer, default=str))
    else:
        print(json.dumps(answer, indent=2, default=str))
    return rc


def _tb() -> str:
    return traceback.format_exc()[-3000:]


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def bench(ctx: Ctx, fns: dict[str, Callable[[], object]], warmup: int, repeats: int, min_repeats: int = 3) -> dict:
    """Median milliseconds of each function, interleaved repeat by repeat (CUDA events on the GPU)."""
    import torch

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ctx.sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        if i >= min_repeats and ctx.left() < 0:
            break
        for k, fn in fns.items():
            if ctx.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: dict(median_ms=round(_median(v), 4), repeats=len(v)) for k, v in times.items()}


def _dims(ctx: Ctx, layers: int | None = None) -> tuple[dict, int]:
    d = dict(TINY if ctx.rehearse else _qwen3_30b_a3b())
    if layers is not None:
        d["num_hidden_layers"] = layers
    return d, TINY_ZERO if ctx.rehearse else ZERO_EXPERTS


def _qwen3_30b_a3b() -> dict:
    """The real model's dimensions, read from the fixture config (transformers 5 names its rope settings)."""
    raw = json.loads(QWEN3_30B_A3B_CONFIG.read_text())
    return {
        **{k: raw[k] for k in SHAPE_KEYS},
        "rope_parameters": {"rope_type": "default", "rope_theta": raw["rope_theta"]},
    }


def _zero_config(dims: dict, zero: int):
    """The converted (zero-expert) transformers config of a Qwen3-MoE of these dims."""
    from zeda_rl.modeling import Qwen3MoePlusPlusConfig
    from zeda_rl.tiny import tiny_qwen3_moe_config

    base = tiny_qwen3_moe_config(**dims).to_dict()
    base.pop("model_type", None)
    base["architectures"] = ["Qwen3MoePlusPlusForCausalLM"]
    return Qwen3MoePlusPlusConfig(**base, zce_nums=[zero], zce_types=["zero"], use_zce_mask=False)


def _free(ctx: Ctx) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


def step_moe_layer(ctx: Ctx) -> dict:
    """(a) One MoE layer: teacher (mask on, K real experts a token) vs ZEDA (K/2 real + K/2 zero slots)."""
    import dataclasses

    import torch

    import zeda_rl  # noqa: F401  (registers zeda_skip with transformers)
    from zeda_rl import skip
    from zeda_rl.modeling import Qwen3MoePlusPlusSparseMoeBlock

    dims, nz = _dims(ctx)
    h, n, k = dims["hidden_size"], dims["num_experts"], dims["num_experts_per_tok"]
    prefill = 256 if ctx.rehearse else 4096
    decode = (1, 4) if ctx.rehearse else (1, 16, 64)
    reps = (3, 3) if ctx.rehearse else (20, 50)  # prefill, decode
    cfg = _zero_config(dims, nz)
    cfg._experts_implementation = skip.NAME
    torch.manual_seed(ctx.seed)
    block, _ = _build(ctx, lambda: Qwen3MoePlusPlusSparseMoeBlock(cfg))  # random init on the GPU: seconds, not tens
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(ctx.device, torch.bfloat16).eval()
    if block.experts.config is not cfg:
        raise RuntimeError("the experts module does not read the block's config: cannot switch implementations")
    zeda_spec = block.gate.spec
    teacher_spec = dataclasses.replace(zeda_spec, mask_zero=True)
    g = torch.Generator().manual_seed(ctx.seed)

    def slots(rows: int, real: int) -> torch.Tensor:  # [rows, K]: `real` distinct real experts, the rest zero slots
        r = torch.rand(rows, n, generator=g).argsort(-1)[:, :real]
        z = n + torch.rand(rows, nz, generator=g).argsort(-1)[:, : k - real]
        return torch.cat([r, z], -1)

    def run(x, ids, spec):
        block.gate.spec = spec
        block.replay, block.replay_pos = ids, 0
        try:
            return block(x)
        finally:
            block.replay, block.gate.spec = None, zeda_spec

    rows, errors, raw, agree = [], {}, {}, []
    shapes = [("prefill", 1, prefill)] + [("decode", b, 1) for b in decode]
    for phase, b, s in shapes:
        x = torch.randn(b, s, h, generator=g).to(ctx.device, torch.bfloat16)
        t_ids = slots(b * s, k).view(b, s, k).to(ctx.device)
        z_ids = slots(b * s, k // 2).view(b, s, k).to(ctx.device)
        share = float((z_ids >= n).float().mean())
        limit = 1.0 / (1.0 - share)
        label = f"{phase} {b * s} tokens" if phase == "prefill" else f"decode batch {b}"
        outs = {}
        for impl in (skip.NAME, "grouped_mm"):
            cfg._experts_implementation = impl
            try:
                with torch.no_grad():
                    outs[impl] = run(x, z_ids, zeda_spec).float()
                    t = bench(
                        ctx,
                        {"teacher": lambda: run(x, t_ids, teacher_spec), "zeda": lambda: run(x, z_ids, zeda_spec)},
                        warmup=3,
                        repeats=reps[0] if phase == "prefill" else reps[1],
                    )
            except Exception:
                errors[f"{impl} {label}"] = _tb()
                continue
            tt, tz = t["teacher"]["median_ms"], t["zeda"]["median_ms"]
            speed = tt / tz if tz > 0 else float("nan")
            raw[f"{impl} {label}"] = dict(teacher=t["teacher"], zeda=t["zeda"], skipped_share=share)
            rows.append(
                [label, impl, tt, tz, round(tz / tt, 3), round(speed, 3), round(limit, 3), round(speed / limit, 3)]
            )
        if len(outs) == 2:
            a, c = outs[skip.NAME], outs["grouped_mm"]
            agree.append([label, round(float((a - c).abs().max() / c.abs().max().clamp_min(1e-12)), 5)])
        cfg._experts_implementation = skip.NAME
        outs = None
        _free(ctx)

    def pick(label: str, impl: str) -> str:
        r = next((r for r in rows if r[0] == label and r[1] == impl), None)
        return f"x{r[5]:.2f}" if r else "n/a"

    pre = f"prefill {prefill} tokens"
    headline = (
        f"ZEDA vs teacher at 50% skipped (limit x2.00): zeda_skip {pick(pre, skip.NAME)} prefill, decode "
        + "/".join(pick(f"decode batch {b}", skip.NAME) for b in decode)
        + f" (batch {'/'.join(map(str, decode))}); grouped_mm {pick(pre, 'grouped_mm')} prefill, decode "
        + "/".join(pick(f"decode batch {b}", "grouped_mm") for b in decode)
    )
    return dict(
        headline=headline,
        shape=f"hidden {h}, expert width {dims['moe_intermediate_size']}, {n} experts + {nz} zero slots, top-{k}, bf16",
        device=ctx.device,
        tables=[
            dict(
                title="median time per layer forward (ms); speed-up = teacher / ZEDA, limit = 1 / (1 - skipped share)",
                columns=[
                    "shape",
                    "experts impl",
                    "teacher ms",
                    "ZEDA ms",
                    "ZEDA/teacher",
                    "speed-up",
                    "limit",
                    "of limit",
                ],
                rows=rows,
            ),
            dict(
                title="agreement of the two paths on the ZEDA routing (bf16): max |zeda_skip - grouped_mm| / max |grouped_mm|",
                columns=["shape", "relative difference"],
                rows=agree,
            ),
        ],
        raw=raw,
        errors=errors,
        notes=[
            "routing is replayed: teacher = use_zce_mask on with K distinct real experts a token; ZEDA = K/2 real "
            "experts + K/2 zero slots a token, drawn uniformly (balanced expert load)",
        ],
    )


@dataclass
class Gen:
    tokens: object  # [B, n] on the CPU
    margins: list[float]  # per step: the smallest top-1 minus top-2 logit over the batch
    first_logits: object  # [B, V] fp32 on the CPU
    prefill_s: float
    decode_s: float


def greedy(ctx: Ctx, model, prompt, new: int, margins: bool = False) -> Gen:
    """Greedy decoding with the KV cache, `new` tokens, no stop token; prefill and decode timed apart."""
    import torch

    mg, first = [], None
    with torch.no_grad():
        ctx.sync()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ctx.sync()
        t1 = time.perf_counter()
        toks = [nxt]
        if margins:
            first = logits.float().cpu()
        for i in range(new - 1):
            if margins:
                top = logits.float().topk(2, -1).values
                mg.append(float((top[:, 0] - top[:, 1]).min()))
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
        if margins:
            top = logits.float().topk(2, -1).values
            mg.append(float((top[:, 0] - top[:, 1]).min()))
        tokens = torch.cat(toks, 1).cpu()
        ctx.sync()
        t2 = time.perf_counter()
    return Gen(tokens, mg, first, t1 - t0, t2 - t1)


def _build(ctx: Ctx, make: Callable[[], object]):
    """`make()` under the device (fast random init on the GPU), else on the CPU; (object, where)."""
    import torch

    if ctx.cuda:
        try:
            with torch.device(ctx.device):
                return make(), ctx.device
        except Exception:
            _free(ctx)
    return make(), "cpu"


def step_model(ctx: Ctx) -> dict:
    """(b) The zero-expert transformers model: greedy tokens on CUDA == CPU (fp32), then bf16 tokens/s."""
    import copy

    import torch

    import zeda_rl  # noqa: F401
    from zeda_rl.modeling import Qwen3MoePlusPlusForCausalLM, record_routing, set_zce_mask

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dims, nz = _dims(ctx, layers=2)
    n = dims["num_experts"]
    cfg = _zero_config(dims, nz)
    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    model, built_on = _build(ctx, lambda: Qwen3MoePlusPlusForCausalLM(cfg).eval())
    model = model.float()
    ref = copy.deepcopy(model).to("cpu").eval()
    model = model.to(ctx.device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    impl = model.config._experts_implementation
    g = torch.Generator().manual_seed(ctx.seed + 1)
    v = dims["vocab_size"]
    batch, plen, new = (2, 16, 8) if ctx.rehearse else (2, 32, 24)
    prompt = torch.randint(0, v, (batch, plen), generator=g)
    errors, check_rows, raw = {}, [], {}
    for variant, mask in (("teacher", True), ("zeda", False)):
        try:
            set_zce_mask(ref, mask)
            set_zce_mask(model, mask)
            cpu = greedy(ctx, ref, prompt, new, margins=True)
            dev = greedy(ctx, model, prompt.to(ctx.device), new, margins=True)
            same = torch.equal(cpu.tokens, dev.tokens)
            diff = (cpu.tokens != dev.tokens).nonzero()
            first_bad = None if same else int(diff[:, 1].min())
            logit_diff = float((cpu.first_logits - dev.first_logits).abs().max())
            check_rows.append(
                [
                    variant,
                    "yes" if same else "NO",
                    first_bad,
                    round(logit_diff, 7),
                    round(min(cpu.margins), 5),
                    None if first_bad is None else round(cpu.margins[first_bad], 6),
                    round(cpu.prefill_s + cpu.decode_s, 2),
                    round(dev.prefill_s + dev.decode_s, 2),
                ]
            )
            raw[f"{variant} tokens cpu"] = cpu.tokens.tolist()
            if not same:
                raw[f"{variant} tokens device"] = dev.tokens.tolist()
        except Exception:
            errors[f"greedy {variant}"] = _tb()
    del ref
    _free(ctx)

    # bf16 speed, teacher and ZEDA interleaved
    model = model.to(torch.bfloat16)
    speed_rows, zero_share = [], None
    sizes = ((1, 16, 8), (4, 16, 8)) if ctx.rehearse else ((1, 128, 64), (16, 128, 64))
    for b, slen, snew in sizes:
        p = torch.randint(0, v, (b, slen), generator=g).to(ctx.device)
        res: dict[str, list[Gen]] = {"teacher": [], "zeda": []}
        try:
            for variant in res:  # warm-up
                set_zce_mask(model, variant == "teacher")
                greedy(ctx, model, p, 4)
            for r in range(3):
                if r and ctx.left() < 0:
                    break
                for variant in res:
                    set_zce_mask(model, variant == "teacher")
                    res[variant].append(greedy(ctx, model, p, snew))
            if zero_share is None:
                set_zce_mask(model, False)
                with record_routing(model) as rec:
                    greedy(ctx, model, p, snew)
                ids = rec()
                zero_share = float((ids >= n).float().mean())
        except Exception:
            errors[f"bf16 speed batch {b}"] = _tb()
            continue
        tok_s = {}
        for variant, gens in res.items():
            pre = _median([x.prefill_s for x in gens]) * 1e3
            dec = b * (snew - 1) / _median([x.decode_s for x in gens])
            tok_s[variant] = dec
            speed_rows.append([variant, b, slen, snew, round(pre, 2), round(dec, 1)])
        speed_rows[-1].append(round(tok_s["zeda"] / tok_s["teacher"], 3))
        speed_rows[-2].append(None)
    limit = None if zero_share is None else round(1 / (1 - zero_share), 3)
    equal = {r[0]: r[1] for r in check_rows}
    last = {r[0]: r for r in speed_rows if r[1] == sizes[-1][0]}
    headline = f"greedy tokens {ctx.device} == CPU (fp32): teacher {equal.get('teacher', 'n/a')}, ZEDA {equal.get('zeda', 'n/a')}"
    if "teacher" in last and "zeda" in last:
        headline += (
            f"; bf16 decode batch {sizes[-1][0]}: teacher {last['teacher'][5]:.0f} tok/s, ZEDA {last['zeda'][5]:.0f} tok/s "
            f"(x{last['zeda'][6]:.2f}; ZEDA zero share {zero_share:.0%}, expert limit x{limit:.2f})"
        )
    return dict(
        headline=headline,
        shape=f"{dims.get('num_hidden_layers')} layers, hidden {dims['hidden_size']}, {n} experts + {nz} zero slots, "
        f"top-{dims['num_experts_per_tok']}, vocab {v}",
        parameters=params,
        experts_implementation=impl,
        built_on=built_on,
        build_s=round(build_s, 1),
        zeda_zero_share=zero_share,
        expert_limit=limit,
        tables=[
            dict(
                title=f"greedy, fp32, batch {batch} x prompt {plen}, {new} new tokens: {ctx.device} vs the CPU reference",
                columns=[
                    "model",
                    "tokens equal",
                    "first differing step",
                    "max |logit diff| (step 1)",
                    "smallest top-1 margin (CPU)",
                    "margin at first difference",
                    "CPU s",
                    "device s",
                ],
                rows=check_rows,
            ),
            dict(
                title="bf16 on the device (medians of 3): prefill ms and decode tokens/s",
                columns=["model", "batch", "prompt", "new tokens", "prefill ms", "decode tok/s", "ZEDA/teacher"],
                rows=speed_rows,
            ),
        ],
        raw=raw,
        errors=errors,
        notes=[
            "random weights (fixed seed): the zero share is what a fresh conversion routes (~N_Z/(N+N_Z) of the "
            "slots), not a trained ZEDA's 50%; the limit applies to expert time only",
            "a token difference at a step whose CPU top-1 margin is ~1e-5 or less is a floating-point tie, not a bug",
        ],
    )


def step_copy(ctx: Ctx) -> dict:
    """(d) 1 GiB of weight buckets: host-to-device (pageable, pinned), device-to-device, device-to-host (pinned)."""
    import torch

    count, mib = (4, 1) if ctx.rehearse else (32, 32)
    elems = (mib << 20) // 2  # bf16
    total = count * (mib << 20)
    host = [torch.ones(elems, dtype=torch.bfloat16) for _ in range(count)]  # touched: no first-touch page faults
    dev = [torch.empty(elems, dtype=torch.bfloat16, device=ctx.device) for _ in range(count)]
    dst = [torch.empty(elems, dtype=torch.bfloat16, device=ctx.device) for _ in range(count)]
    pinned = [t.pin_memory() for t in host] if ctx.cuda else None

    def h2d_pageable():
        for h, d in zip(host, dev):
            d.copy_(h)

    def h2d_pinned():
        for h, d in zip(pinned, dev):
            d.copy_(h, non_blocking=True)

    def d2d():
        for s, d in zip(dev, dst):
            d.copy_(s)

    def d2h_pinned():
        for d, h in zip(dev, pinned):
            h.copy_(d, non_blocking=True)

    fns = {"host to device, pageable": h2d_pageable, "device to device": d2d}
    if pinned is not None:
        fns = {"host to device, pinned": h2d_pinned, **fns, "device to host, pinned": d2h_pinned}
    rows, raw, errors = [], {}, {}
    for name, fn in fns.items():
        try:
            t = bench(ctx, {name: fn}, warmup=1, repeats=5)[name]
        except Exception:
            errors[name] = _tb()
            continue
        gbs = total / (t["median_ms"] / 1e3) / 1e9
        raw[name] = dict(t, gb_per_s=round(gbs, 2))
        rows.append([name, round(t["median_ms"], 3), round(gbs, 1)])
    ok = (
        bool(torch.equal(dst[0].cpu(), host[0]))
        if "device to device" in raw and "host to device, pageable" in raw
        else None
    )
    headline = f"{total / GIB:.3g} GiB in {count} x {mib} MiB: " + ", ".join(f"{r[0]} {r[2]:.1f} GB/s" for r in rows)
    return dict(
        headline=headline,
        buckets=count,
        bucket_mib=mib,
        bytes=total,
        copy_correct=ok,
        tables=[dict(title="median of 5 (GB/s = bytes copied once / time)", columns=["copy", "ms", "GB/s"], rows=rows)],
        raw=raw,
        errors=errors,
        notes=["device-to-device reads and writes each byte: the memory traffic is twice the GB/s shown"],
    )


def learner_overrides(seq: int, tokens: int, zero: int) -> dict:
    """`zeda plan --set` overrides of the learner step's layout (one GPU, bf16, full recompute)."""
    return {
        "model.zero_experts": zero,
        "learner.ep": 1,
        "learner.dp": 1,
        "learner.tp": 1,
        "learner.gpus_per_rank": 1,
        "learner.precision": "bf16",
        "learner.recompute": "full",
        "learner.optimizer": "local",
        "learner.attention": "local",
        "learner.logits_chunk_tokens": None,
        "learner.micro_batch_tokens": tokens,
        "data.max_prompt_tokens": seq // 2,
        "data.max_response_tokens": seq - seq // 2,
        "sampling.max_new_tokens": seq - seq // 2,
    }


def converted_checkpoint(ctx: Ctx, tmp: Path, dims: dict, zero: int) -> tuple[Path, str]:
    """A random static Qwen3-MoE of `dims` (bf16, built on the device when it can be: fast init) converted to
    `zero` zero experts by zeda_rl.convert, as learner.testing.tiny_checkpoint does (which builds on the CPU)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    from zeda_rl.convert import convert_checkpoint
    from zeda_rl.tiny import tiny_qwen3_moe_config

    static, out = tmp / "static", tmp / "ckpt"
    torch.manual_seed(ctx.seed)
    model, built_on = _build(ctx, lambda: Qwen3MoeForCausalLM(tiny_qwen3_moe_config(**dims)).eval())
    model.to(torch.bfloat16).save_pretrained(static)
    del model
    _free(ctx)
    convert_checkpoint(static, out, zero_experts=zero, seed=ctx.seed)
    shutil.rmtree(static, ignore_errors=True)
    return out, built_on


def step_learner(ctx: Ctx) -> dict:
    """(c) Two Qwen3-30B-A3B-shaped MoE layers through the learner: step time and peak memory vs `zeda plan`."""
    import numpy as np
    import torch

    from launch import plan
    from launch.config import load_config
    from learner.config import SFTStage
    from learner.train import Learner
    from zeda_rl.tiny import tiny_qwen3_moe_config

    dims, nz = _dims(ctx, layers=2)
    rows, seq = (2, 64) if ctx.rehearse else (4, 1024)
    tokens = rows * seq
    overrides = learner_overrides(seq, tokens, nz)
    cfg = load_config(ROOT / "launch" / "configs" / "qwen3-30b-a3b-h200.yaml", overrides)
    hf = tiny_qwen3_moe_config(**dims).to_dict()
    name = torch.cuda.get_device_name() if ctx.cuda else ""
    gpu = "H100" if "H100" in name else "H200"
    p = plan.make_plan(cfg, hf, gpu=gpu)
    planned = p["learner"]
    verdict = next((v for v in p["verdicts"] if v["placement"] == "learner rank"), None)
    tmp = Path(tempfile.mkdtemp(prefix="zeda-device-learner-"))
    errors, result = {}, {}
    try:
        t0 = time.perf_counter()
        ck, built_on = converted_checkpoint(ctx, tmp, dims, nz)
        checkpoint_s = time.perf_counter() - t0
        _free(ctx)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        learner = Learner(ck, cfg.learner, SFTStage(lr=1e-5, schedule="constant", warmup_frac=0.0), seed=ctx.seed)
        init_s = time.perf_counter() - t0
        alloc_init = torch.cuda.memory_allocated() if ctx.cuda else None
        rng = np.random.default_rng(ctx.seed)
        ones = np.ones((rows, seq), np.uint8)
        batch = {"tokens": rng.integers(0, dims["vocab_size"], (rows, seq)), "loss_mask": ones, "attention_mask": ones}
        steps, wall, losses, alloc_after = [], [], [], []
        for i in range(4):
            if i >= 2 and ctx.left() < 60:
                break
            ctx.sync()
            t0 = time.perf_counter()
            m = learner.train_step(batch)
            ctx.sync()
            wall.append(time.perf_counter() - t0)
            steps.append(m["step_time_s"])
            losses.append(round(float(m["loss"]), 4))
            if ctx.cuda:
                alloc_after.append(torch.cuda.memory_allocated())
        peak = torch.cuda.max_memory_allocated() if ctx.cuda else None
        reserved = torch.cuda.max_memory_reserved() if ctx.cuda else None
        used = None
        if ctx.cuda:
            free, total = torch.cuda.mem_get_info()
            used = total - free
        later = wall[1:] or wall
        step_s = _median(later)
        result = dict(
            checkpoint_s=round(checkpoint_s, 1),
            checkpoint_built_on=built_on,
            learner_init_s=round(init_s, 1),
            step_times_s=[round(x, 3) for x in wall],
            learner_step_time_s=[round(x, 3) for x in steps],
            step_s_median_after_first=round(step_s, 3),
            tokens_per_s=round(tokens / step_s, 1),
            losses=losses,
            peak_allocated_gib=None if peak is None else round(peak / GIB, 2),
            peak_reserved_gib=None if reserved is None else round(reserved / GIB, 2),
            device_used_gib_at_end=None if used is None else round(used / GIB, 2),
            allocated_after_init_gib=None if alloc_init is None else round(alloc_init / GIB, 2),
            allocated_after_steps_gib=[round(a / GIB, 2) for a in alloc_after],
        )
        learner.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:
        errors["learner"] = _tb()
        if ctx.cuda:  # how far it got (an out-of-memory error names what it asked for)
            result["peak_allocated_at_failure_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plan_total = planned["total"]
    need = plan_total + plan.RUNTIME_GPU_BYTES
    rows_t = [
        [k, round(planned[k] / GIB, 3)] for k in ("weights", "grads", "master", "optimizer", "activations", "logits")
    ]
    rows_t += [["total (plan)", round(plan_total / GIB, 3)], ["+ runtime reserve (plan's need)", round(need / GIB, 3)]]
    measured = []
    if result.get("peak_allocated_gib") is not None:
        peak_b = result["peak_allocated_gib"] * GIB
        result["peak_over_plan_total"] = round(peak_b / plan_total, 3)
        measured.append(["peak allocated (torch)", result["peak_allocated_gib"], result["peak_over_plan_total"]])
        measured.append(
            [
                "peak reserved (torch)",
                result["peak_reserved_gib"],
                round(result["peak_reserved_gib"] * GIB / plan_total, 3),
            ]
        )
        measured.append(
            [
                "device used at end (incl. CUDA context)",
                result["device_used_gib_at_end"],
                round(result["device_used_gib_at_end"] * GIB / need, 3),
            ]
        )
    head = "learner failed" if errors else ""
    if result.get("step_s_median_after_first") is not None:
        head = f"step {result['step_s_median_after_first']:.2f} s ({result['tokens_per_s']:.0f} tok/s, {rows} x {seq})"
        if result.get("peak_allocated_gib") is not None:
            head += (
                f"; peak {result['peak_allocated_gib']:.1f} GiB allocated vs plan {plan_total / GIB:.1f} GiB "
                f"(x{result['peak_over_plan_total']:.2f})"
            )
    set_args = " ".join(f"--set {k}={'null' if v is None else v}" for k, v in overrides.items())
    return dict(
        headline=head,
        shape=f"2 MoE layers, hidden {dims['hidden_size']}, {dims['num_experts']} experts + {nz} zero slots, "
        f"top-{dims['num_experts_per_tok']}, vocab {dims['vocab_size']}; batch {rows} x {seq} tokens",
        params=p["params"],
        plan_gpu=gpu,
        plan_fits=None if verdict is None else verdict["fits"],
        plan_command=f"zeda plan launch/configs/qwen3-30b-a3b-h200.yaml --gpu {gpu} --hf-config <2-layer config> {set_args}",
        plan_learner={k: v for k, v in planned.items()},
        **{k: v for k, v in result.items() if not isinstance(v, list)},
        step_times=result.get("step_times_s"),
        losses=result.get("losses"),
        tables=[
            dict(title="zeda plan (launch.plan.make_plan) for this shape, GiB", columns=["item", "GiB"], rows=rows_t),
            dict(title="measured", columns=["what", "GiB", "over the plan's"], rows=measured),
        ],
        errors=errors,
        notes=[
            "peak allocated is compared with the plan's total (no runtime reserve); the device's used memory with "
            "the plan's need (total + RUNTIME_GPU_BYTES)",
        ],
    )


def _nccl_rank(rank: int, world: int, port: int, out: str, count: int, mib: int, backend: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    bufs = [torch.full(((mib << 20) // 2,), float(rank), dtype=torch.bfloat16, device=device) for _ in range(count)]
    total = count * (mib << 20)

    def sync():
        if backend == "nccl":
            torch.cuda.synchronize()
        dist.barrier()

    res = {}
    for name, op in (
        ("broadcast from rank 0", lambda b: dist.broadcast(b, src=0)),
        ("all-reduce", lambda b: dist.all_reduce(b)),
    ):
        for b in bufs:  # warm-up
            op(b)
        times = []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            for b in bufs:
                op(b)
            sync()
            times.append(time.perf_counter() - t0)
        s = _median(times)
        res[name] = dict(ms=round(s * 1e3, 3), gb_per_s=round(total / s / 1e9, 2))
    if rank == 0:
        res["all-reduce"]["bus_gb_per_s"] = round(res["all-reduce"]["gb_per_s"] * 2 * (world - 1) / world, 2)
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def step_nccl(ctx: Ctx) -> dict:
    """Two ranks, one GPU each: 1 GiB of buckets broadcast (a weight push) and all-reduced."""
    import socket

    import torch
    import torch.multiprocessing as mp

    count, mib = (4, 1) if ctx.rehearse else (32, 32)
    backend = "nccl" if ctx.cuda else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="device-check-nccl-")) / "rank0.json"
    world = 2
    if ctx.cuda and torch.cuda.device_count() < world:
        raise RuntimeError(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    try:
        mp.spawn(_nccl_rank, args=(world, port, str(out), count, mib, backend), nprocs=world, join=True)
        res = json.loads(out.read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    rows = [[k, v["ms"], v["gb_per_s"], v.get("bus_gb_per_s")] for k, v in res.items()]
    return dict(
        headline=", ".join(f"{k} {v['gb_per_s']:.1f} GB/s" for k, v in res.items()) + f" ({backend}, {world} ranks)",
        backend=backend,
        tables=[
            dict(title=f"{count} x {mib} MiB, median of 5", columns=["collective", "ms", "GB/s", "bus GB/s"], rows=rows)
        ],
        raw=res,
    )


def step_sglang(ctx: Ctx) -> dict:
    """The real SGLang engine test file, under what is left of the step's time."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu/test_sglang_real.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, ctx.left()))
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = tail[-1] if tail else ""
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest rc {proc.returncode}: {summary}\n" + "\n".join(tail[-60:]))
    return dict(headline=f"tests/gpu/test_sglang_real.py: {summary}", pytest_rc=proc.returncode)


WORKERS: dict[str, Callable[[Ctx], dict]] = {
    "moe_layer": step_moe_layer,
    "model": step_model,
    "copy": step_copy,
    "learner": step_learner,
    "nccl": step_nccl,
    "sglang": step_sglang,
}


if __name__ == "__main__":
    sys.exit(main())
