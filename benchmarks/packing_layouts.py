"""Which micro batch layout trains fastest: data.packing = pack, group_by_length, none.

Runs `tunefleet run recipe=lora_long` once per layout, interleaved (A B C A B C ...), and prints the
median trained tokens/s and padding share of each, and their ratio to `none`. Same examples per
step in every layout (the layout never changes the global batch), so the ratio is pure layout.

    .venv/bin/python benchmarks/packing_layouts.py --repeats 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("pack", "group_by_length", "none")


def run_once(layout: str, steps: int, out: Path) -> dict:
    words = ["recipe=lora_long", f"data.packing={layout}", f"train.max_steps={steps}", "eval.at_start=false",
             "eval.sample_prompts=[]", "data.max_eval_samples=8", f"output.dir={out}"]
    subprocess.run([sys.executable, "-m", "launcher.cli", "run", *words], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for layout in LAYOUTS:
                metrics = run_once(layout, args.steps, Path(tmp) / f"{layout}-{repeat}")
                results[layout].append(metrics)
                print(f"{layout:16s} run {repeat}: {metrics['tokens_per_s']:.0f} tokens/s, "
                      f"padding {metrics['padding']:.3f}, train loss {metrics['train_loss']:.4f}", flush=True)
    base = statistics.median(m["tokens_per_s"] for m in results["none"])
    print("\n| layout | tokens/s (median) | padding | vs none |\n| --- | --- | --- | --- |")
    for layout in LAYOUTS:
        speed = statistics.median(m["tokens_per_s"] for m in results[layout])
        padding = statistics.median(m["padding"] for m in results[layout])
        print(f"| {layout} | {speed:.0f} | {padding:.3f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
