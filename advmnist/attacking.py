"""`advmnist attack`: choose test images and targets, run an attack, measure, write record and pictures.

Choosing the images, running the attack and measuring it go through `advmnist.execution` (`select`,
`execute_attack`), the path the experiment runner and the robust evaluation share; this module
adds what an attack run leaves behind.

A run lands in `<out>/attacks/<model>-<method>-<time>-s<seed>/` with `record.json`, one upscaled PNG
per (digit, label) pair, a gallery PNG per result and, for sweeps, robust accuracy against eps.
`<out>/attacks/index.html` is rewritten after every run and lists them all.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import pictures, runs, validate
from .attacks import AttackError
from .data import MNIST
from .devices import pick_device
from .errors import InvalidValue
from .execution import check_params, execute_attack, select
from .foreign import load_run_model
from .measures import distance_profile, evaluate, predict_logits

ATTACKS_DIR = "attacks"


def _shown(res: dict, y: torch.Tensor, target: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(example, source, label) for the per-digit PNGs: the first example of each pair."""
    ex = res["per_example"]
    chosen, seen = [], set()
    if target is not None:
        for i, (s, t) in enumerate(zip(y.tolist(), target.tolist())):
            if (s, t) not in seen:
                seen.add((s, t))
                chosen.append((i, s, t))
        return chosen
    for d in range(10):
        cands = [i for i, s in enumerate(y.tolist()) if s == d and ex["clean_pred"][i] == d]
        if not cands:
            continue
        fooled = [i for i in cands if ex["success"][i]]
        i = (fooled or cands)[0]
        chosen.append((i, d, ex["adv_pred"][i]))
    return chosen


def _write_pictures(folder: Path, prefix: str, x_ref, x_adv, y, target, res: dict, method: str,
                    title: str) -> dict:
    ex = res["per_example"]
    digits, gallery_rows, firsts = [], [], set()
    for i, s, label in _shown(res, y, target):
        name = f"{prefix}digit_{s}_as_{label}.png"
        pictures.digit_png(x_adv[i], folder / name)
        digits.append(name)
        if s in firsts:
            continue
        firsts.add(s)
        ref_name = "reference" if method == "penalty" else "clean"
        t_text = f"target {target[i].item()}: " if target is not None else ""
        gallery_rows.append({
            "ref": x_ref[i], "adv": x_adv[i],
            "ref_title": f"{ref_name}: true {s}, pred {ex['clean_pred'][i]}",
            "adv_title": f"{t_text}pred {ex['adv_pred'][i]} ({ex['confidence'][i]:.0%})",
            "adv_title_color": "crimson" if ex["success"][i] else "black",
            "delta_title": f"L2 {ex['l2'][i]:.2f}  Linf {ex['linf'][i]:.2f}",
        })
    gallery = f"{prefix}gallery.png"
    columns = (("image it must look like", "adversarial image", "perturbation") if method == "penalty" else
               ("clean image", "adversarial image", "perturbation"))
    pictures.attack_gallery(gallery_rows, folder / gallery, title=title, columns=columns)
    return {"gallery": gallery, "digits": digits}


