"""Data on disk (diagvi.stream): the backed reader gives the rows in-memory data give, the chunk
sampler visits every cell once per epoch and reads every chunk once, value checks stream with the
in-memory messages, training and inference run from backed files, and the synthetic generator
writes files that load."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hydra import compose, initialize_config_dir

from diagvi import DIAGVI, DataError, stream
from diagvi.data import ModalitySetup, PairedSampler, paired_loader, read_modalities, read_modality
from diagvi.datasets import load_h5ad
from diagvi.inference import knn_probabilities
from diagvi.outputs import paired_foscttm
from diagvi.stream import BackedMatrix, NpyWriter, chunk_shuffle
from diagvi.synthetic import SYNTHETIC_FILES, main, make_synthetic_pair
from diagvi.train import build_datamodule, build_model

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")
N_CELLS = 700


def dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small synthetic pair in memory and as .h5ad files (RNA CSR, protein dense)."""
    adatas, mapping = make_synthetic_pair(n_cells=N_CELLS, n_genes=60, n_proteins=12, seed=1)
    folder = tmp_path_factory.mktemp("pair")
    paths = {m: folder / f"{m}.h5ad" for m in adatas}
    for m, a in adatas.items():
        a.write_h5ad(paths[m])
    return adatas, mapping, paths


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows, buffers of 2 chunks: a few hundred cells span many chunks."""
    monkeypatch.setattr(stream, "CHUNK_ROWS", 64)
    monkeypatch.setattr(stream, "BUFFER_CHUNKS", 2)


# ---------------------------------------------------------------------------------------------
# the reader


@pytest.mark.parametrize("m", ["rna", "protein"])
def test_backed_rows_equal_in_memory_rows(pair, m):
    adatas, _, paths = pair
    memory = dense(read_modality(m, adatas[m], ModalitySetup()).X)
    X = BackedMatrix(paths[m], chunk_rows=64, buffer_chunks=2)
    assert X.is_sparse == (m == "rna")
    assert X.shape == memory.shape and X.n_chunks == math.ceil(N_CELLS / 64)
    idx = np.random.default_rng(0).permutation(N_CELLS)[:300]
    idx = np.concatenate([idx, idx[:5]])  # any order, repeats allowed
    rows = X.read(idx)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, memory[idx])
    np.testing.assert_array_equal(np.concatenate([dense(b) for _, b in X.chunks()]), memory)
    # views: of a row subset, of a mask, of a view
    keep = np.flatnonzero(np.arange(N_CELLS) % 3 != 0)
    view = X[keep]
    assert view.shape == (len(keep), memory.shape[1])
    np.testing.assert_array_equal(view.read(np.arange(len(keep))), memory[keep])
    mask = np.arange(N_CELLS) % 2 == 0
    np.testing.assert_array_equal(X[mask].read(np.arange(mask.sum())), memory[mask])
    np.testing.assert_array_equal(view[10:20].read(np.arange(10)), memory[keep[10:20]])
    scattered = np.array([650, 3, 3, 400, 0, 299, 300])  # unsorted, repeated, far apart
    np.testing.assert_array_equal(X[scattered].read(np.arange(7)), memory[scattered])
    np.testing.assert_array_equal(stream.row_sums(X), memory.sum(1))
    # a pickled copy (what a spawned worker gets) opens its own handle and reads the same
    clone = pickle.loads(pickle.dumps(X))
    np.testing.assert_array_equal(clone.read(idx), rows)


def test_read_modality_keeps_backed_matrix_on_disk(pair):
    _, _, paths = pair
    adata = ad.read_h5ad(paths["rna"], backed="r")
    d = read_modality("rna", adata, ModalitySetup())
    assert isinstance(d.X, BackedMatrix) and d.X.shape == adata.shape
    memory = read_modality("rna", ad.read_h5ad(paths["rna"]), ModalitySetup())
    idx = np.array([5, 3, 600, 64, 65])
    for key in ("x", "batch", "label"):
        torch.testing.assert_close(d.rows(idx)[key], memory.rows(idx)[key])
    # a view of a backed AnnData is materialised by anndata itself: read into memory
    assert not isinstance(read_modality("rna", adata[:50], ModalitySetup()).X, BackedMatrix)


def test_csc_on_disk_is_refused(tmp_path):
    adata = ad.AnnData(sp.random(20, 5, density=0.5, format="csc", dtype=np.float32, rng=0))
    adata.write_h5ad(tmp_path / "csc.h5ad")
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    with pytest.raises(DataError, match=r"modality 'rna': .*csc_matrix.*tocsr"):
        read_modality("rna", backed, ModalitySetup(likelihood="normal"))


@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_read_takes_masks_and_negative_rows_and_names_bad_ones(tmp_path, kind):
    x = np.random.default_rng(0).poisson(1.0, size=(23, 4)).astype(np.int64)
    ad.AnnData(sp.csr_matrix(x) if kind == "csr" else x).write_h5ad(tmp_path / "x.h5ad")
    X = BackedMatrix(tmp_path / "x.h5ad", chunk_rows=4, buffer_chunks=2)
    mask = np.arange(23) % 3 == 0
    np.testing.assert_array_equal(X.read(mask), x[mask])  # a mask, as x[mask]: not rows 0 and 1
    np.testing.assert_array_equal(X.read(np.array([-1, -23, 5])), x[[-1, -23, 5]])
    for bad in ([23], [-24], [3, 40]):  # past the last partial chunk, or before the first row
        with pytest.raises(IndexError, match=r"out of range for 23 rows"):
            X.read(np.array(bad))
    with pytest.raises(IndexError, match="integers or a boolean mask"):
        X.read(np.array([1.5]))
    with pytest.raises(IndexError, match="mask of 5 values for 23 rows"):
        X.read(np.ones(5, dtype=bool))


def test_reads_each_chunk_once_whatever_the_chunk_order(tmp_path, monkeypatch):
    x = sp.random(1000, 3, density=0.5, format="csr", dtype=np.float32, rng=0)
    ad.AnnData(x).write_h5ad(tmp_path / "x.h5ad")
    reads = []
    original = BackedMatrix._read_span
    monkeypatch.setattr(
        BackedMatrix, "_read_span", lambda self, lo, hi: reads.append(lo) or original(self, lo, hi)
    )
    for seed in range(5):
        X = BackedMatrix(tmp_path / "x.h5ad", chunk_rows=50, buffer_chunks=2)
        order = chunk_shuffle(np.arange(1000), 50, 2, np.random.default_rng(seed))
        reads.clear()
        rows = np.concatenate([X.read(order[s : s + 64]) for s in range(0, 1000, 64)])
        np.testing.assert_array_equal(rows, x[order].toarray())
        assert sorted(reads) == list(range(0, 1000, 50)), seed  # minibatches span two buffers


def test_empty_backed_matrix_has_empty_row_sums(pair):
    _, _, paths = pair
    X = BackedMatrix(paths["rna"], chunk_rows=64)[np.arange(0)]
    assert X.shape == (0, 60) and X.read(np.arange(0)).shape == (0, 60)
    assert stream.row_sums(X).shape == (0,)


def test_open_refuses_a_view_and_in_memory_data(pair):
    _, _, paths = pair
    adata = ad.read_h5ad(paths["rna"], backed="r")
    assert BackedMatrix.open(adata).shape == adata.shape
    with pytest.raises(ValueError, match="a view of a backed AnnData"):
        BackedMatrix.open(adata[:50, :10])  # would read all 700 cells and 60 genes
    with pytest.raises(ValueError, match="not opened with backed='r'"):
        BackedMatrix.open(ad.read_h5ad(paths["rna"]))
    with pytest.raises(DataError, match=r"rna\.h5ad: no element 'layers/counts' in the file"):
        BackedMatrix.open(adata, "counts")


def test_each_chunk_is_read_once_per_epoch(pair, small_chunks, monkeypatch):
    _, _, paths = pair
    d = read_modality("rna", ad.read_h5ad(paths["rna"], backed="r"), ModalitySetup())
    reads = []
    original = BackedMatrix._read_span
    monkeypatch.setattr(
        BackedMatrix, "_read_span", lambda self, lo, hi: reads.append(lo) or original(self, lo, hi)
    )
    idx = {"rna": np.arange(N_CELLS), "protein": np.arange(N_CELLS)}
    sampler = PairedSampler(idx, batch_size=50, seed=0, chunks={"rna": (64, 2)})
    seen = [d.rows(batch["rna"])["x"] for batch in sampler]
    assert sum(len(x) for x in seen) == N_CELLS
    assert sorted(reads) == list(range(0, N_CELLS, 64))  # every chunk once, and only once


# ---------------------------------------------------------------------------------------------
# the chunk-level shuffle


def buffers_of(order: np.ndarray, chunk_rows: int, buffer_chunks: int) -> list[set]:
    """Split an order into runs of cells from at most ``buffer_chunks`` chunks (greedy)."""
    runs, current = [], set()
    for c in order // chunk_rows:
        if c not in current and len(current) == buffer_chunks:
            runs.append(current)
            current = set()
        current.add(int(c))
    return [*runs, current]


def test_chunk_shuffle_visits_chunks_in_buffers():
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(1000, size=800, replace=False))  # e.g. the training cells
    order = chunk_shuffle(idx, 50, 3, np.random.default_rng(1))
    np.testing.assert_array_equal(np.sort(order), idx)  # every cell exactly once
    runs = buffers_of(order, 50, 3)
    assert len(runs) == math.ceil(20 / 3)  # 20 chunks, 3 per buffer
    assert sum(len(r) for r in runs) == 20  # no chunk comes back in a later buffer
    assert [sorted(r) for r in runs] != [list(range(i, min(i + 3, 20))) for i in range(0, 20, 3)]
    first = order[order // 50 == order[0] // 50]
    assert not np.array_equal(first, np.sort(first))  # cells are mixed within a buffer
    np.testing.assert_array_equal(chunk_shuffle(idx, 50, 3, np.random.default_rng(1)), order)


def epoch(sampler: PairedSampler, epoch_no: int) -> list[dict[str, np.ndarray]]:
    sampler.set_epoch(epoch_no)
    return list(sampler)


def test_chunked_sampler_epochs_are_complete_seeded_and_differ():
    idx = {"rna": np.arange(1000), "protein": np.arange(400) + 10}
    chunks = {"rna": (64, 2), "protein": (32, 2)}
    sampler = PairedSampler(idx, batch_size=64, seed=3, chunks=chunks)
    e0, e1 = epoch(sampler, 0), epoch(sampler, 1)
    lead = np.concatenate([b["rna"] for b in e0])
    np.testing.assert_array_equal(np.sort(lead), idx["rna"])  # each cell once per epoch
    assert len(buffers_of(lead, 64, 2)) == math.ceil(16 / 2)
    protein = np.concatenate([b["protein"] for b in e0])
    np.testing.assert_array_equal(np.sort(protein[:400]), idx["protein"])  # one full pass first
    again = PairedSampler(idx, batch_size=64, seed=3, chunks=chunks)
    for k in idx:
        np.testing.assert_array_equal(
            np.concatenate([b[k] for b in epoch(again, 0)]), np.concatenate([b[k] for b in e0])
        )
        assert not np.array_equal(
            np.concatenate([b[k] for b in e1]), np.concatenate([b[k] for b in e0])
        )
    other = PairedSampler(idx, batch_size=64, seed=4, chunks=chunks)
    assert not np.array_equal(epoch(other, 0)[0]["rna"], e0[0]["rna"])
    # validation order: natural, not chunk-shuffled
    plain = list(PairedSampler(idx, batch_size=64, shuffle=False, chunks=chunks))
    np.testing.assert_array_equal(np.concatenate([b["rna"] for b in plain]), idx["rna"])


@pytest.mark.parametrize("world", [2, 3])
def test_chunked_sampler_shards_across_ranks(world):
    idx = {"rna": np.arange(1000), "protein": np.arange(1000)}
    chunks = {"rna": (64, 2), "protein": (64, 2)}
    whole = epoch(PairedSampler(idx, batch_size=50, seed=0, chunks=chunks), 2)
    ranks = [
        epoch(PairedSampler(idx, 50, seed=0, num_replicas=world, rank=r, chunks=chunks), 2)
        for r in range(world)
    ]
    assert {len(r) for r in ranks} == {math.ceil(len(whole) / world)}
    for r, batches in enumerate(ranks):
        for i, batch in enumerate(batches[: len(whole[r::world])]):
            np.testing.assert_array_equal(batch["rna"], whole[r::world][i]["rna"])
    cells = np.concatenate([b["rna"] for batches in ranks for b in batches])
    assert set(cells) == set(idx["rna"])  # all cells, each rank a disjoint share (+ padding)
    assert len(cells) - len(idx["rna"]) < world * 50


# ---------------------------------------------------------------------------------------------
# value checks stream over chunks, with the in-memory messages


def bad_matrix(case: str) -> tuple[np.ndarray, str]:
    x = np.random.default_rng(0).poisson(2.0, size=(40, 6)).astype(np.float64)
    likelihood = "nb"
    if case == "nan":
        x[[3, 25, 39], [1, 2, 0]] = np.nan
    elif case == "negative":
        x[[7, 30], 4] = -2
    elif case == "non-integer":
        x[[9, 10, 33], 1] = 2.5
    elif case == "log1pnormal-range":
        x[[2, 35], 3], likelihood = -1.0, "log1pnormal"
    elif case == "negative-then-nan":  # NaN is reported first, as in memory
        x[1, 1], x[38, 5] = -3, np.nan
    elif case == "overflow":  # float64 beyond float32: inf in the float32 copy
        x[20, 2] = 1e300
    return x, likelihood


CASES = ["nan", "negative", "non-integer", "log1pnormal-range", "negative-then-nan", "overflow"]


@pytest.mark.parametrize("kind", ["csr", "dense"])
@pytest.mark.parametrize("case", CASES)
def test_backed_value_checks_raise_the_in_memory_error(tmp_path, monkeypatch, case, kind):
    monkeypatch.setattr(stream, "CHUNK_ROWS", 4)  # bad values in several chunks
    x, likelihood = bad_matrix(case)
    matrix = sp.csr_matrix(x) if kind == "csr" else x
    obs = pd.DataFrame(index=[f"c{i}" for i in range(len(x))])
    adata = ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=[f"f{j}" for j in range(6)]))
    adata.write_h5ad(tmp_path / "bad.h5ad")
    setup = ModalitySetup(likelihood=likelihood)
    with pytest.raises(DataError) as memory:
        read_modality("rna", adata, setup)
    with pytest.raises(DataError) as disk:
        read_modality("rna", ad.read_h5ad(tmp_path / "bad.h5ad", backed="r"), setup)
    assert str(disk.value) == str(memory.value)
    assert "at cell 'c" in str(disk.value)


@pytest.mark.parametrize("empty", ["warn", "drop"])
def test_backed_empty_cells_and_features_as_in_memory(tmp_path, monkeypatch, empty):
    monkeypatch.setattr(stream, "CHUNK_ROWS", 8)
    x = np.random.default_rng(0).poisson(1.0, size=(30, 5)).astype(np.float32) + 1
    x[[4, 17], :] = 0  # all-zero cells
    x[:, 3] = 0  # an all-zero feature
    matrix = sp.csr_matrix(x)
    matrix.data[matrix.indptr[9] : matrix.indptr[10]] = 0  # cell 9 stores explicit zeros only
    adatas = {
        m: ad.AnnData(matrix.copy(), obs=pd.DataFrame(index=[f"{m}{i}" for i in range(30)]))
        for m in ("rna", "protein")
    }
    for m, a in adatas.items():
        a.write_h5ad(tmp_path / f"{m}.h5ad")
    setups = {m: ModalitySetup(empty=empty) for m in adatas}
    with warnings.catch_warnings(record=True) as in_memory:
        warnings.simplefilter("always")
        memory, _ = read_modalities(adatas, setups)
    backed = {m: ad.read_h5ad(tmp_path / f"{m}.h5ad", backed="r") for m in adatas}
    with warnings.catch_warnings(record=True) as on_disk:
        warnings.simplefilter("always")
        disk, _ = read_modalities(backed, setups)
    assert [str(w.message) for w in on_disk] == [str(w.message) for w in in_memory]
    assert "3 all-zero cell(s)" in str(on_disk[0].message)
    assert isinstance(disk["rna"].X, BackedMatrix)
    assert disk["rna"].n_obs == memory["rna"].n_obs == (27 if empty == "drop" else 30)
    all_cells = np.arange(disk["rna"].n_obs)
    np.testing.assert_array_equal(
        disk["rna"].rows(all_cells)["x"], memory["rna"].rows(all_cells)["x"]
    )
    assert list(disk["rna"].obs_names) == list(memory["rna"].obs_names)


# ---------------------------------------------------------------------------------------------
# loading, training and inference from disk


def test_load_h5ad_opens_backed_above_the_limit(pair):
    _, _, paths = pair
    for backed, limit, expected in [
        (True, 100.0, True),
        (False, 0.0, False),
        ("auto", 0.0, True),
        ("auto", 100.0, False),
    ]:
        adatas, _ = load_h5ad(paths, backed=backed, backed_limit_gb=limit)
        assert {a.isbacked for a in adatas.values()} == {expected}, (backed, limit)
    with pytest.raises(ValueError, match="backed must be"):
        load_h5ad(paths, backed="yes")


def test_train_from_backed_h5ad_with_hydra_config(pair, small_chunks):
    _, mapping, paths = pair
    mapping_path = paths["rna"].parent / "mapping.csv"
    mapping.to_csv(mapping_path, index=False)
    overrides = [
        "data=h5ad",
        f"data.load.paths.rna={paths['rna']}",
        f"data.load.paths.protein={paths['protein']}",
        f"data.mapping_path={mapping_path}",
        "data.backed_limit_gb=0",  # auto: these small files are "large"
        "data.batch_size=64",
        "logger=none",
        "callbacks=none",
    ]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.data.load.backed == "auto" and cfg.data.load.backed_limit_gb == 0
    L.seed_everything(0)
    dm, spec, adatas = build_datamodule(cfg)
    assert all(a.isbacked for a in adatas.values())
    assert all(isinstance(d.X, BackedMatrix) for d in dm.data.values())
    lit = build_model(cfg.model, spec)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, datamodule=dm)
    assert trainer.global_step == 4
    for key in ("train/loss", "val/loss"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key


def test_worker_process_reads_the_same_batches(pair, small_chunks):
    _, _, paths = pair
    backed, _ = load_h5ad(paths, backed=True)
    data, _ = read_modalities(backed, {m: ModalitySetup() for m in backed})
    idx = {m: np.arange(N_CELLS) for m in data}
    main_process = list(paired_loader(data, idx, 128, True, seed=1, num_workers=0))
    worker = list(paired_loader(data, idx, 128, True, seed=1, num_workers=1))
    assert len(main_process) == len(worker) == math.ceil(N_CELLS / 128)
    for a, b in zip(main_process, worker, strict=True):
        for m in data:
            torch.testing.assert_close(a[m]["x"], b[m]["x"])


@pytest.fixture(scope="module")
def trained(pair):
    """A model trained one epoch from the backed files."""
    _, mapping, paths = pair
    backed, _ = load_h5ad(paths, backed=True)
    DIAGVI.setup_anndata(backed["rna"], labels_key="cell_type")
    DIAGVI.setup_anndata(backed["protein"])
    model = DIAGVI(backed, mapping_df=mapping, n_latent=8, n_hidden=32)
    model.train(max_epochs=1, batch_size=128, accelerator="cpu", early_stopping=False)
    return model


def test_streaming_inference_equals_in_memory_inference(pair, trained, tmp_path):
    adatas, _, paths = pair
    model = trained
    assert all(isinstance(d.X, BackedMatrix) for d in model.data.values())
    assert model.history is not None and np.isfinite(model.history["train/loss"]).all()
    backed, _ = load_h5ad(paths, backed=True)
    memory = {m: a.copy() for m, a in adatas.items()}
    z_memory = model.get_latent_representation(memory)
    z_disk = model.get_latent_representation(backed, out_dir=tmp_path)
    for m in adatas:
        assert isinstance(z_disk[m], np.memmap) and not z_disk[m].flags.writeable
        assert Path(z_disk[m].filename) == tmp_path / f"latent_{m}.npy"
        np.testing.assert_array_equal(z_disk[m], z_memory[m])
        np.testing.assert_array_equal(model.get_latent_representation()[m], z_memory[m])
    imputed = model.get_imputed_values("rna", memory["rna"])
    streamed = model.get_imputed_values("rna", backed["rna"], out=tmp_path / "imputed.npy")
    assert streamed.shape == (N_CELLS, 12)
    np.testing.assert_array_equal(streamed, imputed)
    # default library size: the median of the target's training cells, summed chunk by chunk
    library = float(np.median(adatas["protein"].X.sum(1)))
    np.testing.assert_array_equal(
        model.get_imputed_values("rna"), model.get_imputed_values("rna", target_libsize=library)
    )
    for method in ("classifier", "knn"):
        result = model.predict_celltype("rna", "protein", method=method)
        assert result["probabilities"].shape == (N_CELLS, 4)
        np.testing.assert_allclose(result["probabilities"].sum(1), 1.0, rtol=1e-6)


def test_knn_probabilities_bounded_blocks_same_result(monkeypatch):
    rng = np.random.default_rng(0)
    reference, query = rng.normal(size=(300, 4)), rng.normal(size=(90, 4))
    labels = rng.integers(3, size=300)
    expected = knn_probabilities(reference, labels, query, 3, k=7, chunk=1024)
    monkeypatch.setattr("diagvi.inference.KNN_BLOCK_ENTRIES", 300 * 8)  # 8 query rows a block
    np.testing.assert_array_equal(knn_probabilities(reference, labels, query, 3, k=7), expected)


def test_paired_foscttm_subsamples_beyond_max_cells(pair):
    adatas, _, _ = pair
    data, _ = read_modalities(adatas, {m: ModalitySetup() for m in adatas})
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N_CELLS, 3))
    latents = {"rna": z, "protein": z + 0.1 * rng.normal(size=z.shape)}
    full = paired_foscttm(latents, data, max_cells=None)
    assert "foscttm_cells" not in full and full == paired_foscttm(latents, data)
    part = paired_foscttm(latents, data, max_cells=200)
    assert part["foscttm_cells"] == 200
    assert part["foscttm"] == pytest.approx(full["foscttm"], abs=0.05)


def test_npy_writer_writes_blocks_and_checks_the_row_count(tmp_path):
    writer = NpyWriter(tmp_path / "out.npy", 5)
    writer.write(np.ones((2, 3), np.float32))
    writer.write(np.zeros((3, 3), np.float32))
    result = writer.result()
    np.testing.assert_array_equal(result, np.r_[np.ones((2, 3)), np.zeros((3, 3))])
    assert result.dtype == np.float32
    short = NpyWriter(tmp_path / "short.npy", 5)
    short.write(np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="wrote 2 rows of 5"):
        short.result()


# ---------------------------------------------------------------------------------------------
# the generator


def test_generator_cli_writes_a_paired_labelled_pair(tmp_path):
    argv = ["--n-cells", "500", "--n-genes", "300", "--n-proteins", "10", "--chunk-size", "128"]
    paths = main([*argv, "--out", str(tmp_path / "a")])
    assert {p.name for p in paths.values()} == set(SYNTHETIC_FILES.values())
    rna, protein = ad.read_h5ad(paths["rna"]), ad.read_h5ad(paths["protein"])
    assert rna.shape == (500, 300) and protein.shape == (500, 10)
    assert sp.isspmatrix_csr(rna.X) and isinstance(protein.X, np.ndarray)
    assert list(rna.obs_names) == list(protein.obs_names)
    assert rna.obs["cell_type"].equals(protein.obs["cell_type"])
    assert rna.obs["cell_type"].dtype == "category" and rna.obs["cell_type"].nunique() > 4
    for x in (rna.X.data, protein.X):
        assert (x >= 0).all() and (np.mod(x, 1) == 0).all()  # counts
    assert 0.05 < rna.X.nnz / (500 * 300) < 0.5  # sparse, as scRNA-seq is
    mapping = pd.read_csv(paths["mapping"])
    assert list(mapping.columns) == ["protein", "rna"]
    assert set(mapping["protein"]) == set(protein.var_names)
    assert set(mapping["rna"]) <= set(rna.var_names)
    # the files train from disk (the checks pass) and the same arguments give the same data
    backed, _ = load_h5ad({m: paths[m] for m in ("rna", "protein")}, backed=True)
    data, _ = read_modalities(backed, {m: ModalitySetup() for m in backed})
    np.testing.assert_array_equal(data["rna"].rows(np.arange(500))["x"], rna.X.toarray())
    again = main([*argv, "--out", str(tmp_path / "b")])
    assert (ad.read_h5ad(again["rna"]).X != rna.X).nnz == 0
    np.testing.assert_array_equal(ad.read_h5ad(again["protein"]).X, protein.X)
    assert not list(tmp_path.glob("a/.*"))  # no temporary file left


def test_encoder_pcs_fitted_from_disk_equal_those_fitted_in_memory(pair, small_chunks):
    adatas, mapping, paths = pair
    backed, _ = load_h5ad(paths, backed=True)
    memory = {m: a.copy() for m, a in adatas.items()}
    models = []
    for group in (backed, memory):
        DIAGVI.setup_anndata(group["rna"], encoder_pcs=10)
        DIAGVI.setup_anndata(group["protein"])
        models.append(DIAGVI(group, mapping_df=mapping, n_latent=8, n_hidden=32, seed=0))
    on_disk, in_memory = (m.module.pcs["rna"] for m in models)
    assert isinstance(models[0].data["rna"].X, BackedMatrix)
    torch.testing.assert_close(on_disk.components, in_memory.components)
    torch.testing.assert_close(on_disk.offset, in_memory.offset)
    z_disk = models[0].get_latent_representation()["rna"]
    np.testing.assert_allclose(z_disk, models[1].get_latent_representation()["rna"], atol=1e-5)
