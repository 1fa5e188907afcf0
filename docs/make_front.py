"""Draw docs/front.png, the README's first picture, from one `advmnist attack` run.

    advmnist train --model improved-bn
    advmnist attack --method penalty --eta 0.1 --lam 0.05
    python docs/make_front.py runs/attacks/<that run>

Top row: the test image of each digit the attack was told to imitate; bottom row: the image the
attack made, and what the model reads in it with its confidence. 10 x 2 small panels, so the picture
fits the README's first screen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

OUT = Path(__file__).resolve().parent / "front.png"


def main(run: Path) -> None:
    rec = json.loads((run / "record.json").read_text())
    ex = rec["results"][0]["examples"]
    adv = torch.load(run / "adversarial.pt", weights_only=True)["x_adv"]
    from advmnist import load_mnist

    ref = load_mnist().test_x[ex["test_index"]]
    n = len(ex["true"])
    fig, axes = plt.subplots(2, n, figsize=(1.05 * n, 2.7), layout="constrained")
    for i in range(n):
        for row, (img, text, colour) in enumerate((
                (ref[i], f"digit {ex['true'][i]}", "black"),
                (adv[i], f"read as {ex['adv_pred'][i]}\n({ex['confidence'][i]:.0%})",
                 "crimson" if ex["success"][i] else "black"))):
            ax = axes[row, i]
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(text, fontsize=9, color=colour, labelpad=2)
    axes[0, 0].set_ylabel("test image", fontsize=10)
    axes[1, 0].set_ylabel("attack's image", fontsize=10)
    model = rec["model"]["name"]
    params = rec["results"][0]["params"]
    fig.suptitle(f"{model} ({rec['model']['clean_test_accuracy']:.2f}% clean) under the penalty attack of report 001 "
                 f"(eta {params['eta']:g}, lam {params['lam']:g}): each image made to read as the next digit",
                 fontsize=10)
    fig.savefig(OUT, dpi=100)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
