"""What `tunefleet collect` adds for a search: the best trial, its parameters and artifact (search.md,
search.json) and the metric against each searched parameter (search.png), read from the study's
journal, the one record of every trial's parameters, state and value."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.outputs.run_files import metric_points, saved_artifact
from launcher.search.driver import SPEC_COPY, open_study
from launcher.search.space import load_search_file


def summarize(sweep_dir: Path, manifest: dict) -> dict:
    from optuna.trial import TrialState

    spec = load_search_file(str(sweep_dir / SPEC_COPY))
    search = manifest["search"]
    study = open_study(sweep_dir, spec, search["direction"])
    records = {r.get("trial"): r for r in manifest["runs"]}
    trials = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING:
            continue
        record = records.get(trial.number, {})
        values = {p.key: p.value_of(trial.params) for p in spec.params if p.key in trial.params}
        trials.append({"trial": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                       "params": values, "run_dir": record.get("run_dir", ""),
                       "last_step": max(trial.intermediate_values, default=None)})
    complete = [t for t in trials if t["state"] == "complete"]
    best = None
    if complete:
        best_trial = study.best_trial
        best = next(t for t in trials if t["trial"] == best_trial.number)
        best = {**best, "artifact": str(saved_artifact(best["run_dir"]) or "") if best["run_dir"] else ""}
    counts = {state: sum(t["state"] == state for t in trials) for state in ("complete", "pruned", "fail", "running")}
    return {"metric": search["metric"], "direction": search["direction"], "trials": trials, "best": best,
            "counts": counts, "planned": spec.trials, "log_keys": [p.key for p in spec.params if p.log],
            "keys": [p.key for p in spec.params]}


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = summary["keys"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for state, style in (("complete", {"marker": "o"}), ("pruned", {"marker": "x", "alpha": 0.6})):
            points = [(t["params"][key], t["value"]) for t in summary["trials"]
                      if t["state"] == state and t["value"] is not None and key in t["params"]]
            if points:
                xs = [x if isinstance(x, (int, float)) else str(x) for x, _ in points]
                ax.scatter(xs, [y for _, y in points], label=state, **style)
        if key in summary["log_keys"]:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(summary["metric"] + " (pruned: last reported)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(f"{summary['direction']} {summary['metric']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_search_report(sweep_dir: Path, manifest: dict) -> dict:
    sweep_dir = Path(sweep_dir)
    summary = summarize(sweep_dir, manifest)
    # A pruned trial has no value; plot it at its last reported one, so the plot shows where it stood.
    for trial in summary["trials"]:
        if trial["state"] == "pruned" and trial["value"] is None and trial["last_step"] is not None:
            points = dict(metric_points(Path(trial["run_dir"]), summary["metric"])) if trial["run_dir"] else {}
            trial["value"] = points.get(trial["last_step"])
    (sweep_dir / "search.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    _plot(sweep_dir / "search.png", summary)
    counts = summary["counts"]
    lines = [f"Search: {summary['direction']} {summary['metric']}; {len(summary['trials'])} of {summary['planned']} "
             f"trials started: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed, "
             f"{counts['running']} running."]
    best = summary["best"]
    if best:
        params = " ".join(f"{k}={v}" for k, v in best["params"].items())
        lines += [f"Best: trial {best['trial']} ({summary['metric']}={best['value']:.4f}) with {params}",
                  f"Artifact: {best['artifact'] or '(none)'}", "Plot: search.png (metric against each parameter)"]
    (sweep_dir / "search.md").write_text("\n".join(lines) + "\n")
    return summary
