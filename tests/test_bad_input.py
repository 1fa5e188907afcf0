"""Bad input, faults and tampering: each case ends in one clear line (or a warning), and nothing already
written is lost or left half-written.

The thirteen cases, in the order of docs/guarantees.md:
1 non-finite numbers, 2 a swapped checkpoint, 3 HTML injection into the attack gallery, 4 an output place
that cannot be written, 5 a malformed record, 6 run-directory collisions, 7 SIGTERM during a save,
8 byte-identical checkpoints, 9 out-of-range counts, 10 bad experiment specs, 11 unavailable devices,
12 file permissions from the umask, 13 an empty data directory (no network).

Everything trains `mlp` on 300 images for one epoch; MNIST is loaded once and handed to the CLI.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from click.testing import CliRunner

import advmnist.data
from advmnist import runs
from advmnist.cli import main
from advmnist.errors import CheckpointError, SkippedFileWarning
from advmnist.models import create_model

TRAIN = ["train", "--model", "mlp", "--epochs", "1", "--limit", "300", "--quiet"]
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# ---- helpers and fixtures ---------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its SHA-256: what an error must leave exactly as it was."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[Path]:
    """Half-written things: partial run directories, temporary files, write probes."""
    return [p for p in root.rglob("*")
            if p.name.startswith((runs.PARTIAL, ".write-test-")) or p.name.endswith(".tmp")]


def one_line_error(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def final_error(result, exit_code: int = 2) -> str:
    """A command that failed after its progress lines: the error is one line, and the last."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.output
    return lines[-1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def loaded(mnist):
    """The CLI's data loading answers from the session's copy (any --data-dir still goes to the files)."""
    original = advmnist.data.load_mnist

    def load(data_dir=None, **kwargs):
        return mnist if data_dir is None else original(data_dir, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(advmnist.data, "load_mnist", load)
        yield


@pytest.fixture(scope="module")
def trained(loaded, tmp_path_factory):
    """Three CLI trainings under umask 022: two identical (seed 0) given the same run name on purpose,
    one with seed 1. Returns (out, same_a, same_b, other)."""
    out = tmp_path_factory.mktemp("runs")
    old_mask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runs, "new_run_name", lambda model, seed, tag="": f"{model}{tag}-fixed-s{seed}")
            for seed in (0, 0, 1):
                result = cli(*TRAIN, "--seed", seed, "--out", out)
                assert result.exit_code == 0, result.output
    finally:
        os.umask(old_mask)
    return out, out / "mlp-fixed-s0", out / "mlp-fixed-s0-2", out / "mlp-fixed-s1"


@pytest.fixture(scope="module")
def attacked(trained, tmp_path_factory):
    """A copy of the seed-0 run in a fresh runs folder, attacked once (fgsm on 20 images)."""
    _, run, _, _ = trained
    out = tmp_path_factory.mktemp("attacked")
    shutil.copytree(run, out / run.name)
    result = cli("attack", "--method", "fgsm", "--eps", "0.2", "--limit", "20", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    (record,) = (out / "attacks").glob("*/record.json")
    return out, json.loads(record.read_text())


# ---- 1. NaN and infinity ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["train", "--lr", "nan"], "learning rate must be positive (a finite number > 0), got nan"),
    (["train", "--lr", "inf"], "learning rate must be positive (a finite number > 0), got inf"),
    (["train", "--adv", "pgd", "--eps", "nan"], "eps must be >= 0 (a finite number), got nan"),
    (["train", "--momentum", "-inf"], "momentum must be >= 0 (a finite number), got -inf"),
    (["train", "--ema", "1"], "weight-average decay must be in [0, 1) (a finite number), got 1"),
    (["attack", "--method", "fgsm", "--eps", "nan"], "eps must be >= 0 (a finite number), got nan"),
    (["attack", "--method", "pgd", "--eps", "0.1,inf"], "eps must be >= 0 (a finite number), got inf"),
    (["attack", "--method", "penalty", "--eta", "inf"], "eta must be positive (a finite number > 0), got inf"),
    (["evaluate", "--robust", "--eps", "nan"], "eps must be >= 0 (a finite number), got nan"),
])
def test_1_non_finite_options_are_refused(trained, args, message):
    out = trained[0]
    before = snapshot(out)
    line = one_line_error(cli(*args, "--out", out))
    assert message in line
    assert snapshot(out) == before and not leftovers(out)


