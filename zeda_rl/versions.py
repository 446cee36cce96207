"""The library versions and machine behind a number: every report and teacher build records them.

A recipe's margin can meet another machine's kernels (the hard teacher reached 92.5% on one CPU and
78.7% on another with the same code), so a result without its versions cannot be compared.
"""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "numpy", "megatron-core", "ray", "tokenizers", "safetensors")


def library_versions() -> dict[str, str]:
    """Python, the packages that shape the numbers, and the CPU, as plain strings."""
    out = {"python": platform.python_version(), "machine": f"{platform.machine()} {_cpu_name()}".strip()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
