"""What a run listens on: the project's own sockets bind 127.0.0.1 by default, the configured address otherwise,
and every interface (0.0.0.0, '::') only when the config says so (cluster.allow_all_interfaces).

The project binds two kinds of socket: the learner's ZMQ inbox (`zeda_rl.transport.Puller`, opened on
rank 0 by `LearnerActor.open_inbox` from cluster.bind_host / inbox_port) and the torch.distributed
rendezvous (`zeda_rl.transport.rendezvous_store`, served by rank 0 on the address `LearnerActor.rendezvous`
picks: cluster.bind_host when the ranks share a node, plus the gloo/NCCL pair sockets) of the learner
ranks' group and of each rank's weight-sync broadcast group (`zeda_rl.weights.join_group`). The metrics hub
is a Ray actor and `zeda monitor --ray` a Ray client: neither opens a socket of its own. A local run's Ray
listens on loopback only (`launch.fleet.start_local_ray`; tests/test_loopback.py lists every socket of
such a run); a cluster's Ray servers (GCS, raylet, workers, agents) listen on every interface (Ray 2.60,
measured) and rely on Ray's token authentication and the security group of launch/cluster-h200.yaml.
Sockets are read with psutil for this process (the inbox) and for a learner rank's process.
"""

from __future__ import annotations

import datetime
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from launch.config import load_config, local_addresses

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny-cpu.yaml"
WILDCARD = {"0.0.0.0", "::"}
OTHER = sorted(a for a in local_addresses() if not a.startswith("127."))


def listening(pid: int | None = None) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _open_inbox(cfg):
    """The learner rank's own open_inbox (the Ray actor's method, called here without Ray)."""
    from learner.actor import LearnerActor

    rank0 = SimpleNamespace(learner=SimpleNamespace(info=SimpleNamespace(vocab_size=None)))  # no model: any token id
    endpoint = LearnerActor.__ray_metadata__.modified_class.open_inbox(
        rank0, cfg.cluster.bind_host, cfg.cluster.inbox_port
    )
    return rank0.inbox, endpoint


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


@pytest.mark.parametrize(
    "overrides,host",
    [
        ({}, lambda: "127.0.0.1"),
        ({"cluster.bind_host": "auto"}, _node_ip),
        ({"cluster.bind_host": "localhost"}, lambda: "127.0.0.1"),
        pytest.param(
            {"cluster.bind_host": OTHER[0] if OTHER else ""},
            lambda: OTHER[0],
            marks=pytest.mark.skipif(not OTHER, reason="no non-loopback IPv4 address here"),
        ),
        ({"cluster.bind_host": "0.0.0.0", "cluster.allow_all_interfaces": True}, lambda: "0.0.0.0"),
    ],
    ids=["default", "auto", "localhost", "configured", "all-interfaces-when-allowed"],
)
@pytest.mark.parametrize("fixed_port", [False, True], ids=["any-port", "inbox_port"])
def test_the_inbox_listens_where_the_config_says(overrides, host, fixed_port):
    port = _free_port() if fixed_port else 0
    cfg = load_config(TINY, {**overrides, "cluster.inbox_port": port})
    before = listening()
    inbox, endpoint = _open_inbox(cfg)
    try:
        new = listening() - before
    finally:
        inbox.close()
    bound_port = int(endpoint.rsplit(":", 1)[1])
    assert new == {(host(), bound_port)}, (endpoint, new)
    assert not fixed_port or bound_port == port


@pytest.mark.parametrize("address", ["127.0.0.1", *OTHER[:1]])
def test_the_rendezvous_store_listens_on_its_address_only(address):
    from zeda_rl.transport import rendezvous_store

    timeout = datetime.timedelta(seconds=60)
    port = _free_port(address)
    before = listening()
    server: list = []
    rank0 = threading.Thread(target=lambda: server.append(rendezvous_store(address, port, 0, 2, timeout)))
    rank0.start()  # rank 0 waits for the group to join
    client = rendezvous_store(address, port, 1, 2, timeout)
    rank0.join(60)
    assert (listening() - before) == {(address, port)}
    client.set("k", "v")
    assert server[0].get("k") == b"v"