def test_1_training_that_diverges_in_its_first_epoch_writes_nothing(loaded, tmp_path):
    line = final_error(cli(*TRAIN, "--lr", "1e30", "--out", tmp_path))
    assert "training diverged in epoch 1" in line and "no epoch ended with finite losses" in line
    assert list(tmp_path.iterdir()) == []


def test_1_training_that_diverges_later_keeps_the_last_good_weights(loaded, tmp_path, monkeypatch):
    import advmnist.train

    original, calls = advmnist.train.train_epoch, []

    def train_epoch(model, *args, **kwargs):  # epoch 2 ends with NaN weights, as a blown-up step leaves them
        stats = original(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return stats

    monkeypatch.setattr(advmnist.train, "train_epoch", train_epoch)
    line = final_error(cli("train", "--model", "mlp", "--epochs", "3", "--limit", "300", "--quiet", "--out", tmp_path))
    assert "training diverged in epoch 2" in line and "the weights of epoch 1" in line
    (kept,) = [p for p in tmp_path.iterdir()]
    assert str(kept / "model.pt") in line
    record = json.loads((kept / "record.json").read_text())
    assert record["kind"] == "train-diverged" and record["epoch"] == 1 and len(record["history"]) == 1
    model, _ = runs.load_checkpoint(kept)  # its hash matches its record
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert runs.find_runs(tmp_path) == []  # never offered to attack or evaluate as a trained run
    assert not leftovers(tmp_path)


def test_1_json_is_strict(trained, tmp_path):
    runs.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")],
                                          "t": torch.tensor([float("-inf"), 2.0])})

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == {
        "a": None, "b": [1.0, None], "t": [None, 2.0]}
    for record in trained[0].rglob("record.json"):
        json.loads(record.read_text(), parse_constant=refuse)


# ---- 2. a swapped checkpoint ------------------------------------------------------------------------

def test_2_a_swapped_checkpoint_is_refused_unless_trusted(trained, tmp_path):
    _, run, _, other = trained
    swapped = tmp_path / "runs" / run.name
    shutil.copytree(run, swapped)
    shutil.copyfile(other / "model.pt", swapped / "model.pt")  # same architecture, other weights
    before = snapshot(tmp_path)
    line = one_line_error(cli("evaluate", "--run", swapped, "--out", tmp_path / "runs"))
    assert f"{swapped / 'model.pt'}: SHA-256" in line and "replaced or damaged" in line
    assert "--trust-checkpoint" in line
    assert snapshot(tmp_path) == before
    with pytest.raises(CheckpointError, match="replaced or damaged"):
        runs.load_checkpoint(swapped)
    runs.load_checkpoint(run)  # the untouched run loads

    result = cli("attack", "--method", "fgsm", "--eps", "0.2", "--limit", "20", "--run", swapped,
                 "--out", tmp_path / "runs", "--quiet", "--trust-checkpoint")
    assert result.exit_code == 0, result.output
    (record,) = (tmp_path / "runs" / "attacks").glob("*/record.json")
    assert json.loads(record.read_text())["model"]["checkpoint_sha256"] == runs.file_sha256(other / "model.pt")
    with pytest.raises(CheckpointError):  # the override lasted only for that command
        runs.load_checkpoint(swapped)


# ---- 3. HTML injection ------------------------------------------------------------------------------

class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs


