"""DIAGVI: the user API (scvi-tools style) over the same data layer, DiagVAE and LightningModule
as the Hydra entry point ``diagvi.train``.

Component names are those of the registries and of ``configs/model/<group>/<name>.yaml``; the
defaults below are those of ``configs/model/diagvi.yaml`` (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch_geometric.data import Data

from diagvi import inference
from diagvi.data import (
    UNLABELED,
    DataSpec,
    ModalityData,
    ModalitySetup,
    PairedDataModule,
    check_adatas,
    read_modalities,
    read_modality,
)
from diagvi.errors import DataError
from diagvi.graph import build_guidance_graph
from diagvi.io import atomic_write, check_features, graph_from_dict, graph_to_dict
from diagvi.lit import DiagVILightning, HistoryCallback
from diagvi.module import DiagVAE
from diagvi.plotting import plot_history, plot_joint_embedding
from diagvi.registry import ALIGNMENTS, CLASSIFIERS, GRAPH_ENCODERS, LIKELIHOODS, PRIORS
from diagvi.stream import row_sums

SETUP_KEY = "diagvi_setup"
MODEL_FILE = "model.pt"


def default_max_epochs(n_cells: int) -> int:
    """``min(400, max(50, round(200000 / n_cells)))`` for the larger modality's ``n_cells``."""
    return int(min(400, max(50, round(200_000 / max(n_cells, 1)))))


def _factory(registry, name: str, kwargs: Mapping[str, Any] | None):
    return functools.partial(registry.get(name), **dict(kwargs or {}))


