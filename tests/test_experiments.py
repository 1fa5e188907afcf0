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


ADVERSARIAL = """
title = "Miniature adversarial training"
report = "test"
seeds = [0]
train_limit = 1000

[[variant]]
label = "strided, PGD training"
model = "strided"
overrides = { epochs = 2, lr = 5e-3, schedule = "onecycle" }
adversarial = { method = "pgd", eps = 0.1, steps = 2, alpha = 0.05, ramp_epochs = 1, monitor = 100, monitor_steps = 3 }

[robust]
eps = 0.1
ensemble = "quick"
steps = 3
queries = 50
limit = 100
check_n = 50
"""


def test_adversarial_spec_gets_a_worst_case_section(tmp_path, small):
    spec = tmp_path / "experiments" / "adv.toml"
    spec.parent.mkdir()
    spec.write_text(ADVERSARIAL)
    data = small.subset(None, 1000)
    page = run_experiment(spec, out=tmp_path / "runs", data=data).read_text()
    (run,) = (tmp_path / "runs").glob("strided-*")
    (cached,) = (run / "attack-cache").glob("robust-*.json")
    rec = json.loads(cached.read_text())
    assert not (run / "eval" / "robust.json").exists()  # an `evaluate --robust` record there is never replaced
    assert rec["settings"] == {"eps": 0.1, "norm": "linf", "ensemble": "quick", "attacks": ["apgd-ce", "apgd-t", "square"],
                               "steps": 3, "restarts": None, "queries": 50, "alone": False, "n": 100, "check_n": 50,
                               "device": "cpu"}
    assert "## Robust accuracy under the standard evaluation" in page and f"| {rec['robust_accuracy']:.2f} |" in page
    assert "APGD-CE (3 steps)" in page and "APGD-T (3 steps x 3 targets)" in page and "Square (50 queries)" in page
    assert "advmnist evaluate --robust --eps 0.1 --ensemble quick --steps 3 --queries 50 --limit 100" in page
    assert page.count("passed: ") + page.count("**FLAGGED**: ") == len(rec["checks"]) == 5
    (score,) = [c["counts"] for c in rec["checks"] if c.get("counts") and "score_based_only" in c["counts"]]
    shown = (f"| {score['score_based_only']}: not attacked again, within the limit ({score['limit']}) |"
             if score["recovered_by_restarts"] is None else
             f"| {score['score_based_only']}: {score['recovered_by_restarts']} recovered, {score['square_only']} left "
             f"({score['limit']}) |")
    assert shown in page  # both counts, on the page's table
    after = [a["robust_accuracy_after"] for a in rec["per_attack"]]
    assert after == sorted(after, reverse=True) and after[-1] == rec["robust_accuracy"] <= rec["clean_accuracy"]
    train = json.loads((run / "record.json").read_text())
    assert train["recipe"]["schedule"] == "onecycle" and train["adversarial"]["method"] == "pgd"
    assert all("robust_accuracy" in h for h in train["history"])
    again = run_experiment(spec, out=tmp_path / "runs", data=data).read_text()
    assert "0 run(s) trained, 1 reused" in again and f"| {rec['robust_accuracy']:.2f} |" in again


def test_runs_recorded_before_a_recipe_field_existed_are_still_found(mini):
    root, spec, page, data = mini
    from advmnist.experiments import find_run
    from advmnist.train import resolve_recipe
    import dataclasses

    (run, *_) = sorted((root / "runs").glob("lenet-*"))
    record = json.loads((run / "record.json").read_text())
    del record["recipe"]["schedule"]  # as written before the learning-rate schedule was added
    (run / "record.json").write_text(json.dumps(record))
    recipe = dataclasses.asdict(resolve_recipe("lenet", epochs=1, lr=0.05))
    assert find_run(root / "runs", "lenet", recipe, record["seed"], record["n_train"], record["data_checksum"]) == run


