"""Session-wide hooks: the suite's exit status is pytest's, not that of the interpreter's teardown.

A clean-clone run (2026-12-03, 2-core CPU) printed "459 passed, 6 skipped" and then the pytest
process died of a segmentation fault while Python tore down torch, gloo and Ray's native threads,
so `make test` failed on a green suite. After pytest has reported, the process ends with pytest's
own status and skips that teardown. Set ZEDA_TEST_TEARDOWN=1 to run the normal interpreter exit,
e.g. to chase the crash.
"""

from __future__ import annotations

import os
import sys

import pytest

_status: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "code" not in _status or os.environ.get("ZEDA_TEST_TEARDOWN") == "1":
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a Ray a test left running: its processes must not outlive us
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status["code"])
