"""The graph encoder's starting node features, and what their scale does to the decoders."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch_geometric.data import Data

from diagvi import DIAGVI
from diagvi.components.graph_encoders import GCNGraphEncoder
from diagvi.synthetic import make_synthetic_pair

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_LINKED = 8  # proteins of the synthetic pair below: genes 0-7 are linked, the rest are not


def _graph(n: int) -> Data:
    loops = torch.arange(n).repeat(2, 1)
    return Data(edge_index=loops, edge_weight=torch.ones(n), edge_sign=torch.ones(n), num_nodes=n)


def test_init_scale_sets_the_node_features_spread():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        default = GCNGraphEncoder(_graph(400), 8)
        wide = GCNGraphEncoder(_graph(400), 8, init_scale=1.0)
    assert float(default.embedding.detach().std()) == pytest.approx(0.01, rel=0.05)
    assert float(wide.embedding.detach().std()) == pytest.approx(1.0, rel=0.05)
    for bad in (0.0, -0.1, float("nan"), float("inf"), True, "0.01", None):
        with pytest.raises(ValueError, match="init_scale must be a positive finite number"):
            GCNGraphEncoder(_graph(3), 4, init_scale=bad)


def test_the_config_starts_as_the_class_does():
    cfg = OmegaConf.load(CONFIGS / "model" / "graph_encoder" / "gcn.yaml")
    defaults = inspect.signature(GCNGraphEncoder).parameters
    assert cfg.init_scale == defaults["init_scale"].default
    for key, value in cfg.items():
        if not key.startswith("_"):
            assert defaults[key].default == value, key


def test_a_saved_model_keeps_its_trained_embeddings(tmp_path):
    # the start is only a start: loading builds the encoder at the default scale, then the
    # saved weights replace it
    adatas, mapping = make_synthetic_pair(n_cells=40, n_genes=12, n_proteins=4)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4, graph_encoder_kwargs={"init_scale": 0.5})
    model.save(tmp_path / "model")
    loaded = DIAGVI.load(tmp_path / "model", adatas)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module.g2v().loc, model.module.g2v().loc)
    assert float(loaded.module.g2v.embedding.detach().std()) > 0.3


def _unlinked_decoder_fit(init_scale: float) -> float:
    """Mean correlation over the RNA's cells between each unlinked gene's decoder term ``z v_j``
    and its encoder input, after a short training."""
    adatas, mapping = make_synthetic_pair(n_cells=300, n_genes=30, n_proteins=N_LINKED, seed=3)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    model = DIAGVI(
        adatas,
        mapping_df=mapping,
        n_latent=6,
        seed=0,
        graph_encoder_kwargs={"init_scale": init_scale},
    )
    model.train(max_epochs=20, batch_size=64, accelerator="cpu", early_stopping=False, seed=0)
    module = model.module
    z = model.get_latent_representation()["rna"]
    with torch.no_grad():
        x = torch.as_tensor(adatas["rna"].X.toarray(), dtype=torch.float32)
        measured = module.transform("rna", x).numpy()
        v = module.feature_embedding("rna", module.g2v().loc).numpy()
    predicted = z @ v.T
    p, m = predicted - predicted.mean(0), measured - measured.mean(0)
    corr = (p * m).sum(0) / np.sqrt((p * p).sum(0) * (m * m).sum(0))
    return float(corr[N_LINKED:].mean())


def test_small_starting_features_let_unlinked_features_decode():
    # sixteenth round of experiments/alignment_defaults: from unit-scale random node features
    # the embeddings of features without a cross-modal edge stay near their random start (Adam
    # moves each parameter by about the learning rate per step), so their decoders read
    # little of the latent; from the default's small start they follow the data
    small, wide = _unlinked_decoder_fit(0.01), _unlinked_decoder_fit(1.0)
    assert small > 0.5, small
    assert small > wide + 0.2, (small, wide)
