"""Copy finished, fully evaluated runs into advmnist/weights/ as the shipped pretrained models.

    python benchmarks/make_pretrained.py [--commit SHA] NAME=RUN_DIR[@RECORD] [NAME=RUN_DIR[@RECORD] ...]

Each RUN_DIR must hold its training record and its robust evaluation on all 10,000 test images
(`advmnist evaluate --run RUN_DIR --robust --eps 0.3 --limit 0`), or RECORD must name that evaluation
(an experiment's, `RUN_DIR/attack-cache/robust-*.json`). The name's entry below says how the
run was made; `advmnist.shipped.ship` writes NAME.pt (the run's checkpoint, byte for byte) and NAME.json
(the record, with the slice check the test suite repeats). `--commit`: the code's commit, for runs
made from an exported tree whose records could not read it.
"""

from __future__ import annotations

import sys

from advmnist.shipped import ship

LICENSE = ("MIT, like advmnist's code; trained on MNIST (LeCun, Cortes and Burges), CC BY-SA 3.0, "
           "see advmnist/mnist_data/README.md")
CPU = "a 2-core CPU box, one core (torch 2.14.1)"

SHIPPED = {
    "improved-bn": dict(
        summary="the standard improved-bn of report 001 (textbook CNN with BatchNorm after conv1-3), "
                "3 epochs of SGD: no defence, fooled by every attack at eps 0.3",
        command="advmnist train --model improved-bn --seed 0 --device cpu",
        spec="experiments/report001.toml (the report's recipe for improved-bn)",
        machine=CPU, check_eps=0.1,
        note="no defence: every attack of the ensemble breaks every image at eps 0.3; the slice check runs at "
             "eps 0.1"),
    "trades-wide": dict(
        summary="TRADES (Zhang et al. 2019, beta 3) on strided-wide with a weight average (EMA 0.9995): "
                "the best adversarially trained row of experiments/results/adversarial.md",
        command="advmnist train --model strided-wide --adv trades --eps 0.3 --adv-steps 10 --adv-alpha 0.04 "
                "--beta 3 --eps-ramp 3 --keep-last --lr 5e-3 --epochs 25 --schedule onecycle --batch-size 100 "
                "--ema 0.9995 --seed 0 --device cuda",
        spec="experiments/adversarial.toml, variant 'strided-wide, TRADES (beta 3), weights averaged "
             "(EMA 0.9995), last epoch, 25 epochs'",
        machine="an NVIDIA H200 (torch 2.11, CUDA)",
        note="on the first 1,000 test images torchattacks' AutoAttack leaves 90.9% against 91.0% for this "
             "evaluation (one image more broken), so the 10,000-image figure may sit about 0.1 pp high "
             "(benchmarks/results.md, 'AutoAttack check of the shipped pretrained models')"),
    "ibp-wide": dict(
        summary="IBP certified training (Gowal et al. 2018) of strided-wide at eps 0.35, kappa 0.6, 70 epochs: "
                "the third row of experiments/results/certified.md, the best one core trains in an hour "
                "(the fourth, strided-large, takes both cores)",
        command="advmnist train --model strided-wide --adv ibp --eps 0.35 --eps-ramp 28 --kappa 0.6 "
                "--monitor-eps 0.3 --lr 1e-3 --epochs 70 --schedule onecycle --batch-size 100 --seed 0 --device cpu",
        spec="experiments/certified.toml, variant 'strided-wide, IBP training at eps 0.35, kappa 0.6, 70 epochs'",
        machine=CPU,
        note="on the first 1,000 test images torchattacks' AutoAttack leaves 90.0% and this evaluation 89.8% "
             "(benchmarks/results.md, 'AutoAttack check of the shipped pretrained models')"),
}


def main(argv: list[str]) -> None:
    commit = None
    if argv[:1] == ["--commit"]:
        commit, argv = argv[1], argv[2:]
    if not argv:
        sys.exit(__doc__)
    for pair in argv:
        name, _, where = pair.partition("=")
        run_dir, _, robust = where.partition("@")
        if name not in SHIPPED or not run_dir:
            sys.exit(f"give NAME=RUN_DIR[@RECORD] with NAME one of {', '.join(SHIPPED)}")
        record = ship(name, run_dir, license=LICENSE, eps=0.3, commit=commit, robust_record=robust or None,
                      **SHIPPED[name])
        ev = record["evaluation"]
        print(f"{name}: clean {record['clean_accuracy']:.2f}%, robust {ev['robust_accuracy']:.2f}% at eps 0.3 on "
              f"{ev['n']} images, slice check {record['check']['robust_accuracy']:.2f}%, {record['bytes']:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
