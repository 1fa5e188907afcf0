"""A model the zoo does not have: a user's residual network evaluated from Python and from the command
line, saved as torch.export and TorchScript files, on every device there is, and every bad input as one
line with exit 2 and nothing written."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import advmnist
from advmnist.cli import main
from advmnist.errors import InvalidValue
from advmnist.foreign import ForeignModelError, load_module

NET = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        """Inline normalisation, a residual convolution block, a residual linear block."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc1 = nn.Linear(4 * 14 * 14, 32)
            self.fc2 = nn.Linear(32, 32)
            self.out = nn.Linear(32, 10)

        def forward(self, x):
            h = F.relu(self.conv1((x - 0.1307) / 0.3081))
            h = F.relu(h + self.bn(self.conv2(h)))
            h = F.relu(self.fc1(h.view(h.size(0), -1)))
            return self.out(h + F.relu(self.fc2(h)))


    def make():
        return Net()


    def raises():
        raise ValueError("no such width")


    def five_classes():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


    class NaN(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), float("nan"))


    def nan():
        return NaN()


    class On255(nn.Module):
        """The trained net behind a layer that expects pixels in [0, 255]."""

        def __init__(self):
            super().__init__()
            self.net = Net()
            self.net.load_state_dict(torch.load(__file__.replace(".py", ".pt"), weights_only=True))

        def forward(self, x):
            return self.net(x / 255.0)


    def on_255():
        return On255().eval()


    def not_a_module():
        return 3
