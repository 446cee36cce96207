"""What a run prints and logs as it goes: the phase rules and times, each step's line and metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console

from zeda_rl.metrics import MetricsLog

console = Console()


class Phases:
    """Wall time per phase, logged and shown as the run goes."""

    def __init__(self, log: MetricsLog):
        self.log, self.times = log, {}

    @contextmanager
    def __call__(self, name: str):
        console.rule(f"[bold]{name}")
        self.log.log("driver", "phase", name)
        t0 = time.time()
        yield
        self.times[name] = time.time() - t0
        self.log.log("driver", f"phase_seconds/{name}", self.times[name])
        console.print(f"[green]{name} done in {self.times[name]:.1f}s")


def log_first_row(log: MetricsLog, stage: str, tokens, loss_mask) -> None:
    """The first row a stage trains on (up to 4096 tokens): shows the chat template and the loss mask at work."""
    log.log("driver", f"first_row/{stage}/tokens", [int(t) for t in tokens[:4096]])
    log.log("driver", f"first_row/{stage}/loss_mask", [int(m) for m in loss_mask[:4096]])


def log_step(log: MetricsLog, metrics: dict, step: int, total: int) -> None:
    log.log_many("learner", metrics, step)
    log.log("learner", "step", step, step)
    log.log("learner", "step_done", 1, step)
    log.log("driver", "progress_done", step, step)
    log.log("driver", "progress_total", total, step)
    if step % 5 == 0 or step == total:
        z = metrics.get("zero_ratio", float("nan"))
        console.print(
            f"step {step}/{total} loss {metrics.get('loss', float('nan')):.4f} zero {100 * z:.1f}% "
            f"tok/s {metrics.get('tokens_per_s', 0):.0f}"
            + (f" rKL {metrics['reverse_kl']:.4f}" if "reverse_kl" in metrics else "")
        )
