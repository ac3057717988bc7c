"""Train scvi-tools' ``scvi.external.DIAGVI`` (the reference) on a runner input folder.

    .venv-ref/bin/python experiments/benchmark/ref_runner.py IN_DIR OUT_DIR

Same contract as ``diagvi_runner.py`` (``runner_io.py``). Settings shared with diagvi: latent
size, epochs (early stopping off), batch size, seed, guidance graph from the same mapping,
likelihoods, training labels. Latents are posterior means (``module.inference(...,
deterministic=True)``): the reference's ``get_latent_representation`` returns one sample.
Imputation is ``get_imputed_values`` with the target's median library size, passed as a log
because that is what the reference expects.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from runner_io import Timer, read_inputs, rss_mb, write_outputs


@torch.inference_mode()
def posterior_means(model, name: str, adata) -> np.ndarray:
    model.module.eval()
    out = []
    for tensors in model._make_data_loader(adata, indices=None, batch_size=1024):
        inputs = model.module._get_inference_input(tensors)
        out.append(model.module.inference(**inputs, mode=name, deterministic=True)["z"].cpu())
    return torch.cat(out).numpy()


def main(in_dir: Path, out_dir: Path) -> None:
    import scvi
    from scvi.external import DIAGVI

    config, adatas, mapping = read_inputs(in_dir)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    scvi.settings.seed = config["seed"]
    for m, adata in adatas.items():
        DIAGVI.setup_anndata(
            adata,
            layer="counts",
            labels_key="cell_type" if config["labels"][m] else None,
            likelihood=config["likelihood"][m],
        )
    graph = DIAGVI.construct_custom_guidance_graph(adatas, mapping[config["modalities"]])
    model = DIAGVI(adatas, guidance_graph=graph, n_latent=config["n_latent"])
    rss_before = rss_mb()
    with Timer() as timer:
        model.train(
            max_epochs=config["epochs"],
            batch_size=config["batch_size"],
            accelerator=config.get("accelerator", "cpu"),
            early_stopping=False,
        )
    latents = {m: posterior_means(model, m, a) for m, a in adatas.items()}
    imputed = None
    if config.get("impute"):
        source, target = config["impute"]
        totals = np.asarray(adatas[target].layers["counts"].sum(1)).ravel()
        imputed = model.get_imputed_values(
            query_name=source, reference_libsize=float(np.log(np.median(totals)))
        )
    source, target = config["modalities"]
    predicted = None
    if config["labels"][source]:  # its semi-supervised classifier, as diagvi's
        predicted = model.predict_celltype(source, target)["predictions"]
    epochs = model.trainer.current_epoch if hasattr(model, "trainer") else config["epochs"]
    write_outputs(
        out_dir,
        latents,
        imputed,
        timer.seconds,
        epochs,
        rss_before,
        f"scvi-tools {scvi.__version__}",
        predicted=predicted,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
