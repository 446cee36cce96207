"""Run one Python program with limits: its own temp dir, a stripped environment, no network.

Untrusted model output runs here, so every run gets a fresh temporary directory as cwd
(removed afterwards), an environment of PATH and HOME only, `python -I` (no user site, no
PYTHON* variables), rlimits set in the child before exec (address space, CPU seconds,
file size, no core dumps), a wall-clock timeout that kills the whole process group, and,
where the kernel lets us, a network namespace of its own (`unshare -rn`, else `unshare -n`
as root) holding only a downed loopback. Where neither works the run still happens, and
the result says `network_isolated: False`. This contains mistakes (loops, runaway
allocation, stray files, sockets); it is not a jail against a hostile program: it runs
as the caller's user, sees the caller's files read-only or not as the caller does.
"""

from __future__ import annotations

import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    output_chars: int = 2000  # kept of stdout / stderr each


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed" | "failed" | "timeout" | "memory"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network_isolated: bool


@functools.lru_cache(maxsize=1)
def network_prefix() -> tuple[str, ...]:
    """The command prefix that gives a child no network, or () where none works here."""
    for prefix in (("unshare", "-rn"), ("unshare", "-n")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return ()


def _limit(limits: Limits):
    mem = limits.memory_mb << 20
    cpu = int(limits.timeout_s) + 1
    fsize = limits.file_mb << 20

    def apply():  # runs in the child between fork and exec: plain rlimit calls only
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_python(source: str, limits: Limits = Limits()) -> RunResult:
    prefix = network_prefix()
    with tempfile.TemporaryDirectory(prefix="zeda-sandbox-") as tmp:
        script = os.path.join(tmp, "program.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"}
        start = time.monotonic()
        # stdout and stderr go to files (capped by RLIMIT_FSIZE), not pipes: a program printing in a loop until its
        # timeout would otherwise make the grader hold gigabytes, once per grading thread
        with open(os.path.join(tmp, ".stdout"), "w+b") as out, open(os.path.join(tmp, ".stderr"), "w+b") as err:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-I", "-B", script],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_limit(limits),
            )
            try:
                proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                timed_out = True
            seconds = time.monotonic() - start
            out_s, err_s = (_tail(f, limits.output_chars) for f in (out, err))
    if timed_out or proc.returncode == -signal.SIGXCPU:
        status = "timeout"
    elif proc.returncode == 0:
        status = "passed"
    elif "MemoryError" in err_s:
        status = "memory"
    else:
        status = "failed"
    return RunResult(status, proc.returncode, out_s, err_s, seconds, bool(prefix))


def _tail(f, chars: int) -> str:
    """The last `chars` characters of a file (read from its last 4 bytes a character at most)."""
    f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * chars))
    return f.read().decode("utf-8", "replace")[-chars:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
    except ProcessLookupError:
        pass
