"""The student as an HF checkpoint in the converted format: `export_hf_checkpoint`.

What `zeda eval`, the engines and transformers load after training: the learner's weights
(experts gathered from the EP ranks, TP shards joined, each tensor in its on-disk dtype) plus
every file of the source checkpoint that is not a weight (config.json, tokenizer). It is
written beside the target and renamed into place only when complete, so a crash or a full
disk never leaves a half checkpoint under the name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from learner.bridge import HFCheckpoint, full_hf_state
from zeda_rl.diskerrors import write_error
from zeda_rl.hfdir import INDEX, SINGLE, copy_side_files, replace_dir


def export_hf_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    source_dir: str | Path | None = None,
    max_shard_bytes: int = 4 << 30,
    write: bool | None = None,
) -> Path | None:
    """Write the model as an HF checkpoint in the converted format; returns out_dir on the writer.

    config.json and tokenizer/other non-weight files come from `source_dir` (default: the
    checkpoint the model was loaded from); weights are gathered from the EP ranks and
    written as safetensors (sharded with an index above `max_shard_bytes`). Everything
    goes to a temporary directory beside out_dir, renamed into place when complete.
    Source tensors the learner does not hold (e.g. GLM-4.7-Flash's multi-token-prediction
    layer, which is not trained here) are copied through unchanged, so the export is as
    complete as the input. Collective over the EP and TP groups; by default the global rank 0 writes.
    """
    out = Path(out_dir)
    src = Path(source_dir or getattr(model, "zeda_source"))
    if write is None:
        write = not dist.is_initialized() or dist.get_rank() == 0

    def named():
        seen = set()
        for name, t in full_hf_state(model):
            seen.add(name)
            yield name, t
        if write:
            ckpt = HFCheckpoint(src)
            for name in ckpt.keys():
                if name not in seen:
                    yield name, ckpt.get(name)

    if not write:  # the other EP ranks only take part in the gathers
        for _ in named():
            pass
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Shards are written as they fill (host memory stays ~max_shard_bytes), renamed once their count is known.
        parts: list[dict[str, int]] = []
        shard: dict[str, torch.Tensor] = {}
        size = 0

        def flush():
            save_file(shard, tmp / f"part-{len(parts):05d}", metadata={"format": "pt"})
            parts.append({k: v.numel() * v.element_size() for k, v in shard.items()})

        for name, t in named():
            n = t.numel() * t.element_size()
            if shard and size + n > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = t.detach().to("cpu", copy=True)  # the tensors may live on a GPU or be live parameters
            size += n
        flush()
        if len(parts) == 1:
            (tmp / "part-00000").rename(tmp / SINGLE)
        else:
            weight_map = {}
            for k, names in enumerate(parts):
                fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
                (tmp / f"part-{k:05d}").rename(tmp / fname)
                weight_map.update(dict.fromkeys(names, fname))
            total = sum(sum(p.values()) for p in parts)
            (tmp / INDEX).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            )
        copy_side_files(src, tmp)
        replace_dir(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_error(err, out)  # a full disk as "<out>: No space left on device", whatever the writer said
        if failed is err:
            raise
        raise failed from err
    return out
