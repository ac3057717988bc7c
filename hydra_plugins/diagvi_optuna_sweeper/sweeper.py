"""A Hydra sweeper that runs an Optuna study with Optuna's ask/tell API.

Each trial is asked from the study, launched as one Hydra job with the sampled values as
overrides plus ``optuna_trial={study_name, storage, trial_id, number, name}`` (so the job can
report intermediate values and be pruned), and told the job's return value: COMPLETE with a
finite value, PRUNED when the job raised ``optuna.TrialPruned``, FAIL otherwise. A failed trial
does not stop the study.

The search space is written as Hydra sweep expressions (``params`` in the sweeper config, or on
the command line): ``interval(a, b)`` is a float range (``tag(log, ...)``: log-uniform,
``tag(int, ...)``: integers), ``range(a, b[, step])`` integers (``b`` excluded; ``tag(log, ...)``
with step 1: log-uniform),
``choice(x, y, ...)`` a categorical. Plain values are fixed for every trial.

Optuna is imported lazily: Hydra imports this module for every application it starts.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")
GRID_SAMPLER = "optuna.samplers.GridSampler"


def distribution(key: str, sweep: Any) -> Any:
    """The Optuna distribution of one Hydra sweep expression (see the module docstring)."""
    import optuna.distributions as od

    if isinstance(sweep, ChoiceSweep):
        return od.CategoricalDistribution(list(sweep.list))
    if not isinstance(sweep, RangeSweep | IntervalSweep):
        raise ValueError(f"{key}: unsupported sweep {sweep!r}; use interval(), range() or choice()")
    unknown = set(sweep.tags) - {"log", "int"}
    if unknown:
        raise ValueError(f"{key}: unknown tags {sorted(unknown)} (known: log, int)")
    log_scale = "log" in sweep.tags
    if isinstance(sweep, RangeSweep):
        values = [sweep.start, sweep.stop, sweep.step]
        if not all(isinstance(v, int) for v in values):
            raise ValueError(f"{key}: range() needs integers, got {values}; use interval()")
        # Hydra's range excludes its stop, Optuna's IntDistribution includes its high: the
        # range's last value, not stop - step (range(0, 10, 4) ends at 8, not 6)
        points = range(sweep.start, sweep.stop, sweep.step)
        if not points:
            raise ValueError(f"{key}: range({', '.join(map(str, values))}) is empty")
        if log_scale and abs(sweep.step) != 1:
            raise ValueError(f"{key}: a log-scaled range() needs step 1, got {sweep.step}")
        return od.IntDistribution(min(points), max(points), log=log_scale, step=abs(sweep.step))
    if "int" in sweep.tags:
        # the integers inside [start, end]: int() would round 1.5 down, out of the interval
        low, high = math.ceil(sweep.start), math.floor(sweep.end)
        if low > high:
            raise ValueError(f"{key}: no integer in interval({sweep.start}, {sweep.end})")
        return od.IntDistribution(low, high, log=log_scale)
    return od.FloatDistribution(sweep.start, sweep.end, log=log_scale)


def search_space(
    params: Mapping[str, Any], arguments: Sequence[str]
) -> tuple[list[str], dict[str, Any]]:
    """Fixed overrides and Optuna distributions from the config's ``params`` and the CLI.

    A command-line override of a key replaces its ``params`` entry: a sweep expression changes
    its range, a plain value fixes it.
    """
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in params.items()]
    overrides: dict[str, Override] = {}
    for o in parser.parse_overrides(lines) + parser.parse_overrides(list(arguments)):
        overrides[o.get_key_element()] = o
    fixed, space = [], {}
    for key, o in overrides.items():
        if o.is_sweep_override():
            space[key] = distribution(key, o.value())
        else:
            fixed.append(o.input_line)
    return fixed, space


def _parses_to(text: str, value: Any) -> bool:
    try:
        parsed = OverridesParser.create().parse_override(f"k={text}").value()
    except Exception:
        return False
    return parsed == value and type(parsed) is type(value)


def format_value(value: Any) -> str:
    """``value`` as a Hydra override value that parses back to itself (quoted if needed)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    for candidate in (text, "'" + str(value).replace("'", "\\'") + "'"):
        if _parses_to(candidate, value):
            return candidate
    raise ValueError(f"cannot write {value!r} as a Hydra override value")


