"""`advmnist evaluate`: accuracy, per-class accuracy, confusion, galleries and feature maps of a run."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from . import pictures, runs
from .data import MNIST
from .errors import AdvmnistError
from .measures import eval_mode, evaluate, predict_logits


@torch.no_grad()
def conv_feature_maps(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every Conv2d with a spatial map (>= 3x3) for one image (1, 28, 28), by layer name.

    Convolutions on a 1x1 map (the textbook net's conv3 and conv4) are linear layers in disguise;
    their maps are single pixels and show nothing, so they are left out.
    """
    maps: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: maps.__setitem__(name, out[0]) if out.shape[-1] >= 3 else None)
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with eval_mode(model):
            model(image.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return maps


def evaluate_run(run_dir: str | Path, data: MNIST, *, image_index: int = 0, samples: int = 32) -> dict:
    """Evaluate a finished training run on the test set and write `run_dir/eval/`."""
    run_dir = Path(run_dir)
    if not 0 <= image_index < len(data.test_x):
        raise AdvmnistError(f"--image must be in [0, {len(data.test_x) - 1}], got {image_index}")
    start = time.perf_counter()
    model, ckpt = runs.load_checkpoint(run_dir)
    x, y = data.test_x, data.test_y
    result = evaluate(model, x, y)
    probs = predict_logits(model, x).softmax(1)
    conf, pred = probs.max(1)
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    name = ckpt["model"]
    pictures.plot_confusion(result["confusion"], out / "confusion.png",
                            title=f"{name}: confusion on {len(y)} test images ({result['accuracy']:.2f}%)")
    first = torch.arange(min(samples, len(y)))
    pictures.prediction_gallery(x[first], y[first].tolist(), pred[first].tolist(), conf[first].tolist(),
                                out / "samples.png", title=f"{name}: the first {len(first)} test images")
    wrong = (pred != y).nonzero().flatten()[:samples]
    pictures.prediction_gallery(x[wrong], y[wrong].tolist(), pred[wrong].tolist(), conf[wrong].tolist(),
                                out / "wrong.png", title=f"{name}: wrong predictions (true -> predicted)")
    maps = conv_feature_maps(model, x[image_index])
    if maps:
        pictures.feature_maps(maps, x[image_index], out / "feature_maps.png",
                              title=f"{name}: conv feature maps of test image {image_index} "
                                    f"(label {y[image_index].item()})")
    record = {"kind": "evaluate", "run": str(run_dir), "model": name, "checkpoint_sha256": ckpt["sha256"],
              "data_checksum": data.checksum, **result, "wrong_indices": wrong.tolist(),
              "feature_map_image": image_index, "wall_time_s": round(time.perf_counter() - start, 2),
              "provenance": runs.provenance()}
    runs.write_json(out / "record.json", record)
    return record


def train_adversarial_accuracy(record: dict, eps: float, norm: str = "linf") -> float | None:
    """Accuracy (%) on the training attack's examples in the epoch whose weights were kept, when the
    run was adversarially trained at this eps (TRADES trains on clean logits: no such number)."""
    adv = record.get("adversarial")
    history = record.get("history") or []
    if not adv or adv.get("method") == "trades" or norm != "linf" or abs(adv.get("eps", -1) - eps) > 1e-9 \
            or not history:
        return None
    kept = history[-1].get("restored_epoch") or len(history)
    return history[kept - 1].get("train_accuracy")


def certify_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                     log=lambda s: None, method: str = "auto") -> tuple[dict, torch.Tensor | None]:
    """Certified robust accuracy (%) by the best bound the model allows (`bounds.certified_margins`)
    and the per-example certificate mask; a record saying why when the model cannot be bounded."""
    from .bounds import BoundError, certified, certified_margins

    if norm != "linf":
        return {"skipped": "the bounds are for Linf balls"}, None
    start = time.perf_counter()
    try:
        with eval_mode(model):
            margins, method = certified_margins(model, x, y, eps, method=method)
    except BoundError as exc:
        return {"skipped": str(exc)}, None
    mask = certified(margins)
    acc = 100.0 * mask.float().mean().item()
    log(f"certified ({method}): {acc:.2f}% of {len(y)} images")
    return {"method": method, "certified_accuracy": acc, "certified_count": int(mask.sum()),
            "seconds": round(time.perf_counter() - start, 2)}, mask


