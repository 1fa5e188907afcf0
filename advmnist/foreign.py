"""Models the zoo does not have: a user's module file with its weights, or one saved model file.

Any `nn.Module` that takes pixels in [0, 1] (N, 1, 28, 28) and returns (N, 10) logits can be
attacked, evaluated and, within the operations `advmnist.bounds` supports, certified. Three ways in:

- `load_module("net.py:factory", "weights.pt")`: the file is imported, `factory()` builds the
  network and the weights (a `state_dict`, read with `weights_only=True`) are loaded strictly;
- `load_model_file("net.pt2")`: a program saved with `torch.export.save`;
- `load_model_file("net.ts")`: a TorchScript module saved with `torch.jit.save`.

Each returns the model in eval mode on the CPU and a provenance dict (paths and SHA-256 of what
was read) for the run's record. `check_model` runs it once on real images and turns the usual
mistakes (wrong output shape, non-finite logits, a model trained on other pixel ranges) into one
line a user can act on.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from . import runs
from .errors import CheckpointError, ModelError
from .runs import file_sha256

KIND = "foreign-model"  # the record of a run directory that names a user's model instead of holding one
CHANCE_LIMIT = 20.0  # clean accuracy (%) on [0, 1] pixels below which the pixel range is suspected


class ForeignModelError(ModelError):
    """A module file, factory, weights or saved model that cannot give an MNIST classifier."""


class FixedGraph(nn.Module):
    """A model whose graph was fixed when it was saved (`torch.export`): its mode cannot change, so
    `train()` and `eval()` change only this wrapper's flag, as they would on a model without
    mode-dependent layers."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> "FixedGraph":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ForeignModelError(f"{path}: no such {what}")
    if not path.is_file():
        raise ForeignModelError(f"{path}: not a file")
    return path


