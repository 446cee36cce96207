"""`zeda doctor CONFIG`: every reason a run of CONFIG would be refused or fail at start-up, without starting it.

A refused config costs seconds; one that fails after the engines have loaded costs the start-up of a
whole cluster. So the config's own checks (`launch.config`: the validators at load, `preflight` against
this machine and the teacher's HF config), the learner knobs and the memory plan (`launch.plan`) are
run here exactly as `zeda train` runs them (`refusals`, its gate), then what the environment must give
the run: Ray, the inbox port on the bind host, the GPU extras a backend imports. Nothing is started: Ray
is probed with a TCP connection, a port with a bind that is closed at once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass
class Check:
    name: str
    status: str
    detail: str


def config_checks(
    cfg, hf_config: dict | None = None, hf_source: str | None = None, cluster: dict | None = None, gpu: str = "H200"
) -> list[Check]:
    """The checks `zeda train` refuses on: preflight, the learner knobs not implemented yet, the plan's verdict."""
    from launch.config import preflight
    from launch.plan import load_hf_config, make_plan, refusal
    from learner.config import not_implemented

    problems = preflight(cfg, hf_config, hf_source)
    out = [Check(_key(p), FAIL, p) for p in problems] or [
        Check("config vs teacher and machine", OK, _summary(cfg, hf_source))
    ]
    knobs = not_implemented(cfg.learner)
    out += [Check(_key(k), FAIL, k) for k in knobs] or [Check("learner knobs", OK, "all implemented by the learner")]
    try:
        hf = hf_config if hf_config is not None else load_hf_config(cfg)
        p = make_plan(cfg, hf, gpu=gpu, cluster=cluster)
    except (OSError, ValueError, KeyError) as err:  # no teacher config: preflight has said why
        out.append(Check("plan", SKIP if problems else FAIL, f"not planned: {err}"))
        return out
    if p["fits"]:
        worst = max(p["verdicts"], key=lambda v: v["need"] / max(v["capacity"], 1))
        out.append(
            Check(
                "plan",
                OK,
                f"fits ({p['device']['name']}); tightest: {worst['placement']} "
                f"{worst['need'] / 2**30:.1f} of {worst['capacity'] / 2**30:.1f} GiB",
            )
        )
    else:
        out.append(Check("plan", FAIL, f"does not fit: {refusal(p)} (zeda plan shows every figure)"))
    out.append(push_check(cfg, p["push"]))
    return out


def gpu_run(cfg) -> bool:
    """Whether the run's engines or learner sit on GPUs (an SGLang engine always does)."""
    return (
        cfg.learner.gpus_per_rank > 0
        or any(getattr(cfg, role).gpus > 0 for role in ("rollout", "teacher"))
        or cfg.rollout.backend == "sglang"
    )


def push_check(cfg, push: dict) -> Check:
    """A weight push's bytes and time on the configured path (`launch.plan.push`); a warning when a GPU run would
    move more than OBJECT_STORE_PUSH_BOUND a step through Ray's object store (`zeda train` is not refused)."""
    from launch.plan import OBJECT_STORE_PUSH_BOUND, PUSH_BANDWIDTH

    gb = 1e9
    figure = (
        f"{push['bytes_per_engine'] / gb:.2f} GB to each of {cfg.rollout.replicas} engines "
        f"({push['bytes_total'] / gb:.2f} GB a push), ~{push['seconds']:.1f} s at {push['bandwidth'] / gb:g} GB/s "
        f"({push['bandwidth_source'].split(':')[0]}; zeda plan names the source)"
    )
    if push["path"] == "ray" and gpu_run(cfg) and push["object_store_bytes"] > OBJECT_STORE_PUSH_BOUND:
        nccl = push["bytes_per_engine"] / PUSH_BANDWIDTH["nccl"][0]
        return Check(
            "weight push",
            WARN,
            f"opd.weight_sync: ray: {figure}, all through Ray's object store, above the "
            f"{OBJECT_STORE_PUSH_BOUND / gb:g} GB a push bound for a GPU run (launch.plan.OBJECT_STORE_PUSH_BOUND); "
            f"set opd.weight_sync: nccl (a broadcast from every learner rank into the SGLang engines: "
            f"~{nccl:.1f} s at the stated {PUSH_BANDWIDTH['nccl'][0] / gb:g} GB/s)",
        )
    return Check("weight push", OK, f"opd.weight_sync: {push['path']}: {figure}")


def refusals(cfg, cluster: dict | None = None) -> list[str]:
    """Why `zeda train` must not start this config, one line each ([]: it may)."""
    return [c.detail for c in config_checks(cfg, cluster=cluster) if c.status == FAIL]


def _key(message: str) -> str:
    head = message.split(" ", 1)[0].rstrip(":")
    return head if "." in head and "/" not in head else "config"


