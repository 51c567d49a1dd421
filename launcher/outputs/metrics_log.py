"""Metrics of a run: metrics.jsonl (one line per logged step), the experiment trackers, a loss-curve PNG.

Only the main process writes; the others hold a logger whose run_dir is None and do nothing.
Every row goes to metrics.jsonl and, in the same call, to the trackers of output.trackers
(TensorBoard by default) through accelerate (launcher.outputs.trackers starts them).
On resume, lines (and TensorBoard events) after the checkpoint's step are dropped first, so a
step that ran before the interruption and runs again after it appears once.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.outputs.run_files import METRICS_ROWS_FILE


class MetricsLog:
    def __init__(self, run_dir: Path | None, accelerator=None):
        self.run_dir = run_dir
        self.accelerator = accelerator  # its trackers receive every row
        self.rows: list[dict] = []
        self._file = None

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS_ROWS_FILE

    def truncate_after(self, step: int) -> None:
        if self.run_dir is None or not self.path.exists():
            return
        kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.rows = [row for row in kept if row["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        tmp.replace(self.path)

    def open(self) -> None:
        if self.run_dir is None:
            return
        self._file = self.path.open("a")

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.run_dir is None:
            return
        row = {"step": step, **values}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.accelerator is not None:
            # The group prefix puts train and eval curves in their own panels in every tracker.
            self.accelerator.log({f"{'eval' if name.startswith('eval_') else 'train'}/{name}": value
                                  for name, value in values.items()}, step=step)

    def close(self) -> None:
        if self.run_dir is None or self._file is None:
            return
        self._file.close()  # the trackers are finished by accelerator.end_training() (train.loop.release)
        self._file = None
        self.plot(self.run_dir / "loss_curves.png")

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), marker="o", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