def load_module(spec: str, weights: str | Path | None = None) -> tuple[nn.Module, dict]:
    """The model `factory()` of the Python file in `spec` ("net.py:factory") builds, with `weights`
    (a state_dict file) loaded strictly; in eval mode, on the CPU."""
    file, sep, factory = spec.rpartition(":")
    if not sep or not file or not factory.isidentifier():
        raise ForeignModelError(f"--module {spec!r}: give FILE.py:FACTORY, e.g. net.py:make_net")
    path = _existing(file, "module file")
    module_sha256 = file_sha256(path)
    name = f"advmnist_user_{module_sha256[:12]}"
    try:
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or loader.loader is None:
            raise ForeignModelError(f"{path}: not a Python module file")
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # dataclasses and pickling look their module up there
        loader.loader.exec_module(module)
    except ForeignModelError:
        raise
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ForeignModelError(f"{path}: importing it failed ({_first_line(exc)})") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ForeignModelError(f"{path}: has no function or class {factory!r}")
    try:
        model = fn()
    except Exception as exc:
        raise ForeignModelError(f"{path}:{factory}() raised {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ForeignModelError(f"{path}:{factory}() returned a {type(model).__name__}, not a torch nn.Module")
    info = {"source": "module", "module": str(path.resolve()), "factory": factory,
            "module_sha256": module_sha256, "weights": None, "weights_sha256": None}
    if weights is not None:
        wpath = _existing(weights, "weights file")
        try:
            state = torch.load(wpath, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ForeignModelError(f"{wpath}: not a readable weights file ({type(exc).__name__}); save it with "
                                    f"torch.save(model.state_dict(), path)") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ForeignModelError(f"{wpath}: not a state_dict (a dict of tensors); save it with "
                                    f"torch.save(model.state_dict(), path)")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines()[1:] if line.strip()]
            raise ForeignModelError(f"{wpath}: weights do not fit {factory}(): "
                                    f"{(lines or [_first_line(exc)])[0]}") from None
        info.update(weights=str(wpath.resolve()), weights_sha256=file_sha256(wpath))
    return model.cpu().eval(), info


def load_model_file(path: str | Path) -> tuple[nn.Module, dict]:
    """A model saved as one file: a `torch.export` program (.pt2) or a TorchScript module; in eval
    mode, on the CPU."""
    path = _existing(path, "model file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    info = {"source": "model-file", "model_file": str(path.resolve()), "model_file_sha256": file_sha256(path)}
    try:
        if any(n.endswith("/archive_format") for n in names):
            if path.suffix != ".pt2":
                raise ForeignModelError(f"{path}: a torch.export program must end in .pt2 (torch.export.load "
                                        f"reads no other name)")
            model = FixedGraph(torch.export.load(path).module())
            info["format"] = "torch.export"
        elif any(n.endswith("/constants.pkl") for n in names):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, its files still load
                model = torch.jit.load(str(path), map_location="cpu")
            info["format"] = "torchscript"
        else:
            raise ForeignModelError(f"{path}: neither a torch.export program (.pt2) nor a TorchScript module; "
                                    f"for a state_dict use --module FILE.py:FACTORY --weights {path.name}")
    except ForeignModelError:
        raise
    except Exception as exc:
        raise ForeignModelError(f"{path}: cannot be loaded ({_first_line(exc)})") from None
    model.eval()
    return model, info


_RANGES = (("pixels in [0, 255]", lambda x: x * 255.0),
           ("pixels normalised with MNIST's mean 0.1307 and std 0.3081", lambda x: (x - 0.1307) / 0.3081),
           ("pixels in [-1, 1]", lambda x: x * 2.0 - 1.0))


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = model(inputs)
    except Exception as exc:
        raise ForeignModelError(f"the model fails on a batch of {tuple(inputs.shape)} pixels in [0, 1]: "
                                f"{_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.shape != (len(inputs), 10):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ForeignModelError(f"the model returns {shape} for {len(inputs)} images; it must return (N, 10) logits")
    return out


def check_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean accuracy (%) on x, y once the model is seen to return finite (N, 10) logits there."""
    out = _logits(model, x)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).any(1).sum())
        raise ForeignModelError(f"the model returns non-finite logits (NaN or inf) for {bad} of {len(x)} images")
    return 100.0 * (out.argmax(1) == y).float().mean().item()


def pixel_range_hint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, accuracy: float) -> str | None:
    """Why a clean accuracy near chance on [0, 1] pixels is what it is, or None when it is not near
    chance: the pixel range the model does better on, if any, and how to wrap it."""
    if accuracy >= CHANCE_LIMIT:
        return None
    scored = [(100.0 * (_logits(model, f(x)).argmax(1) == y).float().mean().item(), what) for what, f in _RANGES]
    best, what = max(scored)
    if best >= 2 * CHANCE_LIMIT:
        return (f"the model scores {accuracy:.1f}% on pixels in [0, 1] but {best:.1f}% on {what}: it expects "
                f"another pixel range; wrap it so that its first step maps [0, 1] pixels to what it was trained "
                f"on, e.g. nn.Sequential(advmnist.models.Normalize(mean, std), net) or a forward that does "
                f"x * 255 first")
    return (f"the model scores {accuracy:.1f}% on {len(x)} test images (chance is 10%): not an MNIST "
            f"classifier on pixels in [0, 1], or untrained weights")


def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean accuracy (%) of `model` on x, y after checking that it is an MNIST classifier on [0, 1]
    pixels: (N, 10) finite logits, and not near chance."""
    accuracy = check_outputs(model, x, y)
    hint = pixel_range_hint(model, x, y, accuracy)
    if hint:
        raise ForeignModelError(hint)
    return accuracy


def describe(info: dict) -> str:
    """One name for tables and run directories."""
    if info.get("source") == "module":
        return f"{Path(info['module']).stem}.{info['factory']}"
    return Path(info.get("model_file", "model")).name


def load(module: str | None = None, weights: str | Path | None = None,
         model_file: str | Path | None = None) -> tuple[nn.Module, dict]:
    """`load_model_file(model_file)` or `load_module(module, weights)`: whichever is given."""
    if (module is None) == (model_file is None):
        raise ForeignModelError("give either --module FILE.py:FACTORY (with --weights) or --model-file FILE")
    if model_file is not None:
        if weights is not None:
            raise ForeignModelError("--weights goes with --module; a --model-file holds its weights")
        return load_model_file(model_file)
    return load_module(module, weights)


def sha256_of(info: dict) -> str:
    """What identifies the model's numbers: the weights' SHA-256 (or the saved model's, or the module's)."""
    return info.get("weights_sha256") or info.get("model_file_sha256") or info["module_sha256"]


def write_run(out: str | Path, info: dict, data_checksum: str, clean_accuracy: float) -> Path:
    """A run directory under `out` whose record names the model's files and their SHA-256, so that
    `evaluate --run` and `attack --run` can load it again and notice when a file changed."""
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in describe(info)).strip("-") or "model"
    with runs.run_directory(out, runs.new_run_name(slug, 0, tag="-foreign")) as tmp:
        run = runs.final_path(tmp)
        runs.write_json(tmp / runs.RECORD, {
            "kind": KIND, "model": describe(info), **info, "sha256": sha256_of(info),
            "data_checksum": data_checksum, "clean_accuracy": clean_accuracy, "run": run.name,
            "provenance": runs.provenance()})
    return run


def load_run_model(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model of a run directory, a zoo checkpoint or a foreign model's files (each file's
    SHA-256 checked against the record), with {model, sha256}; in eval mode on `map_location`."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir}: no such run directory")
    record = run_dir / runs.RECORD
    data = runs.read_record(record, kind=KIND) if record.is_file() and not (run_dir / runs.CHECKPOINT).exists() else None
    if data is None:
        return runs.load_checkpoint(run_dir, map_location=map_location)
    for key in ("module", "weights", "model_file"):
        path = data.get(key)
        if path and (not Path(path).is_file() or file_sha256(path) != data.get(f"{key}_sha256")):
            raise CheckpointError(f"{run_dir}: its {key.replace('_', ' ')} {path} is gone or changed since the run "
                                  f"was made (SHA-256 differs); evaluate it again with --module/--model-file")
    model, info = load(data.get("module") and f"{data['module']}:{data['factory']}", data.get("weights"),
                       data.get("model_file"))
    return model.to(map_location).eval(), {"model": describe(info), "sha256": sha256_of(info), "foreign": info}
