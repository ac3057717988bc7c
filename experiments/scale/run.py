"""Scale benchmark: one epoch of diagvi trained from disk, 10^4 to 10^6 cells per modality.

    .venv/bin/python experiments/scale/run.py --n-cells 10000 100000 1000000

For each size, the synthetic pair (2,000 genes as CSR counts, 100 proteins dense, 8 cell types;
``python -m diagvi.synthetic``) is generated into ``--data-dir/<n>/`` unless it is there. Then a
fresh process (so that its peak RSS is this size's alone) opens both files backed, reads and
checks them chunk by chunk (setup), trains one epoch over every cell from disk (no validation
split, no early stopping) and runs inference: both latents and the protein imputed from RNA
written to ``.npy`` files, label transfer to the protein cells by the classifier and by kNN,
FOSCTTM. Prints a table, writes ``results.csv`` (one row per size; a rerun replaces it) and fits
``time per epoch ~ cells^b`` over every size in it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(REPO)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.benchmark.runner_io import peak_rss_mb  # noqa: E402

HERE = Path(__file__).resolve().parent
#: cells of each modality scored by FOSCTTM and kNN label transfer (cost grows as its square)
METRIC_CELLS = 20_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results.csv")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 0: torch's default (one per core; far slower on a busy 2-core CPU)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="train this many minibatches, not the whole epoch; epoch time is extrapolated",
    )
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one size
    return p.parse_args(argv)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (this program's own: not ``ru_maxrss``,
    which carries the parent's across ``exec``; see the benchmark's ``runner_io``)."""
    return peak_rss_mb() * 2**20 / 1e9


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(n_cells: int, folder: Path) -> None:
    """The synthetic pair in ``folder`` (its own process: its memory is not counted)."""
    from diagvi.synthetic import SYNTHETIC_FILES

    if all((folder / name).is_file() for name in SYNTHETIC_FILES.values()):
        return
    start = time.perf_counter()
    command = [sys.executable, "-m", "diagvi.synthetic", "--n-cells", str(n_cells)]
    subprocess.run([*command, "--out", str(folder)], check=True, cwd=REPO)
    print(f"generated {n_cells} cells in {time.perf_counter() - start:.0f} s", flush=True)


def train_epoch(model, batch_size: int, max_steps: int | None) -> int:
    """One epoch over every cell (or its first ``max_steps`` minibatches); the steps run.

    What ``DIAGVI.train(max_epochs=1, train_size=1.0, early_stopping=False)`` does, with
    Lightning's ``limit_train_batches`` for a partial epoch (DIAGVI.train has no step limit).
    """
    import lightning as L

    from diagvi.data import PairedDataModule
    from diagvi.lit import DiagVILightning

    L.seed_everything(0, verbose=False)
    dm = PairedDataModule(model.data, batch_size, val_fraction=0.0, seed=0)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=max_steps or 1.0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DiagVILightning(model.module), datamodule=dm)
    model.module.eval()
    model.is_trained = True
    return trainer.global_step


def measure(
    n_cells: int, folder: Path, batch_size: int, threads: int | None, max_steps: int | None
) -> dict:
    """Setup, one epoch and inference from the files in ``folder``; times and peak RSS."""
    import warnings

    import torch

    from diagvi import DIAGVI
    from diagvi.datasets import load_h5ad
    from diagvi.metrics import label_transfer
    from diagvi.outputs import paired_foscttm

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*all-zero feature.*")
    row: dict = {
        "n_cells": n_cells,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
    }
    start = time.perf_counter()
    paths = {m: folder / f"{m}.h5ad" for m in ("rna", "protein")}
    adatas, _ = load_h5ad(paths, backed=True)
    DIAGVI.setup_anndata(adatas["rna"], labels_key="cell_type", likelihood="nb")
    DIAGVI.setup_anndata(adatas["protein"], likelihood="nb")
    model = DIAGVI(adatas, mapping_df=pd.read_csv(folder / "mapping.csv"))
    row["setup_s"], row["rss_setup_gb"] = time.perf_counter() - start, peak_rss_gb()

    start, cpu = time.perf_counter(), cpu_seconds()
    row["steps"] = train_epoch(model, batch_size, max_steps)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    trained = min(row["steps"] * batch_size, n_cells)  # cells of each modality trained on
    row["cells_per_s"], row["cells_per_cpu_s"] = trained / seconds, trained / cpu
    row["epoch_s"] = n_cells / row["cells_per_s"]  # measured, or extrapolated from the steps
    row["epoch_cpu_s"] = n_cells / row["cells_per_cpu_s"]
    row["full_epoch"] = trained == n_cells
    row["rss_train_gb"] = peak_rss_gb()

    start = time.perf_counter()
    out = folder / "inference"
    latents = model.get_latent_representation(out_dir=out)
    model.get_imputed_values("rna", out=out / "protein_from_rna.npy")
    truth = adatas["protein"].obs["cell_type"].astype(str).to_numpy()
    predicted = model.predict_celltype("rna", "protein")["predictions"]
    row["classifier_accuracy"] = float(np.mean(predicted == truth))
    row["inference_s"], row["rss_peak_gb"] = time.perf_counter() - start, peak_rss_gb()

    start = time.perf_counter()
    row["foscttm"] = paired_foscttm(latents, model.data, max_cells=METRIC_CELLS)["foscttm"]
    cells = np.sort(np.random.default_rng(0).permutation(n_cells)[:METRIC_CELLS])
    z_rna, z_protein = (np.asarray(latents[m][cells]) for m in ("rna", "protein"))
    knn = label_transfer(z_rna, truth[cells], z_protein, truth[cells])
    row["knn_accuracy"], row["metrics_s"] = knn["accuracy"], time.perf_counter() - start
    row["rss_peak_gb"] = peak_rss_gb()
    return row


