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
    from zeda_rl.evaluate import evaluate, render

    result = evaluate(a.checkpoint, n_per_family=a.n)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        from rich.console import Console

        Console().print(render(result))


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

    e = sub.add_parser("eval", help="held-out accuracy per task family and zero-expert ratio")
    e.add_argument("checkpoint")
    e.add_argument("--n", type=int, default=100, help="held-out prompts per task family")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_eval)

    tr = sub.add_parser("train", help="run the ZEDA pipeline from a typed YAML config")
    tr.add_argument("--config", required=True)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. opd.steps=5")
    tr.add_argument("--resume", action="store_true")
    tr.set_defaults(fn=_train)

    # listed for --help; its arguments are launch.monitor's own (see main)
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
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"zeda {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
