"""Pure helpers of experiments/benchmark (the benchmark itself is not part of the suite)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from experiments.benchmark import baselines, datasets, scoring

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")


def test_log_normalise_and_zscore():
    x = np.array([[1.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(
        baselines.log_normalise(x), [[np.log1p(2500), np.log1p(7500)], [0, 0]]
    )
    z = baselines.zscore(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_allclose(z, [[-1, 0], [1, 0]])


def test_linked_matrices_group_by_the_smaller_side():
    counts = {"rna": np.array([[1.0, 2.0, 7.0], [4.0, 0.0, 6.0]]), "protein": np.eye(2) + 1}
    var = {"rna": pd.Index(["CD8A", "CD8B", "X"]), "protein": pd.Index(["CD8", "Y"])}
    mapping = pd.DataFrame({"rna": ["CD8A", "CD8B"], "protein": ["CD8", "CD8"]})
    a, b, keys = baselines.linked_matrices(counts, var, mapping)
    assert keys == ["CD8"] and a.shape == b.shape == (2, 1)
    # rna column: CD8A + CD8B over the cell's total (10 for both cells), log1p, z-score
    raw = np.log1p(np.array([3.0, 4.0]) / 10 * 1e4)
    np.testing.assert_allclose(a[:, 0], (raw - raw.mean()) / raw.std())


def test_joint_pca_reproduces_the_demo_baseline():
    from diagvi.datasets import load_demo
    from experiments.demo_data import baseline_foscttm as demo

    rna_z, prot_z, proteins = demo.linked_feature_matrices()
    adatas, mapping = load_demo()
    counts = {m: baselines.dense(a.X) for m, a in adatas.items()}
    var = {m: a.var_names for m, a in adatas.items()}
    a, b, keys = baselines.linked_matrices(counts, var, mapping)
    assert keys == proteins
    np.testing.assert_allclose(a, rna_z, atol=1e-3)  # the demo script is float32
    np.testing.assert_allclose(b, prot_z, atol=1e-3)
    emb = baselines.joint_pca(counts, var, mapping, n_comps=10)
    expected = demo.joint_pca(rna_z, prot_z, 10)
    # principal axes are defined up to sign
    signs = np.sign((emb["rna"] * expected[0]).sum(0))
    np.testing.assert_allclose(emb["rna"] * signs, expected[0], atol=1e-2)
    np.testing.assert_allclose(emb["protein"] * signs, expected[1], atol=1e-2)


def test_knn_impute_averages_nearest_targets():
    z_target = np.array([[0.0], [1.0], [10.0]])
    values = np.array([[2.0], [4.0], [100.0]])
    out = baselines.knn_impute(np.array([[0.4], [9.0]]), z_target, values, k=2)
    np.testing.assert_allclose(out, [[3.0], [52.0]])


def test_gate_labels():
    # CD3, CD4, CD8, CD19, CD56, CD14 high in turn; a flat cell; CD3 with CD14 or CD19
    # background (a T cell, neither a monocyte nor a B cell)
    proteins = ["CD3", "CD4", "CD8", "CD19", "CD56", "CD14"]
    base = np.full(6, 5.0)
    cells = [[100, 100, 5, 5, 5, 5], [100, 5, 100, 5, 5, 5], [5, 5, 5, 100, 5, 5]]
    cells += [[5, 5, 5, 5, 100, 5], [5, 5, 5, 5, 5, 100], base]
    cells += [[100, 5, 5, 5, 5, 100], [100, 5, 5, 100, 5, 5]]
    labels = datasets.gate_labels(np.array(cells * 3, dtype=float), proteins)
    expected = ["CD4 T", "CD8 T", "B", "NK", "Monocyte"] + [datasets.OTHER] * 3
    assert labels[:8].tolist() == expected


def _toy(rng, n=60) -> datasets.BenchData:
    labels = np.repeat(["x", "y", "z"], n // 3)
    counts = rng.poisson(3, size=(n, 5)).astype(np.float32)
    adatas = {}
    for m in ("a", "b"):
        adata = ad.AnnData(counts.copy(), obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
        adata.var_names = [f"g{j}" for j in range(5)]
        adata.layers["counts"] = adata.X.copy()
        adatas[m] = adata
    return datasets.BenchData(
        name="toy",
        adatas=adatas,
        mapping=pd.DataFrame({"a": ["g0", "g1"], "b": ["g0", "g1"]}),
        labels={"a": labels, "b": labels},
        pairs=np.stack([np.arange(n), np.arange(n)], 1),
        missing_type="z",
        impute=("a", "b", ["g2", "g3", "g4"]),
    )


def test_likelihoods_default_to_nb():
    ds = _toy(np.random.default_rng(0))
    assert [ds.likelihood(m) for m in ds.modalities] == ["nb", "nb"]
    ds.likelihoods = {"b": "log1pnormal"}
    assert [ds.likelihood(m) for m in ds.modalities] == ["nb", "log1pnormal"]


def test_evaluate_perfect_embedding():
    rng = np.random.default_rng(0)
    ds = _toy(rng)
    labels = ds.labels["a"]
    centres = {"x": 0.0, "y": 10.0, "z": 20.0}
    z = np.array([[centres[c], 0.0] for c in labels]) + 0.1 * rng.normal(size=(len(labels), 2))
    latents = {"a": z, "b": z.copy()}
    before = {m: z for m in ("a", "b")}
    counts = ds.adatas["b"].layers["counts"]
    out = scoring.evaluate(ds, latents, before, imputed=counts * 3.0)
    assert out["foscttm"] == 0.0
    assert out["transfer_accuracy"] == 1.0 and out["transfer_macro_f1"] == 1.0
    assert out["unshared_transfer"] == pytest.approx(1 / 3)  # b still holds "z" here
    assert out["nc_mean"] == 1.0 and out["graph_connectivity"] == 1.0
    assert out["celltype_asw"] > 0.9 and out["mixing_entropy"] > 0.9
    assert out["impute_pearson"] == pytest.approx(1.0)
    assert "classifier_accuracy" not in out  # no classifier output given
    below = np.array(counts, dtype=float) * 3.0
    below[::7, 2] = -0.5  # a log1pnormal mean in (-1, 0) scores as a zero count
    zeroed = np.clip(below, 0, None)
    scored_below = scoring.evaluate(ds, latents, before, imputed=below)["impute_pearson"]
    assert np.isfinite(scored_below)
    assert scored_below == scoring.evaluate(ds, latents, before, imputed=zeroed)["impute_pearson"]
    assert set(out) <= set(scoring.METRICS)
    predicted = np.asarray(labels).copy()
    predicted[:3] = "wrong"
    scored = scoring.evaluate(ds, latents, before, predicted=predicted)
    assert scored["classifier_accuracy"] == pytest.approx(1 - 3 / len(labels))


@needs_shared
def test_gene_split_is_consistent():
    ds = datasets.load_gene_split()
    a, b = ds.adatas["a"], ds.adatas["b"]
    assert ds.missing_type not in set(ds.labels["b"])
    assert ds.missing_type in set(ds.labels["a"])
    np.testing.assert_array_equal(a.obs_names[ds.pairs[:, 0]], b.obs_names[ds.pairs[:, 1]])
    assert set(ds.mapping["a"]) == set(a.var_names) & set(b.var_names)
    assert not set(ds.impute[2]) & set(a.var_names)
    assert "cell_type" in a.obs and "cell_type" not in b.obs  # the model sees a's labels only


def test_twin_transfer_scores_the_reference_neighbourhoods():
    rng = np.random.default_rng(1)
    ds = _toy(rng)
    labels = ds.labels["a"]
    centres = {"x": 0.0, "y": 10.0, "z": 20.0}
    separated = np.array([[centres[c], 0.0] for c in labels]) + 0.1 * rng.normal(size=(60, 2))
    ds.labels["b"] = np.where(labels == "z", "y", labels)  # b's "z" cells are really "y"
    out = scoring.twin_transfer(ds, separated)
    # every z twin votes z: exactly the relabelled cells leak, and only they are wrong
    assert out["unshared_transfer"] == pytest.approx(np.mean(labels == "z"))
    assert out["transfer_accuracy"] == pytest.approx(1 - np.mean(labels == "z"))
    ds.labels["b"] = labels
    mixed = rng.normal(size=(60, 2))  # no structure: the types cannot be told apart
    assert scoring.twin_transfer(ds, mixed)["transfer_accuracy"] < 0.8
    ds.pairs = None
    with pytest.raises(ValueError, match="no pairing"):
        scoring.twin_transfer(ds, separated)


def test_rescore_reads_a_runs_outputs_and_refuses_other_settings(tmp_path):
    from experiments.benchmark import run
    from experiments.benchmark.runner_io import write_outputs

    config = {"modalities": ("a", "b"), "seed": 1, "init": {}, "train": {"lam_link": 150.0}}
    out = tmp_path / "genesplit" / "diagvi_seed1"
    latents = {"a": np.ones((3, 2)), "b": np.zeros((4, 2))}
    write_outputs(out, latents, None, 2.0, 4, 100.0, "diagvi", predicted=np.array(["x"] * 4))
    (out / "config.json").write_text(run.json.dumps(config))
    stats, read, outputs = run.read_outputs(out, config)
    assert stats["seconds_per_epoch"] == 0.5
    for m, z in latents.items():
        np.testing.assert_array_equal(read[m], z)
    assert set(outputs) == {"predicted"} and list(outputs["predicted"]) == ["x"] * 4
    with pytest.raises(RuntimeError, match="other settings"):
        run.read_outputs(out, {**config, "train": {}})
    assert run.parse_args(["--ref-python", "x", "--rescore"]).rescore


def test_peak_rss_is_the_runners_own_not_its_parents():
    # a parent holding 300 MB, as run.py does after loading a large dataset: Linux carries
    # ru_maxrss across fork and exec, so a child read it as its own peak
    import subprocess
    import sys

    held = np.ones(300 * 2**20 // 8)  # touched: resident
    code = (
        "import sys; sys.path.insert(0, 'experiments/benchmark'); import numpy as np; "
        "from runner_io import peak_rss_mb; "
        "before = peak_rss_mb(); grown = np.ones(100 * 2**20 // 8); "
        "print(before, peak_rss_mb())"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    before, after = map(float, out.stdout.split())
    assert held.sum() > 0  # still held while the child ran
    assert before < 250  # the child's imports (anndata, pandas), not the parent's 300 MB
    assert after - before > 90  # the child's own 100 MB array shows
