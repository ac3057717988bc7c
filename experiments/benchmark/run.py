"""Benchmark diagvi against a joint-PCA baseline and scvi-tools' DIAGVI (README.md).

    .venv/bin/python experiments/benchmark/run.py --ref-python .venv-ref/bin/python [--quick]

Writes ``results.csv`` (one row per dataset, method, seed and metric), ``results.md``,
``speed.csv`` and ``plots/*.png`` to ``--out``; runner inputs, outputs and logs to
``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(REPO)

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from diagvi.model import default_max_epochs  # noqa: E402
from diagvi.plotting import plot_joint_embedding  # noqa: E402
from experiments.benchmark import datasets, report, scoring  # noqa: E402
from experiments.benchmark.baselines import dense, joint_pca, knn_impute, modality_pca  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("joint_pca", "diagvi", "diagvi_tuned", "scvi_diagvi")
QUICK = ("eccite", "pbmc10k", "genesplit")
#: ``--quick`` caps the default epochs: the reference needs ~2 s/epoch here on a shared CPU
QUICK_MAX_EPOCHS = 50

#: per-dataset keyword overrides of diagvi for "diagvi_tuned": {"init": {...}, "train": {...}}
#: (DIAGVI(...) and DIAGVI.train(...)). A dataset without an entry is not run as tuned.
#: The sweep (README, "Tuned"): a 3 x 3 grid of lam_sinkhorn x lam_link around the defaults
#: on the ECCITE demo's held-out 30 % (Hydra + Optuna, 50 epochs); its best setting is applied
#: to every dataset, so the column also shows whether tuning on one pair carries to others.
SWEPT = {"train": {"lam_link": 150.0}}
TUNED: dict[str, dict[str, dict]] = dict.fromkeys(datasets.LOADERS, SWEPT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-python", required=True, help="python of the scvi-tools 1.5.1 venv")
    p.add_argument("--quick", action="store_true", help="one seed, small datasets only")
    p.add_argument("--datasets", nargs="+", choices=list(datasets.LOADERS), default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default: diagvi's rule per dataset (quick: at most {QUICK_MAX_EPOCHS})",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-latent", type=int, default=20)
    p.add_argument("--max-cells", type=int, default=None, help="subsample each modality")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the runners")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "benchmark")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score the models a finished run left in --work-dir again, without training "
        "(after a change to the metrics; same datasets, methods, seeds and settings)",
    )
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.datasets is None:
        args.datasets = [n for n in datasets.LOADERS if not args.quick or n in QUICK]
    args.epoch_cap = QUICK_MAX_EPOCHS if args.quick else None
    return args


def n_epochs(args: argparse.Namespace, n_cells: int) -> int:
    """``--epochs``, else diagvi's ``default_max_epochs`` (capped under ``--quick``)."""
    if args.epochs:
        return args.epochs
    return min(default_max_epochs(n_cells), args.epoch_cap or 10**9)


def write_inputs(ds: datasets.BenchData, folder: Path) -> None:
    """The dataset as a runner input folder (``runner_io.py``), config excluded."""
    folder.mkdir(parents=True, exist_ok=True)
    for m, adata in ds.adatas.items():
        adata.write_h5ad(folder / f"{m}.h5ad")
    ds.mapping.to_csv(folder / "mapping.csv", index=False)


def input_mismatch(ds: datasets.BenchData, folder: Path) -> str | None:
    """Why the runner inputs in ``folder`` are not ``ds`` (None when they are).

    ``--rescore`` scores a run's latents against the dataset loaded now; a run trained on
    other cells (another ``--max-cells``, a changed loader) would be scored on misaligned rows.
    Compared: what the runners read (cells, features, counts, training labels, mapping).
    """
    for m, adata in ds.adatas.items():
        path = folder / f"{m}.h5ad"
        if not path.is_file():
            return f"{path} is missing: no run to rescore"
        saved = ad.read_h5ad(path)
        if not (
            saved.obs_names.equals(adata.obs_names) and saved.var_names.equals(adata.var_names)
        ):
            return f"{path}: other cells or features than {ds.name} loaded now"
        x, y = (sp.csr_matrix(a.layers["counts"]) for a in (saved, adata))
        if (x != y).nnz:
            return f"{path}: other counts than {ds.name} loaded now"
        labels = [
            None if "cell_type" not in a.obs else a.obs["cell_type"].astype(str).tolist()
            for a in (saved, adata)
        ]
        if labels[0] != labels[1]:
            return f"{path}: other training labels than {ds.name} loaded now"
    saved_map = pd.read_csv(folder / "mapping.csv", dtype=str, keep_default_na=False)
    if not saved_map.equals(ds.mapping.astype(str).reset_index(drop=True)):
        return f"{folder / 'mapping.csv'}: another feature mapping than {ds.name} loaded now"
    return None


