"""Pretrained models by name: their records ship with advmnist, their weights are installed beside them.

Each model NAME is two files: `NAME.json` under `advmnist/weights/`, its record (a source, shipped),
and `NAME.pt`, the checkpoint its training run wrote, byte for byte (a build output: not in the
source tree; found in `$ADVMNIST_WEIGHTS` or beside the records, and refused unless its SHA-256 is
the record's). The record holds: what it is, the spec and command that trained it,
on which machine and at which commit, its clean accuracy on all 10,000 test images and its robust
evaluation (the standard ensemble's per-attack table, the certified interval, the masking checks, on the number of
images it names) and a small check
the test suite repeats (`slice_check`). `--pretrained NAME` copies the checkpoint into a run
directory of its own under `--out`, so evaluations, attacks and the leaderboard treat it like any
trained run. Reading the list needs no torch: the CLI checks a name before anything heavy loads.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from .errors import AdvmnistError, CheckpointError

WEIGHTS = Path(__file__).parent / "weights"
ENV_VAR = "ADVMNIST_WEIGHTS"
KIND = "pretrained"
#: The slice check: APGD-CE at these settings on the first N test images, seeded, so the same weights
#: give the same number; cheap enough for the test suite to repeat for every shipped model.
CHECK = {"attack": "apgd", "n": 200, "steps": 20, "seed": 0}


class PretrainedError(AdvmnistError):
    """An unknown pretrained name, or a shipped file that is not what its record says."""


def list_pretrained() -> list[str]:
    """The names of the shipped models, from their records (no torch import)."""
    return sorted(p.stem for p in WEIGHTS.glob("*.json"))


def check_name(name: str) -> str:
    """`name` if it is shipped; otherwise one line naming the nearest and every shipped model."""
    names = list_pretrained()
    if name in names:
        return name
    near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise PretrainedError(f"no pretrained model {name!r}; {hint}`advmnist pretrained` lists them: "
                          f"{', '.join(names) or 'none shipped'}")


def pretrained_record(name: str) -> dict:
    """The record shipped beside `NAME.pt`."""
    path = WEIGHTS / f"{check_name(name)}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PretrainedError(f"{path}: unreadable ({exc.__class__.__name__})") from None


def weights_dir() -> Path:
    """Where the checkpoints are looked for: $ADVMNIST_WEIGHTS, else beside the records."""
    import os

    return Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else WEIGHTS


def checkpoint_path(name: str) -> Path:
    return weights_dir() / f"{check_name(name)}.pt"


def installed(name: str) -> bool:
    """Whether the checkpoint of `name` is where `checkpoint_path` looks (its checksum is checked on use)."""
    return checkpoint_path(name).is_file()


def _verified_bytes(name: str) -> tuple[bytes, dict]:
    """The checkpoint's bytes, refused unless their SHA-256 is the one the record holds."""
    import hashlib

    record = pretrained_record(name)
    path = checkpoint_path(name)
    if not path.is_file():
        raise PretrainedError(f"the weights of {name!r} are not installed: checkpoints are build outputs, not "
                              f"part of advmnist's source; put {name}.pt (SHA-256 {str(record.get('sha256'))[:16]}) "
                              f"in {path.parent} or point {ENV_VAR} at a folder holding it, or train it: "
                              f"`{record.get('command')}` (`advmnist pretrained {name}` shows its record)")
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise PretrainedError(f"{path}: cannot be read ({exc.strerror or exc}); reinstall advmnist") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != record.get("sha256"):
        raise PretrainedError(f"{path}: SHA-256 {digest[:16]} is not the {str(record.get('sha256'))[:16]} its record "
                              "holds: the file was replaced or damaged; reinstall advmnist")
    return blob, record


def pretrained(name: str, device: str = "cpu"):
    """The shipped model `name` with its weights, in eval mode, on `device` (pixels in [0, 1] in,
    logits out), e.g. `advmnist.pretrained("trades-wide")`."""
    from .runs import load_checkpoint

    _, record = _verified_bytes(name)
    model, _ = load_checkpoint(checkpoint_path(name), expect=record["model"], map_location=device, trust=True)
    return model.eval()


def pretrained_run(name: str, out: str | Path) -> Path:
    """A run directory `<out>/pretrained-NAME` holding the shipped checkpoint and its training record;
    made on first use and reused after, refused if its checkpoint is no longer the shipped one."""
    from . import runs

    blob, record = _verified_bytes(name)
    run_dir = Path(out) / f"pretrained-{name}"
    checkpoint = run_dir / runs.CHECKPOINT
    if checkpoint.is_file():
        if runs.file_sha256(checkpoint) != record["sha256"]:
            raise CheckpointError(f"{checkpoint}: is not the shipped {name!r} checkpoint; move {run_dir} away "
                                  "and run again")
        return run_dir
    runs.check_output_dir(Path(out))
    run_dir.mkdir(parents=True, exist_ok=True)
    with runs.atomic_path(checkpoint) as tmp:
        tmp.write_bytes(blob)
    training = dict(record["training"])
    training.update(run=run_dir.name, checkpoint_sha256=record["sha256"], pretrained=name)
    runs.write_json(run_dir / runs.RECORD, training)
    return run_dir


