"""How long `zeda` takes to answer before doing any work: `zeda --help` and an argument error.

The CLI parses before it imports torch, transformers or Ray (launch/cli.py), so both should
take about as long as the interpreter's own start (`python -c pass`, printed beside them); the
target is under 2 s. When it was `import zeda_rl` first, --help loaded torch and transformers:
4.3 to 5.9 s on this project's 2-core machines (load 4), where this script measured 0.055 s for
`zeda --help` and 0.054 s for an argument error against 0.039 s for `python -c pass` (2026-12-02).

    python bench/cli_start.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ZEDA = str(Path(sys.executable).parent / "zeda")


def timed(cmd: list[str], repeats: int) -> tuple[float, int]:
    """Median wall time of `cmd` over `repeats` runs, and its exit status."""
    times, rc = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, capture_output=True).returncode
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    for label, cmd in (
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("zeda --help", [ZEDA, "--help"]),
        ("zeda eval (no checkpoint: argument error)", [ZEDA, "eval"]),
        ("zeda convert x y --zero-experts two", [ZEDA, "convert", "x", "y", "--zero-experts", "two"]),
    ):
        seconds, rc = timed(cmd, a.repeats)
        print(f"{label:45s} {seconds:6.3f} s  (exit {rc}, median of {a.repeats})")


if __name__ == "__main__":
    main()