def _summary(cfg, hf_source: str | None) -> str:
    teacher = "embedded (built on demand)" if cfg.model.teacher == "embedded" else cfg.model.teacher
    return (
        f"teacher {teacher}{f' ({hf_source})' if hf_source else ''}; learner EP {cfg.learner.ep} x DP {cfg.learner.dp}, "
        f"TP {cfg.learner.tp}; data paths exist; bind host {cfg.cluster.bind_host}"
    )


def stops_check(cfg) -> Check:
    """The stop ids every phase and engine will use (`zeda_rl.chat.stop_ids`: teacher rollouts, OPD sampling,
    eval, both backends) and the token SFT answers end with, read from the teacher's tokenizer and configs."""
    from zeda_rl.chat import ChatFormat, TemplateError

    thinking = cfg.data.enable_thinking
    try:
        if cfg.model.teacher == "embedded":
            from zeda_rl.teacher import MODEL
            from zeda_rl.tokenizer import build_tokenizer

            where = "embedded teacher (character tokenizer; the build's config.json names the same eos)"
            fmt = ChatFormat(build_tokenizer(), thinking, stops=[MODEL["eos_token_id"]])
        else:
            from pathlib import Path

            teacher = Path(cfg.model.teacher)
            if not any((teacher / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                return Check("stop ids", SKIP, f"model.teacher {teacher}: no tokenizer to read there")
            from transformers import AutoTokenizer

            where = f"teacher {teacher}"
            fmt = ChatFormat(AutoTokenizer.from_pretrained(teacher), thinking)
        tokens = fmt.stop_tokens()
    except Exception as err:  # noqa: BLE001 - a broken tokenizer or config raises anything
        return Check("stop ids", FAIL, f"model.teacher: cannot read its stop ids ({type(err).__name__}: {err})")
    stops = ", ".join(f"{i} {t!r}" for i, t in tokens.items())
    detail = f"{where}: rollouts, the teacher, OPD and eval stop on {stops}"
    if not fmt.templated:
        return Check("stop ids", OK, f"{detail}; SFT answers end with eos {fmt.eos_id} (no chat template)")
    from zeda_rl.data import Record

    probe = Record(
        id="doctor",
        where="zeda doctor's probe answer",
        messages=({"role": "user", "content": "What is 1 + 1?"},),
        response="<think>\nOne and one.\n</think>\n\n2" if thinking else "2",
    )
    try:
        end = fmt.sft_ids(probe)[1][-1]
    except TemplateError as err:
        return Check("stop ids", FAIL if cfg.sft.steps else WARN, f"{detail}; but SFT answers cannot end: {err}")
    return Check(
        "stop ids", OK, f"{detail}; SFT answers end with {end} {tokens[end]!r} (data.enable_thinking {thinking})"
    )


# ---- the environment ------------------------------------------------------------------------


def ray_check(cfg) -> Check:
    """The cluster the run would join, reached over TCP; or the local Ray the run would start, sized against the run."""
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if not address:
        return _local_ray(cfg)
    where = f"cluster.address {cfg.cluster.address}" if cfg.cluster.address else f"RAY_ADDRESS {address}"
    try:
        target = address.removeprefix("ray://")
        if target == "auto":  # the cluster `ray start` last started on this machine
            from ray._private.services import get_ray_address_from_environment

            target = get_ray_address_from_environment("auto", None)
        host, _, port = target.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except (OSError, ValueError, ConnectionError) as err:
        return Check(
            "ray",
            FAIL,
            f"{where}: not reachable ({type(err).__name__}: {err}); start the cluster (ray up / "
            "ray start --head) or leave cluster.address null for a local Ray",
        )
    return Check("ray", OK, f"{where}: {target} accepts connections")


def _local_ray(cfg) -> Check:
    """A local Ray is started by the run itself; what matters is that its CPUs and GPUs hold the run's placement groups,
    which otherwise wait forever."""
    from launch import placement

    cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    gpus = _cuda_devices()
    node = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}
    try:
        placement.pack(placement.plan(cfg), [("local", node)])
    except placement.Unplaceable as err:
        return Check(
            "ray",
            FAIL,
            f"local Ray will be started with {cpus} CPUs and {gpus} GPUs, which cannot hold the run: "
            f"{err} (cluster.num_cpus, or fewer replicas / cpus)",
        )
    return Check("ray", OK, f"local Ray will be started (num_cpus={cpus}, {gpus} GPUs): the run's placement groups fit")


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def bind_address(cfg) -> str:
    """The address the learner's inbox binds, as the learner resolves it ('auto': the node's cluster address;
    for a local run, whose private Ray has node IP 127.0.0.1 (`launch.fleet.start_local_ray`), loopback)."""
    host = cfg.cluster.bind_host
    if host == "auto" and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        return "127.0.0.1"
    if host == "auto":
        from ray._private.services import get_node_ip_address

        return get_node_ip_address()
    return {"localhost": "127.0.0.1", "*": "0.0.0.0"}.get(host, host)


def ports_check(cfg) -> Check:
    """The fixed port the run binds (the inbox's), free on its host. Ray's own and the learner's rendezvous
    ports are picked free at start; a zero inbox port is too."""
    host = bind_address(cfg)
    port = cfg.cluster.inbox_port
    where = f"learner inbox tcp://{host}:{port or '*'}"
    remote = (
        " (checked on this machine; the learner's rank 0 may run on another node)"
        if cfg.cluster.bind_host == "auto"
        else ""
    )
    if not port:
        return Check("ports", OK, f"{where}: a free port picked at start; Ray and the learner rendezvous pick theirs")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as err:
        return Check(
            "ports",
            FAIL,
            f"{where}: cannot bind ({err.strerror or err}){remote}; free it or set "
            "cluster.inbox_port (0: any free port)",
        )
    return Check("ports", OK, f"{where}: free{remote}")


def gpu_checks(cfg) -> list[Check]:
    """The extras a backend imports on the machines that run it: SGLang for an sglang engine, CUDA for nccl
    (a learner on GPUs) and for GPU torch engines. On a named cluster this machine only submits, so a miss warns."""
    miss = WARN if (cfg.cluster.address or os.environ.get("RAY_ADDRESS")) else FAIL
    out = []
    roles = [role for role in ("rollout", "teacher") if getattr(cfg, role).backend == "sglang"]
    if roles:
        try:
            import sglang  # noqa: F401

            out.append(Check("sglang", OK, f"imports ({', '.join(roles)} backend)"))
        except Exception as err:  # noqa: BLE001 - a broken install raises anything
            out.append(
                Check(
                    "sglang",
                    miss,
                    f"{', '.join(r + '.backend' for r in roles)}: sglang, but `import sglang` fails "
                    f"({type(err).__name__}: {err}); install the gpu extra (pip install -e '.[gpu]')",
                )
            )
    wants = ([f"learner.gpus_per_rank {cfg.learner.gpus_per_rank} (nccl)"] if cfg.learner.gpus_per_rank > 0 else []) + [
        f"{role}.gpus {getattr(cfg, role).gpus}" for role in ("rollout", "teacher") if getattr(cfg, role).gpus > 0
    ]
    if wants:
        n = _cuda_devices()
        out.append(
            Check("cuda", OK, f"{n} CUDA devices for {', '.join(wants)}")
            if n
            else Check("cuda", miss, f"{', '.join(wants)}: no CUDA device here (torch.cuda.is_available() is False)")
        )
    if cfg.learner.attention == "flash":
        out += te_checks(cfg)
    return out or [Check("gpu", SKIP, "the run asks for no GPU")]


def te_checks(cfg) -> list[Check]:
    """TransformerEngine for learner.attention: flash. A miss here is already a failed `learner.attention` row
    (`launch.config.package_problems`, which `zeda train` refuses on), except for a Ray Client driver (ray://):
    off the cluster, this machine's packages are not the learner's, so a miss only warns."""
    from launch.config import FLASH_MODULE, TE_INSTALL, import_problem, ray_client

    why = import_problem(FLASH_MODULE)
    if not why:
        return [Check("transformer_engine", OK, f"{FLASH_MODULE} imports (learner.attention: flash)")]
    if ray_client(cfg):
        return [
            Check(
                "transformer_engine",
                WARN,
                f"learner.attention: flash: {FLASH_MODULE} does not import on this machine ({why}), which drives "
                f"the cluster through Ray Client and is not checked; the learner's nodes need it ({TE_INSTALL}), "
                "else the learner refuses at start",
            )
        ]
    return []


def doctor(
    cfg, hf_config: dict | None = None, hf_source: str | None = None, cluster: dict | None = None, gpu: str = "H200"
) -> list[Check]:
    checks = [Check("config", OK, "loads and validates")]
    checks += config_checks(cfg, hf_config, hf_source, cluster, gpu)
    checks.append(stops_check(cfg))
    checks += [ray_check(cfg), ports_check(cfg)] + gpu_checks(cfg)
    return checks


def render(checks: list[Check], title: str):
    from rich.markup import escape
    from rich.table import Table

    colour = {OK: "green", WARN: "yellow", FAIL: "red", SKIP: "dim"}
    t = Table(title=title)
    for c in ("check", "status", "detail"):
        t.add_column(c, overflow="fold")
    for c in checks:
        t.add_row(escape(c.name), f"[{colour[c.status]}]{c.status}", escape(c.detail))
    return t


def as_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