def exponent(results: pd.DataFrame, column: str) -> float | None:
    """``b`` of the least-squares fit ``log(time) = a + b log(n_cells)`` over full epochs."""
    full = results[results["full_epoch"].astype(bool)]
    if full["n_cells"].nunique() < 2:
        return None
    return float(np.polyfit(np.log(full["n_cells"]), np.log(full[column]), 1)[0])


def _format(column: str, value) -> str:
    if column == "full_epoch":
        return "yes" if value else "no: extrapolated"
    return f"{value:,}" if column in ("n_cells", "steps") else f"{value:.3g}"


def table(results: pd.DataFrame) -> str:
    columns = {
        "n_cells": "cells per modality",
        "steps": "steps",
        "full_epoch": "full epoch",
        "epoch_s": "epoch (s)",
        "cells_per_s": "cells/s",
        "epoch_cpu_s": "epoch CPU (s)",
        "cells_per_cpu_s": "cells/CPU-s",
        "setup_s": "setup (s)",
        "inference_s": "inference (s)",
        "rss_train_gb": "peak RSS to end of epoch (GB)",
        "rss_peak_gb": "peak RSS (GB)",
        "foscttm": "FOSCTTM",
        "classifier_accuracy": "classifier acc.",
        "knn_accuracy": "kNN acc.",
        "load_avg": "load avg",
    }
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, row in results.iterrows():
        cells = [_format(k, row[k]) for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:  # child process: one size, one JSON line
        (n_cells,) = args.n_cells
        folder = args.data_dir / str(n_cells)
        row = measure(n_cells, folder, args.batch_size, args.threads, args.max_steps)
        print("RESULT " + json.dumps(row), flush=True)
        return
    results = pd.read_csv(args.out) if args.out.is_file() else pd.DataFrame()
    for n_cells in args.n_cells:
        folder = args.data_dir / str(n_cells)
        generate(n_cells, folder)
        child = [sys.executable, __file__, "--one", "--n-cells", str(n_cells)]
        child += ["--batch-size", str(args.batch_size), "--data-dir", str(args.data_dir)]
        child += ["--threads", str(args.threads)]
        child += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        done = subprocess.run(child, check=True, cwd=REPO, capture_output=True, text=True)
        line = next(x for x in done.stdout.splitlines()[::-1] if x.startswith("RESULT "))
        row = json.loads(line.removeprefix("RESULT "))
        print(
            f"{n_cells} cells: epoch {row['epoch_s']:.0f} s ({row['cells_per_s']:.0f} cells/s), "
            f"peak RSS {row['rss_peak_gb']:.2f} GB",
            flush=True,
        )
        if not results.empty:  # a rerun of a size replaces its row
            same = (results["n_cells"] == n_cells) & (results["batch_size"] == args.batch_size)
            results = results[~same]
        results = pd.concat([results, pd.DataFrame([row])])
        results = results.sort_values(["batch_size", "n_cells"]).reset_index(drop=True)
        results.to_csv(args.out, index=False)
    same = results[results["batch_size"] == args.batch_size]
    print(table(same))
    for column, what in (("epoch_s", "wall time"), ("epoch_cpu_s", "CPU time")):
        b = exponent(same, column)
        if b is not None:
            print(f"{what} per epoch ~ cells^{b:.3f} (least squares over the full epochs)")
    rates = same.set_index("n_cells")["cells_per_s"]
    if {100_000, 1_000_000} <= set(rates.index):
        print(f"throughput at 1M / at 100k: {rates[1_000_000] / rates[100_000]:.3f}")


if __name__ == "__main__":
    main()
