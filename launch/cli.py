"""`zeda`: the command line. Each subcommand is a thin wrapper over a library function.

Parsing imports nothing heavy: torch, transformers and Ray load only inside a subcommand, so
`zeda --help` and argument errors answer at once (bench/cli_start.py measures it). Whatever a
subcommand hits (its own refusal, a file system error, Ctrl-C) ends in one line on stderr that
names the path and the cause, and a non-zero exit: 2 for a refused input, 1 for the operating
system's error, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _convert(a):
    from zeda_rl.convert import convert_checkpoint

    a.target = a.output_dir
    out = convert_checkpoint(
        a.input_dir,
        a.output_dir,
        zero_experts=a.zero_experts,
        zero_type=a.zero_type,
        seed=a.seed,
        overwrite=a.overwrite,
        progress=True,
    )
    print(f"converted checkpoint written to {out}")


def _teacher_build(a):
    from zeda_rl.teacher import build_teacher

    a.target = a.out
    print(build_teacher(a.out, force=a.force, seed=a.seed, suite=a.tasks, name=a.teacher))


def _eval(a):
    from zeda_rl.evaluate import builtin_report, check_checkpoint, evaluate, render

    a.target = a.out or a.checkpoint
    for checkpoint in (a.checkpoint, a.teacher):  # both, before either loads (a suite run loads the teacher first)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
    if a.suite is None and a.teacher is None and a.out is None:  # the built-in tasks, as ever
        result = evaluate(a.checkpoint, n_per_family=a.n, tasks=a.tasks)
        if a.json:
            print(json.dumps(result, indent=2))
        else:
            from rich.console import Console

            Console().print(render(result))
        return
    from zeda_rl.suites import comparison, load_suite, render_markdown, write_outputs

    if a.suite is None:
        student = builtin_report(evaluate(a.checkpoint, n_per_family=a.n, tasks=a.tasks))
        teacher = builtin_report(evaluate(a.teacher, n_per_family=a.n, tasks=a.tasks)) if a.teacher else None
    else:
        suite = load_suite(a.suite)
        teacher = _run_suite(a, a.teacher, suite) if a.teacher else None
        student = _run_suite(a, a.checkpoint, suite)
    if a.out:
        for path in write_outputs(a.out, student, teacher).values():
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(comparison(student, teacher), indent=2) if a.json else render_markdown(student, teacher))


def _run_suite(a, checkpoint, suite):
    from actors.eval_pool import EvalEngines
    from zeda_rl.suites import run_suite

    if a.engines > 0:
        import ray

        from launch.fleet import start_local_ray

        if not ray.is_initialized():  # the cluster RAY_ADDRESS names, else engines of our own on loopback
            (ray.init if os.environ.get("RAY_ADDRESS") else start_local_ray)(log_to_driver=False)
    with EvalEngines(a.backend, checkpoint, engines=a.engines, batch_size=suite.batch_size, threads=a.threads) as gen:
        return run_suite(checkpoint, suite, gen, label=f"eval {checkpoint}")


def _train(a):
    """The driver: the config checked (`zeda doctor`'s refusals) before any actor starts, then the pipeline."""
    from launch.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(a.config, a.set)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    a.target = cfg.run_dir  # where the run writes, for an error that names no path (a full disk)
    from launch.doctor import refusals

    refused = refusals(cfg)  # before any actor starts
    if refused:
        print("\n".join([f"{a.config}: refused:", *(f"  {r}" for r in refused)]), file=sys.stderr)
        return 2
    from launch.pipeline import console, run

    result = run(cfg, resume=a.resume)
    console.print(f"[bold green]done[/]: report at {cfg.run_dir / 'report.md'}")
    acc = result["accuracy"]
    scored = (
        f"teacher {100 * acc['teacher']['mean']:.1f}% | student {100 * acc['student']['mean']:.1f}% | "
        if "mean" in acc["student"]
        else ""
    )
    console.print(f"{scored}zero experts {100 * result['zero_expert_ratio']['overall']:.1f}%")
    return 0


def _plan(a):
    import yaml

    from launch.config import load_run_config
    from launch.plan import load_hf_config, make_plan, render

    cfg = load_run_config(a.config, a.set)
    cluster = yaml.safe_load(open(a.cluster)) if a.cluster else None
    p = make_plan(
        cfg,
        load_hf_config(cfg, a.hf_config),
        gpu=a.gpu,
        cluster=cluster,
        margin=a.margin,
        bandwidth=a.bandwidth * 1e9 if a.bandwidth else None,
    )
    if a.json:
        print(json.dumps(p, indent=2))
    else:
        from rich.console import Console

        Console().print(render(p))
    return 0 if p["fits"] else 2


def _doctor(a):
    import yaml

    from launch.config import ConfigError, load_run_config
    from launch.doctor import FAIL, Check, as_json, doctor, render

    try:
        cfg = load_run_config(a.config, a.set)
    except ConfigError as err:
        checks = [Check("config", FAIL, str(err))]
    else:
        from launch.plan import load_hf_config

        hf = load_hf_config(cfg, a.hf_config) if a.hf_config else None
        cluster = yaml.safe_load(open(a.cluster)) if a.cluster else None
        checks = doctor(cfg, hf, a.hf_config, cluster=cluster, gpu=a.gpu)
    if a.json:
        print(json.dumps(as_json(checks), indent=2))
    else:
        from rich.console import Console

        Console().print(render(checks, f"zeda doctor {a.config}"))
    return 2 if any(c.status == FAIL for c in checks) else 0


def _baselines(a):
    from launch.baselines import run_baselines
    from launch.config import load_run_config

    cfg = load_run_config(a.config, a.set)
    a.target = a.out or cfg.output_dir
    result = run_baselines(cfg, a.out, analysis_per_family=a.analysis_n, seeds=a.seeds, eval_only=a.eval_only)
    for r in result["rows"]:
        print(f"{r['label']:<22} accuracy {100 * r['accuracy']['mean']:5.1f}%  r_ZE {100 * r['r_ze']:5.1f}%")


def _count(what: str):
    """An argparse type: a whole number >= 1 (`what` it counts, for the refusal), refused at parsing."""

    def parse(text: str) -> int:
        n = int(text)  # not a number: argparse's own "argument --x: invalid int value: 'y'"
        if n < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1 ({what}), got {n}")
        return n

    parse.__name__ = "int"
    return parse


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def _own_parser(argv: list[str]) -> int:
    if argv[0] == "monitor":
        from launch.monitor import main
    else:
        from launch.rollouts import main
    return main(argv[1:])


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("zeda-rl")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeda", description="ZEDA: zero-expert self-distillation for MoE LLMs")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="inject zero experts into a Hugging Face MoE checkpoint (streaming)")
    c.add_argument("input_dir")
    c.add_argument("output_dir")
    c.add_argument(
        "--zero-experts",
        type=_count("zero experts per MoE layer; ZEDA uses N/2"),
        required=True,
        help="N_Z zero experts per MoE layer, 1 to 4N (ZEDA: N/2)",
    )
    c.add_argument("--zero-type", choices=["zero", "copy"], default="zero")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=_convert)

    t = sub.add_parser("teacher", help="the embedded tiny teacher")
    tsub = t.add_subparsers(dest="teacher_cmd", required=True)
    tb = tsub.add_parser("build", help="build (or reuse from cache) the tiny Qwen3-MoE teacher")
    tb.add_argument("--out", default=None, help="output directory (default: the cache)")
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--force", action="store_true", help="rebuild even if cached")
    tb.add_argument(
        "--tasks", choices=["basic", "hard"], default="basic", help="built-in task suite the teacher learns"
    )
    tb.add_argument(
        "--teacher",
        default=None,
        help="which of the suite's embedded teachers (zeda_rl.teacher.TEACHERS, e.g. hard-lean; default: the suite's own)",
    )
    tb.set_defaults(fn=_teacher_build)

    e = sub.add_parser("eval", help="accuracy and zero-expert ratio: the built-in tasks, or a benchmark suite")
    e.add_argument("checkpoint")
    e.add_argument(
        "--n",
        type=_count("held-out prompts per task family"),
        default=100,
        help="held-out prompts per task family (built-in tasks; >= 1)",
    )
    e.add_argument("--json", action="store_true")
    e.add_argument("--tasks", choices=["basic", "hard"], default="basic", help="built-in task suite (without --suite)")
    e.add_argument("--suite", help="suite YAML naming local benchmark files and graders (default: the built-in tasks)")
    e.add_argument("--teacher", help="a second checkpoint evaluated the same way, shown side by side")
    e.add_argument("--out", help="directory for eval.json, eval.md and samples.jsonl")
    e.add_argument("--backend", choices=["torch", "sglang"], default="torch", help="engine backend (suites)")
    e.add_argument(
        "--engines", type=int, default=1, help="engine actors on Ray (suites); 0: one torch engine in process"
    )
    e.add_argument("--threads", type=int, default=1, help="torch threads per engine actor")
    e.set_defaults(fn=_eval)

    tr = sub.add_parser("train", help="run the ZEDA pipeline from a typed YAML config")
    tr.add_argument("--config", required=True)
    tr.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. opd.steps=5"
    )
    tr.add_argument("--resume", action="store_true")
    tr.set_defaults(fn=_train)

    pl = sub.add_parser(
        "plan", help="memory per learner rank, engine and weight push, and whether it fits (exit 2: it does not)"
    )
    pl.add_argument("config")
    pl.add_argument("--cluster", help="cluster YAML (launch/cluster-h200.yaml): its GPU type and nodes")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--hf-config", help="the static teacher's config.json (default: model.teacher's)")
    pl.add_argument("--gpu", default="H200", choices=["H200", "H100"], help="GPU without --cluster")
    pl.add_argument("--margin", type=float, default=0.10, help="memory kept free (share of the GPU's)")
    pl.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="weight-push bandwidth in GB/s (default: opd.weight_sync's: measured for ray, stated for nccl)",
    )
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pl.set_defaults(fn=_plan)

    d = sub.add_parser(
        "doctor",
        help="what a run of CONFIG needs, checked without starting it: the config against the teacher "
        "and this machine, the plan, Ray, ports, GPU extras (exit 2: a check fails)",
    )
    d.add_argument("config")
    d.add_argument("--hf-config", help="the static teacher's config.json or checkpoint dir (default: model.teacher's)")
    d.add_argument("--cluster", help="cluster YAML (launch/cluster-h200.yaml): the plan's GPU type and nodes")
    d.add_argument(
        "--gpu", default="H200", choices=["H200", "H100"], help="GPU the plan checks against without --cluster"
    )
    d.add_argument("--json", action="store_true")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    d.set_defaults(fn=_doctor)

    b = sub.add_parser(
        "baselines",
        help="ZEDA vs Dynamic Skipping, NET (static top-K/2) and SFT-only ZEDA, trained and "
        "evaluated the same way: a table in the paper's layout, plots, where tokens skip",
    )
    b.add_argument("--config", required=True, help="run config YAML (its recipe trains ZEDA and NET)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    b.add_argument("--out", default=None, help="output directory (default: OUTPUT_DIR/NAME-baselines)")
    b.add_argument(
        "--analysis-n", type=int, default=200, help="held-out prompts per family for the where-tokens-skip analysis"
    )
    b.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="S,S,...",
        help="training seeds (e.g. 0,1,2): ZEDA and NET are trained once per seed with one teacher "
        "(model.teacher_seed); the table shows means, spreads and paired 95%% intervals (default: the config's seed)",
    )
    b.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the students an earlier run of the same command trained (OUT/zeda-sN, OUT/net-sN) again",
    )
    b.set_defaults(fn=_baselines)

    # listed for --help; its arguments are launch.monitor's own (see main)
    sub.add_parser(
        "rollouts",
        help="the teacher engines answer the SFT prompts into sharded JSONL, resumable (zeda rollouts -h)",
        add_help=False,
    )
    sub.add_parser(
        "monitor", help="live rollout/teacher/learner throughput view of a run (zeda monitor -h)", add_help=False
    )
    return p


def describe(err: BaseException, target=None) -> str:
    """One line for an error: an OSError as `path: cause` (the command's output path when the
    error names none, as a failed write to a full disk does), anything else as its message."""
    if isinstance(err, OSError) and err.errno is not None:
        paths = [str(f) for f in (err.filename, err.filename2) if f is not None]
        where = " -> ".join(paths) if paths else f"writing under {target}" if target else ""
        cause = err.strerror or str(err)
        return f"{where}: {cause}" if where else cause
    return str(err)


def run(cmd: str, fn, arg) -> int:
    """Run one subcommand (`fn(arg)`): its result code, or one error line and a non-zero code."""
    try:
        return fn(arg) or 0
    except KeyboardInterrupt:
        print(f"zeda {cmd}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"zeda {cmd}: error: {describe(err, getattr(arg, 'target', None))}", file=sys.stderr)
        return 1 if err.errno is not None else 2
    except (ValueError, RuntimeError) as err:
        print(f"zeda {cmd}: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["monitor"], ["rollouts"]):  # they parse their own arguments
        return run(argv[0], _own_parser, argv)
    args = build_parser().parse_args(argv)
    return run(args.cmd, args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
