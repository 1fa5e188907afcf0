"""Run directories, atomic files, checkpoints and JSON records with provenance.

A run is built in a hidden `.partial-*` directory and renamed into place only when complete, and
every file is written to a temporary name and `os.replace`d, so an interrupted command leaves no
half-written file and no half-finished run that a later command could pick up.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import CheckpointError
from .models import create_model, get_spec

CHECKPOINT = "model.pt"
RECORD = "record.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, name: str, options: dict) -> str:
    """Save weights with the model's name and builder options; returns the file's SHA-256."""
    payload = {"model": name, "options": dict(options), "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return file_sha256(path)


def load_checkpoint(path: str | os.PathLike, expect: str | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint names and load its weights (`weights_only=True`)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or not {"model", "state_dict"} <= set(payload):
        raise CheckpointError(f"{path}: not an advmnist checkpoint (no model name and weights)")
    name = payload["model"]
    if expect is not None and name != expect:
        raise CheckpointError(f"{path}: the checkpoint holds a {name!r} model, not {expect!r}")
    get_spec(name)
    model = create_model(name, **payload.get("options", {}))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise CheckpointError(f"{path}: weights do not fit a {name!r} model: {first[0].strip()}") from None
    model.to(map_location).eval()
    return model, {"model": name, "options": payload.get("options", {}), "sha256": file_sha256(path)}


def new_run_name(model: str, seed: int, tag: str = "") -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{model}{tag}-{stamp}-s{seed}"


@contextlib.contextmanager
def run_directory(root: str | os.PathLike, name: str) -> Iterator[Path]:
    """A directory that appears under `root/name` only once the block completes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".partial-{name}"
    partial.mkdir()
    final = root / name
    try:
        yield partial
        os.replace(partial, final)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def find_runs(root: str | os.PathLike, model: str | None = None) -> list[Path]:
    """Finished training runs under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for d in root.iterdir():
        rec = d / RECORD
        if d.name.startswith(".") or not rec.is_file() or not (d / CHECKPOINT).is_file():
            continue
        try:
            data = read_json(rec)
        except (OSError, ValueError):
            continue
        if data.get("kind") == "train" and (model is None or data.get("model") == model):
            runs.append((data.get("finished", ""), d))
    return [d for _, d in sorted(runs)]


def latest_run(root: str | os.PathLike, model: str | None = None) -> Path | None:
    runs = find_runs(root, model)
    return runs[-1] if runs else None


def provenance() -> dict:
    """Versions and code revision: what a record needs to be traced back."""
    commit = None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    from . import __version__

    return {"advmnist": __version__, "commit": commit, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
