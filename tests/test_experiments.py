"""A miniature spec (tiny slice, one epoch, few steps) end to end through the real runner."""

import json

import pytest
from click.testing import CliRunner

from advmnist.cli import main
from advmnist.errors import AdvmnistError
from advmnist.experiments import list_experiments, load_spec, run_experiment

MINI = """
title = "Miniature: lenet against improved-bn"
report = "test"
description = "Two models, two seeds, one epoch on 2,000 images."
seeds = [0, 1]
train_limit = 2000
per_class = true

[[variant]]
label = "LeNet"
model = "lenet"
overrides = { epochs = 1, lr = 0.05 }
reported = 97.9
note = "one epoch on 2,000 images instead of 8 on 60,000"

[[variant]]
label = "improved-bn"
model = "improved-bn"
overrides = { epochs = 1 }
reported = 10.0

[[attack]]
method = "fgsm"
params = { eps = [0.1, 0.3] }
limit = 100

[[attack]]
method = "pgd"
params = { eps = [0.1], steps = 5 }
limit = 100

[[attack]]
method = "penalty"
params = { steps = 50 }

[transfer]
method = "pgd"
params = { eps = 0.2, steps = 5 }
limit = 100
"""


@pytest.fixture(scope="module")
def mini(tmp_path_factory, small):
    root = tmp_path_factory.mktemp("exp")
    spec = root / "experiments" / "mini.toml"
    spec.parent.mkdir()
    spec.write_text(MINI)
    data = small.subset(None, 1000)
    page = run_experiment(spec, out=root / "runs", data=data)
    return root, spec, page, data


def test_page_puts_the_reports_numbers_beside_ours(mini):
    root, spec, page, _ = mini
    assert page == spec.parent / "results" / "mini.md"
    text = page.read_text()
    assert "# Miniature: lenet against improved-bn" in text
    assert "| LeNet | `lenet` |" in text and "97.90" in text
    assert "**better**" in text  # improved-bn beats the planted 10%: a difference is called out
    assert "one epoch on 2,000 images" in text or "reproduced" in text
    assert "advmnist experiment run" in text and "4 run(s) trained" in text
    assert "## Per-digit test accuracy" in text
    assert "fgsm eps 0.1" in text and "pgd eps 0.1" in text and "penalty" in text
    assert "## Transfer" in text and "| LeNet |" in text.split("## Transfer")[1]
    for png in ["mini_curves.png", "mini_robustness.png", "mini_transfer.png"]:
        assert (page.parent / png).stat().st_size > 5000


def test_rerun_trains_nothing_and_reuses_attack_results(mini):
    root, spec, page, data = mini
    runs_before = sorted((root / "runs").iterdir())
    again = run_experiment(spec, out=root / "runs", data=data)
    assert "0 run(s) trained, 4 reused" in again.read_text()
    assert sorted((root / "runs").iterdir()) == runs_before


def test_accuracies_on_the_page_come_from_the_runs(mini):
    root, spec, page, _ = mini
    records = [json.loads(p.read_text()) for p in (root / "runs").glob("lenet-*/record.json")]
    assert len(records) == 2
    for rec in records:
        assert f"{rec['test_accuracy']:.2f}" in page.read_text()


def test_list_and_cli(mini):
    root, spec, page, _ = mini
    (listed,) = list_experiments(spec.parent)
    assert listed["results"] == str(page) and listed["error"] is None
    result = CliRunner().invoke(main, ["experiment", "list", "--dir", str(spec.parent)])
    assert result.exit_code == 0 and "mini.toml" in result.output and "results:" in result.output


@pytest.mark.parametrize("text, message", [
    ("title='x'\nreport='x'\n[[variant]]\nlabel='a'\nmodel='resnet'", "unknown model 'resnet'"),
    ("title='x'\nreport='x'\n[[variant]]\nlabel='a'\nmodel='lenet'\ncolour='red'", "unknown key"),
    ("title='x'\nreport='x'\n[[variant]]\nlabel='a'\nmodel='lenet'\n[[attack]]\nmethod='pgd'\n"
     "params={lam=1}", "takes no parameter 'lam'"),
    ("title = [", "not valid TOML"),
])
def test_bad_specs_are_refused_before_any_work(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(AdvmnistError, match=message):
        load_spec(path)
    result = CliRunner().invoke(main, ["experiment", "run", str(path)])
    assert result.exit_code == 2 and message in result.output


def test_no_train_writes_a_partial_page_with_pending_rows(mini, tmp_path):
    root, spec, _, data = mini
    text = spec.read_text().replace('label = "LeNet"', 'label = "LeNet"').replace(
        "[[attack]]", '[[variant]]\nlabel = "never trained"\nmodel = "two-conv"\n\n[[attack]]', 1)
    partial = spec.parent / "partial.toml"
    partial.write_text(text)
    page = run_experiment(partial, out=root / "runs", data=data, train=False)
    body = page.read_text()
    assert "**Pending**" in body and "never trained" in body and "0 run(s) trained" in body
    assert "| never trained |" not in body
