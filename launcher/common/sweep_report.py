"""The report of a sweep: per configuration, the mean, standard deviation and count of the chosen metric over its
seeds; the best configuration; written as report.json, report.md and sweep.png in the sweep directory.

A trial's value is the last value of the metric in its metrics.jsonl (the final evaluation of a completed run);
trials without one (not finished, or the metric never logged) are counted as missing, never as zero. The standard
deviation is the sample one (n - 1 in the denominator, `statistics.stdev`), as papers report over seeds; with one
seed it is undefined and shown as such.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.common.jsonl import read_jsonl
from launcher.common.rundir import read_baseline, write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "sweep.png"


@dataclass(frozen=True)
class ConfigResult:
    config: int
    values: dict[str, Any]
    """The configuration's swept values."""
    trials: dict[str, float | None]
    """Trial name -> its metric value (None: missing)."""
    mean: float | None
    std: float | None
    """Sample standard deviation; None with fewer than two values."""
    n: int


def final_metric(run_dir: Path, metric: str) -> float | None:
    """The metric's last finite value in a run's metrics.jsonl, or None."""
    return final_values(run_dir, (metric,))[metric]


def final_values(run_dir: Path, keys: tuple[str, ...]) -> dict[str, float | None]:
    """The last finite value of each key in a run's metrics.jsonl (None where it has none), in one read."""
    found: dict[str, float | None] = dict.fromkeys(keys)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return found
    for row in read_jsonl(path):
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                found[key] = float(value)
    return found


def summarise(sweep: dict[str, Any], sweep_dir: Path) -> list[ConfigResult]:
    """One result per configuration of sweep.json, in configuration order."""
    by_config: dict[int, dict[str, float | None]] = {}
    for trial in sweep["trials"]:
        value = final_metric(sweep_dir / "trials" / trial["name"], sweep["metric"])
        by_config.setdefault(trial["config"], {})[trial["name"]] = value
    results = []
    for index, trials in sorted(by_config.items()):
        values = [v for v in trials.values() if v is not None]
        results.append(ConfigResult(
            config=index, values=sweep["configs"][index], trials=trials,
            mean=statistics.fmean(values) if values else None,
            std=statistics.stdev(values) if len(values) >= 2 else None, n=len(values)))
    return results


def best(results: list[ConfigResult], mode: str) -> ConfigResult | None:
    scored = [r for r in results if r.mean is not None]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r.mean)  # type: ignore[arg-type,return-value]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in values.items()) or "(recipe)"


def markdown(sweep: dict[str, Any], results: list[ConfigResult], baseline: tuple[str, float] | None = None) -> str:
    top = best(results, sweep["mode"])
    lines = [f"# Sweep report: {sweep['metric']} ({sweep['mode']} is best)", "",
             f"Recipe: `{sweep['recipe']}`; {len(sweep['trials'])} trials, {len(results)} configurations.", "",
             f"| config | values | {sweep['metric']} mean ± std | n | trials |", "|---|---|---|---|---|"]
    for r in results:
        mark = " **best**" if top is not None and r.config == top.config else ""
        trials = ", ".join(f"{name}: {_fmt(v)}" for name, v in r.trials.items())
        lines.append(f"| c{r.config}{mark} | {_values_text(r.values)} | {_fmt(r.mean)} ± {_fmt(r.std)} | "
                     f"{r.n}/{len(r.trials)} | {trials} |")
    if top is not None:
        lines += ["", f"Best: c{top.config} ({_values_text(top.values)}): {_fmt(top.mean)} ± {_fmt(top.std)} "
                      f"over {top.n} seed(s)."]
    if baseline is not None:
        lines += ["", f"Baseline to beat ({baseline[0]}, `launch baseline`): {_fmt(baseline[1])}."]
    return "\n".join(lines) + "\n"


def plot(sweep: dict[str, Any], results: list[ConfigResult], path: Path, baseline: float | None = None) -> None:
    """Each trial's value as a dot, each configuration's mean ± std as an error bar, the baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(results) + 2), 3.5))
    for r in results:
        dots = [v for v in r.trials.values() if v is not None]
        ax.scatter([r.config] * len(dots), dots, s=14, color="tab:gray", zorder=2)
        if r.mean is not None:
            ax.errorbar([r.config], [r.mean], yerr=[r.std or 0.0], fmt="o", color="tab:blue", capsize=4, zorder=3)
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", linestyle="--", label="baseline")
        ax.legend()
    ax.set_xticks([r.config for r in results], [f"c{r.config}" for r in results])
    ax.set_xlabel("configuration")
    ax.set_ylabel(sweep["metric"])
    ax.set_title(f"{sweep['metric']}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def all_trials_completed(sweep_dir: Path) -> bool:
    from launcher.common import outcome

    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    return all(outcome.completed(sweep_dir / "trials" / t["name"]) for t in sweep["trials"])


def write_report(sweep_dir: Path) -> tuple[dict[str, Any], list[ConfigResult], dict[str, Any] | None]:
    """report.json, report.md and sweep.png from the trials' metrics as they are now; returns the sweep, the results
    per configuration and the baseline bar (report.json's `baseline`)."""
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    results = summarise(sweep, sweep_dir)
    top = best(results, sweep["mode"])
    baseline = _baseline(sweep_dir, sweep["metric"], sweep["mode"])
    bar = None if baseline is None else {"name": baseline[0], "value": baseline[1]}
    write_json_atomic(sweep_dir / REPORT_JSON, {
        "metric": sweep["metric"], "mode": sweep["mode"], "best_config": None if top is None else top.config,
        "baseline": bar, "configs": [asdict(r) for r in results]})
    write_text_atomic(sweep_dir / REPORT_MD, markdown(sweep, results, baseline))
    plot(sweep, results, sweep_dir / REPORT_PNG, None if baseline is None else baseline[1])
    return sweep, results, bar


def _baseline(sweep_dir: Path, metric: str, mode: str) -> tuple[str, float] | None:
    """The best baseline's value of the metric, when SWEEP_DIR/baseline.json (`launch baseline SWEEP`) has it: the bar
    every configuration must clear."""
    baseline = read_baseline(sweep_dir)
    if baseline is None:
        return None
    scored = [(name, float(values[metric])) for name, values in baseline.get("baselines", {}).items()
              if isinstance(values.get(metric), (int, float))]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda item: item[1])
