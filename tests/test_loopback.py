"""A local run listens on loopback only.

`make run` (launch/configs/tiny-cpu.yaml: no cluster.address, bind_host 127.0.0.1) starts its Ray with
`launch.fleet.connect_ray`, builds the learner group (2 ranks: their TCPStore and gloo pairs) and opens the
learner's inbox. Every TCP socket listening, and every UDP socket bound, in this process and all it started
(GCS, raylet, dashboard head, the dashboard / metrics and runtime-env agents, the autoscaler monitor, Ray's
workers, the learner ranks) must be on 127.0.0.1 (or ::1 / ::ffff:127.0.0.1): none on every interface
(0.0.0.0, ::) nor on a LAN address. No Ray process is exempt. The token the local Ray authenticates with is
readable by its owner only.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny-cpu.yaml"


def on_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def bound(procs: list[psutil.Process]) -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, command line) of each listening TCP / bound unconnected UDP socket of `procs`."""
    out = []
    for p in procs:
        try:
            conns, cmd = p.net_connections("inet"), " ".join(p.cmdline())[:160]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # a worker that has just exited
            continue
        for c in conns:
            if c.laddr and (c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr)):
                out.append((c.laddr.ip, c.laddr.port, p.pid, cmd))
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from launch.config import load_config
    from launch.fleet import connect_ray

    assert not ray.is_initialized(), "another test left Ray running: this one must start the run's own"
    cfg = load_config(TINY, {"output_dir": str(tmp_path_factory.mktemp("runs"))})
    assert cfg.cluster.address is None and cfg.cluster.bind_host == "127.0.0.1"
    connect_ray(cfg)
    try:
        yield cfg
    finally:
        ray.shutdown()


def test_a_local_run_listens_on_loopback_only(local_run, tmp_path):
    from learner.actor import LearnerGroup
    from learner.testing import tiny_checkpoint

    cfg = local_run
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    group = LearnerGroup.from_run_config(cfg, tiny_checkpoint("qwen3_moe", tmp_path / "ckpt"))
    try:
        endpoint = group.open_inbox(cfg.cluster.bind_host, cfg.cluster.inbox_port)
        rank_pids = [h["pid"] for h in ray.get([a.health.remote() for a in group.actors])]
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        socks = bound(procs)

        offenders = [s for s in socks if not on_loopback(s[0])]
        assert not offenders, "off loopback:\n" + "\n".join(
            f"{ip}:{port} pid {pid}: {cmd}" for ip, port, pid, cmd in offenders
        )

        # what was looked at: Ray's servers, the learner's store and inbox, each rank's gloo pairs
        pids = {p.pid for p in procs}
        assert set(rank_pids) <= pids, "the learner ranks are not among this run's processes"
        cmds = " ".join(cmd for *_, cmd in socks)
        for server in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"):
            assert server in cmds, f"no socket of Ray's {server} seen: {socks}"
        gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
        assert gcs_port in {port for _, port, *_ in socks}
        assert group.master[0] == "127.0.0.1"  # cluster.bind_host: the ranks share this node
        rank0 = {(ip, port) for ip, port, pid, _ in socks if pid == rank_pids[0]}
        assert group.master in rank0, (group.master, rank0)  # the TCPStore
        assert ("127.0.0.1", int(endpoint.rsplit(":", 1)[1])) in rank0, (endpoint, rank0)  # the inbox
        for pid in rank_pids[1:]:  # gloo's pair sockets, on loopback whatever the hostname resolves to
            assert any(p == pid for _, _, p, _ in socks), f"rank pid {pid} listens on nothing"
        gloo = ray.get(ray.remote(lambda: os.environ.get("GLOO_SOCKET_IFNAME")).remote())
        assert gloo and any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[gloo]), gloo
    finally:
        group.shutdown()


def test_the_local_rays_token_is_its_owners_alone(local_run):
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        pytest.skip("this environment gives Ray no token file")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o077 == 0, f"{path}: mode {oct(mode)}"


def test_the_token_file_is_made_the_owners_alone(tmp_path, monkeypatch):
    """`launch.fleet._private_auth_token`, before and after a local Ray starts: a readable token file is
    narrowed to 0600, a missing one created so (Ray's format), and none is touched when auth is off."""
    from launch.fleet import _private_auth_token

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = tmp_path / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    _private_auth_token()
    token = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) == 64 and int(token, 16) >= 0
    path.chmod(0o644)
    _private_auth_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token
    path.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _private_auth_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
