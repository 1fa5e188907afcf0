"""Run directories, atomic files, checkpoints and JSON records with provenance.

A run is built in a hidden `.partial-*` directory and renamed into place only when complete, and
every file is written to a temporary name and `os.replace`d, so an interrupted command leaves no
half-written file and no half-finished run that a later command could pick up. Files get the
permissions of any new file (0666 less the umask). JSON is written strictly: a non-finite number
is written as null, never as the `NaN` that strict readers refuse.

Reading is tolerant: run discovery skips, with a `SkippedFileWarning` naming it, a record it cannot
read. Loading a run's checkpoint checks its SHA-256 against the run's record and refuses a mismatch.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .errors import CheckpointError, OutputError, SkippedFileWarning
from .models import create_model, get_spec

CHECKPOINT = "model.pt"
RECORD = "record.json"


def _umask() -> int:
    """The process's umask, read from /proc where it can be (os.umask can only read by setting)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_failed(path: Path, exc: OSError) -> OutputError:
    err = OutputError(f"could not write {path}: {exc.strerror or exc}")
    err.path, err.reason = path, exc.strerror or str(exc)
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    The file ends with the permissions of any new file (0666 less the umask), not the 0600 of the
    temporary file. A failed write (full disk, read-only place) raises OutputError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON atomically: NaN and infinities become null (JSON has no such numbers)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float (also inside tensors, lists and dicts) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _finite(obj.tolist())
    return obj


#: What a training record must hold for discovery to offer its run (key: type).
TRAIN_RECORD: dict[str, type | tuple[type, ...]] = {
    "model": str, "finished": str, "checkpoint_sha256": str, "recipe": dict, "seed": int, "n_train": int,
    "data_checksum": str,
}


def skip_file(path: str | os.PathLike, why: str) -> None:
    """Tell (as a SkippedFileWarning, which the CLI prints) that `path` was left out, and why."""
    warnings.warn(f"{path}: skipped: {why}", SkippedFileWarning, stacklevel=3)


def read_record(path: str | os.PathLike, *, kind: str | None = None,
                require: Mapping[str, type | tuple[type, ...]] = {}) -> dict | None:
    """The JSON record at `path`, or None. A record that cannot be read, is not a JSON object, has
    no kind, or lacks a key its kind needs is None with a warning naming the file; a well-formed
    record of another kind is None quietly."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        skip_file(path, f"not readable as JSON ({exc.__class__.__name__})")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        skip_file(path, "not a record (a JSON object with a 'kind')")
        return None
    if kind is not None and data["kind"] != kind:
        return None
    bad = [k for k, t in require.items() if not isinstance(data.get(k), t)]
    if bad:
        skip_file(path, f"{data['kind']} record without a valid {', '.join(bad)}")
        return None
    return data


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
    """Save weights with the model's name and builder options; returns the file's SHA-256.

    Saved through a buffer: torch.save names the archive's inner folder after the file it writes,
    which here would be a random temporary name, so the same weights would hash differently."""
    payload = {"model": name, "options": dict(options), "state_dict": model.state_dict()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    blob = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


_TRUST = contextvars.ContextVar("advmnist_trust_checkpoints", default=False)


@contextlib.contextmanager
def trusting_checkpoints() -> Iterator[None]:
    """Within the block, load_checkpoint skips the check against the run's record."""
    token = _TRUST.set(True)
    try:
        yield
    finally:
        _TRUST.reset(token)


def verify_checkpoint(path: Path, sha256: str) -> None:
    """Refuse a run's `model.pt` whose SHA-256 is not the one its record.json wrote down."""
    record = path.parent / RECORD
    if path.name != CHECKPOINT or not record.is_file():
        return  # a checkpoint outside a run: nothing to check it against
    override = "load it anyway with --trust-checkpoint (trust=True)"
    try:
        data = read_json(record)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be checked, its run's {RECORD} is unreadable "
                              f"({exc.__class__.__name__}); {override}") from None
    expected = data.get("checkpoint_sha256") if isinstance(data, dict) else None
    if isinstance(expected, str) and expected != sha256:
        raise CheckpointError(f"{path}: SHA-256 {sha256[:16]} is not the {expected[:16]} its run's {RECORD} "
                              f"records: the checkpoint was replaced or damaged; {override}")