#: what a runner writes to its output folder (``runner_io.write_outputs``) and ``run_model``
OUTPUT_FILES = ("config.json", "stats.json", "latent_*.npy", "imputed*.npy", "predicted.npy")


def run_model(
    python: str,
    script: str,
    in_dir: Path,
    out_dir: Path,
    config: dict,
    n_obs: dict[str, int] | None = None,
) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run one runner in a subprocess.

    Returns (stats, latents, outputs): ``outputs`` holds the imputations (``"primary"``,
    ``"decoder"``) and the classifier's labels (``"predicted"``) that the runner wrote.
    An earlier run's outputs in ``out_dir`` are removed first, so that a failed run leaves
    nothing for ``--rescore`` to score; ``config.json`` is written there only on success.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in OUTPUT_FILES:
        for stale in out_dir.glob(pattern):
            stale.unlink()
    (in_dir / "config.json").write_text(json.dumps(config, indent=2))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    with open(out_dir / "log.txt", "w") as log:
        done = subprocess.run(
            [python, str(HERE / script), str(in_dir), str(out_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    if done.returncode != 0:
        tail = (out_dir / "log.txt").read_text().splitlines()[-15:]
        raise RuntimeError(f"{script} failed ({done.returncode}):\n" + "\n".join(tail))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))  # for --rescore
    return read_outputs(out_dir, config, n_obs)


def read_outputs(
    out_dir: Path, config: dict, n_obs: dict[str, int] | None = None
) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What a runner wrote to ``out_dir`` (see :func:`run_model`); refused when the run was
    made with other settings than ``config`` (``--rescore``; runs from before ``config.json``
    was saved have none, and are taken as made with ``config``), when a latent is not finite,
    or when its rows are not ``n_obs[modality]`` cells (if given). A failed run leaves no
    outputs (:func:`run_model` removes the earlier ones first)."""
    used = out_dir / "config.json"
    if used.exists() and json.loads(used.read_text()) != json.loads(json.dumps(config)):
        raise RuntimeError(f"{out_dir} was trained with other settings ({used}); train again")
    stats = json.loads((out_dir / "stats.json").read_text())
    latents = {m: np.load(out_dir / f"latent_{m}.npy") for m in config["modalities"]}
    for m, z in latents.items():
        if n_obs is not None and len(z) != n_obs[m]:
            raise RuntimeError(f"{out_dir}: latent_{m} has {len(z)} rows, {m} has {n_obs[m]} cells")
        if not np.isfinite(z).all():
            raise RuntimeError(f"{out_dir}: latent_{m} has non-finite values; the run failed")
    imputed = {
        kind: np.load(out_dir / f"{name}.npy")
        for kind, name in (
            ("primary", "imputed"),
            ("decoder", "imputed_decoder"),
            ("predicted", "predicted"),
        )
        if (out_dir / f"{name}.npy").exists()
    }
    if n_obs is not None:  # imputations: one row per source cell; labels: per target cell
        source = (config.get("impute") or config["modalities"])[0]
        rows = {"primary": source, "decoder": source, "predicted": config["modalities"][1]}
        for kind, values in imputed.items():
            if len(values) != n_obs[rows[kind]]:
                raise RuntimeError(
                    f"{out_dir}: {kind} output has {len(values)} rows, "
                    f"{rows[kind]} has {n_obs[rows[kind]]} cells"
                )
    return stats, latents, imputed


def baseline(ds: datasets.BenchData, n_latent: int):
    """Joint PCA embeddings and, for ``ds.impute``, kNN imputation of normalised counts."""
    counts = {m: dense(a.layers["counts"]) for m, a in ds.adatas.items()}
    latents = joint_pca(
        counts, {m: a.var_names for m, a in ds.adatas.items()}, ds.mapping, n_latent
    )
    imputed = None
    if ds.impute is not None:
        source, target, _ = ds.impute
        x = counts[target]
        normalised = x / np.maximum(x.sum(1, keepdims=True), 1e-12) * 1e4
        imputed = knn_impute(latents[source], latents[target], normalised, k=scoring.K)
    return latents, imputed


def main(argv=None) -> None:
    args = parse_args(argv)
    plots = args.out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows, speed, failures = [], [], []
    start = time.perf_counter()
    for name in args.datasets:
        ds = datasets.load(name, args.max_cells)
        shapes = ", ".join(f"{m} {a.shape}" for m, a in ds.adatas.items())
        n_max = max(a.n_obs for a in ds.adatas.values())
        epochs = n_epochs(args, n_max)
        print(
            f"[{time.perf_counter() - start:6.0f}s] {name}: {shapes}, {epochs} epochs", flush=True
        )
        in_dir = args.work_dir / name / "input"
        mismatch = input_mismatch(ds, in_dir) if args.rescore else None
        if not args.rescore:
            write_inputs(ds, in_dir)
        n_obs = {m: a.n_obs for m, a in ds.adatas.items()}
        before = {m: modality_pca(a.layers["counts"]) for m, a in ds.adatas.items()}
        plot_labels = {m: v for m, v in ds.labels.items() if v is not None}
        for seed in args.seeds:
            for method in args.methods:
                if method == "joint_pca" and seed != args.seeds[0]:
                    continue  # deterministic: one run
                if method == "diagvi_tuned" and name not in TUNED:
                    continue
                tuned = TUNED.get(name, {}) if method == "diagvi_tuned" else {}
                config = {
                    "modalities": ds.modalities,
                    "labels": {m: m in ds.train_labels for m in ds.modalities},
                    "likelihood": {m: ds.likelihood(m) for m in ds.modalities},
                    "n_latent": args.n_latent,
                    "epochs": epochs,
                    "batch_size": args.batch_size,
                    "seed": seed,
                    "threads": args.threads,
                    "accelerator": args.accelerator,
                    "impute": list(ds.impute[:2]) if ds.impute else None,
                    "init": tuned.get("init", {}),
                    "train": tuned.get("train", {}),
                }
                t0 = time.perf_counter()
                try:
                    if method == "joint_pca":
                        latents, knn_imputed = baseline(ds, args.n_latent)
                        imputed = {"primary": knn_imputed} if knn_imputed is not None else {}
                    else:
                        python, script = (
                            (args.ref_python, "ref_runner.py")
                            if method == "scvi_diagvi"
                            else (sys.executable, "diagvi_runner.py")
                        )
                        out_dir = args.work_dir / name / f"{method}_seed{seed}"
                        if mismatch:  # --rescore of a run trained on other data
                            raise RuntimeError(f"{mismatch}; train again")
                        stats, latents, imputed = (
                            read_outputs(out_dir, config, n_obs)
                            if args.rescore
                            else run_model(python, script, in_dir, out_dir, config, n_obs)
                        )
                        speed.append({"dataset": name, "method": method, "seed": seed, **stats})
                    scores = scoring.evaluate(
                        ds,
                        latents,
                        before,
                        imputed.get("primary"),
                        imputed.get("decoder"),
                        predicted=imputed.get("predicted"),
                    )
                except Exception as err:  # one failed run must not stop the benchmark
                    failures.append(f"{name} / {method} / seed {seed}: {err}")
                    print(f"  FAILED {method} seed {seed}: {err}", flush=True)
                    continue
                rows += [
                    {"dataset": name, "method": method, "seed": seed, "metric": k, "value": v}
                    for k, v in scores.items()
                ]
                summary = " ".join(f"{k}={v:.3f}" for k, v in scores.items())
                print(f"  {method} seed {seed} ({time.perf_counter() - t0:.0f}s): {summary}")
                if seed == args.seeds[0]:
                    plot_joint_embedding(latents, plots / f"{name}_{method}.png", plot_labels)
    results = pd.DataFrame(rows, columns=["dataset", "method", "seed", "metric", "value"])
    speed_df = pd.DataFrame(speed)
    results.to_csv(args.out / "results.csv", index=False)
    speed_df.to_csv(args.out / "speed.csv", index=False)
    settings = {
        "seeds": args.seeds,
        "epochs": args.epochs or f"default_max_epochs(larger modality), cap {args.epoch_cap}",
        "batch_size": args.batch_size,
        "n_latent": args.n_latent,
        "max_cells": args.max_cells,
        "threads": args.threads,
        "accelerator": args.accelerator,
        "wall_seconds": round(time.perf_counter() - start),
    }
    if args.rescore:  # the speed table keeps the training run's own seconds
        settings["rescored"] = str(args.work_dir)
    report.write_report(results, speed_df, failures, settings, args.out)
    print(f"wrote {args.out / 'results.md'} in {settings['wall_seconds']} s")


if __name__ == "__main__":
    main()
