"""Audit of the graph encoder maths, the synthetic generator's arguments and the registries."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Data

from diagvi.components.graph_encoders import GCNGraphEncoder, graph_loss, signed_gcn_norm
from diagvi.registry import Registry
from diagvi.synthetic import main, make_synthetic_pair, write_synthetic_pair

# ----------------------------------------------------------------------------- graph encoders


def test_signed_gcn_norm_zero_degree_gives_zero_not_nan():
    # node 2's only outgoing edge has weight 0; node 3 has an incoming edge only
    edge_index = torch.tensor([[0, 0, 1, 2, 0], [0, 1, 0, 1, 3]])
    weight = torch.tensor([1.0, 0.5, 0.5, 0.0, 0.5])
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    norm = signed_gcn_norm(edge_index, weight, sign, 5)  # node 4 isolated
    assert torch.isfinite(norm).all()
    assert norm[3] == 0 and norm[4] == 0
    d0, d1 = 2.0, 0.5  # the edges between positive-degree nodes keep their value
    expected = torch.tensor([1.0 / d0, -0.5 / (d0 * d1) ** 0.5, -0.5 / (d1 * d0) ** 0.5])
    torch.testing.assert_close(norm[:3], expected)


@pytest.mark.parametrize(
    ("v_dtype", "w_dtype"), [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_graph_loss_mixed_float_dtypes(v_dtype, w_dtype):
    torch.manual_seed(0)
    v = torch.randn(5, 3, dtype=torch.float64)
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    w, s = torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64), torch.ones(4)
    ref = graph_loss(v, edge_index, w, s, 4, torch.Generator().manual_seed(0))
    out = graph_loss(
        v.to(v_dtype), edge_index, w.to(w_dtype), s, 4, torch.Generator().manual_seed(0)
    )
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


def test_gcn_encoder_loss_after_double():
    # trainer precision 64 (model.double()) makes the weight buffers float64 while the
    # encoder's distribution stays float32
    graph = Data(
        edge_index=torch.tensor([[0, 0, 1, 1, 2], [0, 1, 0, 1, 2]]),
        edge_weight=torch.ones(5),
        edge_sign=torch.ones(5),
        num_nodes=3,
    )
    torch.manual_seed(0)
    enc = GCNGraphEncoder(graph, 4).double()
    qv = enc()
    terms = enc.loss(qv, qv.rsample())
    assert all(torch.isfinite(t) for t in terms.values())


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_genes": 5, "n_proteins": 8}, ValueError, "n_proteins .* must not exceed n_genes"),
        ({"n_cells": -1}, ValueError, "n_cells must be at least 0"),
        ({"n_types": 0}, ValueError, "n_types must be at least 1"),
        ({"n_proteins": 0}, ValueError, "n_proteins must be at least 1"),
        ({"n_cells": 10.0}, TypeError, "n_cells must be an integer"),
    ],
)
def test_make_synthetic_pair_rejects_bad_sizes(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_synthetic_pair(**{"n_cells": 10, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": -5}, "chunk_size must be at least 1"),  # wrote an all-zero pair
        ({"chunk_size": 0}, "chunk_size must be at least 1"),
        ({"n_cells": 0}, "n_cells must be at least 1"),
        ({"n_genes": 5, "n_proteins": 8}, "must not exceed n_genes"),
    ],
)
def test_write_synthetic_pair_rejects_bad_sizes_before_writing(tmp_path, kwargs, match):
    out = tmp_path / "pair"
    with pytest.raises(ValueError, match=match):
        write_synthetic_pair(out, **{"n_cells": 10, "n_genes": 20, "n_proteins": 4, **kwargs})
    assert not out.exists() or not any(out.iterdir())  # no files, temporary or final


def test_failed_synthetic_write_leaves_no_hidden_files(tmp_path, monkeypatch):
    import diagvi.synthetic as synthetic

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # fails after both temporary HDF5 files exist, in the middle of the chunk loop
    monkeypatch.setattr(synthetic, "_append_csr", fail)
    out = tmp_path / "pair"
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_pair(out, n_cells=10, n_genes=20, n_proteins=4)
    assert list(out.iterdir()) == []


def test_synthetic_cli_reports_bad_sizes_as_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--n-cells", "10", "--out", str(tmp_path / "pair"), "--chunk-size", "-3"])
    assert exit_.value.code == 2
    assert "--chunk-size must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "pair").exists()


# ----------------------------------------------------------------------------- registry


def test_registry_register_without_name_raises():
    reg = Registry("widget")
    with pytest.raises(TypeError, match=r'@register\("name"\)'):

        @reg.register  # forgot the name: the class would silently become a function
        class Widget:
            pass

    assert list(reg) == []