def test_3_gallery_escapes_every_field_and_links_only_inside_the_runs_folder(attacked, tmp_path):
    out, real = tmp_path / "runs", attacked[1]
    shutil.copytree(attacked[0], out)
    attacks = out / "attacks"
    hostile = json.loads(json.dumps(real))
    hostile["provenance"]["time"] = "9999"  # listed first
    hostile["model"]["name"] = "<script>alert(1)</script>"
    hostile["method"] = "<b onmouseover=alert(2)>fgsm</b>"
    hostile["seed"] = "<i>0</i>"
    res = hostile["results"][0]
    res["params"]["eps"] = "'><script>alert(3)</script>"
    res["files"] = {"gallery": "../../../../../../etc/passwd", "digits": ["javascript:alert(4)", "/etc/hostname"]}
    res["per_digit"] = {"<u>0</u>": res["per_digit"]["0"]}
    hostile["files"] = {"sweep_plot": "../record.json"}
    names = ["<img src=x onerror=alert(5)>", "javascript:alert(6)"]
    for name in names:
        (attacks / name).mkdir()
        (attacks / name / "record.json").write_text(json.dumps(hostile))
        (attacks / name / "gallery.png").write_bytes(b"png")

    result = cli("attack", "--method", "fgsm", "--eps", "0.1", "--limit", "20", "--out", out, "--quiet")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    page = (attacks / "index.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert set(parser.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table",
                                "tr", "th", "td", "a", "img", "section", "div", "figure", "figcaption", "code"}
    assert not [k for k, _ in parser.attrs if k.startswith("on")]
    for name in names:
        assert f"<h2>{name.replace('<', '&lt;').replace('>', '&gt;')}</h2>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    links = [v for k, v in parser.attrs if k in ("href", "src")]
    assert sum(v.startswith("./") for v in links) >= 10  # the real runs' pictures are still linked
    root = out.resolve()
    for link in links:
        if link.startswith("#"):
            continue
        assert link.startswith("./"), link
        target = (attacks / unquote(link)).resolve()
        assert target.is_relative_to(root) and target.is_file(), link
    # a hostile run's own record.json is inside the folder and linked, as a relative path, never a URL scheme
    assert "./javascript:alert(6)/record.json" in [unquote(v) for v in links]


# ---- 4. an output place that cannot be written ------------------------------------------------------

@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: (tmp / "a-file").write_text("x") and tmp / "a-file", "exists and is not a directory"),
    (lambda tmp: (tmp / "a-file").write_text("x") and tmp / "a-file" / "runs", "cannot write there"),
    (lambda tmp: tmp / ("x" * 300), "cannot write there (File name too long)"),
])
def test_4_an_unwritable_output_place_is_refused_before_any_work(loaded, tmp_path, make_out, message):
    out = make_out(tmp_path)
    before = snapshot(tmp_path)
    line = one_line_error(cli(*TRAIN, "--out", out))  # one line: not even the "training ..." line came first
    assert message in line
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


def test_4_a_failed_write_at_the_end_is_one_line_naming_the_file(trained, tmp_path, monkeypatch):
    import advmnist.pictures

    out = tmp_path / "runs"
    shutil.copytree(trained[1], out / trained[1].name)
    before = snapshot(out)

    def disk_full(history, path, title=""):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(advmnist.pictures, "plot_curves", disk_full)
    line = final_error(cli(*TRAIN, "--seed", "3", "--out", out))
    assert line.startswith("error: could not write ") and line.endswith(
        f"curves.png: {os.strerror(errno.ENOSPC)}; the run was not kept")
    assert runs.PARTIAL not in line  # it names the run directory, not the hidden one
    assert snapshot(out) == before and not leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == [trained[1].name]  # no empty claim left either


# ---- 5. one bad record ------------------------------------------------------------------------------

