"""Tables and plots of a benchmark run: results.md, plots/metrics.png, plots/speed.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.benchmark.scoring import METRICS  # noqa: E402

REFERENCE, OURS = "scvi_diagvi", "diagvi"


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and number of seeds per dataset, method and metric."""
    return (
        results.groupby(["dataset", "method", "metric"], sort=False)["value"]
        .agg(mean="mean", sd="std", n="count")
        .reset_index()
    )


def speed_table(speed: pd.DataFrame) -> pd.DataFrame:
    """Per dataset: mean seconds/epoch and peak RSS of diagvi and the reference, and the
    ratios reference / diagvi (above 1: diagvi is faster or smaller)."""
    if speed.empty:
        return pd.DataFrame()
    mean = speed.groupby(["dataset", "method"], sort=False)[
        ["seconds_per_epoch", "rss_peak_mb", "rss_before_train_mb"]
    ].mean()
    rows = []
    for dataset in mean.index.get_level_values(0).unique():
        row = {"dataset": dataset}
        for method in (OURS, REFERENCE):
            if (dataset, method) in mean.index:
                r = mean.loc[(dataset, method)]
                row[f"{method} s/epoch"] = r["seconds_per_epoch"]
                row[f"{method} peak RSS MB"] = r["rss_peak_mb"]
                row[f"{method} train RSS MB"] = r["rss_peak_mb"] - r["rss_before_train_mb"]
        if f"{REFERENCE} s/epoch" in row and f"{OURS} s/epoch" in row:
            row["time ratio ref/diagvi"] = row[f"{REFERENCE} s/epoch"] / row[f"{OURS} s/epoch"]
            row["RSS ratio ref/diagvi"] = (
                row[f"{REFERENCE} peak RSS MB"] / row[f"{OURS} peak RSS MB"]
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, sd: float, n: int) -> str:
    if np.isnan(mean):
        return "nan"
    return f"{mean:.3f}" if n < 2 else f"{mean:.3f} ± {sd:.3f}"


def markdown(results: pd.DataFrame, speed: pd.DataFrame, failures, settings: dict) -> str:
    """``results.md``: one table per dataset (metrics x methods, mean ± sd), speed, failures."""
    lines = [
        "# Benchmark results",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
    ]
    lines += [
        "",
        "Arrows: ↑ higher is better, ↓ lower is better. Metric definitions: README.md.",
        "",
    ]
    summary = summarise(results)
    for dataset, frame in summary.groupby("dataset", sort=False):
        methods = list(dict.fromkeys(frame["method"]))
        lines += [f"## {dataset}", "", "| metric | " + " | ".join(methods) + " |"]
        lines.append("|---" * (len(methods) + 1) + "|")
        for metric in [m for m in METRICS if m in set(frame["metric"])]:
            cells = []
            for method in methods:
                hit = frame[(frame["method"] == method) & (frame["metric"] == metric)]
                cells.append(
                    _cell(hit["mean"].iloc[0], hit["sd"].iloc[0], hit["n"].iloc[0])
                    if len(hit)
                    else ""
                )
            arrow = "↑" if METRICS[metric][0] else "↓"
            lines.append(f"| {metric} {arrow} | " + " | ".join(cells) + " |")
        lines.append("")
    table = speed_table(speed)
    if not table.empty:
        lines += ["## Speed and memory (same data, epochs, batch size)", ""]
        lines.append("| " + " | ".join(table.columns) + " |")
        lines.append("|---" * len(table.columns) + "|")
        for _, row in table.iterrows():
            cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.3g}" for c in table.columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if failures:
        lines += ["## Failed runs", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines)


def plot_metrics(results: pd.DataFrame, path: Path) -> Path:
    """One panel per metric: bars per dataset and method, error bars one sd over seeds."""
    summary = summarise(results)
    names = [m for m in METRICS if m in set(summary["metric"])]
    ncols = 4
    nrows = max(1, -(-len(names) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    methods = list(dict.fromkeys(summary["method"]))
    for ax, metric in zip(axes.flat, names, strict=False):
        frame = summary[summary["metric"] == metric]
        data_names = list(dict.fromkeys(frame["dataset"]))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            sub = frame[frame["method"] == method].set_index("dataset").reindex(data_names)
            x = np.arange(len(data_names)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, sub["mean"], width, yerr=sub["sd"].fillna(0), label=method, capsize=2)
        ax.set_xticks(np.arange(len(data_names)), data_names, rotation=30, fontsize=8)
        ax.set_title(f"{metric} {'↑' if METRICS[metric][0] else '↓'}", fontsize=10)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(speed: pd.DataFrame, path: Path) -> Path | None:
    """Seconds per epoch and peak RSS per dataset, diagvi vs the reference."""
    if speed.empty:
        return None
    mean = speed.groupby(["dataset", "method"], sort=False)[["seconds_per_epoch", "rss_peak_mb"]]
    mean = mean.mean().reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, column, title in zip(
        axes,
        ("seconds_per_epoch", "rss_peak_mb"),
        ("seconds / epoch", "peak RSS (MB)"),
        strict=True,
    ):
        table = mean.pivot(index="dataset", columns="method", values=column)
        table.plot.bar(ax=ax, rot=30)
        ax.set(title=title, xlabel="")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    results: pd.DataFrame, speed: pd.DataFrame, failures, settings: dict, out: Path
) -> None:
    (out / "results.md").write_text(markdown(results, speed, failures, settings))
    speed_table(speed).to_csv(out / "speed_summary.csv", index=False)
    if not results.empty:
        plot_metrics(results, out / "plots" / "metrics.png")
    plot_speed(speed, out / "plots" / "speed.png")
