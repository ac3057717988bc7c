"""A tour of the DIAGVI Python API on a real CITE-seq pair, with plots.

RNA and antibody counts of the same cells are given to the model as two unpaired modalities;
the known pairing and the protein-gated cell types are used only to score the result.
Run from the repository root (``--data demo`` needs nothing beside the project)::

    .venv/bin/python -m experiments.tour.tour --data demo --out experiments/tour/out
    .venv/bin/python -m experiments.tour.tour --data pbmc10k   # needs ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diagvi import DIAGVI
from diagvi.metrics import foscttm, imputation_scores, label_transfer
from experiments.benchmark.datasets import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo", help="demo (= eccite), pbmc10k, pbmc5k")
    parser.add_argument("--epochs", type=int, default=None, help="default: the model's rule")
    parser.add_argument("--out", type=Path, default=Path("experiments/tour/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bench = load("eccite" if args.data == "demo" else args.data)
    rna, protein = bench.adatas["rna"], bench.adatas["protein"]
    # labels on the RNA side only: the protein side is the query of the label transfer
    rna.obs["cell_type"] = bench.labels["rna"]

    DIAGVI.setup_anndata(
        rna, layer="counts", labels_key="cell_type", unlabeled_category="other", likelihood="nb"
    )
    DIAGVI.setup_anndata(protein, layer="counts", likelihood="nb")
    model = DIAGVI({"rna": rna, "protein": protein}, mapping_df=bench.mapping)
    print(model)
    model.train(max_epochs=args.epochs, accelerator="auto")

    latent = model.get_latent_representation()
    imputed = model.get_imputed_values(source_name="rna", target_libsize=None)
    transfer = model.predict_celltype(labeled_modality="rna", target_modality="protein")
    truth = np.asarray(bench.labels["protein"])
    gated = truth != "other"
    measured = protein.layers["counts"].toarray()
    report = {
        "cells": {m: int(a.n_obs) for m, a in bench.adatas.items()},
        "foscttm": foscttm(latent["rna"], latent["protein"])["foscttm"],
        "label_transfer_accuracy": float((transfer["predictions"][gated] == truth[gated]).mean()),
        "knn_label_transfer": label_transfer(
            latent["rna"][gated], truth[gated], latent["protein"][gated], truth[gated]
        ),
        "imputation": imputation_scores(np.log1p(imputed), np.log1p(measured)),
        "mean_confidence": float(transfer["confidence"].mean()),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    model.plot_embedding(args.out / "embedding.png")
    model.plot_history(args.out / "history.png")
    model.save(args.out / "model", overwrite=True)
    again = DIAGVI.load(args.out / "model", adatas={"rna": rna, "protein": protein})
    same = all(np.array_equal(latent[m], z) for m, z in again.get_latent_representation().items())
    print(json.dumps(report, indent=2, default=float))
    print(f"saved and reloaded: latent identical = {same}; outputs in {args.out}")


if __name__ == "__main__":
    main()