def test_adversarial_runs_recorded_before_a_field_existed_are_still_found(mini):
    root, spec, page, data = mini
    from advmnist.experiments import find_run
    from advmnist.train import Adversarial, resolve_recipe
    import dataclasses

    (run, *_) = sorted((root / "runs").glob("lenet-*"))
    record = json.loads((run / "record.json").read_text())
    wanted = dataclasses.asdict(Adversarial("pgd", eps=0.1, steps=2, alpha=0.05))
    record["adversarial"] = {k: v for k, v in wanted.items() if k not in ("kappa", "monitor_eps")}  # older runs
    (run / "record.json").write_text(json.dumps(record))
    recipe = dataclasses.asdict(resolve_recipe("lenet", epochs=1, lr=0.05))
    args = ("lenet", recipe, record["seed"], record["n_train"], record["data_checksum"])
    assert find_run(root / "runs", *args, wanted) == run
    assert find_run(root / "runs", *args, {**wanted, "kappa": 0.25}) is None
    assert find_run(root / "runs", *args, None) is None


CERTIFIED = """
title = "Miniature certified training"
report = "test"
seeds = [0]
train_limit = 1000

[[variant]]
label = "strided, IBP training"
model = "strided"
overrides = { epochs = 6, lr = 5e-3 }
adversarial = { method = "ibp", eps = 0.1, ramp_epochs = 3, kappa = 0.5, monitor = 100 }

[robust]
eps = 0.05
ensemble = "quick"
steps = 3
queries = 50
limit = 100
check_n = 20
curve = [0.02]
"""


def test_certified_spec_shows_the_interval_and_its_curve(tmp_path, small):
    spec = tmp_path / "experiments" / "cert.toml"
    spec.parent.mkdir()
    spec.write_text(CERTIFIED)
    data = small.subset(None, 1000)
    page = run_experiment(spec, out=tmp_path / "runs", data=data).read_text()
    (run,) = (tmp_path / "runs").glob("strided-*")
    recs = {json.loads(p.read_text())["eps"]: json.loads(p.read_text()) for p in (run / "attack-cache").glob("robust-*.json")}
    assert set(recs) == {0.05, 0.02}
    for eps, rec in recs.items():
        cert = rec["certified"]
        assert cert["method"] == "ibp+crown-ibp" or cert["method"] == "ibp+crown"
        assert rec["clean_accuracy"] > 60  # a model, not a constant
        assert 10 < cert["certified_accuracy"] <= rec["robust_accuracy"] <= rec["clean_accuracy"]
        assert rec["interval"] == [cert["certified_accuracy"], rec["robust_accuracy"]]
    assert recs[0.02]["certified"]["certified_accuracy"] >= recs[0.05]["certified"]["certified_accuracy"]
    main = recs[0.05]
    assert f"| {main['certified']['certified_accuracy']:.2f} | {main['robust_accuracy']:.2f} |" in page
    assert "certified / attacked (%), 100 test images (a subset)" in page
    assert (tmp_path / "experiments" / "results" / "cert_interval.png").stat().st_size > 10_000
    assert "![certified and attacked accuracy against eps](cert_interval.png)" in page


def test_a_spec_bound_reaches_the_command_and_the_cache_key(small):
    """`bound` in [robust] is on the page's command and in the cache key, except auto, whose key stays
    what it was before the field existed (cached evaluations stay valid)."""
    import dataclasses

    from advmnist.experiments.page import robust_command
    from advmnist.experiments.runner import _key, _robust_name
    from advmnist.experiments.spec import NOT_IN_KEY, Robust

    assert robust_command(Robust(bound="bab")).endswith("--limit 0 --bound bab")
    assert "--bound" not in robust_command(Robust())
    before = {k: v for k, v in dataclasses.asdict(Robust()).items() if k not in NOT_IN_KEY and k != "bound"}
    assert _robust_name(Robust(), 0, small) == f"robust-{_key({**before, 'seed': 0, 'data': small.checksum})}.json"
    assert _robust_name(Robust(bound="bab"), 0, small) != _robust_name(Robust(), 0, small)
