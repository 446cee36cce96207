"""`ray job submit` of the pipeline against a local `ray start --head`, as the README runs it.

One head for the module, on ports of its own, with token authentication, started from
the project's environment (a job's entrypoint runs the `python` found on the PATH of
`ray start`). The first job runs a shortened pipeline to success while `zeda monitor
--ray` attaches to it from another process and Ray's Prometheus endpoint is scraped; the
second is stopped with `ray job stop` mid-training. The module stops only the processes
it started (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "sft.steps=6",
    "sft.prompts=64",
    "sft.batch_size=16",
    "opd.steps=4",
    "opd.prompts_per_step=4",
    "opd.rollout_batch=2",
    "eval.n_per_family=4",
    "sampling.max_new_tokens=8",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    def __init__(self, root: Path):
        self.root = root
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_JOB_STOP_WAIT_TIME_S": "30",  # SIGTERM's grace before SIGKILL, as the README and cluster YAML set it
            "ZEDA_RUNS_DIR": str(root / "runs"),
            "ZEDA_CACHE": str(root / "cache"),
        }
        self._start()

    def _start(self):
        self.ports = {k: _free_port() for k in ("gcs", "dashboard", "client", "metrics", "agent")}
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard']}"
        self.gcs = f"127.0.0.1:{self.ports['gcs']}"
        # a short temp dir: Ray's unix sockets live under it (108-byte path limit)
        self.temp = Path(tempfile.mkdtemp(prefix="zrj", dir="/tmp"))
        self.log = self.root / "head.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--num-cpus=2",
                "--node-ip-address=127.0.0.1",
                f"--port={self.ports['gcs']}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.ports['dashboard']}",
                f"--ray-client-server-port={self.ports['client']}",
                f"--metrics-export-port={self.ports['metrics']}",
                f"--dashboard-agent-listen-port={self.ports['agent']}",
                f"--temp-dir={self.temp}",
            ],
            env=self.env,
            cwd=REPO,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ray(self, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode:
            raise AssertionError(
                f"ray {' '.join(args)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        return out

    def wait_ready(self, timeout_s=180, tries=3):
        """Up once `ray start` says so and the job server answers. Ray gives its raylet a fixed 30 s to
        register with the GCS and exits otherwise, which a loaded 2-core machine can miss: start again."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            log = self.log.read_text(errors="replace")
            if self.proc.poll() is not None:
                tries -= 1
                if "timed out during startup" not in log or tries == 0:
                    raise AssertionError(f"ray start exited: {log[-3000:]}")
                self.stop()
                self._start()
                continue
            if (
                "Ray runtime started" in log
                and self.ray("job", "list", "--address", self.dashboard, timeout=60, check=False).returncode == 0
            ):
                return
            time.sleep(1)
        raise AssertionError("the head's job server did not come up")

    def status(self, job_id: str) -> str:
        out = _strip_ansi(self.ray("job", "status", "--address", self.dashboard, job_id).stdout)
        m = re.search(rf"Job '{job_id}'[^\n]*?(pending|running|stopped|succeeded|failed)", out, re.I)
        return m.group(1).upper() if m else out

    def stop(self):
        """Stop this head's processes only: `ray start` and its children, and any left by a failed start."""
        mine = [p for p in psutil.process_iter(["cmdline"]) if str(self.temp) in " ".join(p.info["cmdline"] or [])]
        procs = (
            [self.proc_info()] + self.proc_info().children(recursive=True) if self.proc.poll() is None else []
        ) + mine
        procs = list({p.pid: p for p in procs}.values())
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(self.temp, ignore_errors=True)

    def proc_info(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("rayjob")
    h = Head(root)
    try:
        h.wait_ready()
        from zeda_rl.teacher import build_teacher

        h.teacher = build_teacher(root / "teacher", steps=40, progress=False, min_accuracy=0.0)
        yield h
    finally:
        h.stop()


def _submit_args(head, name, extra=()):
    sets = [f"--set=name={name}", f"--set=model.teacher={head.teacher}", *(f"--set={s}" for s in [*SHORT, *extra])]
    return [
        "job",
        "submit",
        "--address",
        head.dashboard,
        "--working-dir",
        ".",
        "--submission-id",
        f"{name}-{secrets.token_hex(3)}",
        "--",
        "python",
        "-m",
        "launch.train",
        "--config",
        "launch/configs/tiny-cpu.yaml",
        *sets,
    ]


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[()][AB0-9]|\r", "", text)


def _scrape(url: str, stop: threading.Event, seen: dict):
    """Collect every zeda sample line any scrape showed: a gauge whose reporting actor has exited (the learner
    at the end of the run) drops out of later expositions, so the last scrape alone may miss it."""
    lines: dict[str, None] = {}
    while not stop.wait(1.0):
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue
        lines.update(dict.fromkeys(ln for ln in text.splitlines() if ln.startswith("ray_zeda_")))
        seen["text"] = "\n".join(lines) + "\n"


@pytest.mark.slow
def test_submit_runs_the_pipeline_with_monitor_and_prometheus(head):
    # the monitor's screen goes to a file (a pipe nobody reads would fill and stall it), drawn as on a terminal
    screen_file = head.root / "monitor.screen"
    monitor = subprocess.Popen(
        [
            str(BIN / "zeda"),
            "monitor",
            "--ray",
            head.gcs,
            "--run",
            "jobrun",
            "--wait",
            "300",
            "--timeout",
            "600",
            "--refresh",
            "0.5",
        ],
        env={**head.env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160", "NO_COLOR": "1"},
        cwd=REPO,
        stdout=screen_file.open("w"),
        stderr=subprocess.STDOUT,
    )
    stop, seen = threading.Event(), {}
    scraper = threading.Thread(
        target=_scrape, args=(f"http://127.0.0.1:{head.ports['metrics']}/metrics", stop, seen), daemon=True
    )
    scraper.start()
    try:
        out = head.ray(*_submit_args(head, "jobrun"), timeout=900)
    finally:
        monitor.wait(timeout=120)
        time.sleep(3)  # one more scrape after the last events
        stop.set()
    job_id = re.search(r"Job '([^']+)' submitted", out.stdout).group(1)
    assert "done: report at" in out.stdout, out.stdout[-3000:]
    assert head.status(job_id) == "SUCCEEDED"
    # relative output_dir under $ZEDA_RUNS_DIR, not inside the job's temporary working-dir copy
    run_dir = Path(head.env["ZEDA_RUNS_DIR"]) / "runs" / "jobrun"
    report = json.loads((run_dir / "report.json").read_text())
    assert all(v > 0 for v in report["tokens_per_s"].values())

    screen = _strip_ansi(screen_file.read_text())
    assert monitor.returncode == 0, screen[-3000:]
    assert "phase: finished" in screen, screen[-3000:]
    for label in ("rollout tokens/s", "teacher tokens/s", "learner tokens/s", "learner steps/s"):
        shown = [float(v) for v in re.findall(re.escape(label) + r"\s*│\s*([0-9.]+)", screen)]
        assert shown and max(shown) > 0, (label, screen[-3000:])
    assert re.search(r"learner actors\s*│\s*2/2 up, 0 restarts", screen), screen[-3000:]

    prom = seen.get("text", "")
    for metric in ("ray_zeda_learner_tokens_per_s", "ray_zeda_learner_zero_ratio", "ray_zeda_rollout_tokens_total"):
        assert re.search(rf"^{metric}\{{[^}}]*run=\"jobrun\"[^}}]*\}} [0-9.e+-]+$", prom, re.M), (metric, prom[-2000:])
    assert re.search(r'^ray_zeda_learner_zero_ratio_per_layer\{[^}]*index="1"', prom, re.M)


@pytest.mark.slow
def test_ray_job_stop_stops_the_run_cleanly(head):
    long = ["sft.steps=100000", "sft.batch_size=4"]
    args = _submit_args(head, "stoprun", long)
    args.insert(2, "--no-wait")
    out = head.ray(*args)
    job_id = re.search(r"Job '([^']+)' submitted", out.stdout).group(1)
    metrics = Path(head.env["ZEDA_RUNS_DIR"]) / "runs" / "stoprun" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and '"step_done"' in metrics.read_text()):
        assert time.time() - t0 < 300 and head.status(job_id) in ("PENDING", "RUNNING"), head.ray(
            "job", "logs", "--address", head.dashboard, job_id
        ).stdout[-3000:]
        time.sleep(1)
    head.ray("job", "stop", "--address", head.dashboard, job_id, timeout=120)
    t0 = time.time()
    while head.status(job_id) not in ("STOPPED", "FAILED", "SUCCEEDED") and time.time() - t0 < 60:
        time.sleep(1)
    assert head.status(job_id) == "STOPPED"
    phases = [json.loads(line)["value"] for line in metrics.read_text().splitlines() if '"phase"' in line]
    assert phases[-1] == "stopped", phases
    # nothing of the run is left on the cluster: its actors died with the driver
    t0 = time.time()
    while True:
        listed = head.ray(
            "list", "actors", "--address", head.dashboard, "--filter", "state=ALIVE", "--format", "json"
        ).stdout
        listed = "[]" if listed.startswith("No resource") else listed
        alive = [
            a["class_name"]
            for a in json.loads(listed)
            if a["class_name"] in ("LearnerActor", "RolloutActor", "TeacherActor", "MetricsHub")
        ]
        if not alive or time.time() - t0 > 60:
            break
        time.sleep(1)
    assert not alive, alive


def test_job_server_listens_on_loopback_only(head):
    listening = [
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == head.ports["dashboard"]
    ]
    assert listening and set(listening) <= {"127.0.0.1", "::1"}, listening
