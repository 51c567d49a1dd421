"""`tunefleet collect SWEEP`: one table of results, one comparison plot, the failures, the best run.

Writes into the sweep folder: results.csv and results.md (sorted by the runs' eval metric, best
first), curves.png (training loss and eval loss of every run against the step), failures.md (each
failed run with its state and the last lines of its log), and tensorboard/ with one hparams entry
per run (`tensorboard --logdir SWEEP/tensorboard` shows them side by side).
"""

from __future__ import annotations

import csv
from pathlib import Path

from launcher.cluster.executor import executor_for
from launcher.cluster.status import RunRow, gather
from launcher.errors import UserError
from launcher.outputs.run_files import RunSummary, read_metric_rows, read_summary, saved_artifact
from launcher.train.evaluate import HIGHER_IS_BETTER

TAIL_LINES = 20
NOT_FAILED = ("finished", "pruned")  # pruned: a search stopped it on purpose


def failed(row: RunRow) -> bool:
    """Ended without finishing; a run still pending, running or completing has not failed (yet)."""
    return row.run.ended and row.state.split()[0] not in NOT_FAILED


def _result(row: RunRow) -> dict:
    record = row.record
    run_dir = Path(record["run_dir"])
    summary = read_summary(run_dir) or RunSummary()
    best, final = summary.best, summary.eval_final
    artifact = saved_artifact(run_dir)
    return {"run": record["name"], **{k: v for k, v in record.get("overrides", {}).items()}, "state": row.state,
            "steps": summary.steps, "train_loss": summary.train_loss,
            "metric": (best.metric if best else None) or next(iter(final), None),
            "value": best.value if best else final.get("eval_loss"),
            "best_step": best.step if best else None, "runtime_s": summary.runtime_s,
            "artifact": str(artifact or "")}


def _sort_key(result: dict):
    value = result["value"]
    if value is None:
        return (1, 0.0)
    metric = (result["metric"] or "").removeprefix("eval_")
    return (0, -value if metric in HIGHER_IS_BETTER else value)


def _write_tables(sweep_dir: Path, results: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in results for k in r))
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results)
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in results]
    (sweep_dir / "results.md").write_text("\n".join(lines) + "\n")


def _plot(sweep_dir: Path, rows: list[RunRow]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        metrics = read_metric_rows(Path(row.record["run_dir"]))
        name = row.record["name"]
        train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
        if train:
            train_ax.plot(*zip(*train), label=name)
        if evals:
            eval_ax.plot(*zip(*evals), marker="o", label=name)
    for ax, title in ((train_ax, "training loss"), (eval_ax, "eval loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sweep_dir / "curves.png", dpi=110)
    plt.close(fig)


def _failures(rows: list[RunRow], executor) -> list[str]:
    lines = []
    for row in filter(failed, rows):
        logs = executor.log_files(Path(row.record["run_dir"]))
        tail = logs[-1].read_text(errors="replace").splitlines()[-TAIL_LINES:] if logs else ["(no log)"]
        lines += [f"## {row.record['name']}: {row.state}", "", "```", *tail, "```", ""]
    return lines


def _tensorboard(sweep_dir: Path, results: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for result in results:
        hparams = {k: v for k, v in result.items() if k not in ("run", "state", "steps", "train_loss", "metric",
                                                                "value", "best_step", "runtime_s", "artifact")}
        metrics = {f"hparam/{k}": v for k, v in (("train_loss", result["train_loss"]), ("value", result["value"]))
                   if isinstance(v, (int, float))}
        with SummaryWriter(log_dir=str(sweep_dir / "tensorboard" / result["run"])) as writer:
            writer.add_hparams({k: str(v) for k, v in hparams.items()} or {"run": result["run"]}, metrics,
                               run_name=".")


def collect(sweep_dir: Path) -> dict:
    sweep = gather(sweep_dir)
    manifest, rows = sweep.manifest, sweep.rows
    if not manifest.get("sweep_dir"):
        raise UserError(f"{sweep_dir} is a single run, not a sweep: its results are in {sweep_dir}/metrics.json")
    sweep_dir = Path(manifest["sweep_dir"])
    results = sorted((_result(row) for row in rows), key=_sort_key)
    _write_tables(sweep_dir, results)
    _plot(sweep_dir, rows)
    failures = _failures(rows, executor_for(manifest))
    (sweep_dir / "failures.md").write_text("\n".join(failures) if failures else "No run failed.\n")
    _tensorboard(sweep_dir, results)
    if "search" in manifest:
        from launcher.search.report import write_search_report

        write_search_report(sweep_dir, manifest)
    finished = [r for r in results if r["state"] == "finished" and r["value"] is not None]
    return {"results": results, "best": finished[0] if finished else None,
            "failed": [row.record["name"] for row in rows if failed(row)],
            "going": [row.record["name"] for row in rows if not row.run.ended]}


def cmd_collect(words: list[str]) -> int:
    if len(words) != 1:
        raise UserError("usage: tunefleet collect SWEEP_DIR")
    sweep_dir = Path(words[0])
    summary = collect(sweep_dir)
    print((sweep_dir / "results.md").read_text(), end="")
    best = summary["best"]
    if best:
        print(f"[tunefleet] best run: {best['run']} ({best['metric']}={best['value']:.4f}); artifact {best['artifact']}")
    if summary["going"]:
        print(f"[tunefleet] {len(summary['going'])} run(s) still going (collected as they are now): "
              f"{', '.join(summary['going'])}")
    if summary["failed"]:
        print(f"[tunefleet] {len(summary['failed'])} run(s) did not finish: {', '.join(summary['failed'])} "
              f"(see {sweep_dir / 'failures.md'})")
    if (sweep_dir / "search.md").is_file():
        print((sweep_dir / "search.md").read_text(), end="")
    print(f"[tunefleet] wrote results.csv, results.md, curves.png, failures.md and tensorboard/ in {sweep_dir}")
    return 0
