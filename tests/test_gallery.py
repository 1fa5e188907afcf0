"""The attack gallery page (`runs/attacks/index.html`) in a real browser: headless Chromium renders
it and the screenshot must show something. Skipped where `chromium` is not installed (Debian:
`apt-get install chromium`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from advmnist.attacking import run_attack
from advmnist.train import train_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, small):
    """Three attack runs of a small MLP (untargeted, an eps sweep, the targeted penalty) and their index."""
    out = tmp_path_factory.mktemp("gallery")
    data = small.subset(1000, 200)
    run = train_run("mlp", out=out, data=data, epochs=1, device="cpu")
    run_attack(run, data, "fgsm", params={"eps": 0.2}, out=out, limit=50, device="cpu")
    run_attack(run, data, "pgd", params={"steps": 3}, eps_list=[0.05, 0.2], out=out, limit=50, device="cpu")
    run_attack(run, data, "penalty", params={"steps": 30}, out=out, device="cpu")
    return out / "attacks" / "index.html"


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def test_page_has_a_summary_table_parameters_and_full_size_galleries(gallery):
    page = gallery.read_text()
    assert page.index("<table>") < page.index("<section")  # the summary table comes first
    assert page.count("<section") == 3
    for name in ("parameter", "steps", "eps", "0.05, 0.2", "lam", "target_map"):
        assert name in page, name
    parser = _Images()
    parser.feed(page)
    galleries = [img for img in parser.images if img["src"].endswith("gallery.png")]
    assert len(galleries) == 4  # fgsm, two sweep points, penalty
    assert all("style" not in img and "width" not in img for img in galleries)  # shown at natural size
    assert re.search(r"\.pics img \{[^}]*width: auto", page)
    assert re.search(r"\.thumbs img \{[^}]*image-rendering: pixelated", page)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_headless_chromium_renders_the_page(gallery, tmp_path):
    shot = tmp_path / "index.png"
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--window-size=1400,2400", f"--screenshot={shot}", gallery.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) in [0, 1]
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1300
    ink = (pixels.min(axis=2) < 0.5).mean()  # text, tables and images against the white page
    assert ink > 0.02, f"the screenshot is (nearly) blank: {ink:.2%} dark pixels"
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50  # more than a flat fill
    if os.environ.get("ADVMNIST_KEEP_SCREENSHOT"):  # to look at it: ADVMNIST_KEEP_SCREENSHOT=/tmp/shot.png
        shutil.copy(shot, os.environ["ADVMNIST_KEEP_SCREENSHOT"])


def test_robust_accuracy_is_not_shown_for_an_attack_started_from_noise(gallery):
    rows = [r for r in gallery.read_text().split("<tr>") if "<td class=l>" in r and "</a>" in r]
    penalty = [r for r in rows if ">penalty<" in r]
    others = [r for r in rows if ">penalty<" not in r]
    assert penalty and all(re.search(r"<td>[\d.]+</td><td>-</td>", r) for r in penalty)  # fooling rate, then -
    assert others and not any(re.search(r"<td>[\d.]+</td><td>-</td>", r) for r in others)
