"""Config schema of the sweeper, stored as ``hydra/sweeper: diagvi_optuna``.

No ``from __future__ import annotations``: Hydra executes plugin modules before they are in
``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class DiagviOptunaSweeperConf:
    """Options of :class:`~hydra_plugins.diagvi_optuna_sweeper.sweeper.DiagviOptunaSweeper`."""

    _target_: str = "hydra_plugins.diagvi_optuna_sweeper.sweeper.DiagviOptunaSweeper"
    # sampler and pruner stay configs: the sweeper builds them (GridSampler needs the space)
    _recursive_: bool = False
    study_name: str = "diagvi"
    # any SQLAlchemy URL; the trials reach the study through it (so never in-memory)
    storage: str = "sqlite:///${hydra.sweep.dir}/optuna.db"
    direction: str = "minimize"
    # name of the objective, stored with the study for reports
    metric_name: str | None = None
    # trials this process runs (a rerun or a second process adds its own)
    n_trials: int = 10
    # trials asked at once and handed to the launcher together
    n_jobs: int = 1
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    pruner: Any = None
    # "key: hydra sweep expression", e.g. "model.lr: tag(log, interval(1e-4, 1e-2))"
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="diagvi_optuna",
    node=DiagviOptunaSweeperConf,
    provider="diagvi_optuna_sweeper",
)
