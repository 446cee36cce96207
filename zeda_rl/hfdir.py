"""A Hugging Face checkpoint directory on disk: its index, its side files, and how it is replaced.

Every reader and writer of HF directories (the converter, the router checks, the learner's
loader and export, the teacher build, NET's checkpoint) goes through here, so "which file holds
tensor X", "which files are not weights" and "how a finished directory takes the place of the
old one" have one answer each. config.json itself is read by `zeda_rl.arch.read_config`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack"}


def read_index(d: str | Path) -> dict | None:
    """The parsed sharded index of `d` (with its `weight_map`), None for a single-file checkpoint;
    refused, naming the file, when neither weights file is there or the index is not one."""
    d = Path(d)
    path = d / INDEX
    if not path.is_file():
        if not (d / SINGLE).is_file():
            raise FileNotFoundError(f"{d}: neither {SINGLE} nor {INDEX} found")
        return None
    try:
        index = json.loads(path.read_text())
        if not isinstance(index["weight_map"], dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a valid index (expected a 'weight_map' object; {err!r})") from None
    return index


def weight_map(d: str | Path) -> dict[str, str]:
    """Tensor name -> the file (in `d`) that holds it, from the index or the single file's header."""
    d = Path(d)
    index = read_index(d)
    if index is not None:
        return dict(index["weight_map"])
    from safetensors import safe_open

    with safe_open(d / SINGLE, framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE)


def shards(d: str | Path) -> tuple[list[str], dict | None]:
    """The weight files of `d` (sorted, each checked present) and its parsed index (None: single file)."""
    d = Path(d)
    index = read_index(d)
    if index is None:
        return [SINGLE], None
    names = sorted(set(index["weight_map"].values()))
    for name in names:
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: shard named in {d / INDEX} is missing")
    return names, index


def side_files(d: str | Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """The files of `d` that are not weights nor an index (tokenizer, generation config, chat template,
    README...): what a new checkpoint made from `d` carries over unchanged. `skip`: names to leave out."""
    return [
        p
        for p in sorted(Path(d).iterdir())
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and not p.name.endswith(".index.json") and p.name not in skip
    ]


def copy_side_files(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> None:
    for p in side_files(src, skip):
        shutil.copyfile(p, Path(dst) / p.name)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` into place; an existing `dst` is removed only once `tmp` is complete, and is
    put back if the move fails, so a reader finds the old directory or the new one, never a half."""
    if not dst.exists() and not dst.is_symlink():
        tmp.rename(dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
