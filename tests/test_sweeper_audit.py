"""Audit of the ``diagvi_optuna`` sweeper: search spaces that sample what they declare, grid
studies that visit each point once (in batches, across workers) and seeded workers that do not
draw each other's trials. The sweeps here run a stub launcher: no training."""

from __future__ import annotations

import warnings

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import IntDistribution

from hydra_plugins.diagvi_optuna_sweeper.sweeper import (
    GRID_SAMPLER,
    DiagviOptunaSweeper,
    search_space,
)

optuna.logging.set_verbosity(optuna.logging.ERROR)


def space_of(expression: str):
    return search_space({"k": expression}, [])[1]["k"]


def sampled(distribution, n: int = 60) -> set:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = set()
    for _ in range(n):
        trial = study.ask({"k": distribution})
        values.add(trial.params["k"])
        study.tell(trial, 0.0)
    return values


class StubLauncher:
    """Returns a value for every job of a batch, as Hydra's launchers do."""

    def __init__(self) -> None:
        self.batches: list[list[list[str]]] = []

    def launch(self, batch, initial_job_idx):
        self.batches.append(batch)
        return [
            JobReturn(status=JobStatus.COMPLETED, _return_value=0.1 * (initial_job_idx + i))
            for i in range(len(batch))
        ]


def sweeper(tmp_path, params, *, seed=0, grid=True, n_trials=4, n_jobs=1, config=None):
    target = GRID_SAMPLER if grid else "optuna.samplers.TPESampler"
    s = DiagviOptunaSweeper(
        study_name="audit",
        storage=f"sqlite:///{tmp_path}/optuna.db",
        direction="minimize",
        metric_name=None,
        n_trials=n_trials,
        n_jobs=n_jobs,
        sampler=OmegaConf.create({"_target_": target, "seed": seed}),
        pruner=None,
        params=OmegaConf.create(params),
    )
    s.config = OmegaConf.create(
        config or {"hydra": {"sweep": {"dir": str(tmp_path)}}, "model": {"a": 1, "b": 10}}
    )
    s.launcher = StubLauncher()
    s.validate_batch_is_legal = lambda batch: None  # no Hydra app to compose the configs with
    return s


def points(tmp_path) -> list[tuple]:
    study = optuna.load_study(study_name="audit", storage=f"sqlite:///{tmp_path}/optuna.db")
    return [tuple(sorted(t.params.items())) for t in study.trials]


# ---------------------------------------------------------------------------------------------
# search spaces


def test_range_with_a_step_keeps_its_last_value():
    # Hydra's range(0, 10, 4) is 0, 4, 8; stop - step = 6 made Optuna cut the range to 0, 4
    assert space_of("range(0, 10, 4)") == IntDistribution(0, 8, step=4)
    assert sampled(space_of("range(0, 10, 4)")) == {0, 4, 8}
    assert space_of("range(10, 0, -4)") == IntDistribution(2, 10, step=4)  # 10, 6, 2


def test_int_interval_stays_inside_its_bounds():
    # int(1.5) = 1 sampled 1, below the declared interval
    assert space_of("tag(int, interval(1.5, 4.5))") == IntDistribution(2, 4)
    assert sampled(space_of("tag(int, interval(1.5, 4.5))")) == {2, 3, 4}


def test_log_tag_on_range_is_a_log_scale():
    assert space_of("tag(log, range(1, 100))") == IntDistribution(1, 99, log=True)
    with pytest.raises(ValueError, match="unknown tags"):
        space_of("tag(loq, range(1, 100))")


# ---------------------------------------------------------------------------------------------
# grid studies


def test_grid_batches_never_repeat_a_point(tmp_path):
    s = sweeper(tmp_path, {"model.a": "choice(1, 2, 3)"}, n_trials=4, n_jobs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        states = s.sweep([])
    # 3 grid points: 3 trials, each point once (a batch of 2 used to repeat the last point)
    assert states == ["COMPLETE"] * 3
    assert sorted(points(tmp_path)) == [(("model.a", v),) for v in (1, 2, 3)]


def test_grid_workers_with_their_own_seeds_visit_each_point_once(tmp_path):
    params = {"model.a": "choice(1, 2)", "model.b": "choice(10, 20)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # cluster.md: each worker its own sampler seed; a rerun may also change ${seed}
        for seed in (0, 4):
            sweeper(tmp_path, params, seed=seed, n_trials=2).sweep([])
    assert len(set(points(tmp_path))) == 4  # was 2: two points twice, two never


# ---------------------------------------------------------------------------------------------
# seeded workers on one study


def test_workers_with_their_own_seeds_draw_different_trials(tmp_path):
    params = {"model.a": "tag(log, interval(1e-4, 1e-1))"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # cluster.md: each worker its own seed. Worker 2 starts the study; worker 1 joins when
        # it holds one trial, and its seed moved on by one trial (1 + 1) was worker 2's: it drew
        # worker 2's start-up trials again
        sweeper(tmp_path, params, seed=2, grid=False, n_trials=1).sweep([])
        sweeper(tmp_path, params, seed=1, grid=False, n_trials=1).sweep([])
    first, second = points(tmp_path)
    assert first != second


# ---------------------------------------------------------------------------------------------
# config groups in params


def test_config_group_choice_in_params_is_searched(tmp_path):
    config = {
        "hydra": {"sweep": {"dir": str(tmp_path)}, "runtime": {"choices": {"model/x": "one"}}},
        "model": {"a": 1},
    }
    s = sweeper(tmp_path, {}, config=config)
    params = {"model/x": "choice(one, two)", "model.a": "choice(1, 2)", "model.zz": "choice(3, 4)"}
    # "model/x" is a config group, not a key of the composed config: it was dropped
    assert sorted(s._present(params, [])) == ["model.a", "model/x"]