''')

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def user_net(tmp_path_factory, mnist):
    """net.py and net.pt (a state_dict) as a user would have them: trained for one epoch on 3000 images."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "net.py").write_text(NET)
    model, _ = load_module(f"{folder / 'net.py'}:make")
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = mnist.train_x[:3000], mnist.train_y[:3000]
    for i in range(0, 3000, 100):
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), folder / "net.pt")
    return folder, model


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


QUICK = ["--ensemble", "quick", "--steps", "5", "--queries", "50", "--eps", "0.1", "--limit", "60", "--check-n", "30"]


@pytest.mark.parametrize("device", DEVICES)
def test_python_interface_evaluates_a_residual_model_and_leaves_it_as_found(user_net, mnist, device):
    _, model = user_net
    model.train()  # as a user might hand it over
    model.fc1.weight.requires_grad_(False)
    model.out.weight.grad = torch.ones_like(model.out.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rr = advmnist.robust_accuracy(model, mnist.test_x[:60], mnist.test_y[:60], eps=0.1, ensemble="quick", steps=5,
                                  queries=50, check_n=30, device=device)
    assert isinstance(rr, advmnist.records.RobustRecord)
    assert rr.n == 60 and rr.settings["device"].startswith(device)
    assert 50.0 < rr.clean_accuracy <= 100.0 and 0.0 <= rr.robust_accuracy <= rr.clean_accuracy
    assert [a.key for a in rr.per_attack][:4] == ["apgd-ce", "apgd-t", "square", "check-restarts"]
    assert rr.per_attack[-1].robust_accuracy_after == rr.robust_accuracy
    assert len(rr.checks) == 4 and rr.masking["flagged"] == (not all(c.passed for c in rr.checks))
    assert rr.certified.method, rr.certified  # a residual graph is bounded
    certified, attacked = rr.interval
    assert certified <= attacked == rr.robust_accuracy
    assert json.loads(rr.to_json())["robust_accuracy"] == rr.robust_accuracy
    # left as found: mode, requires_grad, .grad, weights, device
    assert model.training and model.bn.training
    assert not model.fc1.weight.requires_grad and model.conv1.weight.requires_grad
    assert torch.equal(model.out.weight.grad, torch.ones_like(model.out.weight))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"
    model.eval()
    model.fc1.weight.requires_grad_(True)
    model.out.weight.grad = None


def test_python_interface_refuses_images_that_are_not_pixels(user_net, mnist):
    _, model = user_net
    with pytest.raises(InvalidValue, match=r"pixels in \[0, 1\]"):
        advmnist.robust_accuracy(model, mnist.test_x[:8] * 255, mnist.test_y[:8], eps=0.1)
    with pytest.raises(InvalidValue, match="one integer label per image"):
        advmnist.robust_accuracy(model, mnist.test_x[:8], mnist.test_y[:7], eps=0.1)
    with pytest.raises(InvalidValue, match=r"\(N, 1, 28, 28\)"):
        advmnist.robust_accuracy(model, mnist.test_x[:8].view(8, -1), mnist.test_y[:8], eps=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_command_line_evaluates_a_module_and_its_weights(user_net, tmp_path, device):
    folder, model = user_net
    out = tmp_path / "runs"
    result = cli("evaluate", "--robust", "--module", f"{folder / 'net.py'}:make", "--weights", folder / "net.pt",
                 *QUICK, "--device", device, "--out", out)
    assert result.exit_code == 0, result.output
    assert "robust accuracy" in result.output and "APGD-T (5 steps x 3 targets)" in result.output
    assert "interval:" in result.output and "certified" in result.output
    (run,) = out.glob("net-make-foreign-*")
    record = json.loads((run / "record.json").read_text())
    assert record["kind"] == "foreign-model" and record["module"] == str((folder / "net.py").resolve())
    assert record["weights_sha256"] == advmnist.runs.file_sha256(folder / "net.pt") == record["sha256"]
    robust = json.loads((run / "eval" / "robust.json").read_text())
    assert robust["checkpoint_sha256"] == record["sha256"] and robust["settings"]["device"].startswith(device)
    assert robust["certified"]["method"] and robust["interval"][0] <= robust["interval"][1]
    assert (run / "eval" / "record.json").is_file() and (run / "eval" / "confusion.png").is_file()
    # the run directory is a run: evaluated again and attacked by --run, never picked as "the latest" training
    again = cli("evaluate", "--run", run, "--device", device, "--out", out)
    assert again.exit_code == 0, again.output
    attacked = cli("attack", "--run", run, "--method", "pgd", "--limit", "20", "--steps", "3", "--device", device,
                   "--out", out, "--quiet")
    assert attacked.exit_code == 0, attacked.output
    assert "net.make" in attacked.output
    assert advmnist.runs.latest_run(out) is None
    direct = cli("attack", "--module", f"{folder / 'net.py'}:make", "--weights", folder / "net.pt", "--method", "pgd",
                 "--limit", "20", "--steps", "3", "--device", device, "--out", tmp_path / "direct", "--quiet")
    assert direct.exit_code == 0, direct.output
    assert len(list((tmp_path / "direct" / "attacks").glob("net.make-pgd-*"))) == 1


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_saved_model_files_give_the_same_numbers(user_net, tmp_path):
    folder, model = user_net
    exported = torch.export.export(model, (torch.rand(2, 1, 28, 28),),
                                   dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(exported, tmp_path / "net.pt2")
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), tmp_path / "net.ts")
    seen = {}
    for name in ("net.pt2", "net.ts"):
        result = cli("evaluate", "--robust", "--model-file", tmp_path / name, *QUICK, "--no-certify",
                     "--device", "cpu", "--out", tmp_path / "runs")
        assert result.exit_code == 0, result.output
        (run,) = (tmp_path / "runs").glob(f"net-{name.split('.')[1]}-foreign-*")
        seen[name] = json.loads((run / "eval" / "robust.json").read_text())
    assert seen["net.pt2"]["clean_accuracy"] == seen["net.ts"]["clean_accuracy"]
    assert seen["net.pt2"]["robust_accuracy"] == pytest.approx(seen["net.ts"]["robust_accuracy"], abs=100 / 60 + 1e-6)


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--module", "{f}/missing.py:make"], "no such module file"),
    (["--module", "{f}/net.py"], "give FILE.py:FACTORY"),
    (["--module", "{f}/net.py:nothing"], "has no function or class 'nothing'"),
    (["--module", "{f}/net.py:raises"], "raises() raised ValueError: no such width"),
    (["--module", "{f}/net.py:not_a_module"], "not a torch nn.Module"),
    (["--module", "{f}/net.py:make", "--weights", "{f}/missing.pt"], "no such weights file"),
    (["--module", "{f}/net.py:make", "--weights", "{f}/net.py"], "not a readable weights file"),
    (["--module", "{f}/net.py:five_classes", "--weights", "{f}/net.pt"], "weights do not fit five_classes()"),
    (["--module", "{f}/net.py:five_classes"], "must return (N, 10) logits"),
    (["--module", "{f}/net.py:nan"], "non-finite logits"),
    (["--module", "{f}/net.py:on_255"], "on pixels in [0, 255]: it expects another pixel range; wrap it"),
    (["--module", "{f}/net.py:make"], "chance is 10%"),
    (["--model-file", "{f}/net.pt"], "neither a torch.export program"),
    (["--model-file", "{f}/missing.pt2"], "no such model file"),
    (["--weights", "{f}/net.pt"], "--weights goes with --module"),
    (["--module", "{f}/net.py:make", "--run", "{f}"], "not both"),
    (["--run", "{f}/nowhere"], "no such run directory"),
])
def test_bad_input_is_one_line_and_nothing_is_written(user_net, tmp_path, args, says):
    folder, _ = user_net
    out = tmp_path / "runs"
    result = cli("evaluate", "--robust", *[a.format(f=folder) for a in args], *QUICK, "--device", "cpu",
                 "--out", out)
    assert says in _one_line(result)
    assert not out.exists() or not any(out.iterdir())


def test_a_changed_weights_file_is_noticed(user_net, tmp_path):
    folder, model = user_net
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "runs"
    first = cli("evaluate", "--module", f"{folder / 'net.py'}:make", "--weights", weights, "--device", "cpu",
                "--out", out)
    assert first.exit_code == 0, first.output
    (run,) = out.glob("net-make-foreign-*")
    state = model.state_dict()
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    assert "gone or changed" in _one_line(cli("evaluate", "--run", run, "--device", "cpu", "--out", out))


def test_an_unavailable_device_is_one_line(user_net):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    folder, _ = user_net
    result = cli("evaluate", "--module", f"{folder / 'net.py'}:make", "--device", "cuda")
    assert "no CUDA GPU is available" in _one_line(result)
