"""Prepared data for a run: checked, tokenized once, cached, mixed by weight, with an eval split.

Tokenization runs on the first process of each machine before the process group exists; the
others wait on a file lock (see launcher.cache), so preprocessing of any length can never trip
a collective timeout. The cache (under `$TUNEFLEET_DATA_CACHE`) is keyed by the content of the
data files (of a hub data set: the fingerprint `datasets` gives the version it loaded),
everything about the tokenizer that changes its tokens (its files, revision, chat template and
special tokens), the format settings and this module's FORMAT_VERSION: change any of them and
the data is rebuilt. File sizes and mtimes are not enough: a same-size edit or a
copy that keeps the mtime would reuse stale tokens.

With eval_fraction, rows are held out from each source before sources are mixed: mixing repeats
the rows of oversampled sources, and a split after it would put copies of one row on both sides.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.cache import build_once, data_cache_root, digest, file_sha256
from launcher.data.formats import tokenize_rows
from launcher.data.rows import check_rows, load_rows, resolve_data_path
from launcher.errors import UserError

if TYPE_CHECKING:
    import datasets

FORMAT_VERSION = 2

# Files of a model folder that decide how text becomes tokens (whichever of them are present).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges*", "*.model",
                   "*.tiktoken", "chat_template*", "additional_chat_templates/*")


@dataclass
class PreparedData:
    train: datasets.Dataset  # columns input_ids, labels
    eval: datasets.Dataset | None
    label_names: list[str] | None  # classification only, in id order
    dropped: int = 0  # examples (train and eval) dropped because the prompt filled data.max_seq_len
    examples: int = 0  # examples tokenized, the dropped ones included
    cache_key: str | None = None  # digest of everything the tokens depend on (a resume must see the same)


def _file_identity(path: str, rows) -> list:
    """Content, not path/size/mtime: a same-size edit or an mtime-preserving copy must rebuild.

    A hub data set has no file of ours to hash: `datasets` fingerprints what it loaded (the
    revision and data files it resolved), so a data set updated upstream is tokenized again."""
    local = resolve_data_path(path)
    if local is None:
        return ["hub", path, getattr(rows, "_fingerprint", None)]
    return ["sha256", file_sha256(local)]


def _tokenizer_folder(tokenizer, revision: str | None) -> Path | None:
    """The folder the tokenizer was loaded from: a local model folder, or the hub cache's snapshot of `revision`."""
    name = tokenizer.name_or_path
    if not name:
        return None  # built in memory: the backend state in the identity covers it
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import try_to_load_from_cache

    for filename in ("tokenizer_config.json", "tokenizer.json"):
        try:
            found = try_to_load_from_cache(name, filename, revision=revision)
        except ValueError:  # not a valid repo id either
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def _tokenizer_files(folder: Path | None) -> dict[str, str]:
    if folder is None:
        return {}
    files = sorted({p for pattern in TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()})
    return {str(p.relative_to(folder)): file_sha256(p) for p in files}


def _tokenizer_identity(tokenizer, revision: str | None) -> dict:
    """Everything that changes the tokens: the tokenizer's files and revision, its live state, template and specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # covers changes made after loading, and hub ids
    return {
        "files": _tokenizer_files(_tokenizer_folder(tokenizer, revision)),
        "revision": revision,
        "class": type(tokenizer).__name__,
        "backend": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None,
        "size": len(tokenizer),
        "chat_template": tokenizer.chat_template,
        "special_tokens": tokenizer.special_tokens_map,
    }


def _label_names(data_cfg, rows_by_source) -> list[str]:
    if data_cfg.labels:
        return list(data_cfg.labels)
    seen = {str(label) for rows, _ in rows_by_source for label in rows[data_cfg.label_field]}
    if all(s.lstrip("-").isdigit() for s in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def _check_labels(rows, where, label_field: str, names: list[str]) -> None:
    known = set(names)
    for i, label in enumerate(rows[label_field]):
        if str(label) not in known:
            raise UserError(f"{where(i)}: label {label!r} is not one of data.labels {names}")


def _check_templates(data_cfg, sources, tokenizer) -> None:
    """Refuse format/template pairs that cannot render, before anything is tokenized."""
    chat_sources = [s.path for s in sources if s.format == "chat"]
    if chat_sources and data_cfg.prompt_template == "alpaca":
        # The classic Alpaca prompt has one instruction and one response: it has no form for a
        # system prompt or several turns, so there is nothing faithful to render chat rows into.
        raise UserError(
            f"data.format=chat ({', '.join(chat_sources)}) cannot use data.prompt_template=alpaca: the classic "
            "Alpaca prompt has no form for multi-turn conversations. Use data.prompt_template=auto or chat "
            "(chat rows are rendered with the tokenizer's chat template), or convert the rows to format alpaca"
        )
    if chat_sources and not tokenizer.chat_template:
        raise UserError("data.format=chat needs a tokenizer with a chat template; this model's has none "
                        "(use format alpaca with data.prompt_template=alpaca)")
    if data_cfg.prompt_template == "chat" and not tokenizer.chat_template:
        raise UserError("data.prompt_template=chat but the tokenizer has no chat template; use auto or alpaca")


def _holdout(num_rows: int, fraction: float, seed: int, path: str) -> tuple[list[int], list[int]]:
    """Row indices kept for training and held out for evaluation: a seeded shuffle, ceil(fraction x rows) held out."""
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    held_out = math.ceil(fraction * num_rows)
    if held_out >= num_rows:
        raise UserError(f"{path} has {num_rows} row(s): too few to hold out data.eval_fraction={fraction} and "
                        "still train on it; add rows, set data.eval, or lower data.eval_fraction")
    return order[held_out:], order[:held_out]


def _select(rows, where, indices: list[int]):
    """A subset of rows whose `where` still names the original file line."""
    return rows.select(indices), lambda i: where(indices[i])


def _tokenize(rows, where, tokenize, fmt: str, desc: str, counts: dict):
    """Tokenize one source; drop (and count) the examples whose prompt left no target token."""
    tokenized = rows.map(partial(tokenize, fmt=fmt, where=where), batched=True, with_indices=True,
                         remove_columns=rows.column_names, desc=desc)
    kept = tokenized.filter(lambda flags: flags, input_columns="has_target", batched=True, desc="dropping empty")
    counts["examples"] += len(tokenized)
    counts["dropped"] += len(tokenized) - len(kept)
    return kept.remove_columns("has_target")


def _mix(parts: list, sources, seed: int):
    """Interleave training sources by weight, repeating the smaller ones until every source is used up."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    total = sum(s.weight for s in sources)
    return datasets.interleave_datasets(parts, probabilities=[s.weight / total for s in sources], seed=seed,
                                        stopping_strategy="all_exhausted")


