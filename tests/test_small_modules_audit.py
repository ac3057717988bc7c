"""Audit of diagvi.linked, diagvi.nn, diagvi.fastmath and diagvi.checkpoint: edge cases."""

from __future__ import annotations

import pandas as pd
import torch

from diagvi.graph import build_guidance_graph
from diagvi.linked import LinkedView
from diagvi.nn import Encoder, principal_axes


def small_view(n_components: int = 3) -> LinkedView:
    features = {
        "rna": pd.Index([f"g{i}" for i in range(6)]),
        "protein": pd.Index([f"p{i}" for i in range(4)]),
    }
    mapping = pd.DataFrame({"rna": ["g1", "g3", "g2", "g5"], "protein": ["p0", "p1", "p2", "p3"]})
    return LinkedView(build_guidance_graph(features, mapping=mapping), n_components)


def test_randomised_principal_axes_leave_the_cuda_generators_alone(monkeypatch):
    # torch.manual_seed reseeds every CUDA device too (lazily before CUDA starts), outside
    # what fork_rng(devices=[]) restores: fitting the linked view or encoder_pcs restarted the
    # caller's GPU random stream from the fit's seed (0), whatever the caller had seeded
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 30, generator=gen)
    x = x - x.mean(0)  # 3 + 10 < 30: svd_lowrank
    with torch.random.fork_rng(devices=[]):  # what the seeded solver gave before
        torch.manual_seed(5)
        _, _, reference = torch.svd_lowrank(x, q=13, niter=4)
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    state = torch.get_rng_state()
    basis, singular = principal_axes(x, 3, seed=5)
    assert cuda_seeds == []
    assert torch.equal(torch.get_rng_state(), state)
    # the same draws as before: a model fitted earlier refits to the same components
    reference = reference[:, :3]
    reference = reference * torch.sign(reference.gather(0, reference.abs().argmax(0)[None]))
    torch.testing.assert_close(basis, reference)
    assert torch.equal(principal_axes(x, 3, seed=5)[0], basis)
    assert not torch.equal(principal_axes(x, 3, seed=6)[1], singular)


def test_unfitted_linked_view_takes_float64_inputs():
    # the fitted map casts its input; before fit, float64 columns met float32 loadings in a
    # matrix product and raised
    view = small_view()
    x = torch.rand(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = view(0, x)
    assert out.dtype == torch.float32 and out.shape == (10, 3)
    torch.testing.assert_close(out, view(0, x.float()))


def test_fitting_a_model_leaves_the_cuda_generators_alone(monkeypatch):
    # DIAGVI.load refits its module (fit_on_data) "leaving the caller's RNG alone", and a
    # Hydra run fits after seeding: neither may restart the CUDA stream from seed 0
    from diagvi import DIAGVI
    from diagvi.synthetic import make_synthetic_pair

    adatas, mapping = make_synthetic_pair(n_cells=160, n_genes=40, n_proteins=10, seed=3)
    DIAGVI.setup_anndata(adatas["rna"], encoder_pcs=6)  # 6 + 10 < 40 genes: svd_lowrank
    DIAGVI.setup_anndata(adatas["protein"])
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4)
    components = model.module.pcs["rna"].components.clone()
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    model.module.fit_on_data(model.data)
    assert cuda_seeds == []
    assert torch.equal(model.module.pcs["rna"].components, components)


def test_building_a_seeded_model_leaves_the_cuda_generators_alone(monkeypatch):
    # DIAGVI(seed=...) draws its weights from a forked CPU stream; torch.manual_seed also
    # restarted every CUDA device's stream from that seed, outside what the fork restores
    from diagvi import DIAGVI
    from diagvi.synthetic import make_synthetic_pair

    adatas, mapping = make_synthetic_pair(n_cells=60, n_genes=12, n_proteins=4, seed=1)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    state = torch.get_rng_state()
    first = DIAGVI(adatas, mapping_df=mapping, n_latent=4, seed=7)
    second = DIAGVI(adatas, mapping_df=mapping, n_latent=4, seed=7)
    assert cuda_seeds == []
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first.module.parameters(), second.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_encoder_heads_are_its_two_layers():
    """The heads run as one product of stacked weights: the same values and gradients as the
    two layers, which stay the parameters a saved model holds."""
    torch.manual_seed(0)
    enc = Encoder(12, 3, n_hidden=16).eval()  # no dropout: the body is deterministic
    x = torch.rand(9, 12)
    q = enc(x)
    h = enc.body(x)
    torch.testing.assert_close(q.loc, enc.loc(h))
    torch.testing.assert_close(q.scale, torch.nn.functional.softplus(enc.scale(h)) + 1e-4)
    (q.loc.square().sum() + q.scale.sum()).backward()
    heads = [enc.loc.weight, enc.loc.bias, enc.scale.weight, enc.scale.bias]
    got = [p.grad.clone() for p in heads]
    enc.zero_grad()
    h = enc.body(x)
    (enc.loc(h).square().sum() + torch.nn.functional.softplus(enc.scale(h)).sum()).backward()
    torch.testing.assert_close(got, [p.grad for p in heads])
    assert {"loc.weight", "loc.bias", "scale.weight", "scale.bias"} <= set(enc.state_dict())