def test_5_unreadable_records_are_skipped_with_a_warning(attacked, tmp_path):
    src, _ = attacked
    out = tmp_path / "runs"
    shutil.copytree(src, out)
    bad = {"bad-kind-only": '{"kind": "train"}', "bad-list": "[1, 2]", "bad-json": "{not json",
           "bad-bytes": b"\xff\xfe\x00"}
    for name, content in bad.items():
        (out / name).mkdir()
        (out / name / "model.pt").write_bytes(b"junk")
        target = out / name / "record.json"
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    for name, content in {"bad-attack": '{"kind": "attack"}', "bad-attack-json": "{"}.items():
        (out / "attacks" / name).mkdir()
        (out / "attacks" / name / "record.json").write_text(content)
    bad_files = {p: p.read_bytes() for p in out.glob("*/record.json")} | {
        p: p.read_bytes() for p in (out / "attacks").glob("bad-*/record.json")}

    with pytest.warns(SkippedFileWarning) as caught:
        found = runs.find_runs(out)
    assert [p.name for p in found] == [next(out.glob("mlp-*")).name]
    assert {Path(str(w.message).split(": skipped")[0]).parent.name for w in caught} == set(bad)

    result = cli("attack", "--method", "fgsm", "--eps", "0.1", "--limit", "20", "--out", out, "--quiet")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    for name in [*bad, "bad-attack", "bad-attack-json"]:
        assert any(f"/{name}/record.json: skipped" in w for w in warnings), (name, warnings)
    page = (out / "attacks" / "index.html").read_text()
    assert page.count("<section") == 2  # the earlier attack and this one

    result = cli("evaluate", "--out", out)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert sum(line.startswith("warning: ") for line in result.output.splitlines()) == len(bad)
    assert (found[0] / "eval" / "record.json").is_file()
    assert {p: p.read_bytes() for p in bad_files} == bad_files  # left as they were


# ---- 6. run directories never collide ---------------------------------------------------------------

def test_6_same_name_runs_get_their_own_directories(trained):
    out, a, b, _ = trained
    assert a.is_dir() and b.is_dir()
    assert json.loads((a / "record.json").read_text())["run"] == a.name
    assert json.loads((b / "record.json").read_text())["run"] == b.name


