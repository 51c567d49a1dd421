"""Prepared data for a run: checked, tokenized once, cached, mixed by weight, with an eval split.

Tokenization runs on the first process of each machine before the process group exists; the
others wait on a file lock (see launcher.cache), so preprocessing of any length can never trip
a collective timeout. The cache key covers the files' sizes and mtimes, the tokenizer, the
format settings and this module's FORMAT_VERSION: change any of them and the data is rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.cache import build_once, cache_root, digest
from launcher.data.formats import tokenize_rows
from launcher.data.rows import check_rows, load_rows, resolve_data_path
from launcher.errors import UserError

if TYPE_CHECKING:
    import datasets

FORMAT_VERSION = 1


@dataclass
class PreparedData:
    train: datasets.Dataset  # columns input_ids, labels
    eval: datasets.Dataset | None
    label_names: list[str] | None  # classification only, in id order


def _file_identity(path: str) -> list:
    local = resolve_data_path(path)
    if local is None:
        return [path]
    stat = local.stat()
    return [str(local), stat.st_size, int(stat.st_mtime)]


def _tokenizer_identity(tokenizer) -> list:
    return [tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token]


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


def prepare_data(recipe, tokenizer, *, quiet: bool = False) -> PreparedData:
    """Check, tokenize (cached), mix and split the recipe's data."""
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    data_cfg = recipe.data
    sources = data_cfg.sources
    if any(s.format == "chat" for s in sources) and not tokenizer.chat_template:
        raise UserError("data.format=chat needs a tokenizer with a chat template; this model's has none "
                        "(use format alpaca with data.prompt_template=alpaca)")
    if data_cfg.prompt_template == "chat" and not tokenizer.chat_template:
        raise UserError("data.prompt_template=chat but the tokenizer has no chat template; use auto or alpaca")

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
        "sources": [[_file_identity(s.path), s.format, s.weight, s.split] for s in sources],
        "eval": _file_identity(data_cfg.eval) if data_cfg.eval else None,
        "settings": data_cfg.model_dump(exclude={"train", "eval"}),
        "labels": label_names,
        "tokenizer": _tokenizer_identity(tokenizer),
        "seed": recipe.train.seed,
    })
    tokenize = partial(
        tokenize_rows, tokenizer=tokenizer, max_len=data_cfg.max_seq_len, prompt_template=data_cfg.prompt_template,
        text_field=data_cfg.text_field, label_field=data_cfg.label_field,
        label_ids={name: i for i, name in enumerate(label_names)} if label_names else None,
    )

    def build(tmp: Path) -> None:
        parts = []
        for (rows, _), source in zip(loaded, sources):
            parts.append(rows.map(partial(tokenize, fmt=source.format), batched=True,
                                  remove_columns=rows.column_names, desc=f"tokenizing {Path(source.path).name}"))
        if len(parts) == 1:
            train = parts[0]
        else:
            total = sum(s.weight for s in sources)
            train = datasets.interleave_datasets(
                parts, probabilities=[s.weight / total for s in sources], seed=recipe.train.seed,
                stopping_strategy="all_exhausted",
            )
        if eval_loaded:
            rows = eval_loaded[0]
            evaluation = rows.map(partial(tokenize, fmt=sources[0].format), batched=True,
                                  remove_columns=rows.column_names, desc="tokenizing eval")
        elif data_cfg.eval_fraction > 0:
            split = train.train_test_split(test_size=data_cfg.eval_fraction, seed=recipe.train.seed)
            train, evaluation = split["train"], split["test"]
        else:
            evaluation = None
        if data_cfg.max_samples:
            train = train.select(range(min(data_cfg.max_samples, len(train))))
        if evaluation is not None and data_cfg.max_eval_samples:
            evaluation = evaluation.select(range(min(data_cfg.max_eval_samples, len(evaluation))))
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))

    folder = build_once(cache_root() / "datasets" / key, build)
    train = datasets.load_from_disk(str(folder / "train"))
    evaluation = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    if len(train) == 0:
        raise UserError("no training example is left after tokenization (prompts longer than data.max_seq_len?)")
    return PreparedData(train=train, eval=evaluation, label_names=label_names)

