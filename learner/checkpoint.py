"""Full learner state, saved atomically and resumed exactly.

A learner checkpoint is a directory:
    meta.json        format, step, world/EP layout, data cursor (JSON), learner and stage sections, source model
    rank00000.pt     that rank's tensors: model (its own experts), AdamW state (Megatron's optimiser:
                     per sub-optimiser its torch state and the fp32 master weights or this rank's
                     shard of them, learner.optim.state_dict), RNG state
    ...
Every rank writes its own file into a temporary directory beside the target (all ranks
need the same filesystem), and global rank 0 renames it into place only after all ranks
have finished, so a crash never leaves a half-written checkpoint under the final name.
Resuming restores the parameters, the optimiser moments and step counts, the
learner section, the stage's section (the lr is a pure function of the step), the temperature and
the data cursor, so the next step is bit-identical to
the one the uninterrupted run would have taken. The layout (world, EP and TP sizes) must be
the same; to change it, go through an HF export (`Learner.export_hf`), which keeps the
weights but not the optimiser state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from zeda_rl.diskerrors import write_error
from zeda_rl.hfdir import replace_dir

FORMAT = "zeda-learner-checkpoint/2"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _optimizer_state(learner):
    if learner.ddp is not None:  # bf16 weights alone would lose the fp32 masters: an exact resume needs them
        from learner import optim

        return optim.state_dict(learner.optimizer)
    return learner.optimizer.state_dict()


def _all_ok(ok: bool) -> bool:
    """Whether every rank's part succeeded (collective): a rank that failed must not leave the
    others waiting in a barrier for a file it will never write."""
    if not dist.is_initialized():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def save(learner, path: str | Path) -> Path:
    """Save the learner's full state to `path` (collective: every rank calls it).

    Any rank's failure (a full disk, a read-only directory) fails the save on every rank: the
    temporary directory is removed and a checkpoint already at `path` stays as it was.
    """
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = path.parent / f".{path.name}.tmp"
    error: BaseException | None = None
    try:
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    except OSError as err:
        error = err
    if _all_ok(error is None):
        try:
            state = {
                "model": _model_tensors(learner.model),
                "optimizer": _optimizer_state(learner),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
            torch.save(state, tmp / _rank_file(rank))
        except Exception as err:  # noqa: BLE001 - torch's writer reports a full disk as a RuntimeError
            error = write_error(err, path)
        if _all_ok(error is None) and rank == 0:
            try:
                _write_meta(learner, tmp)
                replace_dir(tmp, path)
            except OSError as err:
                error = write_error(err, path)
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise OSError(f"{path}: the learner checkpoint was not written (another rank failed to write its part)")
    return path


def _write_meta(learner, tmp: Path) -> None:
    meta = {
        "format": FORMAT,
        "step": learner.step,
        "stage_start": learner.stage_start,
        "world_size": learner.world_size,
        "ep_size": learner.config.ep,
        "tp_size": learner.config.tp,
        "data_cursor": learner.data_cursor,
        **learner.settings(),
        "source": str(learner.source),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: str | Path) -> dict:
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a learner checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path}: not JSON ({err}); a learner checkpoint's meta.json is written whole") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}. {_convert_hint(meta)}"
        )
    return meta


def _convert_hint(meta: dict) -> str:
    """How to go on from a checkpoint this version cannot resume exactly."""
    if meta.get("format") == "zeda-learner-checkpoint/1":
        return (
            "Format 1 (zeda-rl before 2026-12-02) saved one LearnerConfig instead of the learner and stage "
            "sections, so its optimiser state cannot be matched to a stage here: resume it with the zeda-rl "
            "commit that wrote it, or start a new run from its weights: export them there "
            "(`Learner.export_hf`, or the run's RUN_DIR/student / probe/step_* directories it already wrote) "
            "and set model.student to that directory"
        )
    return "It was not written by this zeda-rl (or is damaged); resume it with the version that wrote it"


def load(learner, path: str | Path) -> dict:
    """Restore a learner (built from the same source model and layout) from `path`; returns meta."""
    path = Path(path)
    meta = read_meta(path)
    saved_tp = meta.get("tp_size", 1)
    if (
        meta["world_size"] != learner.world_size
        or meta["ep_size"] != learner.config.ep
        or saved_tp != learner.config.tp
    ):
        raise ValueError(
            f"{path}: saved with world={meta['world_size']} EP={meta['ep_size']} TP={saved_tp}, this learner has "
            f"world={learner.world_size} EP={learner.config.ep} TP={learner.config.tp}; resume with the same layout "
            "(or start a new run from an HF export)"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    from learner.config import STAGES, LearnerSection

    # The run's settings at save time (stage, schedule...) come back too; how often checkpoints go follows this learner.
    saved_cfg = LearnerSection(**meta["config"])
    for k in ("dispatcher", "alpha", "w", "precision", "optimizer"):
        if getattr(saved_cfg, k) != getattr(learner.config, k):
            raise ValueError(
                f"{path}: saved with {k}={getattr(saved_cfg, k)!r}, this learner has {getattr(learner.config, k)!r}"
            )
    learner.config = saved_cfg.model_copy(update={"checkpoint_every": learner.config.checkpoint_every})
    stage = dict(meta["stage"])
    learner.stage = STAGES[stage.pop("name")](**stage)
    learner.temperature = float(meta["temperature"])
    state = torch.load(path / _rank_file(rank), map_location="cpu", weights_only=False)
    targets = {k: v for k, v in learner.model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(targets) - set(state["model"]))
    unexpected = sorted(set(state["model"]) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{path}: model tensors do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for k, v in state["model"].items():
            targets[k].copy_(v)
    if learner.ddp is not None:
        from learner import optim

        optim.load_state_dict(learner.optimizer, state["optimizer"])
    else:
        learner.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    learner.step = int(meta["step"])
    learner.stage_start = int(meta.get("stage_start", 0))
    learner.data_cursor = meta.get("data_cursor")
    _barrier()
    return meta


def clean_partial(root: str | Path) -> list[str]:
    """Remove what a killed writer left under `root` (`.step_*.tmp`: a save that never reached its rename);
    returns their names. Called when a run (fresh or resumed) starts, when no writer of this run is alive."""
    root = Path(root)
    if not root.is_dir():
        return []
    left = sorted(p for p in root.glob(".step_*.tmp") if p.is_dir())
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in left]


def prune(newest: Path, keep: int) -> list[str]:
    """Delete the complete `step_N` checkpoints beside `newest` that are older than it, all but the `keep - 1`
    newest of them; returns their names. Newer ones (another lineage's) and half-written ones are left alone."""
    older = [p for p in newest.parent.glob("step_*") if (p / "meta.json").is_file() and -1 < _step(p) < _step(newest)]
    gone = sorted(older, key=_step)[: max(0, len(older) - (keep - 1))]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in gone]


def _step(path: Path) -> int:
    """N of a `step_N` directory, -1 for any other name."""
    n = path.name.removeprefix("step_")
    return int(n) if n.isdigit() else -1


def latest(root: str | Path) -> Path | None:
    """The newest complete `step_*` checkpoint under `root` (what train_step's periodic saves write)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted((p for p in root.glob("step_*") if (p / "meta.json").is_file() and _step(p) >= 0), key=_step)
    return done[-1] if done else None
