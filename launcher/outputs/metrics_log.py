"""Metrics of a run: metrics.jsonl (one line per logged step), TensorBoard events, a loss-curve PNG.

Only the main process writes; the others hold a no-op logger.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self.rows: list[dict] = []
        self._writer = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self._file = (run_dir / "metrics.jsonl").open("a")

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.run_dir is None:
            return
        row = {"step": step, **values}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for name, value in values.items():
            group = "eval" if name.startswith("eval_") else "train"
            self._writer.add_scalar(f"{group}/{name}", value, step)

    def close(self) -> None:
        if self.run_dir is None:
            return
        self._writer.close()
        self._file.close()
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