def run_attack(run_dir: str | Path, data: MNIST, method: str, *, params: dict | None = None,
               eps_list: list[float] | None = None, out: str | Path = "runs", seed: int = 0,
               per_digit: int | None = None, limit: int | None = None, target_map: str = "next",
               targeted: bool = False, device: str = "auto", progress: bool = False,
               keep_examples: int = 200) -> Path:
    """Attack the model of a training run and write an attack run directory; returns its path.

    The attack itself runs through `advmnist.execution.execute_attack`, once per point of the eps
    sweep; this function chooses the images, and writes the pictures, the record and the index."""
    params = {k: v for k, v in (params or {}).items() if v is not None}
    spec = check_params(method, params)
    accepted = spec.defaults()
    if eps_list is not None and not eps_list:
        raise AttackError("an empty eps list: give one or more values")
    if eps_list and "eps" not in accepted:
        raise AttackError(f"attack {method!r} takes no --eps")
    try:
        for eps in eps_list or []:
            validate.NONNEG.check(eps, "eps")
    except InvalidValue as exc:
        raise AttackError(str(exc)) from None
    if targeted and not spec.always_targeted and "targeted" not in accepted:
        raise AttackError(f"attack {method!r} is untargeted: drop --targeted")
    if not targeted and not spec.always_targeted and target_map.strip().lower() != "next":
        raise AttackError(f"--target-map {target_map} goes with --targeted"
                          + ("" if "targeted" in accepted else f" (attack {method!r} is untargeted)"))
    targeted = targeted or spec.always_targeted
    if targeted and per_digit is None and not limit:
        per_digit = 1
    if not targeted and per_digit is None and limit is None:
        limit = 1000

    start = time.perf_counter()
    dev = pick_device(device)
    root = Path(out) / ATTACKS_DIR
    runs.check_output_dir(root)  # before the attack, not after it
    model, ckpt = load_run_model(run_dir, map_location=dev)
    data = data.to(dev)
    clean = evaluate(model, data.test_x, data.test_y)["accuracy"]
    chosen = select(data, per_digit=per_digit, limit=limit, targeted=targeted, target_map=target_map)
    idx, target = chosen.indices, chosen.target
    x, y = data.test_x[idx], data.test_y[idx]

    sweep = [{"eps": e} for e in eps_list] if eps_list else [{}]
    name = runs.new_run_name(ckpt["model"], seed, tag=f"-{method}")
    results = []
    with runs.run_directory(root, name) as folder:
        name = runs.final_path(folder).name  # with a suffix if another run took the name
        for point in sweep:
            label = ", ".join(f"{k}={v:g}" for k, v in point.items())
            done = execute_attack(model, method, x, y, target=target, params={**params, **point}, seed=seed,
                                  progress=progress, label=label)
            x_adv, res = done.x_adv, done.measures
            prefix = ""
            if len(sweep) > 1:
                prefix = "_".join(f"{k}{v:g}" for k, v in point.items()) + "/"
                (folder / prefix).mkdir(exist_ok=True)
            title = (f"{ckpt['model']} / {' '.join([method, label]).strip()}: fooling rate "
                     f"{pictures._fmt(res['overall']['fooling_rate'])}%")
            files = _write_pictures(folder, prefix, x, x_adv, y, target, res, method, title)
            norm = spec.distance_norm(done.params)
            if norm is not None:
                res["distance"] = distance_profile(res["per_example"], y.tolist(), norm, targeted=target is not None)
                what = "distance to the target" if target is not None else "robust accuracy"
                pictures.plot_distance_curve({method: res["distance"]}, folder / f"{prefix}distance_curve.png",
                                             title=f"{ckpt['model']} / {method}: {what} from each example's "
                                                   f"smallest adversarial")
                files["distance_curve"] = f"{prefix}distance_curve.png"
            torch.save({"indices": idx.cpu(), "target": None if target is None else target.cpu(),
                        "x_adv": x_adv.cpu()}, folder / f"{prefix}adversarial.pt")
            per_example = res.pop("per_example")
            if len(idx) <= keep_examples:
                res["examples"] = {"test_index": idx.tolist(), "true": y.tolist(),
                                   "target": None if target is None else target.tolist(), **per_example}
            results.append({"params": done.params, "sweep_params": point, **res, "files": files,
                            "seconds": round(done.seconds, 3)})
        record_files = {}
        if len(sweep) > 1:
            eps = [p["eps"] for p in sweep]
            pictures.plot_sweep(eps, {"robust accuracy": [r["overall"]["robust_accuracy"] for r in results],
                                      "fooling rate": [r["overall"]["fooling_rate"] for r in results]},
                                folder / "robust_vs_eps.png", title=f"{ckpt['model']} under {method}",
                                ylabel="%")
            record_files["sweep_plot"] = "robust_vs_eps.png"
        if targeted and target_map.strip().lower() == "all" and len(sweep) == 1:
            size_norm = spec.distance_norm(results[0]["params"]) or "l2"
            delta = (x_adv - x).flatten(1)
            sizes = {"l0": (delta != 0).sum(1).float(), "l1": delta.abs().sum(1), "l2": delta.norm(dim=1),
                     "linf": delta.abs().amax(1)}[size_norm].tolist()
            preds, clean_preds = predict_logits(model, x_adv).argmax(1).tolist(), predict_logits(model, x).argmax(1).tolist()
            cells = {}
            for i, (s, t) in enumerate(zip(y.tolist(), target.tolist())):
                cells.setdefault((s, s), {"image": x[i], "pred": clean_preds[i], "size": None})
                cells.setdefault((s, t), {"image": x_adv[i], "pred": preds[i], "unchanged": sizes[i] == 0,
                                          "size": pictures.size_text(size_norm, sizes[i])})
            pictures.target_grid(cells, folder / "grid.png",
                                 title=f"{ckpt['model']} / {method}: the first test image of each digit (rows) "
                                       f"sent to every target (columns)")
            record_files["grid"] = "grid.png"
        record = {
            "kind": "attack", "method": method, "name": name,
            "model": {"name": ckpt["model"], "options": ckpt.get("options", {}), "run": str(run_dir),
                      "checkpoint_sha256": ckpt["sha256"], "clean_test_accuracy": clean},
            "seed": seed, "data_checksum": data.checksum,
            "selection": {"per_digit": per_digit, "limit": limit, "targeted": targeted,
                          "target_map": target_map if targeted else None, "n": len(idx)},
            "results": results, "files": record_files,
            "wall_time_s": round(time.perf_counter() - start, 2), "provenance": runs.provenance(),
        }
        runs.write_json(folder / runs.RECORD, record)
    write_index(root)
    return root / name


def write_index(root: str | Path) -> Path:
    """Rewrite `root/index.html` from every attack record under `root`."""
    root = Path(root)
    records = []
    for rec_path in root.glob("*/record.json"):
        if rec_path.parent.name.startswith("."):
            continue
        rec = runs.read_record(rec_path, kind="attack")  # unreadable ones are skipped with a warning
        if rec is None:
            continue
        stamp = rec.get("provenance", {}).get("time") if isinstance(rec.get("provenance"), dict) else None
        if not isinstance(stamp, str):
            runs.skip_file(rec_path, "attack record without provenance.time")
            continue
        records.append((stamp, rec_path.parent.name, rec))
    records.sort(key=lambda r: (r[0], r[1]), reverse=True)
    pictures.attack_index([(name, rec) for _, name, rec in records], root / "index.html")
    return root / "index.html"