@pytest.mark.parametrize(
    "bind_host,host",
    [
        ("127.0.0.1", lambda: "127.0.0.1"),
        ("localhost", lambda: "127.0.0.1"),
        ("auto", _node_ip),
        pytest.param(
            OTHER[0] if OTHER else "", lambda: OTHER[0], marks=pytest.mark.skipif(not OTHER, reason="no LAN address")
        ),
        ("0.0.0.0", lambda: "127.0.0.1"),  # the store needs no more than this node, whatever the inbox may do
        ("*", lambda: "127.0.0.1"),
        ("203.0.113.7", lambda: "127.0.0.1"),  # not this node's (the driver's, the learner elsewhere)
        (None, _node_ip),  # the ranks span nodes
    ],
    ids=["loopback", "localhost", "auto", "configured", "all-interfaces", "zmq-wildcard", "not-here", "multi-node"],
)
def test_the_learners_rendezvous_is_on_bind_host_when_its_ranks_share_a_node(bind_host, host):
    """`LearnerActor.rendezvous` (called here without Ray): the address rank 0's TCPStore binds, and a port free there."""
    from learner.actor import LearnerActor

    addr, port = LearnerActor.__ray_metadata__.modified_class.rendezvous(SimpleNamespace(), bind_host)
    assert addr == host()
    with socket.socket() as s:
        s.bind((addr, port))  # free there


RANK = """
import psutil, socket, sys
from learner import parallel
from zeda_rl.weights import join_group
def listening():
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN}
for i, addr in enumerate(sys.argv[1:]):
    parallel.setup(0, 1, 1, **({"master_addr": addr} if i else {}))  # first: setup's default
    print(sorted(listening()))
    parallel.teardown()
before = listening()
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
join_group("gloo", "127.0.0.1", port, 1, 0, "weights-rank0")  # a learner rank's weight-sync broadcast group
print(sorted(listening() - before))
"""


def test_a_learner_ranks_process_groups_open_nothing_on_every_interface():
    addrs = ["127.0.0.1", *OTHER[:1]]
    out = subprocess.run([sys.executable, "-c", RANK, *addrs], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == len(addrs) + 1, out.stdout
    for addr, line in zip([*addrs, "127.0.0.1"], lines):
        socks = eval(line)  # noqa: S307 - a list of tuples the child printed
        assert socks and not {ip for ip, _ in socks} & WILDCARD, socks
        assert addr in {ip for ip, _ in socks}, (addr, socks)  # the store, on master_addr


# A socket a new module binds must be looked at here: where the project binds or serves anything.
BINDS = re.compile(
    r"\.bind\(|\.listen\(|TCPStore\(|init_method\s*=\s*f?[\"']tcp|rendezvous\(f?[\"']tcp|"
    r"HTTPServer|start_http_server|bind_to_random_port|serve_forever"
)
KNOWN = {
    "zeda_rl/transport.py": 5,  # Puller's bind; rendezvous_store's bind, listen and TCPStore (rank 0, the others)
    "learner/parallel.py": 1,  # free_port: bound to the rendezvous address and closed at once
    "launch/doctor.py": 1,  # the port probe, closed at once
}


def test_every_place_the_project_binds_is_one_of_those_tested_here():
    found: dict[str, int] = {}
    for top in ("zeda_rl", "learner", "actors", "launch"):
        for path in sorted((ROOT / top).rglob("*.py")):
            code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
            n = len(BINDS.findall(code))
            if n:
                found[str(path.relative_to(ROOT))] = n
    assert found == KNOWN, (
        f"{found}: a new place that binds or serves; test where it listens (default 127.0.0.1, the configured "
        "address otherwise, never every interface unless configured) and list it in KNOWN"
    )
