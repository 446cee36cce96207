"""The GPU stack resolves together: pyproject's `gpu` extra, the cluster YAML's pip commands and the learner's pins.

Offline: launch/cluster-h200.yaml installs the extra with one torch pin in every command, that pin is inside the
project's torch range, TransformerEngine is pinned to one version in the extra, the YAML and `zeda doctor`'s
install hint, within the range megatron-core declares, and its PyTorch extension is built against the installed
torch (--no-build-isolation).

Online (the package index; skipped with the reason only when it cannot be reached): `pip install --dry-run
--report` resolves the extra with the YAML's torch pin, installing nothing (~40 s here: 2-core AMD EPYC, pip 26.3).
Deselect with `-k "not resolves"`. The TransformerEngine extension itself is an sdist whose metadata pip only
learns by building it in an isolated environment with the newest torch (4m35s and several GB here), so it is
resolved only with ZEDA_RESOLVE_TE_EXTENSION=1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "cluster-h200.yaml"
TE = "transformer-engine"


def _name(req: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _gpu_extra() -> dict[str, Requirement]:
    return {_name(r): r for r in map(Requirement, _pyproject()["project"]["optional-dependencies"]["gpu"])}


def _pip_commands() -> list[list[str]]:
    """Each `pip install` of the YAML's setup_commands, as its arguments."""
    out = []
    for command in yaml.safe_load(CLUSTER.read_text())["setup_commands"]:
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                out.append(words[2:])
    return out


def _requirements(args: list[str]) -> dict[str, Requirement]:
    reqs = {}
    for word in args:
        if word.startswith("-") or "/" in word:  # flags, the editable checkout
            continue
        try:
            req = Requirement(word)
        except InvalidRequirement:
            continue
        reqs[_name(req)] = req
    return reqs


def _pin(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req}: expected an exact pin"
    return spec.version


def _torch_pin() -> str:
    pins = {_pin(r["torch"]) for r in map(_requirements, _pip_commands()) if "torch" in r}
    assert len(pins) == 1, f"{CLUSTER}: every pip install must pin the same torch, got {pins}"
    return pins.pop()


def test_the_cluster_yaml_pins_agree_with_pyproject_and_megatron():
    from launch.config import TE_INSTALL, TE_REQUIREMENT

    commands = _pip_commands()
    extra = next(args for args in commands if any(a.endswith("[gpu]") for a in args))
    torch = _torch_pin()
    assert "torch" in _requirements(extra), "the gpu extra and torch's pin in one install (SGLang must not swap torch)"
    project = {_name(r): r for r in map(Requirement, _pyproject()["project"]["dependencies"])}
    assert Version(torch) in project["torch"].specifier, (
        f"the YAML's torch {torch} outside pyproject's {project['torch']}"
    )

    gpu = _gpu_extra()
    te_commands = [args for args in commands if TE in _requirements(args)]
    assert len(te_commands) == 1, f"{CLUSTER}: one pip install of {TE}"
    te_args = te_commands[0]
    yaml_te = _requirements(te_args)[TE]
    assert _pin(yaml_te) == _pin(gpu[TE]), f"{CLUSTER}'s {yaml_te} and pyproject's gpu extra {gpu[TE]}"
    assert "pytorch" in yaml_te.extras and gpu[TE].extras <= yaml_te.extras
    # the extension compiles against the torch it finds: the installed, pinned one, not pip's isolated newest
    assert "--no-build-isolation" in te_args and "torch" in _requirements(te_args)
    assert commands.index(te_args) > commands.index(extra)
    assert str(Requirement(TE_REQUIREMENT)) == str(yaml_te) and TE_REQUIREMENT in TE_INSTALL  # doctor's hint
    # the CUDA of TransformerEngine's core is torch's: torch 2.14's wheels on PyPI are CUDA 13
    assert {e for e in yaml_te.extras if e.startswith("core")} == {"core_cu13"} and Version(torch) >= Version("2.9")

    megatron = project["megatron-core"]
    assert _pin(megatron) == metadata.version("megatron-core"), "the installed megatron-core is pyproject's"
    declared = [Requirement(r) for r in metadata.requires("megatron-core") or [] if r.startswith(TE)]
    assert declared, "megatron-core declares the TransformerEngine it is tested with (its dev extra)"
    assert all(Version(_pin(gpu[TE])) in r.specifier for r in declared), (gpu[TE], declared)
    assert (
        Version(torch)
        in next(Requirement(r) for r in metadata.requires("megatron-core") if r.startswith("torch")).specifier
    )


def _index_reachable() -> str:
    """'' when pip reaches the package index, else why not."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "megatron-core"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "" if out.returncode == 0 else (out.stderr.strip().splitlines() or ["pip index failed"])[-1]


def _resolve(requirements: list[str], timeout_s: int) -> dict[str, str]:
    """{name: version} pip would install for `requirements` in an empty environment (nothing is installed)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
    out = subprocess.run(cmd + requirements, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    if out.returncode:
        why = _index_reachable()
        if why:
            pytest.skip(f"the package index cannot be reached ({why}): the GPU stack's resolution is not checked")
        pytest.fail(f"pip cannot resolve {requirements}:\n{out.stderr[-4000:]}")
    report = json.loads(out.stdout)
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"] for i in report["install"]}


def _check_stack(got: dict[str, str], torch: str) -> None:
    gpu = _gpu_extra()
    project = {_name(r): r for r in map(Requirement, _pyproject()["project"]["dependencies"])}
    assert got["torch"] == torch, got.get("torch")
    assert got["megatron-core"] == _pin(project["megatron-core"])
    assert (
        Version(got["sglang"]) in gpu["sglang"].specifier
        and Version(got["transformers"]) in project["transformers"].specifier
    )
    assert got[TE] == _pin(gpu[TE]) and got["transformer-engine-cu13"] == _pin(gpu[TE])
    assert any(n.startswith("nvidia-") and n.endswith("-cu13") for n in got), "torch's CUDA 13 libraries"
    print(
        "resolved:",
        ", ".join(f"{n} {got[n]}" for n in ("torch", "sglang", "transformers", "megatron-core", TE) if n in got),
    )


@pytest.mark.slow  # 40-45 s of pip resolution: CI runs it (it has the package index)
@pytest.mark.timeout(900)
def test_the_gpu_extra_resolves_with_the_cluster_yamls_torch_pin():
    torch = _torch_pin()
    _check_stack(_resolve([".[gpu]", f"torch=={torch}"], timeout_s=600), torch)


@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    os.environ.get("ZEDA_RESOLVE_TE_EXTENSION") != "1",
    reason="set ZEDA_RESOLVE_TE_EXTENSION=1: builds the extension's metadata with the newest torch (minutes, GBs)",
)
def test_the_gpu_extra_resolves_with_the_te_extension_too():
    torch = _torch_pin()
    te = str(next(r[TE] for r in map(_requirements, _pip_commands()) if TE in r))
    got = _resolve([".[gpu]", f"torch=={torch}", te], timeout_s=1100)
    _check_stack(got, torch)
    assert got["transformer-engine-torch"] == _pin(_gpu_extra()[TE])
