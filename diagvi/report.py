"""Report of an Optuna sweep: ``python -m diagvi.report SWEEP_DIR``.

Reads the study of a sweep folder (``SWEEP_DIR/study.yaml``, written by the ``diagvi_optuna``
sweeper, names its storage and study; ``--storage`` and ``--study`` override it) and writes
into ``SWEEP_DIR``:

- ``trials.csv`` and ``trials.md``: one row per trial (number, state, objective, parameters,
  duration, run folder), completed trials best first, then pruned and failed ones;
- ``history.png``: the objective of every trial and the best so far;
- ``objective_vs_<parameter>.png``: the objective against each hyperparameter;
- ``best_experiment.yaml``: the best trial's parameters as a ``configs/experiment`` file. Copy it
  to ``configs/experiment/<name>.yaml`` and train with
  ``python -m diagvi.train experiment=<name>`` (the sweep's fixed overrides, such as the data,
  are listed in its header comment).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf
from optuna.trial import TrialState

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}


def load_study(
    sweep_dir: Path, storage: str | None = None, study_name: str | None = None
) -> optuna.Study:
    """The study of ``sweep_dir`` (its ``study.yaml``), or the one named by the arguments."""
    info_path = Path(sweep_dir) / "study.yaml"
    info = OmegaConf.load(info_path) if info_path.is_file() else {}
    storage = storage or info.get("storage")
    study_name = study_name or info.get("study_name")
    if not storage:
        raise FileNotFoundError(
            f"no {info_path} (written by the diagvi_optuna sweeper): pass --storage "
            "(e.g. sqlite:///path/optuna.db) and --study"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def metric_name(study: optuna.Study) -> str:
    """The objective's name stored with the study, else ``objective``."""
    return (study.metric_names or ["objective"])[0]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, objective, parameters, seconds, run_dir; best first."""
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.duration else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                metric_name(study): t.value,
                **t.params,
                "seconds": seconds,
                "run_dir": t.user_attrs.get("run_dir"),
                "error": t.user_attrs.get("error"),
            }
        )
    # the columns every table has, even with no trial or no finished one (readers index them)
    always = ["number", "state", metric_name(study)]
    df = pd.DataFrame(rows, columns=None if rows else always)
    if df.empty:
        return df
    ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
    df["_state"] = df["state"].map(STATE_ORDER)
    df = df.sort_values(["_state", metric_name(study), "number"], ascending=[True, ascending, True])
    empty = [c for c in df.columns[df.isna().all()] if c not in always]
    return df.drop(columns=["_state", *empty]).reset_index(drop=True)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``df`` (floats to 4 significant digits)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(False)]
    return "\n".join(lines) + "\n"


def plot_history(study: optuna.Study, path: Path) -> None:
    """Objective of each completed (dots) and pruned (crosses) trial, and the best so far."""
    name = metric_name(study)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.value is not None]
    # a Figure without pyplot: files only, and no backend switched for whoever imports this
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete")
    if pruned:
        x, y = [t.number for t in pruned], [t.value for t in pruned]
        ax.scatter(x, y, marker="x", c="grey", label="pruned (last value)")
    best, best_so_far = None, []
    better = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    for t in done:
        best = t.value if best is None else better(best, t.value)
        best_so_far.append(best)
    ax.step([t.number for t in done], best_so_far, where="post", c="C1", label="best so far")
    ax.set(xlabel="trial", ylabel=name, title=f"{study.study_name}: optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_parameters(study: optuna.Study, sweep_dir: Path) -> list[Path]:
    """``objective_vs_<param>.png`` for every parameter of the completed trials."""
    name = metric_name(study)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    written = []
    for param in sorted({p for t in done for p in t.params}):
        trials = [t for t in done if param in t.params]
        x = [t.params[param] for t in trials]
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
            points = ax.scatter(x, [t.value for t in trials], c=[t.number for t in trials])
            fig.colorbar(points, label="trial")
            if getattr(trials[0].distributions[param], "log", False):
                ax.set_xscale("log")
        else:  # categorical: one column per choice
            ax.scatter([str(v) for v in x], [t.value for t in trials])
        ax.set(xlabel=param, ylabel=name)
        fig.tight_layout()
        path = sweep_dir / f"objective_vs_{param.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def best_experiment_yaml(study: optuna.Study) -> str:
    """The best trial's parameters as a ``# @package _global_`` experiment config."""
    best = study.best_trial
    body, groups = OmegaConf.create(), []
    for key, value in best.params.items():
        key = key.lstrip("+~")
        if "/" in key:  # a config group choice, e.g. model/alignment
            # no choice (e.g. model/classifier=null) is YAML's null; Python's None would be
            # read as an option named "None"
            groups.append(f"  - override /{key}: {'null' if value is None else value}")
        else:
            OmegaConf.update(body, key, value, force_add=True)
    fixed = [
        o
        for o in best.user_attrs.get("overrides", [])
        if o.split("=", 1)[0] not in best.params and not o.startswith("hparams_search=")
    ]
    lines = [
        "# @package _global_",
        f"# Best trial ({best.number}) of Optuna study {study.study_name!r}: "
        f"{metric_name(study)} = {best.value:.6g} ({study.direction.name.lower()}).",
        f"# The sweep also fixed: {' '.join(fixed) or '(nothing)'}",
        "# Use: copy to configs/experiment/<name>.yaml, then",
        "#   python -m diagvi.train experiment=<name>",
    ]
    if groups:
        lines += ["defaults:", *groups]
    # a sweep of config groups only has no values: an empty body would be written "{}", which
    # after the defaults list is not YAML
    return "\n".join(lines) + "\n" + (OmegaConf.to_yaml(body) if body else "")


def write_report(
    sweep_dir: Path, storage: str | None = None, study_name: str | None = None
) -> dict[str, Path]:
    """Write the tables, plots and best experiment of a sweep into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    study = load_study(sweep_dir, storage, study_name)
    df = trials_frame(study)
    out = {"csv": sweep_dir / "trials.csv", "md": sweep_dir / "trials.md"}
    df.to_csv(out["csv"], index=False)
    out["md"].write_text(
        f"# Study {study.study_name}: {metric_name(study)} "
        f"({study.direction.name.lower()})\n\n" + markdown_table(df)
    )
    out["history"] = sweep_dir / "history.png"
    plot_history(study, out["history"])
    for path in plot_parameters(study, sweep_dir):
        out[path.stem] = path
    if any(t.state == TrialState.COMPLETE for t in study.trials):
        out["best"] = sweep_dir / "best_experiment.yaml"
        out["best"].write_text(best_experiment_yaml(study))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m diagvi.report SWEEP_DIR [--storage URL] [--study NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m diagvi.report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's hydra.sweep.dir")
    parser.add_argument("--storage", help="Optuna storage URL (default: from study.yaml)")
    parser.add_argument("--study", help="study name (default: from study.yaml)")
    args = parser.parse_args(argv)
    out = write_report(args.sweep_dir, args.storage, args.study)
    df = pd.read_csv(out["csv"])
    print(f"diagvi.report: {len(df)} trials ({df['state'].value_counts().to_dict()})")
    if "best" in out:
        print(f"best trial: {out['best'].read_text().splitlines()[1][2:]}")
    print(f"diagvi.report: wrote {len(out)} files into {args.sweep_dir}")


if __name__ == "__main__":
    main()
