"""Rebuild the heads the bundle ships for the `toy` target (``audit/toy/bundle/heads``) with their recipe.

    python -m audit.toy.heads [--workdir DIR] [--out audit/toy/bundle/heads]

The recipe: 200 members + 200 non-members of the bundled world (`audit toy data --seed 0`), features on the torch
path with the demo's settings (n_gen 2, 10 DDIM steps, no guidance, seed 0, batches of 32), every attack and the
blind baseline trained with seed 0 on one 50/25/25 split (`folds` 0; `audit train` now cross-fits by default).
Everything is seeded: two rebuilds write byte-identical ONNX heads.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from . import BUNDLE

RECIPE = {"n_members": 200, "n_nonmembers": 200, "data_seed": 0, "n_gen": 2, "steps": 10, "seed": 0,
          "batch_size": 32, "train_seed": 0, "folds": 0}


def rebuild(out: Path, workdir: Path) -> dict:
    from .. import api

    aux, store = workdir / "aux", workdir / "features.h5"
    if not aux.is_dir():
        api.toy_aux_data(aux, RECIPE["n_members"], RECIPE["n_nonmembers"], RECIPE["data_seed"])
    api.featurize("toy", aux, store, n_gen=RECIPE["n_gen"], steps=RECIPE["steps"], seed=RECIPE["seed"],
                  batch_size=RECIPE["batch_size"], resume=store.exists(), quiet=True)
    trained = workdir / "heads"
    shutil.rmtree(trained, ignore_errors=True)
    result = api.train(store, trained, seed=RECIPE["train_seed"], folds=RECIPE["folds"], register=False,
                       quiet=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(trained, out)
    return result.info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep aux/, features.h5 and heads/ here")
    ap.add_argument("--out", type=Path, default=BUNDLE / "heads")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        info = rebuild(args.out, workdir)
    print(f"wrote {args.out}: " + ", ".join(f"{a} validation AUC {e['validation']['auc']:.3f}"
                                             for a, e in info["attacks"].items()))


if __name__ == "__main__":
    main()