class DIAGVI:
    """Integrate two unpaired single-cell modalities (DiagVI) from Python.

    Parameters
    ----------
    adatas
        ``{modality name: AnnData}`` (two modalities, each prepared with :meth:`setup_anndata`)
        or a ``MuData`` with two modalities. An AnnData opened with ``backed="r"`` (X stored as
        CSR or dense) stays on disk: it is checked, trained on and inferred from chunk by
        chunk (:mod:`diagvi.stream`).
    guidance_graph
        A ready :class:`torch_geometric.data.Data` guidance graph (validated).
    mapping_df
        DataFrame with one column per modality (feature names) and optional ``weight``,
        ``sign``. With neither graph nor mapping, features with equal names are linked.
    n_latent
        Latent dimension.
    gmm_prior
        Shortcut for ``prior="gmm"``.
    prior, prior_kwargs
        Registered prior name (default ``"normal"``, or ``"gmm"`` with ``gmm_prior``) and its
        keyword arguments.
    graph_encoder, graph_encoder_kwargs
        Registered graph encoder and its keyword arguments.
    alignment, alignment_kwargs
        Registered alignment loss (``"uot"``, ``"sinkhorn"``, ``"none"``) and its settings
        (``reach_scale``, ``epsilon_scale``, ``blur_mode``, ...).
    classifier, classifier_kwargs
        Registered classifier used when labels exist; ``None`` for none.
    n_hidden, n_layers, dropout
        Encoder MLP. One hidden layer by default: on the benchmark's CITE-seq pairs it
        transfers labels better and mixes the modalities more than two (the reference's
        architecture), and a step is about 20% faster (``experiments/alignment_defaults``).
    seed
        Seed of the initial weights (torch's global random state is left as it was); ``None``
        draws them from the global state. Training has its own ``seed`` (:meth:`train`).
    """

    def __init__(
        self,
        adatas,
        guidance_graph: Data | None = None,
        mapping_df: pd.DataFrame | None = None,
        n_latent: int = 20,
        gmm_prior: bool = False,
        prior: str | None = None,
        prior_kwargs: dict | None = None,
        graph_encoder: str = "gcn",
        graph_encoder_kwargs: dict | None = None,
        alignment: str = "uot",
        alignment_kwargs: dict | None = None,
        classifier: str | None = "linear",
        classifier_kwargs: dict | None = None,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        seed: int | None = 0,
    ) -> None:
        adatas = check_adatas(adatas)
        setups = {}
        for name, adata in adatas.items():
            if SETUP_KEY not in adata.uns:
                raise DataError(
                    f"modality {name!r} is not set up; call DIAGVI.setup_anndata(adata, ...) first"
                )
            setups[name] = ModalitySetup(**dict(adata.uns[SETUP_KEY]))
        init_args = _plain(
            {
                "n_latent": int(n_latent),
                "prior": prior or ("gmm" if gmm_prior else "normal"),
                "prior_kwargs": dict(prior_kwargs or {}),
                "graph_encoder": graph_encoder,
                "graph_encoder_kwargs": dict(graph_encoder_kwargs or {}),
                "alignment": alignment,
                "alignment_kwargs": dict(alignment_kwargs or {}),
                "classifier": classifier,
                "classifier_kwargs": dict(classifier_kwargs or {}),
                "encoder": {"n_hidden": n_hidden, "n_layers": n_layers, "dropout": dropout},
            }
        )
        # the weights are drawn from their own stream: two models built with one seed are the
        # same model, whatever else drew from torch's global RNG before
        # (the CPU generator only: torch.manual_seed would also restart every CUDA device's
        # stream, which fork_rng(devices=[]) does not restore; the weights are drawn on the CPU)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.default_generator.manual_seed(seed)
            self._build(adatas, setups, init_args, guidance_graph, mapping_df)

    # ------------------------------------------------------------------ construction

    def _build(
        self,
        adatas,
        setups,
        init_args,
        graph=None,
        mapping=None,
        categories=None,
        batch_categories=None,
    ):
        for key, registry in (
            ("prior", PRIORS),
            ("graph_encoder", GRAPH_ENCODERS),
            ("alignment", ALIGNMENTS),
        ):
            registry.get(init_args[key])  # unknown names: DataError listing the known ones
        if init_args["classifier"] is not None:
            CLASSIFIERS.get(init_args["classifier"])
        data, categories = read_modalities(adatas, setups, categories, batch_categories)
        features = {m: d.var_names for m, d in data.items()}
        graph = build_guidance_graph(features, graph=graph, mapping=mapping)
        spec = DataSpec.from_data(data, categories, graph)
        a = init_args
        self.module = DiagVAE(
            spec,
            n_latent=a["n_latent"],
            likelihoods={m: _factory(LIKELIHOODS, s.likelihood, None) for m, s in setups.items()},
            prior=_factory(PRIORS, a["prior"], a["prior_kwargs"]),
            graph_encoder=_factory(GRAPH_ENCODERS, a["graph_encoder"], a["graph_encoder_kwargs"]),
            alignment=ALIGNMENTS.build(a["alignment"], **a["alignment_kwargs"]),
            classifier=(
                _factory(CLASSIFIERS, a["classifier"], a["classifier_kwargs"])
                if a["classifier"]
                else None
            ),
            encoder=a["encoder"],
        )
        self.module.fit_on_data(data)
        self.adatas, self.data, self.spec, self.init_args = adatas, data, spec, init_args
        self.setups = {m: setups[m] for m in data}
        self.history: pd.DataFrame | None = None
        self.is_trained = False

    @staticmethod
    def setup_anndata(
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str = "unknown",
        likelihood: str = "nb",
        empty: str = "warn",
        encoder_pcs: int | None = None,
    ) -> None:
        """Record how to read ``adata`` in ``adata.uns["diagvi_setup"]`` (a plain dict).

        Parameters
        ----------
        adata
            One modality.
        layer
            Layer with the data; ``None`` reads ``X``.
        batch_key, labels_key
            ``obs`` columns of batches and of cell labels.
        unlabeled_category
            Label of unlabelled cells.
        likelihood
            Registered likelihood name (``nb``, ``zinb``, ``nbmixture``, ``normal``, ...).
        empty
            All-zero cells or features: ``"warn"`` (keep them), ``"drop"`` (drop all-zero
            cells; outputs then have fewer rows than ``adata``) or ``"error"``.
        encoder_pcs
            The encoder reads this many principal components of the transformed input instead
            of every feature (as GLUE's ``use_rep``; fitted before training on up to 10,000
            cells). Faster on thousands of genes; see ``experiments/alignment_defaults`` for
            when it helps. ``None``: every feature.
        """
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"expected an AnnData, got {type(adata).__name__}")
        LIKELIHOODS.get(likelihood)
        if layer is not None and layer not in adata.layers:
            raise DataError(f"layer {layer!r} not found; layers: {list(adata.layers.keys())}")
        for what, key in (("batch_key", batch_key), ("labels_key", labels_key)):
            if key is not None and key not in adata.obs:
                raise DataError(f"{what} {key!r} is not an obs column: {list(adata.obs.columns)}")
        setup = ModalitySetup(
            layer, batch_key, labels_key, str(unlabeled_category), likelihood, empty, encoder_pcs
        )
        # None values are left out: h5ad cannot store them
        adata.uns[SETUP_KEY] = {k: v for k, v in dataclasses.asdict(setup).items() if v is not None}

    # ------------------------------------------------------------------ training

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        accelerator: str = "auto",
        devices: int | str = 1,
        train_size: float = 0.9,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        check_val_every_n_epoch: int | None = None,
        lam_data: float = 0.1,
        lam_kl: float = 0.1,
        lam_spread: float = 0.1,
        lam_graph: float = 15.0,
        lam_link: float = 75.0,
        lam_self: float = 25.0,
        lam_sinkhorn: float = 170.0,
        lam_class: float = 5.0,
        seed: int = 0,
        num_workers: int = 0,
        gradient_clip_val: float | None = None,
        enable_progress_bar: bool = False,
    ) -> pd.DataFrame:
        """Train with Lightning; returns and stores :attr:`history` (one row per epoch).

        ``max_epochs=None`` uses :func:`default_max_epochs` of the larger modality. Early
        stopping watches ``val/loss`` (``train/loss`` when ``train_size=1``). The held-out
        cells are evaluated every ``check_val_every_n_epoch`` epochs; ``None``: every epoch
        with early stopping, never without (as scvi-tools; the history then has no ``val/``
        columns). The ``lam_*`` weights are those of ``configs/model/diagvi.yaml``.
        """
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}")
        if max_epochs is None:
            max_epochs = default_max_epochs(max(d.n_obs for d in self.data.values()))
        _check_positive_int(max_epochs=max_epochs, batch_size=batch_size)
        L.seed_everything(seed, verbose=False)
        dm = PairedDataModule(
            self.data, batch_size, val_fraction=1.0 - train_size, seed=seed, num_workers=num_workers
        )
        weights = dict(
            lam_data=lam_data,
            lam_kl=lam_kl,
            lam_spread=lam_spread,
            lam_graph=lam_graph,
            lam_link=lam_link,
            lam_self=lam_self,
            lam_sinkhorn=lam_sinkhorn,
            lam_class=lam_class,
        )
        history = HistoryCallback()
        callbacks: list[L.Callback] = [history]
        monitored = []  # no logger here: Lightning needs only what early stopping watches
        if early_stopping:
            has_val = dm.has_validation
            monitored = ["val/loss" if has_val else "train/loss"]
            callbacks.append(EarlyStopping(monitored[0], patience=early_stopping_patience))
        lit = DiagVILightning(
            self.module, weights, lr=lr, weight_decay=weight_decay, logged=monitored
        )
        validate = check_val_every_n_epoch or (1 if early_stopping else None)
        with tempfile.TemporaryDirectory() as root:
            trainer = L.Trainer(
                check_val_every_n_epoch=validate or 1,
                limit_val_batches=None if validate else 0,
                num_sanity_val_steps=None if validate else 0,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=enable_progress_bar,
                enable_model_summary=False,
                gradient_clip_val=gradient_clip_val,
                default_root_dir=root,
                callbacks=callbacks,
            )
            trainer.fit(lit, datamodule=dm)
        self.module.cpu().eval()
        self.is_trained = True
        self.history = history.frame()
        return self.history

    # ------------------------------------------------------------------ inference

    def _other(self, name: str) -> str:
        self._check_name(name)
        return next(m for m in self.data if m != name)

    def _check_name(self, name: str) -> None:
        if name not in self.data:
            raise DataError(f"unknown modality {name!r}; modalities: {list(self.data)}")

    def _read(self, name: str, adata: ad.AnnData | None) -> ModalityData:
        """Training data of ``name``, or ``adata`` read with ``name``'s setup after checks."""
        self._check_name(name)
        if adata is None:
            return self.data[name]
        if not isinstance(adata, ad.AnnData):  # before its var_names are read
            raise TypeError(
                f"modality {name!r}: expected an AnnData, got {type(adata).__name__}; wrap a "
                "cells x features matrix as anndata.AnnData(X, var=...) with the training features"
            )
        check_features(name, [str(v) for v in self.data[name].var_names], adata.var_names)
        setup = dataclasses.replace(self.setups[name], batch_key=None, labels_key=None)
        return read_modality(name, adata, setup)

    def _read_all(self, adatas: Mapping[str, ad.AnnData]) -> dict[str, ModalityData]:
        """``{modality: AnnData}`` (one or both modalities), each read by :meth:`_read`."""
        if not isinstance(adatas, Mapping):  # e.g. one AnnData, as scvi-tools takes it
            raise TypeError(
                f"adatas must be a dict {{modality name: AnnData}}, got {type(adatas).__name__}; "
                f"e.g. {{{next(iter(self.data))!r}: adata}}"
            )
        return {m: self._read(m, a) for m, a in adatas.items()}

    def get_latent_representation(
        self,
        adatas: Mapping[str, ad.AnnData] | None = None,
        give_mean: bool = True,
        out_dir: str | Path | None = None,
        batch_size: int = 1024,
    ) -> dict[str, np.ndarray]:
        """Latent ``z`` per modality: posterior mean (default) or one posterior sample.

        ``adatas`` (default: the training data) may hold one or both modalities, with the
        training features in the training order; AnnData opened with ``backed="r"`` are read
        from disk chunk by chunk. ``out_dir``: write each modality's latent to
        ``<out_dir>/latent_<modality>.npy`` minibatch by minibatch and return read-only
        memmaps of the files (for more cells than memory holds). ``batch_size``: cells encoded
        at a time.
        """
        _check_positive_int(batch_size=batch_size)
        sources = self.data if adatas is None else self._read_all(adatas)
        return {
            m: inference.latent_representation(
                self.module,
                d,
                batch_size=batch_size,
                give_mean=give_mean,
                out=None if out_dir is None else Path(out_dir) / f"latent_{m}.npy",
            )
            for m, d in sources.items()
        }

    def _batch_codes(self, name: str, batch, n: int) -> np.ndarray:
        """Batch codes of ``name`` for ``n`` cells from names or indices (one, or one per cell).

        A value is a batch *name* first; an integer that names no batch is an index, unless
        the batch names are themselves numbers (``obs["donor"] = 1, 2``, or ``1.0, 2.0`` from a
        float column), where reading ``1`` as the second batch would silently decode into the
        wrong one: a number then names the batch of equal value.
        """
        categories = self.data[name].batch_categories
        if batch is None:  # the first batch: not the one named "0" (integer names are names)
            return np.zeros(n, dtype=np.int64)
        values = _per_cell(batch, n, "target_batch", name, dtype=object)
        lookup = {c: i for i, c in enumerate(categories)}
        numeric = {v: i for i, c in enumerate(categories) if (v := _finite_number(c)) is not None}
        codes = np.empty(n, dtype=np.int64)
        for i, value in enumerate(values):
            is_number = isinstance(
                value, int | float | np.integer | np.floating
            ) and not isinstance(value, bool | np.bool_)
            if str(value) in lookup:
                codes[i] = lookup[str(value)]
            elif is_number and numeric and float(value) in numeric:
                codes[i] = numeric[float(value)]
            elif isinstance(value, int | np.integer) and is_number and not numeric:
                if not 0 <= value < len(categories):
                    raise DataError(
                        f"batch index {value} out of range for modality {name!r} with "
                        f"{len(categories)} batches: {categories}"
                    )
                codes[i] = value
            else:
                note = " (numeric batch names are read as names)" if numeric else ""
                raise DataError(
                    f"unknown batch {value!r} of modality {name!r}; valid batches: {categories}"
                    + note
                )
        return codes

    def get_imputed_values(
        self,
        source_name: str | None = None,
        source_adata: ad.AnnData | None = None,
        target_batch=None,
        target_libsize=None,
        batch_size: int = 1024,
        *,
        method: str = "decoder",
        n_neighbors: int = 15,
        out: str | Path | None = None,
        query_name: str | None = None,
        query_adata: ad.AnnData | None = None,
        reference_batch=None,
        reference_libsize=None,
    ) -> np.ndarray:
        """The other (target) modality's values for the source cells, on the target's scale.

        ``method="decoder"``: source cells are encoded to their posterior mean ``z`` and decoded
        by the target's decoder and likelihood (mean feature embeddings, computed once); the
        result is the likelihood's mean, ``(source cells, target features)``.
        ``method="knn"``: the mean measured profile of the ``n_neighbors`` nearest target
        training cells in the joint latent space (depth-normalised, then scaled to the
        library size, for count likelihoods); ``target_batch``, when given, restricts the
        neighbours to that batch. It can only return profiles that were measured, but it
        keeps every feature's own distribution; on the benchmark's pairs it correlates
        better with the measured values (``experiments/benchmark/README.md``), most of all
        for features without a cross-modal edge in the guidance graph.

        Parameters
        ----------
        source_name
            Modality of the cells (alias ``query_name``).
        source_adata
            Cells to impute (alias ``query_adata``); default: the training cells of
            ``source_name``.
        target_batch
            Batch of the target modality to decode into: category name or index (an index only
            when no batch name is an integer), one value or one per cell (alias
            ``reference_batch``). Default: the first batch.
        target_libsize
            Library size in counts for count likelihoods, scalar or one per cell (alias
            ``reference_libsize``). Default: median library size of the target's training
            cells. Ignored by continuous likelihoods.
        method
            ``"decoder"`` (default) or ``"knn"``.
        n_neighbors
            Neighbours per cell for ``method="knn"``.
        out
            An ``.npy`` path: the result is written there minibatch by minibatch and returned
            as a read-only memmap (for more cells x features than memory holds).
        """
        if method not in ("decoder", "knn"):
            raise ValueError(f"method must be 'decoder' or 'knn', got {method!r}")
        source_name = _alias(source_name, query_name, "source_name", "query_name")
        source_adata = _alias(source_adata, query_adata, "source_adata", "query_adata")
        target_batch = _alias(target_batch, reference_batch, "target_batch", "reference_batch")
        target_libsize = _alias(
            target_libsize, reference_libsize, "target_libsize", "reference_libsize"
        )
        if source_name is None:
            raise TypeError("give source_name (or query_name): the modality of the cells")
        target = self._other(source_name)
        source = self._read(source_name, source_adata)
        n = source.n_obs
        if target_libsize is None:
            target_libsize = float(np.median(row_sums(self.data[target].X)))
        library = _per_cell(target_libsize, n, "target_libsize", target, dtype=np.float32)
        counts = self.module.likelihood[target].counts  # continuous ones ignore the size
        if counts and not (np.isfinite(library).all() and (library > 0).all()):
            raise ValueError(f"target_libsize must be finite and positive, got {target_libsize!r}")
        _check_positive_int(n_neighbors=n_neighbors, batch_size=batch_size)
        batch = self._batch_codes(target, target_batch, n)
        if method == "decoder":
            return inference.imputed_values(
                self.module, source, target, batch, library, batch_size, out=out
            )
        reference = self.data[target]
        candidates = None
        if target_batch is not None:
            if len(np.unique(batch)) > 1:
                raise ValueError("method='knn' takes one target_batch for all cells, not one each")
            candidates = np.flatnonzero(reference.batch == batch[0])
            if not len(candidates):  # a saved model's batch absent from the loaded cells
                raise DataError(
                    f"target_batch {reference.batch_categories[batch[0]]!r} of modality "
                    f"{target!r} has no cells in this model's data, and method='knn' averages "
                    "measured cells of that batch: load the model with that batch's cells, or "
                    "use method='decoder'"
                )
        z_source = inference.latent_representation(self.module, source, batch_size)
        z_target = inference.latent_representation(self.module, reference, batch_size)
        return inference.knn_imputed_values(
            z_source,
            z_target,
            reference,
            library if counts else None,
            k=n_neighbors,
            batch_size=batch_size,
            out=out,
            candidates=candidates,
        )

    def predict_celltype(
        self,
        labeled_modality: str | None = None,
        target_modality: str | None = None,
        method: str = "classifier",
        k: int = 15,
    ) -> dict[str, Any]:
        """Transfer labels to the cells of ``target_modality``.

        ``method="classifier"``: softmax of the trained classifier on the posterior mean;
        ``method="knn"``: class fractions among the ``k`` nearest labelled cells of
        ``labeled_modality`` in the joint latent space. Only real classes are predicted.

        Returns
        -------
        ``{"predictions": class names, "probabilities": DataFrame (target cells x classes),
        "confidence": maximum probability}``.
        """
        categories = list(self.spec.label_categories)
        if not categories:
            raise DataError(
                "no cell labels: call setup_anndata with labels_key= on a modality and retrain"
            )
        if labeled_modality is None:
            labeled_modality = next(
                (m for m, d in self.data.items() if (d.labels != UNLABELED).any()),
                next(iter(self.data)),
            )
        if target_modality is None:
            target_modality = self._other(labeled_modality)
        self._check_name(labeled_modality)
        self._check_name(target_modality)
        _check_positive_int(k=k)
        z = self.get_latent_representation()
        if method == "classifier":
            if self.module.classifier is None:
                raise DataError("this model has no classifier (classifier=None); use method='knn'")
            probs = inference.class_probabilities(self.module, z[target_modality])
        elif method == "knn":
            labels = self.data[labeled_modality].labels
            known = labels != UNLABELED
            if not known.any():
                raise DataError(f"modality {labeled_modality!r} has no labelled cells")
            probs = inference.knn_probabilities(
                z[labeled_modality][known], labels[known], z[target_modality], len(categories), k
            )
        else:
            raise ValueError(f"method must be 'classifier' or 'knn', got {method!r}")
        frame = pd.DataFrame(
            probs, index=self.data[target_modality].obs_names.copy(), columns=categories
        )
        return {
            "predictions": np.asarray(categories, dtype=object)[probs.argmax(1)],
            "probabilities": frame,
            "confidence": probs.max(1),
        }

    def posterior_predictive_sample(
        self,
        n_samples: int = 1,
        batch_size: int = 1024,
        adatas: Mapping[str, ad.AnnData] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{modality: (n_samples, cells, features)}`` of ``x ~ p(x|z)``, ``z ~ q(z|x)``.

        ``adatas`` (default: the training data) may hold one or both modalities, with the
        training features in the training order; new cells are decoded in the first batch.
        """
        _check_positive_int(n_samples=n_samples, batch_size=batch_size)
        sources = self.data if adatas is None else self._read_all(adatas)
        return {
            m: inference.posterior_predictive(self.module, d, n_samples, batch_size)
            for m, d in sources.items()
        }

    # ------------------------------------------------------------------ save / load

    def save(self, dir_path: str | Path, save_anndata: bool = False, overwrite: bool = False):
        """Write weights, setup, features, labels, batches and guidance graph to ``dir_path``.

        ``model.pt`` loads with ``torch.load(weights_only=True)``; the AnnData objects are
        written (``<modality>.h5ad``) only with ``save_anndata=True`` (otherwise such files
        left by an earlier save are removed).
        """
        path = Path(dir_path)
        if (path / MODEL_FILE).exists() and not overwrite:
            raise FileExistsError(f"{path / MODEL_FILE} exists; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        attrs = {
            "init_args": self.init_args,
            "setups": {m: dataclasses.asdict(s) for m, s in self.setups.items()},
            "var_names": {m: [str(v) for v in d.var_names] for m, d in self.data.items()},
            "batch_categories": {m: list(d.batch_categories) for m, d in self.data.items()},
            "label_categories": list(self.spec.label_categories),
            "graph": graph_to_dict(self.spec.graph),
            "history": None if self.history is None else self.history.to_dict(orient="list"),
            "is_trained": self.is_trained,
        }
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        atomic_write(
            path / MODEL_FILE, lambda f: torch.save({"state_dict": state, "attrs": attrs}, f)
        )
        for m, adata in self.adatas.items():
            if save_anndata:
                atomic_write(path / f"{m}.h5ad", lambda f, a=adata: a.write_h5ad(f))
            else:  # an earlier save's data would be loaded with these weights
                (path / f"{m}.h5ad").unlink(missing_ok=True)

    @classmethod
    def load(cls, dir_path: str | Path, adatas: Mapping[str, ad.AnnData] | None = None) -> DIAGVI:
        """Restore a saved model on ``adatas`` (default: the AnnData saved with it).

        Feature names and order are checked against the saved ones; batches and labels are
        matched by name (``adatas`` may hold some of the saved batches, in any order, and
        cells without labels or without the labels column).
        """
        path = Path(dir_path)
        saved = torch.load(path / MODEL_FILE, weights_only=True, map_location="cpu")
        attrs = saved["attrs"]
        if adatas is None:
            files = {m: path / f"{m}.h5ad" for m in attrs["var_names"]}
            if missing := [str(f) for f in files.values() if not f.is_file()]:
                raise DataError(
                    f"{missing} not found: the model was saved without its AnnData "
                    "(save_anndata=False); pass adatas={modality: AnnData}"
                )
            adatas = {m: ad.read_h5ad(f) for m, f in files.items()}
        adatas = check_adatas(adatas)
        if sorted(adatas) != sorted(attrs["var_names"]):
            raise DataError(
                f"the model was saved with modalities {list(attrs['var_names'])}, "
                f"got {list(adatas)}"
            )
        adatas = {m: adatas[m] for m in attrs["var_names"]}
        for m, adata in adatas.items():
            check_features(m, attrs["var_names"][m], adata.var_names)
        graph = graph_from_dict(attrs["graph"])
        setups = {m: ModalitySetup(**s) for m, s in attrs["setups"].items()}
        self = cls.__new__(cls)
        # the weights drawn here are replaced by the saved ones: leave the caller's RNG alone
        with torch.random.fork_rng(devices=[]):
            self._build(
                adatas,
                setups,
                attrs["init_args"],
                graph,
                categories=tuple(attrs["label_categories"]),
                batch_categories=attrs["batch_categories"],
            )
        self.module.load_state_dict(saved["state_dict"])
        self.module.eval()
        self.is_trained = attrs["is_trained"]
        if attrs["history"] is not None:
            self.history = pd.DataFrame(attrs["history"]).rename_axis("epoch")
        return self

    # ------------------------------------------------------------------ plots

    def plot_embedding(self, path: str | Path | None = None):
        """PCA of the joint latent (posterior means), by modality and by label.

        Saved to ``path`` (returns the path) or returned as a matplotlib Figure.
        """
        latents = self.get_latent_representation()
        categories = self.spec.label_categories
        labels = {
            m: d.label_names(categories)
            for m, d in self.data.items()
            if (d.labels != UNLABELED).any()
        }
        return plot_joint_embedding(latents, path, labels)

    def plot_history(self, path: str | Path | None = None):
        """Training curves of every logged loss term (train and validation)."""
        if self.history is None or self.history.empty:
            raise RuntimeError("the model has no training history; call train() first")
        return plot_history(self.history, path)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{m}: {d.n_obs} x {d.n_vars}" for m, d in self.data.items())
        return f"DIAGVI({shapes}; trained={self.is_trained})"


def _check_positive_int(**values) -> None:
    for what, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _finite_number(name: str) -> float | None:
    """``name`` as a finite number (``"1"``, ``"1.0"``, ``"-2"``), or None."""
    try:
        value = float(name)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _per_cell(value, n: int, what: str, modality: str, dtype) -> np.ndarray:
    """``value`` as one entry per cell: a scalar is repeated, an array must have ``n`` entries."""
    array = np.asarray(value, dtype=dtype)
    if array.ndim > 1 or (array.ndim == 1 and len(array) != n):
        raise DataError(
            f"{what} for modality {modality!r} must be one value or one per cell ({n}), "
            f"got shape {array.shape}"
        )
    return np.broadcast_to(array, (n,)).copy()


def _plain(value):
    """``value`` with NumPy scalars and arrays as Python numbers and lists, which
    ``torch.load(weights_only=True)`` reads back (the model file is loaded that way)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


def _alias(value, alias, name: str, alias_name: str):
    if alias is None:
        return value
    if value is not None:
        raise TypeError(f"give {name} or its alias {alias_name}, not both")
    return alias
