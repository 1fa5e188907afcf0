"""Every image and file a page links exists: generated experiment pages of each shape, the attack
gallery's index.html, and the committed pages (experiments/results/*.md, README.md, docs/*.md).

Everything runs through the CLI on one small slice (1,000 training images, one epoch of `mlp`), and
all specs share one runs directory, so each variant is trained once for the whole module.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner

from advmnist import runs
from advmnist.cli import main

REPO = Path(__file__).resolve().parent.parent

HEAD = """
title = "{title}"
report = "none"
seeds = {seeds}
train_limit = 1000

[[variant]]
label = "mlp"
model = "mlp"
overrides = {{ epochs = 1 }}
"""

SPECS = {
    # one attack at one eps (the column label holds no eps)
    "one_eps": HEAD.format(title="One attack, one eps", seeds="[0, 1]") + """
[[attack]]
method = "fgsm"
params = { eps = 0.1 }
limit = 100
""",
    # an eps list, and an attack whose eps is its default (0.3)
    "eps_list": HEAD.format(title="An eps list", seeds="[0]") + """
[[attack]]
method = "fgsm"
params = { eps = [0.05, 0.1] }
limit = 100

[[attack]]
method = "pgd"
params = { steps = 2 }
limit = 50
""",
    # no eps at all: a table and no eps figure
    "penalty": HEAD.format(title="The penalty attack", seeds="[0]") + """
[[attack]]
method = "penalty"
params = { steps = 20 }
""",
    "transfer": HEAD.format(title="Transfer", seeds="[0]") + """
[[variant]]
label = "mlp, lr 0.05"
model = "mlp"
overrides = { epochs = 1, lr = 0.05 }

[transfer]
method = "pgd"
params = { eps = 0.2, steps = 2 }
limit = 100
""",
}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
_MD_REF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)
_HTML_ATTR = re.compile(r"""\b(?:src|href)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>'"]+))""", re.I)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def links(page: Path) -> list[str]:
    """The relative targets a page links: Markdown links, images and reference definitions (outside code),
    and HTML src/href attributes; no http(s) or other schemes, no bare anchors, fragments dropped."""
    text = page.read_text()
    found = []
    if page.suffix == ".md":
        prose = _CODE.sub("", _FENCE.sub("", text))
        found += _MD_LINK.findall(prose) + _MD_REF.findall(prose)
        text = prose
    found += [html.unescape(next(g for g in m if g)) for m in _HTML_ATTR.findall(text) if any(m)]
    out = []
    for target in found:
        target = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if target and not _SCHEME.match(target) and not target.startswith("/"):
            out.append(target)
    return out


def missing(page: Path) -> tuple[list[str], list[str]]:
    targets = links(page)
    return targets, [t for t in targets if not (page.parent / t).exists()]


def test_link_finder_on_a_sample(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("![a](x.png) [b `c`](d/e.md#top) [web](https://example.org) [anchor](#here)\n"
                    "```\nmodel[0](x)\n```\n`f[1](y)` <img src='g.png'>\n[r]: h.txt\n")
    assert links(page) == ["x.png", "d/e.md", "h.txt", "g.png"]
    gallery = tmp_path / "index.html"
    gallery.write_text("<a href='#run'>run</a><a href='run/g.png'><img src=\"run/a&amp;b.png\"></a>")
    assert links(gallery) == ["run/g.png", "run/a&b.png"]


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """All four specs in one `advmnist experiment run ... --out L --results LR`."""
    root = tmp_path_factory.mktemp("links")
    (root / "specs").mkdir()
    paths = []
    for name, text in SPECS.items():
        paths.append(root / "specs" / f"{name}.toml")
        paths[-1].write_text(text)
    out, results = root / "L", root / "LR"
    result = CliRunner().invoke(main, ["experiment", "run", *map(str, paths), "--out", str(out),
                                       "--results", str(results)])
    assert result.exit_code == 0, result.output
    return out, {name: results / f"{name}.md" for name in SPECS}


@pytest.mark.parametrize("name", list(SPECS))
def test_generated_page_links_only_files_that_exist(pages, name):
    page = pages[1][name]
    targets, absent = missing(page)
    assert f"{name}_curves.png" in targets
    assert absent == [], f"{page.name} links missing files: {absent}"


def test_eps_figure_is_drawn_from_the_attack_parameters(pages):
    _, by_name = pages
    for name in ["one_eps", "eps_list"]:  # one eps: clean at 0 plus the attacked point; a list: a curve
        page = by_name[name]
        assert f"{name}_robustness.png" in links(page)
        assert (page.parent / f"{name}_robustness.png").stat().st_size > 5000
    penalty = by_name["penalty"]
    assert "## Robustness" in penalty.read_text() and "| mlp |" in penalty.read_text()
    assert not any("robustness" in t for t in links(penalty))
    assert not (penalty.parent / "penalty_robustness.png").exists()
    assert "transfer_transfer.png" in links(by_name["transfer"])


@pytest.fixture(scope="module")
def gallery(pages):
    """`advmnist attack` runs of each kind into the same runs directory, then its index.html."""
    out, _ = pages
    run = runs.latest_run(out, "mlp")
    assert run is not None
    for args in (["--method", "fgsm", "--eps", "0.1", "--limit", "50"],
                 ["--method", "pgd", "--eps", "0.05,0.1", "--steps", "2", "--limit", "50"],
                 ["--method", "penalty", "--steps", "20"],
                 ["--method", "fgsm", "--eps", "0.2", "--targeted", "--target-map", "all", "--per-digit", "1"]):
        result = CliRunner().invoke(main, ["attack", *args, "--run", str(run), "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
    return out / "attacks" / "index.html"


def test_attack_gallery_links_only_files_that_exist(gallery):
    targets, absent = missing(gallery)
    names = {Path(t).name for t in targets}
    assert {"gallery.png", "robust_vs_eps.png", "grid.png", "record.json"} <= names
    assert sum(t.endswith(".png") for t in targets) > 20
    assert absent == [], f"index.html links missing files: {absent}"


COMMITTED = (sorted((REPO / "experiments" / "results").glob("*.md")) + [REPO / "README.md"]
             + sorted((REPO / "docs").glob("*.md")))


def test_there_are_committed_pages():
    assert len(COMMITTED) > 1 and all(p.is_file() for p in COMMITTED)
    assert {"architecture.md", "cli.md"} <= {p.name for p in COMMITTED if p.parent.name == "docs"}


@pytest.mark.parametrize("page", COMMITTED, ids=[p.relative_to(REPO).as_posix() for p in COMMITTED])
def test_committed_page_links_only_files_that_exist(page):
    targets, absent = missing(page)
    assert targets or page.parent == REPO / "docs", f"{page} links nothing"  # a docs page may link nothing
    assert absent == [], f"{page.relative_to(REPO)} links missing files: {absent}"
