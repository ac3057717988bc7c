"""How far each method's label transfer is from what perfect pairing would give (README.md).

    .venv/bin/python experiments/benchmark/twin_floor.py --work-dir /tmp/benchwork

For every paired, labelled dataset of a finished benchmark run (``run.py --work-dir``), scores
label transfer twice in each embedding of modality 0: as the benchmark does (modality 1's cells
where the method put them) and with every cell of modality 1 placed on its own twin
(:func:`experiments.benchmark.scoring.twin_transfer`): what perfect pairing into that embedding
gives, a reference level (not a bound: a method may place a cell better than its twin).
Modality 0's own PCA (the benchmark's ``before``) shows what its measurements alone give.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.benchmark import datasets, scoring  # noqa: E402
from experiments.benchmark.baselines import modality_pca  # noqa: E402
from experiments.benchmark.run import baseline, input_mismatch  # noqa: E402

PAIRED = ("eccite", "pbmc10k", "pbmc5k", "genesplit")
KEYS = ("transfer_accuracy", "unshared_transfer")


def rows(ds: datasets.BenchData, work: Path) -> list[dict]:
    a = ds.modalities[0]
    # latents of a run on other cells (run.py --max-cells) would be scored on misaligned rows
    if mismatch := input_mismatch(ds, work / ds.name / "input"):
        raise RuntimeError(f"{mismatch}: the runs in {work} are not of this dataset")
    embeddings = [
        ("own PCA of modality 0", {a: modality_pca(ds.adatas[a].layers["counts"])}),
        ("joint_pca", baseline(ds, n_latent=20)[0]),
    ]
    for run in sorted(work.glob(f"{ds.name}/*_seed*")):
        if (run / f"latent_{a}.npy").exists():
            method = run.name.rsplit("_seed", 1)[0]
            embeddings.append(
                (method, {m: np.load(run / f"latent_{m}.npy") for m in ds.modalities})
            )
    out = []
    for label, latents in embeddings:
        row = {"dataset": ds.name, "embedding": label}
        row |= {f"twin {k}": v for k, v in scoring.twin_transfer(ds, latents[a]).items()}
        if len(latents) == 2:  # where the method put modality 1's cells
            scores = scoring.evaluate(ds, latents, before=latents)
            row |= {k: scores[k] for k in KEYS if k in scores}
        out.append(row)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="a run.py --work-dir")
    parser.add_argument("--datasets", nargs="+", default=list(PAIRED))
    args = parser.parse_args(argv)
    table = pd.DataFrame(
        [row for name in args.datasets for row in rows(datasets.load(name), args.work_dir)]
    )
    means = table.groupby(["dataset", "embedding"], sort=False).mean().reset_index()
    print("| " + " | ".join(means.columns) + " |")
    print("|---" * len(means.columns) + "|")
    for _, row in means.iterrows():
        cells = [v if isinstance(v, str) else "" if np.isnan(v) else f"{v:.3f}" for v in row]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
