"""What both model runners share: the input/output contract and resource measurements.

Imported by ``diagvi_runner.py`` and ``ref_runner.py`` as scripts (each in its own venv), so it
uses only the standard library, numpy, pandas and anndata.

Input folder: ``<modality>.h5ad`` (counts in ``layers["counts"]``, training labels in
``obs["cell_type"]``), ``mapping.csv`` (one column per modality), ``config.json``::

    {"modalities": [a, b], "labels": {a: true, b: false}, "likelihood": {a: "nb", ...},
     "n_latent": 20, "epochs": 100, "batch_size": 256, "seed": 0, "threads": null,
     "impute": [source, target] or null, "init": {...}, "train": {...}}

(``init``/``train``: diagvi keyword overrides, ignored by the reference). Output folder:
``latent_<modality>.npy`` (posterior means), ``imputed.npy`` (target means for the source
cells, when ``impute``), ``predicted.npy`` (the model's own classifier's label for every cell
of the second modality, when it has one) and ``stats.json`` (seconds, epochs, seconds per
epoch, RSS in MB).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


def read_inputs(in_dir: Path) -> tuple[dict, dict[str, ad.AnnData], pd.DataFrame]:
    config = json.loads((in_dir / "config.json").read_text())
    adatas = {m: ad.read_h5ad(in_dir / f"{m}.h5ad") for m in config["modalities"]}
    mapping = pd.read_csv(in_dir / "mapping.csv", dtype=str, keep_default_na=False)
    return config, adatas, mapping


def rss_mb() -> float:
    """Current resident set size (MB) from /proc/self/statm; NaN where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return float("nan")
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB).

    ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's own memory; not
    ``ru_maxrss``, which Linux carries across ``exec`` from the parent's memory at ``fork``: a
    runner started by ``run.py`` reported ``run.py``'s resident size whenever that was the
    larger (634.7 MB for every diagvi runner of the gene split's later seeds and of MERFISH).
    ``ru_maxrss`` only where ``/proc`` is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_outputs(
    out_dir: Path,
    latents: dict[str, np.ndarray],
    imputed: np.ndarray | None,
    seconds: float,
    epochs: int,
    rss_before_mb: float,
    version: str,
    imputed_decoder: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if predicted is not None:
        np.save(out_dir / "predicted.npy", np.asarray(predicted, dtype=str))
    if imputed_decoder is not None:  # diagvi: its decoder's imputation, scored apart
        np.save(out_dir / "imputed_decoder.npy", np.asarray(imputed_decoder, dtype=np.float32))
    for m, z in latents.items():
        np.save(out_dir / f"latent_{m}.npy", np.asarray(z, dtype=np.float32))
    if imputed is not None:
        np.save(out_dir / "imputed.npy", np.asarray(imputed, dtype=np.float32))
    stats = {
        "seconds": seconds,
        "epochs": epochs,
        "seconds_per_epoch": seconds / max(epochs, 1),
        "rss_before_train_mb": rss_before_mb,
        "rss_peak_mb": peak_rss_mb(),
        "version": version,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
