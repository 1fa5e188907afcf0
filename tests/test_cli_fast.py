"""The CLI answers --help, --version and shell completion without importing torch, and its static
name lists (advmnist/names.py) equal the real registries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from advmnist import names

HEAVY = ("torch", "torchvision", "matplotlib", "numpy", "ray")
SCRIPT = Path(sys.executable).parent / "advmnist"
REPO = Path(__file__).resolve().parents[1]


def test_static_names_equal_the_registries():
    from advmnist import evaluation, models, robustness, train
    from advmnist.attacks import list_attacks

    assert list(names.MODELS) == models.list_models()
    assert list(names.ATTACKS) == list_attacks()
    assert tuple(names.ADVERSARIAL_METHODS) == tuple(train.ADVERSARIAL_METHODS)
    assert tuple(names.SCHEDULES) == tuple(models.SCHEDULES)
    assert list(names.ENSEMBLES) == list(robustness.ENSEMBLES)
    assert tuple(names.BOUNDS) == tuple(evaluation.BOUNDS)


def _fresh(code: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)


# Runs the click main with sys.argv set, then reports on stderr which heavy modules got imported.
_MAIN = """
import atexit, sys
atexit.register(lambda: print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr))
sys.argv = {argv!r}
from advmnist.cli import main
main(prog_name="advmnist")
"""


def _heavy_loaded(result: subprocess.CompletedProcess) -> list[str]:
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


@pytest.mark.parametrize("argv", [["--help"], ["attack", "--help"], ["experiment", "run", "--help"], ["--version"]])
def test_help_and_version_import_no_torch(argv):
    result = _fresh(_MAIN.format(heavy=HEAVY, argv=["advmnist", *argv]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert _heavy_loaded(result) == []


def test_package_names_stay_importable_and_lazy():
    result = _fresh("import sys, advmnist\n"
                    "print('torch' in sys.modules)\n"
                    "from advmnist import load_mnist, create_model, MNIST, Recipe, list_models, register_model\n"
                    "print('torch' in sys.modules, create_model('lenet').__class__.__name__, 'lenet' in list_models())\n"
                    "print(advmnist.models.list_models() == list_models(), advmnist.train.fit.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "Sequential", "True", "True", "fit"]


def _complete(words: str, cwd: Path | None = None, check_heavy: bool = False) -> list[str]:
    """Click's bash completion protocol; returns the offered values."""
    env = {"_ADVMNIST_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    if check_heavy or not SCRIPT.exists():
        result = _fresh(_MAIN.format(heavy=HEAVY, argv=["advmnist"]), env=env, cwd=cwd)
        if check_heavy:
            assert _heavy_loaded(result) == []
    else:
        result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, **env}, cwd=cwd or REPO)
    assert result.returncode == 0, result.stderr
    items = [line.split(",", 1) for line in result.stdout.splitlines() if line]
    return [value for kind, value in items if kind == "plain"]


@pytest.mark.parametrize("command", ["train", "evaluate", "attack"])
def test_model_completion_offers_every_zoo_model(command):
    from advmnist.models import list_models

    assert _complete(f"advmnist {command} --model ") == list_models()
    assert set(_complete(f"advmnist {command} --model lenet")) == {"lenet", "lenet-bn"}


def test_method_and_adv_completion():
    from advmnist.attacks import list_attacks
    from advmnist.train import ADVERSARIAL_METHODS

    assert _complete("advmnist attack --method ") == list_attacks()
    assert _complete("advmnist attack --method apgd") == ["apgd", "apgd-t"]
    assert _complete("advmnist train --adv ") == list(ADVERSARIAL_METHODS)


def _make_run(root: Path, name: str, record: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    if record:
        (run / "record.json").write_text(json.dumps({"kind": "train", "model": "lenet"}))
    return run


def test_run_completion_lists_run_directories(tmp_path):
    _make_run(tmp_path / "runs", "lenet-20260101-000000-000-s0")
    _make_run(tmp_path / "runs", "mlp-20260101-000000-000-s1")
    _make_run(tmp_path / "runs", "attacks", record=False)              # no record.json: not a run
    _make_run(tmp_path / "runs", ".partial-mlp-20260102-000000-000-s0")  # unfinished: hidden
    expected = ["runs/lenet-20260101-000000-000-s0", "runs/mlp-20260101-000000-000-s1"]
    assert _complete("advmnist evaluate --run ", cwd=tmp_path, check_heavy=True) == expected
    assert _complete("advmnist attack --run runs/le", cwd=tmp_path) == expected[:1]
    assert _complete("advmnist attack --run ml", cwd=tmp_path) == expected[1:]

    other = _make_run(tmp_path / "elsewhere", "cnn-small-20260101-000000-000-s0")
    assert _complete(f"advmnist attack --out {tmp_path / 'elsewhere'} --run ", cwd=tmp_path) == [str(other)]


def test_spec_completion_offers_toml_files_and_directories(tmp_path):
    (tmp_path / "a.toml").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "b.toml").write_text("")
    assert _complete("advmnist experiment run ", cwd=tmp_path, check_heavy=True) == ["a.toml", "specs/"]
    assert _complete("advmnist experiment run specs/", cwd=tmp_path) == ["specs/b.toml"]
    assert "experiments/report001.toml" in _complete("advmnist experiment run rep")


def test_attack_errors_take_the_one_line_error_path(tmp_path):
    from click.testing import CliRunner

    from advmnist.cli import main

    result = CliRunner().invoke(main, ["attack", "--method", "square", "--targeted", "--run", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "untargeted" in result.output


def test_attack_signatures_read_from_source_equal_the_registry():
    """`names.read_attacks()` reads the attacks' files with ast; the live registry must agree, and every
    keyword-only parameter with a command-line kind is an option of `advmnist attack`."""
    from click.testing import CliRunner

    from advmnist.attacks import get_attack
    from advmnist.cli import main

    help_text = CliRunner().invoke(main, ["attack", "--help"], terminal_width=200).output
    for info in names.read_attacks():
        spec = get_attack(info.name)
        defaults = spec.defaults()
        assert info.always_targeted == spec.always_targeted
        assert [p.name for p in info.params] == list(defaults)
        for p in info.params:
            if p.kind == "other":
                continue
            assert p.default == defaults[p.name], (info.name, p.name)
            flag = "--no-fast" if p.name == "fast" else "--" + p.name.replace("_", "-")
            assert flag in help_text and info.name in help_text