def load_checkpoint(path: str | os.PathLike, expect: str | None = None,
                    map_location: str | torch.device = "cpu", *,
                    trust: bool | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint names and load its weights (`weights_only=True`).

    A run's `model.pt` must have the SHA-256 its record.json holds (CheckpointError otherwise);
    `trust=True`, or a `trusting_checkpoints()` block, skips that check."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    sha256 = hashlib.sha256(blob).hexdigest()
    if not (_TRUST.get() if trust is None else trust):
        verify_checkpoint(path, sha256)
    try:
        payload = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
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
    return model, {"model": name, "options": payload.get("options", {}), "sha256": sha256}


def new_run_name(model: str, seed: int, tag: str = "") -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{model}{tag}-{stamp}-s{seed}"


PARTIAL = ".partial-"
_OWNER = ".owner"  # "<pid> <host>" of the process building a partial directory


def check_output_dir(path: str | os.PathLike, need_bytes: int = 16 << 20) -> Path:
    """Fail before the work, not after it: `path` must be, or become, a writable directory with room."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: exists and is not a directory; choose another output directory")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OutputError(f"{path}: only {free / 2**20:.1f} MiB free, about {need_bytes / 2**20:.0f} MiB needed")
    return path


def final_path(partial: str | os.PathLike) -> Path:
    """The run directory that a `run_directory` block's partial directory becomes."""
    partial = Path(partial)
    return partial.parent / partial.name[len(PARTIAL):]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def clean_stale(root: str | os.PathLike) -> list[Path]:
    """Remove the partial directories under `root` whose process is gone (killed before it could
    clean up; Ctrl-C and SIGTERM clean up themselves), and their empty name claims."""
    removed, host = [], socket.gethostname()
    for partial in Path(root).glob(f"{PARTIAL}*"):
        try:
            pid, owner_host = (partial / _OWNER).read_text().split()
            if owner_host != host or _alive(int(pid)):
                continue
        except (OSError, ValueError):
            continue  # not ours to judge: left alone, and ignored by discovery (a dot name)
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):
            final_path(partial).rmdir()  # only ever removes an empty claim
        removed.append(partial)
    return removed


def _claim(root: Path, name: str) -> tuple[Path, Path]:
    """Claim `root/name` (or name-2, name-3, ...) by creating it, empty, exclusively; the work goes
    into the partial directory beside it."""
    for i in range(1, 1000):
        candidate = name if i == 1 else f"{name}-{i}"
        final, partial = root / candidate, root / f"{PARTIAL}{candidate}"
        try:
            final.mkdir()
        except FileExistsError:
            continue
        try:
            partial.mkdir()
        except FileExistsError:  # another process's leftover with this name: take the next name
            final.rmdir()
            continue
        try:
            (partial / _OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(OSError):
                final.rmdir()
            raise
        return final, partial
    raise OutputError(f"{root}: no free run directory name for {name}")


@contextlib.contextmanager
def run_directory(root: str | os.PathLike, name: str) -> Iterator[Path]:
    """A directory that appears under `root/name` only once the block completes.

    The name is claimed first, by creating `root/name` empty and exclusively, so two processes never
    write into one run directory; a taken name gets a suffix (-2, -3, ...): `final_path(partial)`
    says which. The block writes into `root/.partial-<name>`, which replaces the empty claim when the
    block completes and is removed, with the claim, when it fails or is interrupted. A failed write
    raises OutputError naming the run directory.
    """
    root = Path(root)
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)
        final, partial = _claim(root, name)
    except OSError as exc:
        raise OutputError(f"could not create the run directory {final}: {exc.strerror or exc}") from None
    done = False
    try:
        yield partial
        (partial / _OWNER).unlink(missing_ok=True)
        os.replace(partial, final)
        done = True
    except (OSError, OutputError) as exc:
        where = getattr(exc, "path", None) or getattr(exc, "filename", None) or final
        with contextlib.suppress(ValueError):
            where = final / Path(where).relative_to(partial)
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise OutputError(f"could not write {where}: {reason}; the run was not kept") from None
    finally:
        if not done:
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(OSError):
                final.rmdir()


def find_runs(root: str | os.PathLike, model: str | None = None) -> list[Path]:
    """Finished training runs under `root`, oldest first. A run whose record cannot be read is left
    out with a SkippedFileWarning naming it."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for d in sorted(root.iterdir()):
        rec = d / RECORD
        if d.name.startswith(".") or not rec.is_file() or not (d / CHECKPOINT).is_file():
            continue
        data = read_record(rec, kind="train", require=TRAIN_RECORD)
        if data is not None and (model is None or data["model"] == model):
            runs.append((data["finished"], d))
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
