"""Derive the small shipped data sets in data/wordnet/ from Princeton WordNet 3.0.

Run once by a developer (needs Debian's `wordnet-base`); the output is committed, so
neither users nor CI need the package. WordNet's licence is copied to data/wordnet/LICENSE.

    python scripts/make_wordnet_data.py /usr/share/wordnet data/wordnet
"""

import json
import random
import sys
from pathlib import Path

PART_OF_SPEECH = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def read_synsets(wordnet_dir: Path, pos_file: str):
    for line in (wordnet_dir / f"data.{pos_file}").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # licence header
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        word_count = int(fields[3], 16)
        lemma = fields[4].replace("_", " ")
        lemma = lemma.split("(")[0]  # adjective markers such as "(a)"
        definition = gloss.split(";")[0].strip()
        if word_count and definition and lemma.isascii() and len(definition) > 10:
            yield lemma, definition


def write_jsonl(path: Path, rows):
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(wordnet_dir: str, out_dir: str) -> None:
    src, out = Path(wordnet_dir), Path(out_dir)
    rng = random.Random(1234)
    by_pos = {name: list(read_synsets(src, key)) for key, name in PART_OF_SPEECH.items()}
    for rows in by_pos.values():
        rng.shuffle(rows)

    # Definitions: instruction tuning ("Define X" -> gloss), mixed parts of speech.
    pairs = [(w, d, pos) for pos, rows in by_pos.items() for w, d in rows[:400]]
    rng.shuffle(pairs)
    alpaca = [{"instruction": f"Define the {pos} \"{w}\".", "input": "", "output": d} for w, d, pos in pairs]
    write_jsonl(out / "definitions_train.jsonl", alpaca[:1200])
    write_jsonl(out / "definitions_eval.jsonl", alpaca[1200:1328])
    chat = [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]} for r in alpaca[1328:1528]]
    write_jsonl(out / "definitions_chat.jsonl", chat)
    write_jsonl(out / "glosses_text.jsonl", [{"text": f"{w}: {d}."} for w, d, _ in pairs[1528:1600]])

    # Part of speech from the gloss alone: a 4-way text classification task.
    labelled = [(d, pos) for pos, rows in by_pos.items() for _, d in rows[400:700]]
    rng.shuffle(labelled)
    classify = [{"text": d, "label": pos} for d, pos in labelled]
    write_jsonl(out / "pos_train.jsonl", classify[:960])
    write_jsonl(out / "pos_eval.jsonl", classify[960:1200])


if __name__ == "__main__":
    main(*sys.argv[1:3])