def test_6_concurrent_writers_never_share_a_directory(tmp_path):
    n, barrier, made = 8, threading.Barrier(8), []

    def work(i):
        barrier.wait()
        with runs.run_directory(tmp_path, "same-name") as partial:
            (partial / "who").write_text(str(i))
            time.sleep(0.05)
            made.append(runs.final_path(partial))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == n
    expected = ["same-name"] + [f"same-name-{i}" for i in range(2, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    assert sorted(int((p / "who").read_text()) for p in made) == list(range(n))


# ---- 7. SIGTERM during a save -----------------------------------------------------------------------

_SLOW_SAVE = """
import sys, time
import advmnist.pictures

def slow(*args, **kwargs):
    print("SAVING", flush=True)
    time.sleep(120)

advmnist.pictures.plot_curves = slow
from advmnist.cli import main
main(sys.argv[1:], prog_name="advmnist")
"""


def test_7_sigterm_during_a_save_cleans_up_like_ctrl_c(trained, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(trained[1], out / trained[1].name)
    before = snapshot(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, *TRAIN, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("SAVING"):
                break
        assert lines and lines[-1].startswith("SAVING"), lines
        assert list(out.glob(f"{runs.PARTIAL}*")), "the save is under way"
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["interrupted; no partial files were kept"]
    assert snapshot(out) == before and not leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == [trained[1].name]


def test_7_leftovers_of_a_killed_process_are_cleaned(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose process is gone
    host = socket.gethostname()
    for name, pid in (("killed", dead.pid), ("running", os.getpid())):
        (tmp_path / name).mkdir()  # the name's claim
        (tmp_path / f"{runs.PARTIAL}{name}").mkdir()
        (tmp_path / f"{runs.PARTIAL}{name}" / ".owner").write_text(f"{pid} {host}\n")
        (tmp_path / f"{runs.PARTIAL}{name}" / "model.pt").write_bytes(b"half")
    with runs.run_directory(tmp_path, "new") as partial:
        (partial / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{runs.PARTIAL}running", "new", "running"]
    assert runs.find_runs(tmp_path) == []


# ---- 8. identical runs, identical checkpoints ---------------------------------------------------------

def test_8_same_seed_same_checkpoint_bytes_and_record(trained):
    _, a, b, other = trained
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    assert (a / "model.pt").read_bytes() != (other / "model.pt").read_bytes()

    def timeless(path):
        rec = json.loads(path.read_text())
        for key in ("finished", "wall_time_s", "run"):  # times, and the run's name (made from the time)
            rec.pop(key)
        rec["provenance"].pop("time")
        for h in rec["history"]:
            h.pop("seconds")
        return rec

    ra, rb = timeless(a / "record.json"), timeless(b / "record.json")
    assert ra == rb and ra["checkpoint_sha256"] == runs.file_sha256(a / "model.pt")


def test_8_the_file_name_does_not_enter_the_archive(tmp_path):
    model = create_model("mlp")
    sha = [runs.save_checkpoint(tmp_path / name / "model.pt", model, "mlp", {}) for name in ("one", "two")]
    assert sha[0] == sha[1] == runs.file_sha256(tmp_path / "one" / "model.pt")


# ---- 9. out-of-range counts -------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["train", "--limit", "-5"], "limit must be an integer >= 0, got -5"),
    (["train", "--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    (["train", "--batch-size", "-1"], "batch_size must be an integer >= 1, got -1"),
    (["attack", "--method", "pgd", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["attack", "--method", "pgd", "--targeted", "--target-map", "3:3"], "a target must differ from the true digit"),
    (["attack", "--method", "pgd", "--targeted", "--target-map", "3:10"], "digits are 0 to 9"),
    (["attack", "--method", "pgd", "--eps", ","], "expected one or more numbers separated by commas, got ','"),
    (["attack", "--method", "pgd", "--eps", "0.1,,0.3"], "empty item in '0.1,,0.3'"),
    (["attack", "--method", "penalty", "--per-digit", "0"], "per_digit must be an integer >= 1, got 0"),
    (["attack", "--method", "apgd-t", "--targets", "10"], "targets must be an integer in [1, 9], got 10"),
    (["evaluate", "--robust", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["train", "--adv", "trades", "--adv-restarts", "0"], "adv_restarts must be an integer >= 1, got 0"),
    (["train", "--adv", "ibp", "--adv-restarts", "2"], "inner restarts are for pgd and trades training, not ibp"),
])
def test_9_out_of_range_counts_are_one_line_errors(trained, args, message):
    out = trained[0]
    before = snapshot(out)
    assert message in one_line_error(cli(*args, "--out", out))
    assert snapshot(out) == before and not leftovers(out)


# ---- 10. experiment specs ---------------------------------------------------------------------------

_OK = "title = 'ok'\nreport = 'r'\n[[variant]]\nlabel = 'a'\nmodel = 'mlp'\n"


@pytest.mark.parametrize("text, message", [
    ("seeds = 5\n" + _OK, "key 'seeds': expected a non-empty list of distinct integers >= 0, got 5"),
    ("seeds = ['a']\n" + _OK, "key 'seeds': expected a non-empty list of distinct integers >= 0, got ['a']"),
    (_OK + "overrides = { lr = 0.1, speed = 2 }\n", "[[variant]] #1 ('a') overrides: unknown key(s) 'speed'"),
    (_OK + "overrides = { lr = nan }\n", "overrides: key 'lr': expected positive (a finite number > 0), got nan"),
    (_OK + "overrides = { precision = 'fp16' }\n", "unknown precision 'fp16'; use fp32 or bf16"),
    (_OK.replace("title = 'ok'\n", ""), "missing key 'title': expected a non-empty string"),
    (_OK + "[robust]\neps = inf\n", "[robust]: key 'eps': expected >= 0 (a finite number), got inf"),
    (_OK + "[robust]\nbound = 'alpha'\n", "[robust]: key 'bound': expected one of"),
    (_OK + "adversarial = { method = 'trades', uniform_start = 3 }\n", "uniform_start must be true or false, got 3"),
    (_OK + "adversarial = { method = 'pgd', keep_last = 'yes' }\n", "keep_last must be true or false, got 'yes'"),
    (_OK + "adversarial = { method = 'trades', restarts = 0 }\n", "key 'restarts': expected"),
    (None, "a directory, not an experiment spec"),
])
def test_10_bad_specs_name_the_file_and_key(tmp_path, text, message):
    spec = tmp_path / "specs"
    if text is not None:
        spec = tmp_path / "bad.toml"
        spec.write_text(text)
    else:
        spec.mkdir()
    before = snapshot(tmp_path)
    line = one_line_error(cli("experiment", "run", spec, "--out", tmp_path / "runs"))
    assert line.startswith(f"error: {spec}") and message in line
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_10_one_bad_spec_does_not_break_the_list(tmp_path):
    (tmp_path / "good.toml").write_text(_OK)
    (tmp_path / "bad.toml").write_text("seeds = 5\n" + _OK)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    result = cli("experiment", "list", "--dir", tmp_path)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "no results yet" in lines[str(tmp_path / "good.toml")]
    assert "error: " in lines[str(tmp_path / "bad.toml")] and "'seeds'" in lines[str(tmp_path / "bad.toml")]
    assert "cannot be read as a UTF-8 text file" in lines[str(tmp_path / "binary.toml")]


# ---- 11. devices that are not there -----------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (TRAIN + ["--device", "meta"], "device 'meta' cannot train or attack"),
    (["attack", "--device", "meta"], "device 'meta' cannot train or attack"),
    (TRAIN + ["--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(TRAIN + ["--device", "mps"], "MPS", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="this machine has MPS")),
    pytest.param(TRAIN + ["--device", "cuda:99"], "cuda", marks=pytest.mark.skipif(
        torch.cuda.device_count() >= 100, reason="this machine has 100 GPUs")),
])
def test_11_unavailable_devices_are_one_line_errors(trained, args, message):
    out = trained[0]
    before = snapshot(out)
    assert message in one_line_error(cli(*args, "--out", out))
    assert snapshot(out) == before and not leftovers(out)


# ---- 12. permissions from the umask -----------------------------------------------------------------

def test_12_files_get_the_umask_permissions(trained, tmp_path):
    _, run, _, _ = trained  # written under umask 022
    modes = {p.name: p.stat().st_mode & 0o777 for p in [run, *run.iterdir()]}
    assert modes == {run.name: 0o755, "model.pt": 0o644, "record.json": 0o644, "curves.png": 0o644}
    old = os.umask(0o077)
    try:
        runs.write_json(tmp_path / "private.json", {})
        os.umask(0o002)
        runs.write_json(tmp_path / "shared.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o664


# ---- 13. an empty data directory --------------------------------------------------------------------

def test_13_empty_data_dir_names_the_missing_files_and_never_downloads(tmp_path, monkeypatch):
    import torchvision.datasets

    tried = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", lambda *a, **k: tried.append(a))
    empty = tmp_path / "mnist"
    empty.mkdir()
    line = one_line_error(cli(*TRAIN, "--data-dir", empty, "--out", tmp_path / "runs"))
    assert tried == [] and "download" not in line
    assert "missing MNIST files " + ", ".join(FILES) in line
    for place in (empty, empty / "MNIST" / "raw", empty / "raw"):
        assert str(place) in line
    assert list(empty.iterdir()) == []
