"""`zeda doctor CONFIG`: the run's checks and its environment, without starting anything; exit 2 when one fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from launch import doctor
from launch.cli import main as cli_main
from launch.config import load_config
from learner.config import not_implemented

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny-cpu.yaml"
QWEN = ROOT / "launch" / "configs" / "qwen3-30b-a3b-h200.yaml"
QWEN_HF = ROOT / "tests" / "fixtures" / "configs" / "qwen3-30b-a3b.json"


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _json(capsys, *args) -> tuple[int, dict[str, list[dict]]]:
    code = cli_main(["doctor", *map(str, args), "--json"])
    by_name: dict[str, list[dict]] = {}
    for c in json.loads(capsys.readouterr().out):
        by_name.setdefault(c["name"], []).append(c)
    return code, by_name


def test_the_tiny_config_is_healthy_on_this_machine_as_a_table():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"COLUMNS": "200"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "zeda"), "doctor", str(TINY)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("config ", "config vs teacher and machine", "learner knobs", "plan ", "ray ", "ports ", "gpu "):
        assert row in out.stdout, out.stdout
    assert "local Ray will be started (num_cpus=2" in out.stdout and "tcp://127.0.0.1:*" in out.stdout
    assert " fail " not in out.stdout


def test_an_h200_config_here_fails_naming_each_cause(capsys):
    code, rows = _json(capsys, QWEN, "--hf-config", QWEN_HF, "--set", "cluster.address=null")
    assert code == 2
    status = {name: [c["status"] for c in cs] for name, cs in rows.items()}
    planned = [m.split(":")[0] for m in not_implemented(load_config(QWEN).learner)]  # knobs the learner lacks today
    for name in ("model.teacher", "data.sft_prompts", "data.opd_prompts", "ray", *planned):
        assert status[name] == ["fail"], rows
    assert planned or status["learner knobs"] == ["ok"]
    assert status["plan"] == ["ok"] and "fits (H200)" in rows["plan"][0]["detail"]
    assert "learner bundle 0 {'CPU': 8.0, 'GPU': 1.0} fits on no node" in rows["ray"][0]["detail"]
    assert "/mnt/models/Qwen3-30B-A3B" in rows["model.teacher"][0]["detail"]


def test_a_config_that_does_not_load_is_one_failed_check(capsys):
    code, rows = _json(capsys, TINY, "--set", "name=../..")
    assert code == 2 and list(rows) == ["config"] and "name" in rows["config"][0]["detail"]
    assert "one plain path component" in rows["config"][0]["detail"]


def test_the_inbox_port_must_be_free_on_the_bind_host():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        c = doctor.ports_check(load_config(TINY, {"cluster.inbox_port": port}))
        assert c.status == doctor.FAIL and f"tcp://127.0.0.1:{port}: cannot bind" in c.detail
    assert doctor.ports_check(load_config(TINY, {"cluster.inbox_port": port})).status == doctor.OK


def test_ray_reachable_or_the_local_one_big_enough():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        up = doctor.ray_check(load_config(TINY, {"cluster.address": addr}))
    assert up.status == doctor.OK and f"{addr} accepts connections" in up.detail
    down = doctor.ray_check(load_config(TINY, {"cluster.address": addr}))
    assert down.status == doctor.FAIL and "not reachable" in down.detail and f"cluster.address {addr}" in down.detail
    small = doctor.ray_check(load_config(TINY, {"cluster.num_cpus": 1}))
    assert small.status == doctor.FAIL and "local Ray will be started with 1 CPUs" in small.detail


def test_gpu_extras_fail_locally_and_warn_for_a_cluster(monkeypatch):
    gpu = {"learner.gpus_per_rank": 1, "rollout.backend": "sglang"}
    monkeypatch.setattr(doctor, "_cuda_devices", lambda: 0)
    monkeypatch.setitem(sys.modules, "sglang", None)  # `import sglang` raises ImportError
    checks = {c.name: c for c in doctor.gpu_checks(load_config(TINY, gpu))}
    assert checks["sglang"].status == checks["cuda"].status == doctor.FAIL
    assert (
        "rollout.backend: sglang" in checks["sglang"].detail
        and "learner.gpus_per_rank 1.0 (nccl)" in checks["cuda"].detail
    )
    remote = doctor.gpu_checks(load_config(TINY, {**gpu, "cluster.address": "10.0.0.1:6379"}))
    assert {c.status for c in remote} == {doctor.WARN}
    monkeypatch.setattr(doctor, "_cuda_devices", lambda: 8)
    monkeypatch.setitem(sys.modules, "sglang", types.ModuleType("sglang"))
    assert {c.status for c in doctor.gpu_checks(load_config(TINY, gpu))} == {doctor.OK}


def test_flash_without_transformer_engine_fails_here_and_warns_for_a_ray_client(capsys, monkeypatch):
    """The H200 configs' learner.attention: flash on a machine without TransformerEngine: a failed check naming the
    key and the package (the refusal `zeda train` makes); through Ray Client (off the cluster) only a warning."""
    import launch.config as config

    monkeypatch.setattr(config, "_IMPORTS", {})
    code, rows = _json(capsys, QWEN, "--hf-config", QWEN_HF, "--set", "cluster.address=null")
    assert code == 2 and [c["status"] for c in rows["learner.attention"]] == ["fail"], rows
    detail = rows["learner.attention"][0]["detail"]
    assert "learner.attention: flash needs the package transformer_engine" in detail and "not importable here" in detail
    assert "transformer_engine" not in rows  # the failed row says it once
    assert any("learner.attention: flash" in r for r in doctor.refusals(load_config(QWEN, {"cluster.address": None})))
    client = load_config(QWEN, {"cluster.address": "ray://10.0.0.1:10001"})
    assert not any("learner.attention" in r for r in doctor.refusals(client))
    (warn,) = doctor.te_checks(client)
    assert warn.status == doctor.WARN and "Ray Client" in warn.detail and "transformer_engine.pytorch" in warn.detail
    monkeypatch.setattr(config, "_IMPORTS", {config.FLASH_MODULE: ""})  # a node with TransformerEngine
    (ok,) = doctor.te_checks(load_config(QWEN, {"cluster.address": None}))
    assert ok.status == doctor.OK and not any("learner.attention" in r for r in doctor.refusals(client))


def test_a_gpu_run_pushing_through_the_object_store_is_warned_about(monkeypatch):
    """The shipped H200 configs push by NCCL; set back to Ray (57-61 GB to each of 4 engines a step) zeda doctor warns
    and names the fix; a CPU run's small pushes through Ray are fine."""
    import launch.config as config
    from launch.plan import OBJECT_STORE_PUSH_BOUND, PUSH_BANDWIDTH

    hf = json.loads(QWEN_HF.read_text())

    def push_row(cfg):
        return next(c for c in doctor.config_checks(cfg, hf, str(QWEN_HF)) if c.name == "weight push")

    monkeypatch.setattr(config, "_IMPORTS", {config.FLASH_MODULE: ""})
    shipped = push_row(load_config(QWEN))
    assert shipped.status == doctor.OK and "opd.weight_sync: nccl" in shipped.detail and "stated" in shipped.detail
    ray = push_row(load_config(QWEN, {"opd.weight_sync": "ray"}))
    assert ray.status == doctor.WARN, ray
    assert "through Ray's object store" in ray.detail and f"{OBJECT_STORE_PUSH_BOUND / 1e9:g} GB" in ray.detail
    assert (
        "set opd.weight_sync: nccl" in ray.detail
        and f"{PUSH_BANDWIDTH['ray'][0] / 1e9:g} GB/s (measured;" in ray.detail
    )
    assert not any("object store" in r for r in doctor.refusals(load_config(QWEN, {"opd.weight_sync": "ray"})))
    tiny = next(c for c in doctor.config_checks(load_config(TINY)) if c.name == "weight push")
    assert tiny.status == doctor.OK and "opd.weight_sync: ray" in tiny.detail


def test_bind_host_auto_is_loopback_for_a_local_run_and_the_node_address_on_a_cluster(monkeypatch):
    """A local run's private Ray has node IP 127.0.0.1, so 'auto' resolves there, as the learner resolves it."""
    local = load_config(TINY).model_copy(deep=True)
    local.cluster.bind_host = "auto"
    assert doctor.bind_address(local) == "127.0.0.1"
    from ray._private.services import get_node_ip_address

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: the node's own address
    assert doctor.bind_address(local) == get_node_ip_address()