def _merge_eval(parts: list, seed: int):
    """Held-out rows of every source, shuffled so data.max_eval_samples takes from all of them."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def _report_dropped(counts: dict, max_seq_len: int, quiet: bool) -> None:
    if counts["dropped"] and not quiet:
        print(f"[tunefleet] {counts['dropped']} of {counts['examples']} examples dropped: prompt longer than "
              f"data.max_seq_len={max_seq_len} (no response token left to train on)", flush=True)


def prepare_data(recipe, tokenizer, *, quiet: bool = False) -> PreparedData:
    """Check, tokenize (cached), split, mix the recipe's data."""
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    data_cfg = recipe.data
    sources = data_cfg.sources
    _check_templates(data_cfg, sources, tokenizer)

    loaded = []
    for source in sources:
        rows, where = load_rows(source.path, source.split)
        check_rows(rows, source.format, where, data_cfg.text_field, data_cfg.label_field)
        loaded.append((rows, where))
    eval_loaded = None
    if data_cfg.eval:
        eval_loaded = load_rows(data_cfg.eval)
        check_rows(eval_loaded[0], sources[0].format, eval_loaded[1], data_cfg.text_field, data_cfg.label_field)

    label_names = None
    if recipe.model.task == "classification":
        label_names = _label_names(data_cfg, loaded)
        if len(label_names) < 2:
            raise UserError(f"classification needs at least two labels; the training data has {label_names}")
        for rows, where in loaded + ([eval_loaded] if eval_loaded else []):
            _check_labels(rows, where, data_cfg.label_field, label_names)

    key = digest({
        "version": FORMAT_VERSION,
        "sources": [[_file_identity(s.path, rows), s.format, s.weight, s.split]
                    for s, (rows, _) in zip(sources, loaded)],
        "eval": _file_identity(data_cfg.eval, eval_loaded[0]) if data_cfg.eval else None,
        "settings": data_cfg.model_dump(exclude={"train", "eval", "augment"}),  # augment acts on tokens later
        "labels": label_names,
        "tokenizer": _tokenizer_identity(tokenizer, recipe.model.revision),
        "seed": recipe.train.seed,
    })
    tokenize = partial(
        tokenize_rows, tokenizer=tokenizer, max_len=data_cfg.max_seq_len, prompt_template=data_cfg.prompt_template,
        text_field=data_cfg.text_field, label_field=data_cfg.label_field,
        label_ids={name: i for i, name in enumerate(label_names)} if label_names else None,
    )
    seed = recipe.train.seed
    hold_out = not eval_loaded and data_cfg.eval_fraction > 0

    def build(tmp: Path) -> None:
        counts = {"examples": 0, "dropped": 0}
        train_parts, eval_parts = [], []
        for (rows, where), source in zip(loaded, sources):
            name = Path(source.path).name
            if hold_out:
                train_rows, eval_rows = _holdout(len(rows), data_cfg.eval_fraction, seed, source.path)
                held_rows, held_where = _select(rows, where, eval_rows)
                eval_parts.append(_tokenize(held_rows, held_where, tokenize, source.format,
                                            f"tokenizing {name} (held out)", counts))
                rows, where = _select(rows, where, train_rows)
            train_parts.append(_tokenize(rows, where, tokenize, source.format, f"tokenizing {name}", counts))
        if eval_loaded:
            eval_parts.append(_tokenize(*eval_loaded, tokenize, sources[0].format, "tokenizing eval", counts))
        train = _mix(train_parts, sources, seed)
        evaluation = _merge_eval(eval_parts, seed) if eval_parts else None
        if data_cfg.max_samples:
            train = train.select(range(min(data_cfg.max_samples, len(train))))
        if evaluation is not None and data_cfg.max_eval_samples:
            evaluation = evaluation.select(range(min(data_cfg.max_eval_samples, len(evaluation))))
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / "counts.json").write_text(json.dumps(counts))

    folder = build_once(data_cache_root() / key, build)
    train = datasets.load_from_disk(str(folder / "train"))
    evaluation = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    counts = json.loads((folder / "counts.json").read_text())
    _report_dropped(counts, data_cfg.max_seq_len, quiet)
    if len(train) == 0:
        raise UserError("no training example is left after tokenization (prompts longer than data.max_seq_len?)")
    return PreparedData(train=train, eval=evaluation, label_names=label_names, cache_key=key, **counts)
