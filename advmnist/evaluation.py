"""`advmnist evaluate`: accuracy, per-class accuracy, confusion, galleries and feature maps of a run."""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path

import torch
from torch import nn

from . import pictures, runs
from .data import MNIST
from .errors import AdvmnistError
from .measures import eval_mode, evaluate, predict_logits, robust_at


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


def evaluate_run(run_dir: str | Path, data: MNIST, *, image_index: int = 0, samples: int = 32,
                 device: str = "cpu") -> dict:
    """Evaluate a finished training run (or a foreign model's run) on the test set, on `device`, and
    write `run_dir/eval/`."""
    from .devices import pick_device
    from .foreign import load_run_model

    run_dir = Path(run_dir)
    if not 0 <= image_index < len(data.test_x):
        raise AdvmnistError(f"--image must be in [0, {len(data.test_x) - 1}], got {image_index}")
    start = time.perf_counter()
    dev = pick_device(device)
    model, ckpt = load_run_model(run_dir, map_location=dev)
    x, y = data.test_x.to(dev), data.test_y.to(dev)
    result = evaluate(model, x, y)
    conf, pred = (t.cpu() for t in predict_logits(model, x).softmax(1).max(1))
    maps = {k: v.cpu() for k, v in conv_feature_maps(model, x[image_index]).items()}
    x, y = x.cpu(), y.cpu()
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
    run was adversarially trained at this eps. TRADES and IBP record the accuracy of their clean logits
    (IBP trains on bounds, not examples): no such number, and comparing theirs would flag every run."""
    adv = record.get("adversarial")
    history = record.get("history") or []
    if not adv or adv.get("method") in ("trades", "ibp") or norm != "linf" or abs(adv.get("eps", -1) - eps) > 1e-9 \
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


#: `bound` values of the robust evaluation: `certify_examples`' methods, then two that run auto's bounds on
#: every image and a tighter one on the images the attacks leave standing (`refine_open`)
BOUNDS = ("auto", "ibp", "crown-ibp", "crown", "alpha-crown", "bab")

#: branch and bound's limits per image in `refine_open` (bab): parts per margin, seconds
BAB_DOMAINS, BAB_SECONDS = 512, 30.0


def refine_open(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, certificate: dict,
                cert_mask: torch.Tensor, robust: torch.Tensor, log=lambda s: None, method: str = "alpha-crown",
                steps: int = 40, batch_size: int = 25) -> None:
    """A tighter bound on the images the first bounds left open and no attack broke, the only ones
    where it can still move the interval (verifiers work the same way: cheap bounds first, the
    expensive one on what is left): alpha-CROWN (`bounds.alpha_crown_margins`), and with
    method "bab" then branch and bound (`branching.branch_margins`) on what alpha-CROWN leaves, one
    image at a time within `BAB_DOMAINS` and `BAB_SECONDS`. Updates `cert_mask` and `certificate`."""
    from .bounds import BoundError, alpha_crown_margins, certified, full_precision
    from .branching import branch_margins

    open_ = (robust & ~cert_mask).nonzero().flatten()
    name = "alpha-crown" + ("+bab" if method == "bab" else "")
    if not len(open_):
        certificate["refined"] = {"method": name, "open": 0, "certified": 0}
        return
    start = time.perf_counter()
    found = torch.zeros(len(open_), dtype=torch.bool, device=cert_mask.device)
    branched = parts = timed_out = 0
    report: dict = {}
    try:
        with eval_mode(model), full_precision():
            for b in range(0, len(open_), batch_size):
                idx = open_[b:b + batch_size]
                found[b:b + len(idx)] = certified(alpha_crown_margins(model, x[idx], y[idx], eps, steps=steps))
            by_alpha = int(found.sum())
            if method == "bab":
                left = (~found).nonzero().flatten().tolist()
                log(f"alpha-CROWN certified {by_alpha} of the {len(open_)} open images; branch and bound on "
                    f"the other {len(left)}")
                for b in left:
                    i = open_[b:b + 1]
                    found[b] = branch_margins(model, x[i], y[i], eps, domains=BAB_DOMAINS, time_limit=BAB_SECONDS,
                                              report=report)[0]
                    branched += 1
                    parts += report["parts"]
                    timed_out += report["timed_out"]
                    if branched % 20 == 0 and branched < len(left):
                        log(f"  {branched} of {len(left)}: {int(found.sum()) - by_alpha} proven "
                            f"({time.perf_counter() - start:.0f} s)")
    except BoundError as exc:
        certificate["refined"] = {"method": name, "skipped": str(exc)}
        log(f"{method}: none ({exc})")
        return
    seconds = round(time.perf_counter() - start, 2)
    cert_mask[open_[found]] = True
    certificate.update(method=f"{certificate['method']}+{name}", certified_count=int(cert_mask.sum()),
                       certified_accuracy=100.0 * cert_mask.float().mean().item(),
                       seconds=round(certificate["seconds"] + seconds, 2))
    certificate["refined"] = {"method": name, "steps": steps, "open": len(open_), "certified": int(found.sum()),
                              "by_alpha_crown": by_alpha, "seconds": seconds}
    if method == "bab":
        certificate["refined"].update(branched=branched, by_bab=int(found.sum()) - by_alpha, parts=parts,
                                      timed_out=timed_out, domains_per_margin=BAB_DOMAINS,
                                      seconds_per_image=BAB_SECONDS)
    log(f"{name} on the {len(open_)} images neither certified nor broken: {int(found.sum())} more certified, "
        f"{certificate['certified_accuracy']:.2f}% in all ({seconds:.1f} s)")


def check_soundness(certified_mask: torch.Tensor, robust_mask: torch.Tensor, eps: float) -> None:
    """Stop when an attack broke an example the bounds certified: one of the two is wrong."""
    broken = (certified_mask & ~robust_mask).nonzero().flatten()
    if len(broken):
        raise AdvmnistError(f"soundness violation at eps {eps:g}: test images {broken[:10].tolist()} are certified "
                            f"robust but an attack broke them; this is a bug in advmnist.bounds or in the attack")


def foreign_run(data: MNIST, *, out: str | Path = "runs", module: str | None = None,
                weights: str | Path | None = None, model_file: str | Path | None = None,
                device: str = "cpu") -> Path:
    """A run directory under `out` for a model the zoo does not have (`advmnist.foreign`), made once the
    model has been loaded and seen to classify the first 1000 test images on [0, 1] pixels; then
    `evaluate_run`, `robust_evaluate_run` and `run_attack` take it like a training run."""
    from .devices import pick_device
    from .foreign import check_model, load, write_run

    model, info = load(module, weights, model_file)
    dev = pick_device(device)
    runs.check_output_dir(out)
    with eval_mode(model.to(dev)):
        accuracy = check_model(model, data.test_x[:1000].to(dev), data.test_y[:1000].to(dev))
    return write_run(out, info, data.checksum, accuracy)


def robust_evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
                          ensemble: str = "standard", attacks: list[str] | None = None, steps: int | None = None,
                          restarts: int | None = None, queries: int | None = None, norm: str = "linf",
                          check_n: int = 1000, alone: bool = False, certify: bool = True, bound: str = "auto",
                          seed: int = 0, train_adv_accuracy: float | None = None, log=lambda s: None) -> dict:
    """Robust accuracy of any model on x, y as an interval: certified (IBP/CROWN lower bound) <= true
    <= attacked (worst case per example over an attack ensemble), plus the masking checks; the body of
    a `RobustRecord`. Runs where x lives. An example certified robust yet broken by an attack is a
    bug in one of the two and stops the evaluation. Certified images beyond the first `check_n` are
    not attacked: the bound proves what any attack would find."""
    from .robustness import checks_scope, ensemble_stages, masking_checks, run_ensemble

    if not eps >= 0:
        raise AdvmnistError(f"eps must be >= 0, got {eps}")
    if norm not in ("linf", "l2"):
        raise AdvmnistError(f"norm must be linf or l2, got {norm!r}")
    stages = ensemble_stages(ensemble, attacks, steps=steps, restarts=restarts, queries=queries)
    start = time.perf_counter()
    n = len(y)
    if bound not in BOUNDS:
        raise AdvmnistError(f"unknown bound {bound!r}; use {', '.join(BOUNDS)}")
    first = "auto" if bound in ("alpha-crown", "bab") else bound
    certificate, cert_mask = certify_examples(model, x, y, eps, norm, log, first) if certify else (None, None)
    m = min(check_n, n)
    proven = None
    if cert_mask is not None:  # certified images need no attack; the first check_n are attacked anyway, as a check
        proven = cert_mask.clone()
        proven[:m] = False
        certificate["attacked_certified"] = int(cert_mask[:m].sum())
    result = run_ensemble(model, x, y, eps=eps, stages=stages, norm=norm, seed=seed, alone=alone, proven=proven,
                          log=log)
    robust = result.pop("robust_mask")
    log(f"masking checks: {checks_scope(n, m, any(s.gradient_free for s in stages))}")
    checks = masking_checks(model, x, y, result, robust, eps=eps, norm=norm, steps=steps or 100, seed=seed,
                            train_adv_accuracy=train_adv_accuracy, check_n=m)
    result.pop("broken_by")
    if cert_mask is not None:
        check_soundness(cert_mask, robust, eps)
        if bound in ("alpha-crown", "bab") and "skipped" not in certificate:
            refine_open(model, x, y, eps, certificate, cert_mask, robust, log, method=bound)
    failed = [c["check"] for c in checks if not c["passed"]]
    return {"kind": "robust-evaluate", "seed": seed,
            "settings": {"eps": eps, "norm": norm, "ensemble": ensemble, "attacks": [s.key for s in stages],
                         "steps": steps, "restarts": restarts, "queries": queries, "alone": alone, "n": n,
                         "check_n": m, "device": str(x.device)},
            **result, "not_robust": (~robust).nonzero().flatten().tolist(), "certified": certificate,
            "interval": [certificate["certified_accuracy"] if certificate and "certified_accuracy" in certificate
                         else None, result["robust_accuracy"]],
            "checks": checks, "masking": {"flagged": bool(failed), "failed": failed},
            "warnings": [f"possible gradient masking: {c['check']} failed ({c['detail']})" for c in checks
                         if not c["passed"]],
            "wall_time_s": round(time.perf_counter() - start, 1), "provenance": runs.provenance()}


def robust_evaluate_run(run_dir: str | Path, data: MNIST, *, eps: float = 0.3, ensemble: str = "standard",
                        attacks: list[str] | None = None, steps: int | None = None, restarts: int | None = None,
                        queries: int | None = None, norm: str = "linf", limit: int | None = 1000,
                        check_n: int = 1000, alone: bool = False, certify: bool = True, bound: str = "auto",
                        seed: int = 0, device: str = "cpu", log=lambda s: None, write: bool = True) -> dict:
    """`robust_evaluate_model` on the first `limit` test images for a run's model, on `device`;
    writes `run_dir/eval/robust.json` (`write=False`: the caller keeps the record elsewhere, as the
    experiment runner does in the run's attack-cache/, so an `evaluate --robust` record is not replaced)."""
    from .devices import pick_device
    from .foreign import load_run_model
    from .robustness import ensemble_stages

    ensemble_stages(ensemble, attacks, steps=steps, restarts=restarts, queries=queries)  # bad names before loading
    dev = pick_device(device)
    run_dir = Path(run_dir)
    start = time.perf_counter()
    model, ckpt = load_run_model(run_dir, map_location=dev)
    n = len(data.test_y) if not limit else min(limit, len(data.test_y))
    x, y = data.test_x[:n].to(dev), data.test_y[:n].to(dev)
    train_acc = None
    record_path = run_dir / runs.RECORD
    if record_path.is_file():
        train_acc = train_adversarial_accuracy(runs.read_json(record_path), eps, norm)
    body = robust_evaluate_model(model, x, y, eps=eps, ensemble=ensemble, attacks=attacks, steps=steps,
                                 restarts=restarts, queries=queries, norm=norm, check_n=check_n, alone=alone,
                                 certify=certify, bound=bound, seed=seed, train_adv_accuracy=train_acc, log=log)
    record = {"kind": "robust-evaluate", "run": str(run_dir), "model": ckpt["model"],
              "checkpoint_sha256": ckpt["sha256"], "data_checksum": data.checksum, **body,
              "wall_time_s": round(time.perf_counter() - start, 1)}
    if write:
        runs.write_json(run_dir / "eval" / "robust.json", record)
    return record


def minimum_norm_profiles(out: str | Path, checkpoint_sha256: str, norm: str) -> dict[str, dict]:
    """The distance profiles of every untargeted minimum-norm attack run under `<out>/attacks/` on these
    weights in this norm, labelled "<method> (<run>)"."""
    found = {}
    for path in sorted((Path(out) / "attacks").glob("*/record.json")):
        rec = runs.read_record(path, kind="attack")
        if not rec or (rec.get("model") or {}).get("checkpoint_sha256") != checkpoint_sha256:
            continue
        if (rec.get("selection") or {}).get("targeted"):
            continue
        for res in rec.get("results") or []:
            prof = res.get("distance")
            if isinstance(prof, dict) and prof.get("norm") == norm and prof.get("n"):
                found[f"{rec.get('method')} ({path.parent.name})"] = prof
    return found


def robust_curve_run(run_dir: str | Path, data: MNIST, eps_values: list[float], *, out: str | Path = "runs",
                     known: dict | None = None, norm: str = "linf", limit: int | None = 1000,
                     device: str = "cpu", log=lambda s: None, **settings) -> dict:
    """The ensemble's robust accuracy (and certified bound) at each eps, beside the curves of the
    minimum-norm attacks run on the same weights (`advmnist attack --method fmn ...`), in one figure:
    where a minimum-norm curve lies above the ensemble's points it missed adversarial images the
    ensemble found, and is not to be trusted there. `known`: a robust record already made at one of
    the eps values, reused. Writes `run_dir/eval/robust_curve.json` and `robust_curve.png`."""
    from .devices import pick_device
    from .foreign import load_run_model

    dev = pick_device(device)
    run_dir = Path(run_dir)
    model, ckpt = load_run_model(run_dir, map_location=dev)
    n = len(data.test_y) if not limit else min(limit, len(data.test_y))
    x, y = data.test_x[:n].to(dev), data.test_y[:n].to(dev)
    points = []
    for eps in sorted(set(eps_values)):
        if known is not None and known.get("eps") == eps and known.get("n") == n:
            body = known
        else:
            log(f"eps {eps:g}")
            body = robust_evaluate_model(model, x, y, eps=eps, norm=norm, log=log, **settings)
        cert = (body.get("certified") or {}).get("certified_accuracy")
        points.append({"eps": eps, "robust_accuracy": body["robust_accuracy"], "certified_accuracy": cert,
                       "flagged": body["masking"]["flagged"]})
    profiles = minimum_norm_profiles(out, ckpt["sha256"], norm)
    comparison = [{"attack": label, "n": prof["n"], "median": prof.get("median"),
                   "at": [{"eps": p["eps"], "robust_accuracy": robust_at(prof, p["eps"]),
                           "weaker_than_ensemble": robust_at(prof, p["eps"]) > p["robust_accuracy"] + 1e-9}
                          for p in points]}
                  for label, prof in profiles.items()]
    record = {"kind": "robust-curve", "run": str(run_dir), "model": ckpt["model"],
              "checkpoint_sha256": ckpt["sha256"], "norm": norm, "n": n, "points": points,
              "minimum_norm": comparison, "settings": {k: v for k, v in settings.items()},
              "provenance": runs.provenance()}
    folder = run_dir / "eval"
    runs.write_json(folder / "robust_curve.json", record)
    marks = {f"ensemble, attacked ({n} images)": ([p["eps"] for p in points], [p["robust_accuracy"] for p in points])}
    certified = [p for p in points if p["certified_accuracy"] is not None]
    if certified:
        marks["certified"] = ([p["eps"] for p in certified], [p["certified_accuracy"] for p in certified])
    pictures.plot_distance_curve(profiles, folder / "robust_curve.png", points=marks, norm=norm,
                                 title=f"{ckpt['model']}: robust accuracy against {norm} eps")
    return record


def _as_images(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """x as (N, 1, 28, 28) float pixels in [0, 1] and y as (N,) int64 labels 0..9, or InvalidValue."""
    from .errors import InvalidValue

    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InvalidValue("x and y must be torch tensors")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1:] != (1, 28, 28):
        raise InvalidValue(f"x must hold MNIST images (N, 1, 28, 28) or (N, 28, 28), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidValue(f"x must hold float pixels in [0, 1], got {x.dtype} (divide uint8 images by 255)")
    if y.shape != (len(x),) or y.is_floating_point() or y.dtype == torch.bool:
        raise InvalidValue(f"y must hold one integer label per image ({len(x)},), got {tuple(y.shape)} {y.dtype}")
    if len(x) == 0:
        raise InvalidValue("x holds no images")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise InvalidValue(f"x must hold pixels in [0, 1], got values in [{x.min().item():g}, {x.max().item():g}]; "
                           f"make normalisation the model's first layer (advmnist.models.Normalize)")
    if y.min() < 0 or y.max() > 9:
        raise InvalidValue(f"y must hold labels 0..9, got values in [{y.min().item()}, {y.max().item()}]")
    return x, y.long()


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


@contextlib.contextmanager
def _restored(model: nn.Module, device: torch.device):
    """Run on `device` and leave the model as it was found: device, each module's mode, and each
    parameter's requires_grad and .grad."""
    home = _model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        if home is not None and home != device:
            model.to(device)
        yield model
    finally:
        if home is not None and home != device:
            model.to(home)
        for m, mode in modes:
            m.training = mode
        for p, requires, grad in grads:
            p.requires_grad_(requires)
            p.grad = grad


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                    ensemble: str = "standard", certify: bool = True, device: str | torch.device | None = None,
                    attacks: list[str] | None = None, steps: int | None = None, restarts: int | None = None,
                    queries: int | None = None, check_n: int = 1000, alone: bool = False, bound: str = "auto",
                    seed: int = 0, log=lambda s: None):
    """Robust accuracy of any MNIST classifier: the worst case per example over an attack ensemble
    (AutoAttack's APGD-CE, APGD-T and Square by default), the certified lower bound where
    `advmnist.bounds` can bound the model, and the masking checks, as a `records.RobustRecord`.

    `model`: any nn.Module taking pixels in [0, 1] (N, 1, 28, 28) and returning (N, 10) logits.
    `device`: None runs where the model's weights are; "auto", "cpu", "cuda", "mps" or a torch
    device moves model and images there once. The model is left as it was found (device, modes,
    requires_grad, gradients)."""
    from .devices import pick_device
    from .foreign import check_outputs, pixel_range_hint
    from .records import RobustRecord, from_dict
    from .robustness import ensemble_stages

    ensemble_stages(ensemble, attacks, steps=steps, restarts=restarts, queries=queries)
    x, y = _as_images(x, y)
    if device is None:
        dev = _model_device(model) or x.device
    else:
        dev = device if isinstance(device, torch.device) else pick_device(device)
    start = time.perf_counter()
    x, y = x.to(dev), y.to(dev)
    with _restored(model, dev), eval_mode(model):
        accuracy = check_outputs(model, x[:1000], y[:1000])
        hint = pixel_range_hint(model, x[:1000], y[:1000], accuracy)
        body = robust_evaluate_model(model, x, y, eps=eps, ensemble=ensemble, attacks=attacks, steps=steps,
                                     restarts=restarts, queries=queries, norm=norm, check_n=check_n, alone=alone,
                                     certify=certify, bound=bound, seed=seed, log=log)
    if hint:
        body["warnings"] = [hint, *body["warnings"]]
    body.update(model=type(model).__name__, wall_time_s=round(time.perf_counter() - start, 1))
    return from_dict(RobustRecord, body)
