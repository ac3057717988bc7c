"""Train ``diagvi.DIAGVI`` on a runner input folder and write its outputs (``runner_io.py``).

    python experiments/benchmark/diagvi_runner.py IN_DIR OUT_DIR

Run by ``run.py`` in a subprocess, so that peak RSS is this model's alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from runner_io import Timer, read_inputs, rss_mb, write_outputs

import diagvi
from diagvi import DIAGVI


def main(in_dir: Path, out_dir: Path) -> None:
    config, adatas, mapping = read_inputs(in_dir)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    for m, adata in adatas.items():
        DIAGVI.setup_anndata(
            adata,
            layer="counts",
            labels_key="cell_type" if config["labels"][m] else None,
            likelihood=config["likelihood"][m],
        )
    # the seed sets the initial weights too, as scvi.settings.seed does in the reference's runner
    model = DIAGVI(
        adatas,
        mapping_df=mapping,
        n_latent=config["n_latent"],
        seed=config["seed"],
        **config["init"],
    )
    train_kwargs = {
        "max_epochs": config["epochs"],
        "batch_size": config["batch_size"],
        "seed": config["seed"],
        "accelerator": config.get("accelerator", "cpu"),
        "early_stopping": False,
        **config["train"],
    }
    rss_before = rss_mb()
    with Timer() as timer:
        history = model.train(**train_kwargs)
    latents = model.get_latent_representation()
    imputed = decoded = None
    if config.get("impute"):  # kNN in the joint space, as the baseline; the decoder apart
        imputed = model.get_imputed_values(source_name=config["impute"][0], method="knn")
        decoded = model.get_imputed_values(source_name=config["impute"][0])
    source, target = config["modalities"]
    predicted = None
    if config["labels"][source] and model.module.classifier is not None:
        predicted = model.predict_celltype(source, target, method="classifier")["predictions"]
    epochs = len(history) if history is not None else config["epochs"]
    write_outputs(
        out_dir,
        latents,
        imputed,
        timer.seconds,
        epochs,
        rss_before,
        f"diagvi {diagvi.__version__}",
        imputed_decoder=decoded,
        predicted=predicted,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