def sqlite_absolute(url: str) -> str:
    """An SQLite URL with an absolute path (trials may run elsewhere), its folder made."""
    if not url.startswith("sqlite:") or ":memory:" in url:
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.database:
        raise ValueError(f"storage {url!r}: an SQLite storage needs a file path")
    path = Path(parsed.database).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    parsed = parsed.set(database=str(path))
    if "timeout" not in parsed.query:
        # workers and their trials share one file: wait up to 60 s for its lock, not 5 s
        parsed = parsed.update_query_dict({"timeout": "60"})
    return parsed.render_as_string(hide_password=False)


def grid_points_left(sampler: Any, study: Any) -> int:
    """Points of ``sampler``'s grid that no trial of ``study`` has started, as GridSampler counts
    them (by grid id, for trials of the same grid); Optuna has no public accessor."""
    try:
        started = {
            t.system_attrs["grid_id"]
            for t in study.get_trials(deepcopy=False)
            if "grid_id" in t.system_attrs
            and sampler._same_search_space(t.system_attrs["search_space"])
        }
        return len(sampler._all_grids) - len(started)
    except AttributeError:  # an Optuna whose private names differ: no cap, as before
        return 2**31


class DiagviOptunaSweeper(Sweeper):
    """Runs ``n_trials`` trials of an Optuna study, ``n_jobs`` at a time, through Hydra's launcher.

    Parameters
    ----------
    study_name
        Name of the study in ``storage``; an existing study of that name is resumed.
    storage
        SQLAlchemy URL of the study (SQLite by default). Several processes may share it.
    direction
        ``"minimize"`` or ``"maximize"``.
    metric_name
        Name of the objective, stored with the study (read by ``diagvi.report``).
    n_trials
        Trials this process runs; a rerun adds ``n_trials`` more to the study.
    n_jobs
        Trials asked together and handed to the launcher as one batch: they run in parallel
        with a parallel launcher, one after another with Hydra's basic launcher.
    sampler, pruner
        Configs (``_target_``) of an Optuna sampler and pruner; ``pruner: null`` never prunes.
        ``optuna.samplers.GridSampler`` gets its grid from ``params`` (choices only).
    params
        Search space: ``{key: sweep expression}`` (see the module docstring).
    """

    def __init__(
        self,
        study_name: str,
        storage: str,
        direction: str,
        metric_name: str | None,
        n_trials: int,
        n_jobs: int,
        sampler: DictConfig | None,
        pruner: DictConfig | None,
        params: DictConfig | None,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction must be one of {DIRECTIONS}: {direction!r}")
        if not storage:
            raise ValueError(
                "hydra.sweeper.storage must be a database URL (e.g. sqlite:///optuna.db): "
                "trials report to the study through it"
            )
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"n_trials and n_jobs must be >= 1, got {n_trials} and {n_jobs}")
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.metric_name, self.n_trials, self.n_jobs = metric_name, n_trials, n_jobs
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.params = OmegaConf.to_container(params) if params else {}
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _sampler(self, space: Mapping[str, Any], **kwargs: Any) -> Any:
        if not self.sampler_cfg:
            return None
        if self.sampler_cfg.get("_target_") != GRID_SAMPLER:
            return instantiate(self.sampler_cfg, **kwargs)
        grid = {k: getattr(d, "choices", None) for k, d in space.items()}
        if any(v is None for v in grid.values()):
            bad = [k for k, v in grid.items() if v is None]
            raise ValueError(f"GridSampler needs choice() for every parameter, not for {bad}")
        search = {k: list(v) for k, v in grid.items()}
        return instantiate(self.sampler_cfg, search_space=search, **kwargs)

    def _study(self, space: Mapping[str, Any]) -> Any:
        import optuna
        from sqlalchemy.exc import DBAPIError

        pruner = instantiate(self.pruner_cfg) if self.pruner_cfg else optuna.pruners.NopPruner()
        for attempt in range(3):
            try:
                study = optuna.create_study(
                    study_name=self.study_name,
                    storage=self.storage,
                    sampler=self._sampler(space),
                    pruner=pruner,
                    direction=self.direction,
                    load_if_exists=True,
                )
                break
            except DBAPIError:
                # workers that start together race to create (and stamp the schema version of)
                # a new database; the loser finds it made on the next attempt
                if attempt == 2:
                    raise
                time.sleep(1.0 + attempt)
        seed = self.sampler_cfg.get("seed") if self.sampler_cfg else None
        if self.sampler_cfg and self.sampler_cfg.get("_target_") == GRID_SAMPLER:
            # GridSampler shuffles the grid by its seed and marks a point visited by its place in
            # that order: every process of the study (workers with their own seeds, a rerun with
            # another) must shuffle alike, or it visits others' points again and skips the rest
            if study.user_attrs.get("grid_seed") is None:
                study.set_user_attr("grid_seed", int(seed or 0))
            first = study.user_attrs["grid_seed"]  # read back: a worker may have set it first
            if first != int(seed or 0):
                study.sampler = self._sampler(space, seed=first)
        elif study.trials and seed is not None:
            # a resumed study: a sampler seeded as in the first run would draw that run's
            # start-up trials again; the seed moves on with the trials already run, mixed into
            # the worker's seed (seed + n is the seed worker seed + 1 gets after n - 1 trials)
            import numpy as np

            moved = np.random.SeedSequence([int(seed), len(study.trials)]).generate_state(1)[0]
            study.sampler = instantiate(self.sampler_cfg, seed=int(moved))
        if study.direction.name.lower() != self.direction:
            raise ValueError(
                f"study {self.study_name!r} in {self.storage} was created to "
                f"{study.direction.name.lower()}, not to {self.direction}: choose another "
                "hydra.sweeper.study_name"
            )
        with warnings.catch_warnings():  # experimental in some Optuna versions
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            known = study.metric_names
        if self.metric_name and known and known != [self.metric_name]:
            raise ValueError(
                f"study {self.study_name!r} in {self.storage} optimises {known[0]!r}, not "
                f"{self.metric_name!r}: its trials' values are not comparable; choose another "
                "hydra.sweeper.study_name"
            )
        if self.metric_name:
            with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([self.metric_name])
        return study

    def _present(self, params: Mapping[str, Any], arguments: Sequence[str]) -> dict[str, Any]:
        """The config's ``params`` whose keys the composed config has: a search space written
        for one component (e.g. the unbalanced alignment's ``reach_scale``) still runs with
        another (``model/alignment=sinkhorn``); the command line's own keys are kept."""
        given = {o.get_key_element() for o in OverridesParser.create().parse_overrides(arguments)}
        absent = object()
        # a config group ("model/alignment: choice(sinkhorn, uot)") is no key of the config
        groups = OmegaConf.select(self.config, "hydra.runtime.choices", default=None) or {}
        kept = {
            k: v
            for k, v in params.items()
            if k in given
            or k in groups
            or OmegaConf.select(self.config, k, default=absent) is not absent
        }
        if dropped := sorted(set(params) - set(kept)):
            log.warning(f"not searched, the config has no such keys: {', '.join(dropped)}")
        return kept

    def _trial_overrides(self, trial: Any, fixed: list[str]) -> list[str]:
        sampled = [f"{k}={format_value(v)}" for k, v in trial.params.items()]
        spec = {
            "study_name": self.study_name,
            "storage": self.storage,
            # Optuna has no public accessor of the storage id a Trial(study, id) needs
            "trial_id": trial._trial_id,
            "number": trial.number,
            "name": f"trial_{trial.number}",
        }
        inner = ",".join(f"{k}:{format_value(v)}" for k, v in spec.items())
        return [*fixed, *sampled, f"optuna_trial={{{inner}}}"]

    @staticmethod
    def _store(study: Any, trial: Any, value: float | None, state: Any) -> None:
        try:
            study.tell(trial, value, state=state)
        except RuntimeError as err:
            # GridSampler calls study.stop() when the grid is done, which only works inside
            # study.optimize; the state is stored before it raises
            if "Study.stop" not in str(err):
                raise

    def _tell(self, study: Any, trial: Any, ret: JobReturn) -> str:
        """Record the job's outcome in the study; returns the trial state's name."""
        import optuna
        from optuna.trial import TrialState

        if ret.hydra_cfg is not None:
            trial.set_user_attr("run_dir", str(ret.hydra_cfg.hydra.runtime.output_dir))
        state, value = TrialState.FAIL, None
        # JobReturn.return_value re-raises a job's error (and prints it): not for a pruned one
        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, optuna.TrialPruned):
            state = TrialState.PRUNED
        else:
            try:
                value = float(ret.return_value)
                if not math.isfinite(value):
                    trial.set_user_attr("error", f"objective is {value}")
                    value = None
                else:
                    state = TrialState.COMPLETE
            except Exception as err:  # a failed trial is recorded, never stops the study
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
                log.warning(f"trial {trial.number} failed: {type(err).__name__}: {err}")
        self._store(study, trial, value, state)
        return state.name

    def sweep(self, arguments: list[str]) -> list[str]:
        """Run ``n_trials`` trials; returns their final states."""
        from optuna.samplers import GridSampler
        from optuna.trial import TrialState

        self.storage = sqlite_absolute(self.storage)
        fixed, space = search_space(self._present(self.params, arguments), arguments)
        if not space:
            raise ValueError(
                "empty search space: give hydra.sweeper.params sweep expressions, e.g. "
                "model.lr='tag(log, interval(1e-4, 1e-2))'"
            )
        study = self._study(space)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # where diagvi.report finds the study of this sweep folder
        info = {"study_name": self.study_name, "storage": self.storage, "metric": self.metric_name}
        OmegaConf.save(OmegaConf.create(info), sweep_dir / "study.yaml")
        log.info(f"Optuna study {self.study_name!r} in {self.storage}: {len(space)} parameters")
        states: list[str] = []
        while len(states) < self.n_trials:
            if isinstance(study.sampler, GridSampler) and study.sampler.is_exhausted(study):
                log.info("the grid is exhausted")
                break
            n = min(self.n_jobs, self.n_trials - len(states))
            if isinstance(study.sampler, GridSampler):
                # a batch larger than the points left would run some of them twice
                n = min(n, max(1, grid_points_left(study.sampler, study)))
            trials = [study.ask(dict(space)) for _ in range(n)]
            batch = [self._trial_overrides(t, fixed) for t in trials]
            for t, overrides in zip(trials, batch, strict=True):
                t.set_user_attr("overrides", overrides[:-1])  # without optuna_trial
            try:
                # compose every config here first: a bad key fails now, with Hydra's message
                self.validate_batch_is_legal(batch)
                returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            except BaseException:
                # a bad config or an interrupt: leave no trial RUNNING in the study
                for t in trials:
                    self._store(study, t, None, TrialState.FAIL)
                raise
            self.job_idx += len(returns)
            for t, ret in zip(trials, returns, strict=True):
                states.append(self._tell(study, t, ret))
                log.info(f"trial {t.number}: {states[-1]}")
        if states and all(s == "FAIL" for s in states):
            raise RuntimeError(
                f"all {len(states)} trials failed; see the errors above and in the trials' "
                f"folders under {sweep_dir}"
            )
        best = study.best_trial if any(s == "COMPLETE" for s in states) else None
        if best is not None:
            log.info(f"best trial {best.number}: {best.value} with {best.params}")
        return states