def slice_check(model, data, *, eps: float, norm: str = "linf", device: str = "cpu") -> float:
    """Robust accuracy (%) under the CHECK attack on the first CHECK['n'] test images: the number
    each record holds and the test suite recomputes, so a shipped file that no longer matches its
    record is caught without the hour a full evaluation takes."""
    import torch

    from .execution import execute_attack

    n = CHECK["n"]
    x, y = data.test_x[:n].to(device), data.test_y[:n].to(device)
    params = {"eps": eps, "steps": CHECK["steps"], "norm": norm}
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    result = execute_attack(model, CHECK["attack"], x, y, params=params, seed=CHECK["seed"], measure=False)
    with torch.no_grad():
        still = model(result.x_adv).argmax(1) == y
    return 100.0 * float((correct & still).float().mean())


def clean_accuracy(model, data, device: str = "cpu") -> float:
    """Accuracy (%) on all 10,000 test images (`measures.evaluate`)."""
    from .measures import evaluate

    return evaluate(model, data.test_x.to(device), data.test_y.to(device))["accuracy"]


def ship(name: str, run_dir: str | Path, *, summary: str, command: str, spec: str, machine: str,
         license: str, eps: float, norm: str = "linf", check_eps: float | None = None,
         commit: str | None = None, note: str = "", robust_record: str | Path | None = None) -> dict:
    """Write a finished, evaluated run's record as `advmnist/weights/NAME.json` and its checkpoint as
    NAME.pt in `weights_dir()`.

    The run must have its robust evaluation at `eps` on the first 1,000 test images or more (all 10,000,
    `evaluate --robust --limit 0`, for a number a page quotes); the record keeps how many, and every
    listing shows it. `check_eps`: the slice check's eps where
    `eps` would leave nothing to compare (a standard model is at 0% there). `commit`: the code's commit
    where the runs' own provenance could not read it (run from an exported tree). `robust_record`: the
    evaluation to ship where it is not `RUN/eval/robust.json` (an experiment's, in `RUN/attack-cache/`)."""
    from . import runs
    from .data import load_mnist

    run_dir = Path(run_dir)
    training = runs.read_json(run_dir / runs.RECORD)
    robust = runs.read_json(Path(robust_record) if robust_record else run_dir / "eval" / "robust.json")
    if (robust.get("n") or 0) < 1000 or robust.get("eps") != eps or robust.get("norm") != norm:
        raise PretrainedError(f"{run_dir}: its robust evaluation is on {robust.get('n')} images at "
                              f"{robust.get('norm')} eps {robust.get('eps')}; ship one on 1,000 images or more at "
                              f"{norm} eps {eps:g}")
    blob = (run_dir / runs.CHECKPOINT).read_bytes()
    sha = runs.file_sha256(run_dir / runs.CHECKPOINT)
    if sha != training.get("checkpoint_sha256") or sha != robust.get("checkpoint_sha256"):
        raise PretrainedError(f"{run_dir}: the checkpoint is not the one its records name")
    model, _ = runs.load_checkpoint(run_dir, expect=training["model"])
    data = load_mnist()
    record = {
        "kind": KIND, "name": name, "summary": summary, "model": training["model"],
        "sha256": sha, "bytes": len(blob), "dtype": "float32", "license": license,
        "command": command, "spec": spec, "machine": machine, "note": note,
        "commit": {"training": (training.get("provenance") or {}).get("commit") or commit,
                   "evaluation": (robust.get("provenance") or {}).get("commit") or commit},
        "training": {k: v for k, v in training.items() if k not in ("history",)},
        "clean_accuracy": clean_accuracy(model, data),
        "evaluation": robust,
        "check": {**CHECK, "eps": check_eps or eps, "norm": norm,
                  "robust_accuracy": slice_check(model, data, eps=check_eps or eps, norm=norm)},
    }
    WEIGHTS.mkdir(exist_ok=True)
    weights_dir().mkdir(parents=True, exist_ok=True)
    with runs.atomic_path(weights_dir() / f"{name}.pt") as tmp:
        tmp.write_bytes(blob)
    runs.write_json(WEIGHTS / f"{name}.json", record)
    return record
