"""Distilled student vs the same student on hard labels vs the teacher: eval quality and speed.

    .venv/bin/python benchmarks/distill.py                     # the tables in distill.md (12 runs, ~6 min alone)
    .venv/bin/python benchmarks/distill.py --seeds 1 --out /tmp/x
    .venv/bin/python benchmarks/distill.py --seeds 0 --student RUN/final   # speed only

Every training run is `tunefleet run recipe=distill_classify` (teacher: the shipped classify_lora run
data/teachers/minilm_pos, MiniLM-L6 + LoRA; student: its blocks 0, 2, 4, full fine-tuning), as shipped
(distill.alpha=0.9, temperature 4) or with distill.alpha=0 (the same student, data, steps and seed,
trained on the labels alone), with the first 96 labelled rows (as shipped) or all 960, evaluated once at the end on
the recipe's eval file (240 rows). train.seed varies the data order and dropout. Speed: eval forward
passes over those 240 rows (batch 32, float32, this machine's CPU), teacher and student alternating,
best of 5 (other work on the machine only slows a pass down).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ["recipe=distill_classify", "eval.every_steps=null", "eval.at_start=false", "output.trackers=[]"]
VARIANTS = {"distilled": [], "hard labels": ["distill.alpha=0"]}
REGIMES = {"96 (as shipped)": [], "960 (all)": ["data.max_samples=null"]}


def train(out: Path, seed: int, words: list[str]) -> dict:
    argv = [sys.executable, "-m", "launcher.cli", "run", *COMMON, *words, f"train.seed={seed}", f"output.dir={out}"]
    started = time.time()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    final = json.loads((out / "metrics.json").read_text())["eval_final"]
    return {"f1": final["eval_f1"], "accuracy": final["eval_accuracy"], "wall_s": time.time() - started}


def evaluate_folder(folder: Path, labels: list[str]) -> tuple[dict, float]:
    """(accuracy and macro F1 on the eval file, best seconds for one pass over it) of a saved classifier."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (ROOT / "data/wordnet/pos_eval.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    batches = [tokenizer([r["text"] for r in rows[i:i + 32]], padding=True, truncation=True, max_length=64,
                         return_tensors="pt") for i in range(0, len(rows), 32)]
    best, predicted = float("inf"), []
    for _ in range(5):
        started = time.perf_counter()
        with torch.no_grad():
            predicted = [i for b in batches for i in model(**b).logits.argmax(-1).tolist()]
        best = min(best, time.perf_counter() - started)
    truth = [labels.index(r["label"]) for r in rows]
    return {"accuracy": accuracy_score(truth, predicted),
            "f1": f1_score(truth, predicted, average="macro", zero_division=0)}, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="train.seed 1..N for every variant")
    parser.add_argument("--out", type=Path, default=Path("/tmp/distill_bench"), help="run folders go here (new)")
    parser.add_argument("--student", type=Path, help="a trained student folder to time (default: the first run's)")
    args = parser.parse_args()

    from transformers import AutoConfig

    from launcher.config.load import load_recipe
    from launcher.model.sources import materialize

    results: dict[tuple[str, str], list[dict]] = {}
    for regime, regime_words in REGIMES.items():
        for seed in range(1, args.seeds + 1):
            for name, words in VARIANTS.items():
                out = args.out / f"{regime.split()[0]}-{'hard' if words else 'distilled'}-seed{seed}"
                results.setdefault((regime, name), []).append(train(out, seed, [*regime_words, *words]))
                print(f"{regime} rows, seed {seed}, {name}: {results[regime, name][-1]}", flush=True)
    if results:
        print("\n| labelled rows | student (3 of 6 blocks) | median eval F1 | F1 per seed | median accuracy |")
        print("| --- | --- | --- | --- | --- |")
        for (regime, name), rows in results.items():
            print(f"| {regime} | {name} | {statistics.median(r['f1'] for r in rows):.3f} | "
                  f"{', '.join(format(r['f1'], '.3f') for r in rows)} | "
                  f"{statistics.median(r['accuracy'] for r in rows):.3f} |")
        print("training wall time per run (median): " + ", ".join(
            f"{regime} rows {name} {statistics.median(r['wall_s'] for r in rows):.0f} s"
            for (regime, name), rows in results.items()))

    _, recipe = load_recipe(COMMON)
    teacher = Path(materialize(recipe.model.name))  # the folded teacher, as the runs used it
    student = args.student or args.out / "96-distilled-seed1" / "final"
    labels = json.loads((student / "labels.json").read_text())
    quality, passes = {}, {"teacher": [], "student": []}
    for _ in range(3):  # interleaved, so drift in the machine's speed hits both alike
        for who, folder in (("teacher", teacher), ("student", student)):
            quality[who], seconds = evaluate_folder(folder, labels)
            passes[who].append(seconds)
    blocks = {who: AutoConfig.from_pretrained(folder).num_hidden_layers
              for who, folder in (("teacher", teacher), ("student", student))}
    t_s, s_s = statistics.median(passes["teacher"]), statistics.median(passes["student"])
    print(f"\nteacher ({blocks['teacher']} blocks): {quality['teacher']}; student ({blocks['student']} blocks, "
          f"{student}): {quality['student']}")
    print(f"eval pass over 240 rows (median of 3 interleaved best-of-5): teacher {t_s:.3f} s, student {s_s:.3f} s: "
          f"{t_s / s_s:.2f}x faster")


if __name__ == "__main__":
    main()
