"""`zeda`: the command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import sys


def _convert(a):
    from zeda_rl.convert import convert_checkpoint

    out = convert_checkpoint(
        a.input_dir, a.output_dir, zero_experts=a.zero_experts, zero_type=a.zero_type, seed=a.seed,
        overwrite=a.overwrite, progress=True,
    )
    print(f"converted checkpoint written to {out}")


def _teacher_build(a):
    from zeda_rl.teacher import build_teacher

    print(build_teacher(a.out, force=a.force, seed=a.seed))


def _eval(a):
    from zeda_rl.evaluate import builtin_report, evaluate, render

    if a.suite is None and a.teacher is None and a.out is None:  # the built-in tasks, as ever
        result = evaluate(a.checkpoint, n_per_family=a.n)
        if a.json:
            print(json.dumps(result, indent=2))
        else:
            from rich.console import Console

            Console().print(render(result))
        return
    from zeda_rl.suites import comparison, load_suite, render_markdown, write_outputs

    if a.suite is None:
        student = builtin_report(evaluate(a.checkpoint, n_per_family=a.n))
        teacher = builtin_report(evaluate(a.teacher, n_per_family=a.n)) if a.teacher else None
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

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
    with EvalEngines(a.backend, checkpoint, engines=a.engines, batch_size=suite.batch_size, threads=a.threads) as gen:
        return run_suite(checkpoint, suite, gen, progress=lambda m: print(f"{checkpoint}: {m}", file=sys.stderr))


def _train(a):
    from launch.train import main as train_main

    return train_main(["--config", a.config] + [f"--set={kv}" for kv in a.set] + (["--resume"] if a.resume else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeda", description="ZEDA: zero-expert self-distillation for MoE LLMs")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="inject zero experts into a Hugging Face MoE checkpoint (streaming)")
    c.add_argument("input_dir")
    c.add_argument("output_dir")
    c.add_argument("--zero-experts", type=int, required=True, help="N_Z zero experts per MoE layer (ZEDA: N/2)")
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
    tb.set_defaults(fn=_teacher_build)

    e = sub.add_parser("eval", help="accuracy and zero-expert ratio: the built-in tasks, or a benchmark suite")
    e.add_argument("checkpoint")
    e.add_argument("--n", type=int, default=100, help="held-out prompts per task family (built-in tasks)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--suite", help="suite YAML naming local benchmark files and graders (default: the built-in tasks)")
    e.add_argument("--teacher", help="a second checkpoint evaluated the same way, shown side by side")
    e.add_argument("--out", help="directory for eval.json, eval.md and samples.jsonl")
    e.add_argument("--backend", choices=["torch", "sglang"], default="torch", help="engine backend (suites)")
    e.add_argument("--engines", type=int, default=1, help="engine actors on Ray (suites); 0: one torch engine in process")
    e.add_argument("--threads", type=int, default=1, help="torch threads per engine actor")
    e.set_defaults(fn=_eval)

    tr = sub.add_parser("train", help="run the ZEDA pipeline from a typed YAML config")
    tr.add_argument("--config", required=True)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. opd.steps=5")
    tr.add_argument("--resume", action="store_true")
    tr.set_defaults(fn=_train)

    # listed for --help; its arguments are launch.monitor's own (see main)
    sub.add_parser("rollouts", help="the teacher engines answer the SFT prompts into sharded JSONL, resumable (zeda rollouts -h)",
                   add_help=False)
    sub.add_parser("monitor", help="live rollout/teacher/learner throughput view of a run (zeda monitor -h)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["monitor"]:
        from launch.monitor import main as monitor_main

        try:
            return monitor_main(argv[1:])
        except FileNotFoundError as err:
            print(f"zeda monitor: error: {err}", file=sys.stderr)
            return 2
    if argv[:1] == ["rollouts"]:
        from launch.rollouts import main as rollouts_main

        try:
            return rollouts_main(argv[1:])
        except (ValueError, FileNotFoundError) as err:
            print(f"zeda rollouts: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"zeda {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
