"""The `advmnist` command: a thin layer that parses options, calls one library function, prints.

Importing this module imports click and a few small torch-free modules (names, errors, the option
types of `cli_types.py` and the checks of `validate.py`), never torch, numpy or matplotlib: each
command imports what it needs in its body, so `--help`, `--version` and shell completion are quick.
The option choices come from `names.py`: static copies of the registries that a test keeps in step,
and the attacks' names and keyword-only parameters read from their source files, from which the
`attack` command builds its options (`_attack_options`).
"""

from __future__ import annotations

import contextvars
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from . import cli_types as T
from . import validate as VALIDATE
from .errors import AdvmnistError, SkippedFileWarning
from .names import ADVERSARIAL_METHODS, ATTACKS, BOUNDS, ENSEMBLES, MODELS, PRECISIONS, SCHEDULES, read_attacks


def _terminated(signum, frame) -> None:
    """SIGTERM is handled like Ctrl-C: partial files are removed on the way out."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    if issubclass(category, SkippedFileWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default(message, category, filename, lineno, file, line)


class _Group(click.Group):
    """Turns library errors, bad option values and file-system errors into one line on stderr and exit
    code 2, Ctrl-C and SIGTERM into exit 130, and files left out by discovery into warning lines."""

    def invoke(self, ctx: click.Context):
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", SkippedFileWarning)
                warnings.showwarning = _show_warning
                # a copy of the context: settings a command makes (--trust-checkpoint) end with it
                return contextvars.copy_context().run(super().invoke, ctx)
        except AdvmnistError as exc:  # AttackError and every other bad-input error derive from it
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.BadParameter as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no partial files were kept", err=True)
            sys.exit(130)
        except OSError as exc:  # the library reports what it writes; this is the last resort
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="advmnist")
def main() -> None:
    """Train the classic MNIST networks, attack them in pixel space, and measure and show the results."""


data_dir_option = click.option("--data-dir", type=click.Path(), default=None, envvar="ADVMNIST_DATA",
                               help="MNIST IDX files (default: the copy shipped with advmnist).")
out_option = click.option("--out", type=click.Path(), default="runs", show_default=True,
                          help="Directory of run directories.")


def _trust(ctx: click.Context, param, value: bool) -> None:
    if value:
        from .runs import trusting_checkpoints

        ctx.with_resource(trusting_checkpoints())


trust_option = click.option("--trust-checkpoint", is_flag=True, expose_value=False, callback=_trust,
                            help="Load the run's model.pt even when its SHA-256 is not the one its "
                                 "record.json holds (a replaced or damaged checkpoint).")


# Shell completion (see docs/setup.md): these read only the name lists and the file system. Choice options
# (--method, --adv, --schedule, --ensemble, ...) complete their choices through click itself.

def _complete_model(ctx, param, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(name) for name in MODELS if name.startswith(incomplete)]


def _complete_run(ctx, param, incomplete: str) -> list[CompletionItem]:
    """Run directories (those holding a record.json) under --out, or under the directory being typed."""
    roots = [str(ctx.params.get("out") or "runs")]
    typed_dir = os.path.dirname(incomplete)
    if typed_dir and os.path.normpath(typed_dir) != os.path.normpath(roots[0]):
        roots.append(typed_dir)
    found = []
    for root in roots:
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not os.path.isfile(os.path.join(entry.path, "record.json")):
                continue
            path = os.path.join(root, entry.name)
            if path.startswith(incomplete) or entry.name.startswith(incomplete):
                found.append(CompletionItem(path))
    return found


def _complete_spec(ctx, param, incomplete: str) -> list[CompletionItem]:
    """*.toml files and directories under the directory being typed; also experiments/*.toml."""
    typed_dir = os.path.dirname(incomplete)
    found = []
    for root in [typed_dir] + (["experiments"] if not typed_dir else []):
        try:
            entries = sorted(os.scandir(root or "."), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(root, entry.name)
            if entry.name.startswith(".") and not os.path.basename(incomplete).startswith("."):
                continue
            if not (path.startswith(incomplete) or (not typed_dir and entry.name.startswith(incomplete))):
                continue
            if entry.is_dir():
                if root == typed_dir:
                    found.append(CompletionItem(path + os.sep))
            elif entry.name.endswith(".toml"):
                found.append(CompletionItem(path))
    return found


def _model_name(ctx, param, value):
    """A zoo name, checked before anything heavy is imported, with the nearest name for a near miss."""
    if value is None or value in MODELS:
        return value
    import difflib

    near = difflib.get_close_matches(value, MODELS, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise click.BadParameter(f"unknown model {value!r}; {hint}`advmnist models` lists them: {', '.join(MODELS)}")


def _load_data(data_dir: str | None, device=None, limit_train: int | None = None,
               limit_test: int | None = None):
    from .data import load_mnist

    data = load_mnist(data_dir, download=False)  # offline: missing files are an error naming them
    if limit_train or limit_test:
        data = data.subset(limit_train or None, limit_test or None)
    return data.to(device) if device is not None else data


@main.command("models")
def models_cmd() -> None:
    """List the model zoo: name, parameters, report, reported accuracy, default recipe."""
    from .models import count_parameters, create_model, get_spec, list_models

    click.echo(f"{'name':<12} {'params':>9}  report  {'acc %':>6}  recipe")
    for name in list_models():
        spec = get_spec(name)
        click.echo(f"{name:<12} {count_parameters(create_model(name)):>9,}  {spec.report:>6}  "
                   f"{spec.reported_accuracy:>6.2f}  {spec.recipe}")
        click.echo(f"{'':<12} {spec.summary}")


@main.command("train")
@click.option("--model", "model_name", default="improved-bn", show_default=True, help="Zoo model name.", callback=_model_name,
              shell_complete=_complete_model)
@click.option("--epochs", type=T.POSITIVE_INT, default=None, help="Override the recipe's epochs.")
@click.option("--lr", type=T.LEARNING_RATE, default=None, help="Override the learning rate.")
@click.option("--momentum", type=T.MOMENTUM, default=None, help="Override SGD momentum.")
@click.option("--dropout", type=T.DROPOUT, default=None, help="Override the dropout probability.")
@click.option("--batch-size", type=T.POSITIVE_INT, default=None, help="Override the batch size.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None, help="Override the optimizer.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Override the learning-rate schedule (onecycle: 0 -> lr -> 0).")
@click.option("--ema", type=T.EMA_DECAY, default=None,
              help="Keep an exponential moving average of the weights with this decay per step (e.g. 0.999) "
                   "and test, monitor and save it instead of the last weights.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="bf16: run the training passes under bfloat16 autocast (an IBP step of strided-large 1.3x "
                   "faster on 2 threads, 1.5x on one, of a CPU with AVX512-BF16; measure first on one without); weights, tests, monitor and "
                   "certificates stay fp32.")
@click.option("--seed", type=T.SEED_INT, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--limit", type=T.LIMIT, default=None, help="Train on the first N images only (quick runs).")
@click.option("--adv", type=click.Choice(ADVERSARIAL_METHODS), default=None,
              help="Adversarial training: PGD (Madry), FGSM with random start, plain FGSM, TRADES, IBP (certified), "
                   "or another registered attack by name as the inner maximiser.")
@click.option("--eps", type=T.EPS, default=0.3, show_default=True, help="With --adv: Linf bound.")
@click.option("--adv-steps", type=T.POSITIVE_INT, default=40, show_default=True,
              help="With --adv pgd/trades (or an attack that takes steps): inner steps.")
@click.option("--adv-alpha", type=T.STEP_SIZE, default=None, help="With --adv: inner step size.")
@click.option("--adv-restarts", type=T.POSITIVE_INT, default=1, show_default=True,
              help="With --adv pgd/trades: inner attacks from that many starts, the worst kept per example "
                   "(costs that many times the inner attack).")
@click.option("--beta", type=T.WEIGHT, default=6.0, show_default=True, help="With --adv trades: KL weight.")
@click.option("--monitor-eps", type=T.EPS, default=None,
              help="With --adv: eps of the per-epoch robustness monitor that picks the kept epoch (default: --eps).")
@click.option("--kappa", type=T.WEIGHT, default=0.5, show_default=True,
              help="With --adv ibp: final weight of the clean loss (from 1 as eps ramps up).")
@click.option("--uniform-start", is_flag=True,
              help="With --adv trades: start the inner attack uniformly in the eps ball (as PGD does) instead of "
                   "TRADES' Gaussian noise of std 0.001.")
@click.option("--keep-last", is_flag=True,
              help="With --adv: keep the last epoch's weights instead of the most robust epoch's on the monitor.")
@click.option("--eps-ramp", type=T.EPOCHS, default=None,
              help="With --adv: epochs over which eps rises from 0 (after --warmup). Default: sized from the "
                   "epochs, a clean warm-up over the first 10% of them and the ramp over the next 40%.")
@click.option("--warmup", type=T.EPOCHS, default=None,
              help="With --adv: clean epochs before eps starts rising (default: sized from the epochs without "
                   "--eps-ramp, 0 with it).")
@out_option
@data_dir_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(model_name, epochs, lr, momentum, dropout, batch_size, optimizer, schedule, ema, precision, seed, device,
              limit, adv, eps, adv_steps, adv_alpha, adv_restarts, beta, monitor_eps, kappa, uniform_start, keep_last,
              eps_ramp, warmup, out, data_dir, quiet) -> None:
    """Train a zoo model with its report's recipe and write a run directory."""
    from .devices import pick_device
    from .runs import check_output_dir
    from .train import Adversarial, recipe_warnings, resolve_recipe, train_run

    adversarial = None
    if adv is not None:
        adversarial = Adversarial(adv, eps=eps, steps=adv_steps, alpha=adv_alpha, beta=beta, kappa=kappa,
                                  ramp_epochs=eps_ramp, warmup_epochs=warmup, monitor_eps=monitor_eps,
                                  uniform_start=uniform_start, keep_last=keep_last, restarts=adv_restarts)
        adversarial.check()

    recipe = resolve_recipe(model_name, epochs=epochs, lr=lr, momentum=momentum, dropout=dropout,
                            batch_size=batch_size, optimizer=optimizer, schedule=schedule, ema=ema,
                            precision=precision)
    pick_device(device)  # before the data is loaded
    data = _load_data(data_dir, limit_train=limit)
    check_output_dir(out)  # now, not after the training
    click.echo(f"training {model_name} on {len(data.train_x)} images: {recipe} seed={seed}")
    if adversarial is not None:
        click.echo(f"{adversarial}; {adversarial.resolved(recipe.epochs).schedule_note(recipe.epochs)}")
    for w in recipe_warnings(recipe, len(data.train_x)):
        click.echo(f"warning: {w}", err=True)

    def on_epoch(s: dict) -> None:
        robust = f"  PGD acc {s['robust_accuracy']:6.2f}%" if "robust_accuracy" in s else ""
        if "certified_accuracy" in s:
            robust += f"  IBP-certified {s['certified_accuracy']:6.2f}%"
        click.echo(f"epoch {s['epoch']:>2}  train loss {s['train_loss']:.4f} acc {s['train_accuracy']:6.2f}%"
                   f"  test loss {s['test_loss']:.4f} acc {s['test_accuracy']:6.2f}%{robust}  {s['seconds']:6.1f} s")
        for w in s.get("warnings", []):
            click.echo(f"warning: {w}", err=True)

    run = train_run(model_name, out=out, seed=seed, device=device, data=data, adversarial=adversarial,
                    progress=not quiet and sys.stderr.isatty(), on_epoch=on_epoch,
                    epochs=epochs, lr=lr, momentum=momentum, dropout=dropout, batch_size=batch_size,
                    optimizer=optimizer, schedule=schedule, ema=ema, precision=precision)
    from .records import RunRecord, read

    rec = read(run / "record.json", RunRecord)
    click.echo(f"test accuracy {rec.test_accuracy:.2f}% (report: {rec.reported_accuracy:.2f}%) "
               f"in {rec.wall_time_s:.1f} s")
    restored = rec.history[-1].restored_epoch
    if restored:
        click.echo(f"kept the weights of epoch {restored}, the most robust on the monitor")
    click.echo(f"run: {run}")


def _pick_run(run: str | None, model_name: str | None, out: str) -> Path:
    from .runs import latest_run

    if run is not None:
        return Path(run)
    found = latest_run(out, model_name)
    if found is None:
        which = model_name or "improved-bn"
        raise AdvmnistError(f"no trained {model_name or ''}{' ' if model_name else ''}model under {out}/; "
                            f"run `advmnist train --model {which}` first")
    return found


def _names(ctx, param, value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _checked(check, value):
    """`check(value)`, its AdvmnistError turned into click's one-line usage error; None passes."""
    if value is None:
        return None
    try:
        return check(value)
    except AdvmnistError as exc:
        raise click.BadParameter(str(exc)) from None


def _pretrained_name(ctx, param, value):
    """A shipped model's name, checked before anything heavy is imported."""
    from .shipped import check_name

    return _checked(check_name, value)


def _complete_pretrained(ctx, param, incomplete: str) -> list[CompletionItem]:
    from .shipped import list_pretrained

    return [CompletionItem(name) for name in list_pretrained() if name.startswith(incomplete)]


pretrained_option = click.option("--pretrained", default=None, metavar="NAME", callback=_pretrained_name,
                                 shell_complete=_complete_pretrained,
                                 help="A pretrained model by name (`advmnist pretrained` lists them; its weights must be "
                                      "installed); its run directory goes under --out.")


def _foreign_options(command):
    """--module, --weights and --model-file: a model the zoo does not have (advmnist/foreign.py)."""
    for option in reversed([
            click.option("--module", "module", default=None, metavar="FILE.py:FACTORY",
                         help="Your own network: FACTORY() in FILE.py builds it (pixels in [0, 1] in, (N, 10) "
                              "logits out); its run directory goes under --out."),
            click.option("--weights", type=click.Path(), default=None, help="With --module: a state_dict file to load."),
            click.option("--model-file", type=click.Path(), default=None,
                         help="Your own model saved as one file: torch.export (.pt2) or TorchScript.")]):
        command = option(command)
    return command


def _check_foreign(run, model_name, module, weights, model_file, pretrained=None) -> None:
    if weights is not None and module is None:
        raise AdvmnistError("--weights goes with --module FILE.py:FACTORY")
    given = [flag for flag, value in (("--run", run), ("--model", model_name), ("--module", module),
                                      ("--model-file", model_file), ("--pretrained", pretrained)) if value is not None]
    if len(given) > 1:
        raise AdvmnistError(f"{' and '.join(given)} each name a model: give one, not "
                            f"{'both' if len(given) == 2 else 'all of them'}")


def _pick_target(run, model_name, module, weights, model_file, out, data, device, pretrained=None) -> Path:
    """The run to work on: the shipped model's run directory, a new one for your own model, else --run,
    --model or the latest."""
    if pretrained is not None:
        from .shipped import pretrained_run

        run_dir = pretrained_run(pretrained, out)
        click.echo(f"run: {run_dir}", err=True)
        return run_dir
    if module is None and model_file is None:
        return _pick_run(run, model_name, out)
    from .evaluation import foreign_run

    run_dir = foreign_run(data, out=out, module=module, weights=weights, model_file=model_file, device=device)
    click.echo(f"run: {run_dir}", err=True)
    return run_dir


@main.command("evaluate")
@click.option("--run", type=click.Path(), default=None, help="Run directory (default: the latest).",
              shell_complete=_complete_run)
@click.option("--model", "model_name", default=None, help="Latest run of this model.", callback=_model_name,
              shell_complete=_complete_model)
@click.option("--image", type=int, default=0, show_default=True, help="Test image for the feature maps.")
@click.option("--robust", is_flag=True,
              help="Also robust accuracy under an attack ensemble (worst case per example) and masking checks.")
@click.option("--eps", type=T.EPS, default=0.3, show_default=True, help="With --robust: perturbation bound.")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True,
              help="With --robust: threat model.")
@click.option("--ensemble", type=click.Choice(ENSEMBLES), default="standard", show_default=True,
              help="With --robust: standard = APGD-CE, APGD-T, Square at AutoAttack's budgets; autoattack = "
                   "the same with FAB-T (AutoAttack's standard version in full); quick = fewer steps and "
                   "queries; pgd = FGSM, PGD restarts, targeted PGD.")
@click.option("--attacks", callback=_names, default=None,
              help="With --robust: only these attacks of the ensemble, e.g. apgd-ce,square.")
@click.option("--steps", type=T.POSITIVE_INT, default=None, help="With --robust: steps of the gradient attacks.")
@click.option("--restarts", type=T.POSITIVE_INT, default=None, help="With --robust: restarts of the gradient attacks.")
@click.option("--queries", type=T.POSITIVE_INT, default=None, help="With --robust: Square's query budget.")
@click.option("--alone", is_flag=True, help="With --robust: also each attack on its own (slower).")
@click.option("--limit", type=T.LIMIT, default=1000, show_default=True,
              help="With --robust: the first N test images (0: all 10,000).")
@click.option("--check-n", type=T.POSITIVE_INT, default=1000, show_default=True,
              help="With --robust: images for the masking checks.")
@click.option("--bound", type=click.Choice(BOUNDS), default="auto", show_default=True,
              help="With --robust: the certified bound; auto = IBP and, without max pooling, CROWN-IBP (full CROWN "
                   "is tighter and costs hundreds of forward passes); alpha-crown = auto, then full CROWN with "
                   "optimised ReLU slopes on the images the attacks leave standing; bab = alpha-crown, then branch "
                   "and bound over ReLU splits on what it leaves (up to 30 s an image).")
@click.option("--certify/--no-certify", default=True, show_default=True,
              help="With --robust: also certified accuracy (IBP/CROWN lower bound), so the true value is an interval.")
@click.option("--curve", callback=lambda ctx, param, value: _floats(ctx, param, value), default=None, metavar="EPS,...",
              help="With --robust: also these eps, drawn with the curves of the minimum-norm attacks run on the "
                   "same weights (eval/robust_curve.png).")
@_foreign_options
@pretrained_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@trust_option
@out_option
@data_dir_option
def evaluate_cmd(run, model_name, image, robust, eps, norm, ensemble, attacks, steps, restarts, queries, alone, limit,
                 check_n, certify, bound, curve, module, weights, model_file, pretrained, device, out, data_dir) -> None:
    """Accuracy, per-class accuracy, confusion matrix, galleries and feature maps of a run, or of your
    own model (--module, --model-file); with --robust, the robust accuracy interval and masking checks."""
    from .devices import pick_device

    pick_device(device)  # before anything is loaded
    _check_foreign(run, model_name, module, weights, model_file, pretrained)
    from .evaluation import evaluate_run, robust_evaluate_run

    data = _load_data(data_dir)
    run_dir = _pick_target(run, model_name, module, weights, model_file, out, data, device, pretrained)
    if robust:
        rr = robust_evaluate_run(run_dir, data, eps=eps, norm=norm, ensemble=ensemble, attacks=attacks, steps=steps,
                                 restarts=restarts, queries=queries, limit=limit, check_n=check_n, alone=alone,
                                 certify=certify, bound=bound, device=device,
                                 log=lambda line: click.echo(f"  {line}", err=True))
        click.echo(f"{rr['model']}: robust accuracy {rr['robust_accuracy']:.2f}% at {norm} eps {eps:g} on the first "
                   f"{rr['n']} test images (clean {rr['clean_accuracy']:.2f}% on them), worst case per image over the "
                   f"{ensemble} ensemble and the checks' attacks, {rr['wall_time_s']:.0f} s")
        click.echo(robust_table(rr))
        click.echo(interval_line(rr))
        for c in rr["checks"]:
            click.echo(f"  [{'ok' if c['passed'] else 'FLAGGED'}] {c['check']}: {c['detail']}")
        for w in rr["warnings"]:
            click.echo(f"warning: {w}", err=True)
        if curve:
            from .evaluation import robust_curve_run

            rc = robust_curve_run(run_dir, data, [*curve, eps], out=out, known=rr, norm=norm, limit=limit,
                                  device=device, log=lambda line: click.echo(f"  {line}", err=True), ensemble=ensemble,
                                  attacks=attacks, steps=steps, restarts=restarts, queries=queries, check_n=check_n,
                                  certify=certify, bound=bound)
            click.echo(_curve_table(rc))
    elif curve:
        raise AdvmnistError("--curve goes with --robust")
    rec = evaluate_run(run_dir, data, image_index=image, device=device)
    click.echo(f"{rec['model']}: test accuracy {rec['accuracy']:.2f}% on {rec['n']} images")
    click.echo("per digit: " + "  ".join(f"{d}:{a:.1f}" for d, a in enumerate(rec["per_class_accuracy"])))
    click.echo(f"wrote {run_dir / 'eval'}/ (record.json, confusion.png, samples.png, wrong.png, "
               f"feature_maps.png{', robust.json' if robust else ''})")


def _curve_table(rc: dict) -> str:
    """Ensemble points and the minimum-norm curves at the same eps; where a curve lies above the
    ensemble it missed adversarial images the ensemble found."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}"

    names = [c["attack"] for c in rc["minimum_norm"]]
    lines = [f"robust accuracy against {rc['norm']} eps on the first {rc['n']} test images:",
             "  " + f"{'eps':>6} {'certified %':>11} {'ensemble %':>10}" + "".join(f" {n[:28]:>28}" for n in names)]
    for i, p in enumerate(rc["points"]):
        cells = []
        for c in rc["minimum_norm"]:
            at = c["at"][i]
            cells.append(f" {pct(at['robust_accuracy']) + (' (weaker)' if at['weaker_than_ensemble'] else ''):>28}")
        lines.append(f"  {p['eps']:>6g} {pct(p['certified_accuracy']):>11} {pct(p['robust_accuracy']):>10}" + "".join(cells))
    if not names:
        lines.append("  (no minimum-norm attack run on these weights in this norm yet: e.g. advmnist attack "
                     f"--method fmn --norm {rc['norm']} --run RUN)")
    elif any(a["weaker_than_ensemble"] for c in rc["minimum_norm"] for a in c["at"]):
        lines.append("  (weaker): the minimum-norm attack leaves more images than the ensemble there; trust the ensemble")
    lines.append(f"  figure: {rc['run']}/eval/robust_curve.png")
    return "\n".join(lines)


def interval_line(rr: dict) -> str:
    """certified <= true robust accuracy <= attacked, or why there is no certified side."""
    cert = rr.get("certified")
    if not cert:
        return "  certified: not computed (--no-certify)"
    if "skipped" in cert:
        return f"  certified: none ({cert['skipped']})"
    return (f"  interval: {cert['certified_accuracy']:.2f}% certified ({cert['method']}, {cert['seconds']:.1f} s) "
            f"<= true robust accuracy <= {rr['robust_accuracy']:.2f}% attacked")


def robust_table(rr: dict) -> str:
    """The per-attack table users ask AutoAttack for: robust accuracy after each attack."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}"

    width = max([len(a["attack"]) for a in rr["per_attack"]] + [12])
    alone = any(a.get("robust_accuracy_alone") is not None for a in rr["per_attack"][1:])
    if not alone:  # each attack after the first ran only on what the ones before it left: no "alone" number
        lines = [f"  {'attack':<{width}} {'robust % after it':>17} {'seconds':>8}",
                 f"  {'clean':<{width}} {pct(rr['clean_accuracy']):>17}"]
        lines += [f"  {a['attack']:<{width}} {pct(a['robust_accuracy_after']):>17} {a.get('seconds', 0):>8.0f}"
                  for a in rr["per_attack"]]
        return "\n".join(lines)
    lines = [f"  {'attack':<{width}} {'alone %':>8} {'cumulative %':>13} {'seconds':>8}",
             f"  {'clean':<{width}} {pct(rr['clean_accuracy']):>8} {pct(rr['clean_accuracy']):>13}"]
    lines += [f"  {a['attack']:<{width}} {pct(a.get('robust_accuracy_alone')):>8} "
              f"{pct(a['robust_accuracy_after']):>13} {a.get('seconds', 0):>8.0f}" for a in rr["per_attack"]]
    return "\n".join(lines + ["  (alone %: the attack on every clean-correct image by itself; - : it was not run alone)"])


def _floats(ctx, param, value):
    """An eps list: one or more finite numbers >= 0 separated by commas (advmnist.validate)."""
    from .validate import parse_eps_list

    return _checked(parse_eps_list, value)


_OWN_OPTIONS = ("eps", "targeted", "fast")  # options of their own: an eps list, --targeted, --no-fast


def _attack_options(command):
    """The `attack` command's per-attack options, one for each keyword-only parameter the attacks'
    signatures have (read without torch by `names.read_attacks`), so a new attack needs no edit here:
    bool -> --name/--no-name, a Literal of strings -> a choice, int or float -> a number in the range
    `advmnist/validate.py` gives the name (any finite number where it gives none). `eps` (a comma
    list sweeps), `targeted` (--targeted with --target-map) and `fast` (--no-fast) are options of their
    own; a generator, a callback or a function-valued parameter has none."""
    uses: dict[str, list] = {}
    for attack in read_attacks():
        for p in attack.params:
            if p.kind != "other":
                uses.setdefault(p.name, []).append((attack.name, p))
    options = []
    for name, found in uses.items():
        methods = "/".join(m for m, _ in found)
        defaults = {repr(p.default) if isinstance(p.default, str) else str(p.default) for _, p in found}
        default = (f"default {defaults.pop()}" if len(defaults) == 1 else
                   "defaults: " + ", ".join(f"{m} {p.default}" for m, p in found))
        default = default.replace("default None", "default: see the attack's docstring")
        flag = "--" + name.replace("_", "-")
        kinds = {p.kind for _, p in found}
        if name == "eps":
            options.append(click.option("--eps", callback=_floats, default=None,
                                        help=f"{methods}: perturbation bound; a comma list sweeps ({default})."))
        elif name == "targeted":
            options.append(click.option("--targeted", is_flag=True, help=f"{methods}: aim at targets from --target-map."))
        elif name in _OWN_OPTIONS:
            continue
        elif "choice" in kinds:
            choices = list(dict.fromkeys(c for _, p in found for c in p.choices))
            options.append(click.option(flag, name, type=click.Choice(choices), default=None,
                                        help=f"{methods} ({default})."))
        elif kinds & {"int", "float"}:
            label, rng = VALIDATE.ATTACK_PARAMS.get(name, (name, VALIDATE.Range(integer="float" not in kinds)))
            options.append(click.option(flag, name, type=T.Number(rng, label), default=None,
                                        help=f"{methods} ({default})."))
        else:  # bool
            options.append(click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=f"{methods} ({default})."))
    for option in reversed(options):
        command = option(command)
    return command


@main.command("attack")
@click.option("--method", type=click.Choice(ATTACKS), default="penalty",
              show_default=True, help="Which attack (the attack registry).")
@click.option("--run", type=click.Path(), default=None, help="Training run to attack (default: the latest).",
              shell_complete=_complete_run)
@click.option("--model", "model_name", default=None, help="Attack the latest run of this model.", callback=_model_name,
              shell_complete=_complete_model)
@_attack_options
@click.option("--target-map", type=T.TargetMap(), default="next", show_default=True,
              help="next, prev, all, or pairs like 0:3,1:7.")
@click.option("--per-digit", type=T.POSITIVE_INT, default=None,
              help="Attack the first N test images of each digit (targeted attacks default 1).")
@click.option("--limit", type=T.LIMIT, default=None,
              help="untargeted attacks: attack the first N test images (default 1000; 0: all).")
@click.option("--seed", type=T.SEED_INT, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@_foreign_options
@pretrained_option
@trust_option
@out_option
@data_dir_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--no-fast", is_flag=True, help="Plain autograd gradients instead of the fast path (to compare).")
def attack_cmd(method, run, model_name, eps, targeted, target_map, per_digit, limit, seed, device, module, weights,
               model_file, pretrained, out, data_dir, quiet, no_fast, **options) -> None:
    """Attack a trained model in pixel space; write a record, per-digit PNGs, galleries and index.html.

    Each option below the first three belongs to the attacks named in its help: the keyword-only
    parameters of their functions in advmnist/attacks/."""
    from .attacking import run_attack

    params = {**options, "fast": False if no_fast else None}
    if eps is not None and len(eps) == 1:
        params["eps"], eps = eps[0], None
        if params["eps"] < 0:
            raise AdvmnistError(f"eps must be >= 0, got {params['eps']}")
    from .devices import pick_device

    pick_device(device)  # before the data is loaded
    _check_foreign(run, model_name, module, weights, model_file, pretrained)
    data = _load_data(data_dir)
    run_dir = _pick_target(run, model_name, module, weights, model_file, out, data, device, pretrained)
    path = run_attack(run_dir, data, method, params=params, eps_list=eps, out=out, seed=seed,
                      per_digit=per_digit, limit=limit, target_map=target_map, targeted=targeted,
                      device=device, progress=not quiet and sys.stderr.isatty())
    from .records import read_attack_record

    rec = read_attack_record(path / "record.json")
    click.echo(f"{rec.model.name} (clean test accuracy {rec.model.clean_test_accuracy:.2f}%), "
               f"{method} on {rec.selection.n} examples, {rec.wall_time_s:.1f} s")
    click.echo(_summary_table(rec))
    click.echo(f"wrote {path}/ and {path.parent / 'index.html'}")


@main.command("leaderboard")
@out_option
@click.option("--runs/--no-runs", "from_runs", default=True, show_default=True,
              help="Read the robust evaluations under --out.")
@click.option("--shipped", is_flag=True, help="Add the pretrained models' records (advmnist pretrained).")
@click.option("--literature", is_flag=True,
              help="Add the literature's reported numbers (Linf eps 0.3), marked as reported with their source.")
@click.option("--md", "md_path", type=click.Path(), default=None,
              help="Write only this Markdown file, e.g. experiments/results/leaderboard.md.")
def leaderboard_cmd(out, from_runs, shipped, literature, md_path) -> None:
    """Every robust evaluation under --out in one table per threat model and eps, most robust first;
    written as runs/attacks/leaderboard.md and leaderboard.html beside the attack gallery."""
    from .leaderboard import gather, write_leaderboard, write_markdown

    rows = gather(out, from_runs=from_runs, shipped=shipped, literature=literature)
    if md_path is not None:
        flags = ([] if from_runs else ["--no-runs"]) + (["--shipped"] if shipped else []) + \
            (["--literature"] if literature else [])
        command = " ".join(["advmnist leaderboard", *([f"--out {out}"] if from_runs else []), *flags, f"--md {md_path}"])
        md = write_markdown(md_path, rows, command)
        click.echo(md.read_text(), nl=False)
        click.echo(f"wrote {md} ({len(rows)} row(s))")
        return
    md, page, rows = write_leaderboard(out, rows)
    click.echo(md.read_text(), nl=False)
    click.echo(f"wrote {md} and {page} ({len(rows)} evaluation(s))")


def _pretrained_line(rec: dict) -> str:
    ev = rec["evaluation"]
    cert = (ev.get("certified") or {}).get("certified_accuracy")
    flagged = "FLAGGED" if (ev.get("masking") or {}).get("flagged") else "ok"
    training = rec["training"]
    return (f"  {rec['name']:<14} {rec['model']:<14} {rec['clean_accuracy']:>7.2f} {ev['robust_accuracy']:>9.2f} "
            f"{'-' if cert is None else f'{cert:.2f}':>11} {ev['n']:>7,}  {flagged:<8} "
            f"{'yes' if rec['installed'] else 'no':<9} {training.get('wall_time_s', 0):>7.0f} s on {rec['machine']}")


@main.command("pretrained")
@click.argument("name", required=False, callback=_pretrained_name, shell_complete=_complete_pretrained)
def pretrained_cmd(name) -> None:
    """The pretrained models, their numbers on all 10,000 test images and whether their weights are
    installed; with NAME, its whole record: how it was trained, its per-attack table and certified interval, how to use it."""
    from .shipped import ENV_VAR, installed, list_pretrained, pretrained_record, weights_dir

    if name is None:
        records = sorted(({**pretrained_record(n), "installed": installed(n)} for n in list_pretrained()),
                         key=lambda r: (-r["evaluation"]["robust_accuracy"], -r["clean_accuracy"]))
        eps = sorted({f"{r['evaluation']['norm']} eps {r['evaluation']['eps']:g}" for r in records})
        click.echo(f"pretrained models (their records ship with advmnist): clean on all 10,000 test images; robust and certified at "
                   f"{', '.join(eps)} on the first `images` (robust: worst case per image over the standard ensemble; "
                   "certified: IBP/CROWN-IBP lower bound)")
        click.echo(f"  {'name':<14} {'model':<14} {'clean %':>7} {'robust %':>9} {'certified %':>11} {'images':>7}  "
                   f"{'masking':<8} {'weights':<9} trained in")
        for rec in records:
            click.echo(_pretrained_line(rec))
        if not all(r["installed"] for r in records):
            click.echo(f"weights: the records ship with advmnist, the checkpoints (build outputs) do not; put NAME.pt in "
                       f"{weights_dir()} or point {ENV_VAR} at a folder holding them")
        click.echo("use one: advmnist attack --pretrained NAME --method penalty; advmnist evaluate --robust "
                   "--pretrained NAME; advmnist.pretrained(\"NAME\") in Python; advmnist pretrained NAME for its record")
        return
    rec = pretrained_record(name)
    ev = rec["evaluation"]
    training = rec["training"]
    click.echo(f"{rec['name']}: {rec['summary']}")
    click.echo(f"  model {rec['model']}, {rec['bytes'] / 1e6:.1f} MB ({rec['dtype']}), SHA-256 {rec['sha256'][:16]}, "
               f"weights {'installed' if installed(name) else 'not installed'} in {weights_dir()}, "
               f"license: {rec['license']}")
    click.echo(f"  trained by: {rec['command']}")
    click.echo(f"  spec: {rec['spec']}")
    click.echo(f"  on {rec['machine']} in {training.get('wall_time_s', 0):.0f} s, seed {training.get('seed')}, "
               f"commit {rec['commit']['training']}")
    subset = "" if ev["n"] == 10000 else " (a subset: the first of the 10,000)"
    click.echo(f"clean accuracy {rec['clean_accuracy']:.2f}% on all 10,000 test images; robust accuracy "
               f"{ev['robust_accuracy']:.2f}% at {ev['norm']} eps {ev['eps']:g} on {ev['n']:,} images{subset}, "
               f"{(ev.get('settings') or {}).get('ensemble', '?')} ensemble (commit {rec['commit']['evaluation']})")
    click.echo(robust_table(ev))
    click.echo(interval_line(ev))
    for c in ev.get("checks", []):
        click.echo(f"  [{'ok' if c['passed'] else 'FLAGGED'}] {c['check']}: {c['detail']}")
    if rec.get("note"):
        click.echo(f"note: {rec['note']}")
    check = rec["check"]
    click.echo(f"slice check (the test suite repeats it): {check['robust_accuracy']:.2f}% under {check['attack']} "
               f"{check['steps']} steps, {check['norm']} eps {check['eps']:g}, first {check['n']} test images")
    click.echo(f"use it: advmnist attack --pretrained {name} --method penalty | advmnist evaluate --robust "
               f"--pretrained {name} --limit 500 | advmnist.pretrained({name!r})")


@main.group("experiment")
def experiment_group() -> None:
    """Reproduce the reports' tables from the TOML specs under experiments/."""


@experiment_group.command("run")
@click.argument("specs", nargs=-1, required=True, type=click.Path(), shell_complete=_complete_spec)
@out_option
@click.option("--results", type=click.Path(), default=None,
              help="Where pages go (default: results/ beside the spec).")
@click.option("--no-train", is_flag=True, help="Train nothing; variants without runs are listed as pending.")
@click.option("--device", default="cpu", show_default=True,
              help="auto, cpu, cuda or mps: where the runs train and the attacks, robust evaluations and "
                   "transfer run (with --executor ray each task asks for a GPU on cuda).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one run or attack after another in this process. ray: each training run and "
                   "attack is a Ray task on a Ray cluster (pip install -e '.[ray]'); --out must be a path "
                   "every node sees.")
@click.option("--address", default=None,
              help="With --executor ray: the cluster's address (default: $RAY_ADDRESS, else the cluster "
                   "`ray start --head` started on this machine, else a Ray instance started here).")
@click.option("--cpus-per-task", type=T.POSITIVE_INT, default=None,
              help="With --executor ray: CPUs, and torch threads, of each task (default 1).")
@data_dir_option
def experiment_run_cmd(specs, out, results, no_train, device, executor, address, cpus_per_task, data_dir) -> None:
    """Train what is missing, evaluate, attack, and write results/<name>.md for each SPEC."""
    from .experiments import load_spec, make_executor, run_experiment

    def log(line: str) -> None:
        click.echo(f"  {line}", err=True)

    for spec in specs:
        load_spec(spec)  # every spec is checked before any of them runs
    with make_executor(executor, address=address, cpus_per_task=cpus_per_task, data_dir=data_dir, log=log) as ex:
        data = _load_data(data_dir)
        for spec in specs:
            page = run_experiment(spec, out=out, results=results, data=data, device=device, train=not no_train,
                                  log=log, executor=ex)
            click.echo(f"wrote {page}")


@experiment_group.command("list")
@click.option("--dir", "directory", type=click.Path(), default="experiments", show_default=True)
def experiment_list_cmd(directory) -> None:
    """The specs, and whether each has a results page."""
    from .experiments import list_experiments

    found = list_experiments(directory)
    if not found:
        raise AdvmnistError(f"no *.toml experiment specs in {directory}/")
    for e in found:
        state = "error: " + e["error"] if e["error"] else (f"results: {e['results']}" if e["results"]
                                                           else "no results yet")
        click.echo(f"{e['spec']:<40} {e['title'][:60]:<60}  {state}")


def _summary_table(rec) -> str:
    """Per digit and overall measures of each point of an attack run (a `records.AttackRecord`)."""
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = []
    for res in rec.results:
        label = ", ".join(f"{k}={v:g}" for k, v in res.sweep_params.items())
        if label:
            lines.append(f"[{label}]")
        lines.append(f"{'digit':>5} {'n':>5} {'fooled %':>9} {'robust %':>9} {'L2':>6} {'Linf':>6} {'conf':>5}")
        rows = list(res.per_digit.items()) + [("all", res.overall)]
        for d, s in rows:
            lines.append(f"{d:>5} {s.n:>5} {f(s.fooling_rate):>9} {f(s.robust_accuracy):>9} "
                         f"{f(s.l2.mean, '.2f'):>6} {f(s.linf.mean, '.3f'):>6} {f(s.confidence.mean, '.2f'):>5}")
        if res.distance is not None:
            lines += _distance_lines(res.distance, targeted=rec.selection.targeted)
    return "\n".join(lines)


#: eps values at which the command line reads a minimum-norm attack's curve, per norm.
CURVE_POINTS = {"l0": (5, 10, 20, 40), "l1": (2, 5, 10, 15), "l2": (0.5, 1.0, 1.5, 2.0, 2.5), "linf": (0.05, 0.1, 0.2, 0.3)}


def _distance_lines(prof, targeted: bool) -> list[str]:
    """The median distance and, untargeted, the robust accuracy it implies at a few eps."""
    norm = prof.norm
    unit = " pixels" if norm == "l0" else ""
    if targeted:
        reached = prof.n - prof.never_fooled
        median = "-" if prof.median_fooled is None else f"{prof.median_fooled:.4g}{unit}"
        return [f"median {norm.upper()} distance to its target: {median} over the {reached} of {prof.n} examples "
                "that reached it"]
    median = "none (more than half never fooled)" if prof.median is None else f"{prof.median:.4g}{unit}"
    lines = [f"median {norm.upper()} distance to the nearest adversarial image found: {median} over {prof.n} "
             f"examples ({prof.never_fooled} never fooled, counted as infinitely far)"]
    if prof.n:
        points = ", ".join(f"{e:g}: {100.0 * (sum(d > e for d in prof.sorted) + prof.never_fooled) / prof.n:.1f}%"
                           for e in CURVE_POINTS.get(norm, ()))
        lines.append(f"robust accuracy these distances imply at {norm.upper()} eps {points} (an upper bound: a "
                     "stronger attack may find closer points)")
    return lines


if __name__ == "__main__":
    main()