def check_soundness(certified_mask: torch.Tensor, robust_mask: torch.Tensor, eps: float) -> None:
    """Stop when an attack broke an example the bounds certified: one of the two is wrong."""
    broken = (certified_mask & ~robust_mask).nonzero().flatten()
    if len(broken):
        raise AdvmnistError(f"soundness violation at eps {eps:g}: test images {broken[:10].tolist()} are certified "
                            f"robust but an attack broke them; this is a bug in advmnist.bounds or in the attack")


def robust_evaluate_run(run_dir: str | Path, data: MNIST, *, eps: float = 0.3, ensemble: str = "standard",
                        attacks: list[str] | None = None, steps: int | None = None, restarts: int | None = None,
                        queries: int | None = None, norm: str = "linf", limit: int | None = 1000,
                        check_n: int = 1000, alone: bool = False, certify: bool = True, bound: str = "auto",
                        seed: int = 0,
                        log=lambda s: None) -> dict:
    """Robust accuracy as an interval for a run: certified (IBP/CROWN lower bound) <= true <= attacked
    (worst case per example over an attack ensemble), plus the masking checks; writes
    `run_dir/eval/robust.json`. An example certified robust yet broken by an attack is a bug in one
    of the two and stops the evaluation. Certified images beyond the first `check_n` are not
    attacked: the bound proves what any attack would find."""
    from .robustness import checks_scope, ensemble_stages, masking_checks, run_ensemble

    if not eps >= 0:
        raise AdvmnistError(f"eps must be >= 0, got {eps}")
    if norm not in ("linf", "l2"):
        raise AdvmnistError(f"norm must be linf or l2, got {norm!r}")
    stages = ensemble_stages(ensemble, attacks, steps=steps, restarts=restarts, queries=queries)
    run_dir = Path(run_dir)
    start = time.perf_counter()
    model, ckpt = runs.load_checkpoint(run_dir)
    n = len(data.test_y) if not limit else min(limit, len(data.test_y))
    x, y = data.test_x[:n], data.test_y[:n]
    certificate, cert_mask = certify_examples(model, x, y, eps, norm, log, bound) if certify else (None, None)
    m = min(check_n, n)
    proven = None
    if cert_mask is not None:  # certified images need no attack; the first check_n are attacked anyway, as a check
        proven = cert_mask.clone()
        proven[:m] = False
        certificate["attacked_certified"] = int(cert_mask[:m].sum())
    result = run_ensemble(model, x, y, eps=eps, stages=stages, norm=norm, seed=seed, alone=alone, proven=proven,
                          log=log)
    robust = result.pop("robust_mask")
    if cert_mask is not None:
        check_soundness(cert_mask, robust, eps)
    train_acc = None
    record_path = run_dir / runs.RECORD
    if record_path.is_file():
        train_acc = train_adversarial_accuracy(runs.read_json(record_path), eps, norm)
    log(f"masking checks: {checks_scope(n, m, any(s.gradient_free for s in stages))}")
    checks = masking_checks(model, x[:m], y[:m], result, robust, eps=eps, norm=norm, steps=steps or 100, seed=seed,
                            train_adv_accuracy=train_acc)
    failed = [c["check"] for c in checks if not c["passed"]]
    record = {"kind": "robust-evaluate", "run": str(run_dir), "model": ckpt["model"],
              "checkpoint_sha256": ckpt["sha256"], "data_checksum": data.checksum, "seed": seed,
              "settings": {"eps": eps, "norm": norm, "ensemble": ensemble, "attacks": [s.key for s in stages],
                           "steps": steps, "restarts": restarts, "queries": queries, "alone": alone, "n": n,
                           "check_n": m},
              **result, "not_robust": (~robust).nonzero().flatten().tolist(), "certified": certificate,
              "interval": [certificate["certified_accuracy"] if certificate and "certified_accuracy" in certificate
                           else None, result["robust_accuracy"]],
              "checks": checks, "masking": {"flagged": bool(failed), "failed": failed},
              "warnings": [f"possible gradient masking: {c['check']} failed ({c['detail']})" for c in checks
                           if not c["passed"]],
              "wall_time_s": round(time.perf_counter() - start, 1), "provenance": runs.provenance()}
    runs.write_json(run_dir / "eval" / "robust.json", record)
    return record
