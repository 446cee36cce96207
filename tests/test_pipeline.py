"""The whole pipeline, shortened, on a local Ray: teacher -> convert -> SFT -> async OPD -> export -> eval.

One run (module fixture) with the live monitor following its metrics JSONL in a thread;
the tests then check what must hold for any run: the learner's weights really reached
the rollout engines, staleness stayed bounded, the zero share moved toward the group
auxiliary loss's target, the report was written, and the monitor showed throughput.
"""

from __future__ import annotations

import io
import json
import re
import threading

import numpy as np
import pytest
from rich.console import Console

from launch.monitor import MonitorState, follow
from tests.helpers import run_on_fresh_ray, short_run_config
from zeda_rl.metrics import read_events

SHORT = {
    "name": "e2e",
    "sft.steps": 6,
    "sft.prompts": 64,
    "sft.batch_size": 16,
    "opd.steps": 4,
    "opd.prompts_per_step": 4,
    "opd.samples_per_prompt": 2,
    "opd.rollout_batch": 2,
    "opd.max_staleness": 1,
    "eval.n_per_family": 4,
    "sampling.max_new_tokens": 8,
    "opd.probe_every": 2,
    "opd.probe_per_family": 4,
}


class _Screen:
    """A Live stand-in: keeps the last rendered frame as plain text."""

    def __init__(self):
        self.frames: list[str] = []

    def update(self, renderable):
        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None).print(renderable)
        self.frames.append(buf.getvalue())

    def peak(self, label: str) -> float:
        """The largest figure the screen ever showed in the row `label`."""
        found = [float(m) for f in self.frames for m in re.findall(re.escape(label) + r"\s*│\s*([0-9.]+)", f)]
        return max(found, default=0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = short_run_config(tmp_path_factory.mktemp("e2e"), SHORT)
    screen, state = _Screen(), MonitorState()
    monitor = threading.Thread(
        target=follow, args=(cfg.run_dir / "metrics.jsonl", state, screen, 0.2, 900), daemon=True
    )
    monitor.start()
    result = run_on_fresh_ray(cfg)
    monitor.join(timeout=10)
    events = read_events(cfg.run_dir / "metrics.jsonl")
    return cfg, result, events, screen, state


def _values(events, component, name):
    return [e for e in events if e.component == component and e.name == name]


def test_weights_reach_the_rollout_engines(run):
    cfg, result, events, _, _ = run
    served = _values(events, "rollout", "served_versions")
    probes = _values(events, "rollout", "probe_logprobs")
    first, last = served[0], served[-1]
    assert first.value == [0] * cfg.rollout.replicas
    final = result["final_policy_version"]
    assert final == cfg.opd.steps // cfg.opd.sync_every and last.value == [final] * cfg.rollout.replicas
    before, after = np.array(probes[0].value), np.array(probes[-1].value)
    assert np.abs(after - before).max() > 1e-3  # the engines' outputs changed with the pushed weights
    # ... and they are exactly the learner's final weights: score the probe with the exported student
    from transformers import AutoTokenizer

    from actors.torch_engine import TorchEngine
    from launch.streams import chat_format, opd_prompts

    tok = AutoTokenizer.from_pretrained(cfg.run_dir / "student")
    probe = opd_prompts(cfg, chat_format(cfg, tok)).ids[:4]
    exported = np.concatenate(TorchEngine(cfg.run_dir / "student").score(probe))
    np.testing.assert_allclose(after, exported, atol=2e-4)


def test_staleness_is_bounded_and_versions_advance(run):
    cfg, _, events, _, _ = run
    stale_max = [e.value for e in _values(events, "learner", "staleness_max")]
    assert len(stale_max) == cfg.opd.steps and max(stale_max) <= cfg.opd.max_staleness
    # admission control keeps it there, not dropping samples after generating them
    assert _values(events, "driver", "dropped_stale")[-1].value == 0
    acked = [e.value for e in _values(events, "rollout", "served_version")]
    assert acked == sorted(acked) and len(set(acked)) >= 2  # engines applied successive versions in order


def test_driver_gauges_are_logged_when_they_change_not_every_loop_turn(run):
    """The OPD loop turns about 20 times a second for days on a real run: a pair of events a turn was 3.9M events."""
    _, _, events, _, state = run
    depth, inflight = _values(events, "driver", "queue_depth"), _values(events, "driver", "inflight_samples")
    pairs = [(d.value, i.value) for d, i in zip(depth, inflight, strict=True)]
    assert pairs and all(a != b for a, b in zip(pairs, pairs[1:]))


def test_zero_share_moves_toward_target(run):
    cfg, _, events, _, _ = run
    n = 8  # the embedded teacher's experts; N_Z = N/2
    target = cfg.learner.w * (n // 2) / (n + cfg.learner.w * (n // 2))
    z = [e.value for e in _values(events, "learner", "zero_ratio")]
    assert len(z) == cfg.sft.steps + cfg.opd.steps
    # on the same data distribution (the teacher's SFT answers), L_GA pulls the share toward r*
    sft = z[: cfg.sft.steps]
    first, last = sum(sft[:2]) / 2, sum(sft[-2:]) / 2
    assert abs(last - target) < abs(first - target), z


def test_report_is_written_with_every_number(run):
    cfg, result, _, _, _ = run
    for f in ("report.md", "report.json", "accuracy.png", "zero_ratio.png", "training.png", "throughput_time.png"):
        assert (cfg.run_dir / f).is_file(), f
    on_disk = json.loads((cfg.run_dir / "report.json").read_text())
    assert on_disk["accuracy"] == result["accuracy"]
    assert set(on_disk["phase_seconds"]) >= {"teacher", "convert", "sft", "opd", "export", "eval", "total"}
    assert all(v > 0 for v in on_disk["tokens_per_s"].values()), on_disk["tokens_per_s"]
    assert len(on_disk["zero_expert_ratio"]["per_layer"]) == 2
    vio = on_disk["expert_load_violation"]
    assert len(vio["max_per_layer"]) == 2 and all(
        m >= a >= 0 for m, a in zip(vio["max_per_layer"], vio["mean_per_layer"])
    )
    assert on_disk["versions"]["torch"] and "Load of the real experts" in (cfg.run_dir / "report.md").read_text()


def test_opd_probe_measured_the_student_after_sft_and_every_probe_step(run):
    """opd.probe_every: the student exported at OPD steps 0, 2, 4 and measured on held-out prompts; the
    learner logged the advantage's statistics on every OPD step."""
    cfg, _, events, _, _ = run
    probe = json.loads((cfg.run_dir / "opd_probe.json").read_text())
    assert [p["step"] for p in probe["points"]] == [0, 2, 4] and (cfg.run_dir / "opd_probe.png").is_file()
    for p in probe["points"]:
        assert p["reverse_kl_exact"] >= 0 and p["response_tokens"] > 0 and 0 <= p["accuracy_t1"]["mean"] <= 1
    for name in ("adv_mean", "adv_std", "adv_pos_frac"):
        assert len(_values(events, "learner", name)) == cfg.opd.steps, name
    assert len(_values(events, "learner", "expert_load_max_violation")) == cfg.sft.steps + cfg.opd.steps
    assert [e.value for e in events if e.component == "teacher" and e.name == "selftest_max_diff"] == [0.0]


def test_monitor_showed_live_throughput(run):
    _, _, _, screen, state = run
    assert len(screen.frames) >= 3 and state.phase == "finished"
    assert "zero-expert ratio" in screen.frames[-1] and "staleness" in screen.frames[-1]
    for label in ("rollout tokens/s", "teacher tokens/s", "learner tokens/s", "learner steps/s"):
        assert screen.peak(label) > 0, label
    for group, n in (("rollout", 1), ("teacher", 1), ("learner", 2)):  # actor health, from the driver's pings
        assert re.search(rf"{group} actors\s*│\s*{n}/{n} up, 0 restarts", screen.frames[-1]), screen.frames[-1]
