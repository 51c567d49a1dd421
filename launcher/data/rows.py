"""Read training rows and check each one, so a bad row is reported as FILE:LINE, not as an Arrow trace.

Local JSONL/JSON/CSV/Parquet files and hub data sets all go through `datasets`; JSONL is first
scanned line by line because a syntax error deep inside a file is otherwise reported without
a line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cache import data_cache_root, file_sha256
from launcher.errors import UserError

LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CHAT_ROLES = ("system", "user", "assistant")


def resolve_data_path(path: str) -> Path | None:
    """The local file `path` names (relative to the working directory, then to the shipped assets, whose
    recipes name `data/...`), or None for a hub name."""
    from launcher.config.assets import shipped_root

    candidate = Path(path).expanduser()
    for found in (candidate, shipped_root() / candidate):
        if found.is_file():
            return found.resolve()
    if candidate.suffix in LOCAL_LOADERS or path.startswith((".", "/", "~")):
        places = dict.fromkeys([str(Path.cwd()), str(shipped_root())])
        raise UserError(f"data file {path} does not exist (looked in {' and '.join(places)})")
    return None


def _jsonl_line_numbers(path: Path) -> list[int]:
    """Check every line parses as a JSON object; return the line number of each row."""
    numbers = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            numbers.append(number)
    if not numbers:
        raise UserError(f"{path} holds no rows")
    return numbers


def load_rows(path: str, split: str = "train"):
    """Load a source as a `datasets.Dataset` plus a function naming where row i came from."""
    import datasets

    local = resolve_data_path(path)
    if local is None:
        try:
            dataset = datasets.load_dataset(path, split=split)
        except Exception as err:  # noqa: BLE001 - any failure here means "cannot get this data set"
            raise UserError(f"could not load data set '{path}' (split {split}) from the hub: {err}") from None
        return dataset, lambda i: f"{path}[{split}] row {i}"

    suffix = local.suffix.lower()
    if suffix not in LOCAL_LOADERS:
        raise UserError(f"{local}: unknown file type {suffix}; use one of {', '.join(LOCAL_LOADERS)}")
    line_of = {".jsonl": None, ".csv": lambda i: i + 2}.get(suffix, lambda i: i)  # CSV: header is line 1
    if suffix == ".jsonl":
        numbers = _jsonl_line_numbers(local)
        line_of = numbers.__getitem__
    # datasets keeps its Arrow copy of a local file keyed by path and mtime, so an edit that keeps
    # the mtime (cp -p, rsync -t) would read the old rows: key it by content.
    arrow_cache = data_cache_root() / "rows" / file_sha256(local)[:16]
    try:
        dataset = datasets.load_dataset(
            LOCAL_LOADERS[suffix], data_files=str(local), split="train", cache_dir=str(arrow_cache)
        )
    except Exception as err:  # noqa: BLE001 - pandas/arrow parse errors carry their own detail
        raise UserError(f"{local}: could not be read as {suffix[1:]}: {str(err).splitlines()[0]}") from None
    where = "line" if suffix in (".jsonl", ".csv") else "row"
    return dataset, lambda i: f"{local}:{line_of(i)}" if where == "line" else f"{local} row {i}"


def check_rows(dataset, fmt: str, where, text_field: str = "text", label_field: str = "label") -> None:
    """Raise a UserError naming the first row that does not fit `fmt`."""
    required = {
        "alpaca": ("instruction", "output"),
        "chat": ("messages",),
        "text": (text_field,),
        "classification": (text_field, label_field),
    }[fmt]
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"{where(0).rsplit(':', 1)[0]}: format {fmt} needs column(s) {', '.join(missing)}; "
            f"found {', '.join(dataset.column_names)}"
        )
    for i, row in enumerate(dataset):
        problem = _row_problem(row, fmt, text_field, label_field)
        if problem:
            raise UserError(f"{where(i)}: {problem}")


def _row_problem(row: dict, fmt: str, text_field: str, label_field: str) -> str | None:
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                return f"'{key}' must be a non-empty string (format alpaca)"
        if row.get("input") not in (None, "") and not isinstance(row["input"], str):
            return "'input' must be a string (format alpaca)"
    elif fmt == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {role, content} (format chat)"
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                return f"each message needs a role in {CHAT_ROLES} and string content (format chat)"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message to train on (format chat)"
    elif fmt in ("text", "classification"):
        if not isinstance(row.get(text_field), str) or not row[text_field].strip():
            return f"'{text_field}' must be a non-empty string (format {fmt})"
        if fmt == "classification" and not isinstance(row.get(label_field), (str, int)):
            return f"'{label_field}' must be a label name or integer id (format classification)"
    return None
