"""Turn checked rows into token ids and labels, one function per data format.

Instruction formats (alpaca, chat) train on responses only: every prompt token gets label -100,
so the loss counts the assistant's tokens alone. With a chat template the conversation is
rendered once and assistant spans are found by character offsets, which is exact even where a
template's tokens merge across the prompt/response boundary. That needs every rendered prefix of
a conversation to be a prefix of the whole rendering; templates that rewrite earlier turns once
later ones follow break it, and are refused per conversation instead of mislabelled silently.
"""

from __future__ import annotations

from launcher.errors import UserError

IGNORE = -100


class ChatTemplateError(UserError):
    """The chat template renders a conversation in a way response-only labels cannot follow."""


# The prompt of the original Stanford Alpaca release, for tokenizers without a chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def alpaca_messages(row: dict) -> list[dict]:
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if input_text else "",
        instruction=instruction,
        input_block=f"### Input:\n{input_text}\n\n" if input_text else "",
    )


def uses_chat_template(tokenizer, prompt_template: str) -> bool:
    return prompt_template == "chat" or (prompt_template == "auto" and bool(tokenizer.chat_template))


def render_prompt(tokenizer, prompt_template: str, text: str) -> str:
    """The text the model sees before its answer: used for generation at the end of a run."""
    if uses_chat_template(tokenizer, prompt_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return alpaca_prompt(text)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _check_prefix(prefix: str, full: str, turn: int, what: str) -> None:
    """Raise unless `prefix` (the rendering of the first turns) starts the full rendering."""
    if full.startswith(prefix):
        return
    at = _first_difference(prefix, full)
    raise ChatTemplateError(
        f"the chat template renders the conversation up to turn {turn} ({what}) differently from the "
        f"start of the whole conversation: at character {at} the prefix has {prefix[at:at + 40]!r}, the "
        f"whole conversation {full[at:at + 40]!r}. The template rewrites earlier turns once later ones "
        "follow (e.g. it drops reasoning from earlier assistant turns or places the system prompt "
        "differently), so the assistant tokens cannot be labelled exactly. Use one row per assistant "
        "turn (the conversation up to and including it), or a template that renders each turn on its own"
    )


def _assistant_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full`: where the generation prompt ends, to where the turn ends."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        _check_prefix(before, full, i + 1, "before the assistant answers, with the generation prompt")
        _check_prefix(through, full, i + 1, "the assistant's answer")
        if len(before) > len(through):
            raise ChatTemplateError(
                f"the chat template's generation prompt before turn {i + 1} is longer than the rendered assistant "
                "turn itself, so the template does not start assistant turns the way it prompts for them"
            )
        spans.append((len(before), len(through)))
    return spans


def tokenize_chat(tokenizer, messages: list[dict], max_len: int) -> dict:
    """Render with the chat template; label only the characters of assistant turns."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = _assistant_spans(tokenizer, messages, full)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len)
    labels = [
        token if any(s <= begin < e for s, e in spans) else IGNORE
        for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return {"input_ids": encoded["input_ids"], "labels": labels}


def tokenize_alpaca_classic(tokenizer, row: dict, max_len: int) -> dict:
    prompt_ids = tokenizer(alpaca_prompt(row["instruction"], row.get("input") or ""))["input_ids"]
    answer_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_len]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_text(tokenizer, text: str, max_len: int) -> list[dict]:
    """Plain language modelling: the text (plus EOS) cut into chunks of max_len, every token trained."""
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return [{"input_ids": ids[i : i + max_len], "labels": ids[i : i + max_len]} for i in range(0, len(ids), max_len)]


def has_target(labels) -> bool:
    """Whether any token is left to train on: the first position is never predicted (labels shift by one)."""
    return isinstance(labels, int) or any(label != IGNORE for label in labels[1:])


def _tokenize_row(row: dict, *, tokenizer, fmt: str, max_len: int, prompt_template: str, text_field: str,
                  label_field: str, label_ids: dict | None) -> list[dict]:
    if fmt == "classification":
        ids = tokenizer(row[text_field], truncation=True, max_length=max_len)["input_ids"]
        return [{"input_ids": ids, "labels": label_ids[str(row[label_field])]}]
    if fmt == "text":
        return tokenize_text(tokenizer, row[text_field], max_len)
    # Chat rows only render through a chat template (prepare refuses prompt_template=alpaca for them).
    if fmt == "chat":
        return [tokenize_chat(tokenizer, row["messages"], max_len)]
    if uses_chat_template(tokenizer, prompt_template):
        return [tokenize_chat(tokenizer, alpaca_messages(row), max_len)]
    return [tokenize_alpaca_classic(tokenizer, row, max_len)]


def _place(where, indices: list[int] | None, k: int) -> str:
    return where(indices[k]) if where is not None and indices is not None else f"row {k} of the batch"


def tokenize_rows(batch: dict, indices: list[int] | None = None, *, tokenizer, fmt: str, max_len: int,
                  prompt_template: str, text_field: str, label_field: str, label_ids: dict | None,
                  where=None) -> dict:
    """A `datasets.map(batched=True, with_indices=True)` function: rows of `fmt` -> input_ids, labels
    and has_target.

    has_target is False where the prompt filled max_len and no response token is left; the caller
    counts and drops those rows (see launcher.data.prepare). `where(index)` names a row in errors.
    """
    from jinja2.exceptions import TemplateError

    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: list[dict] = []
    for k, row in enumerate(rows):
        try:
            out.extend(_tokenize_row(row, tokenizer=tokenizer, fmt=fmt, max_len=max_len,
                                     prompt_template=prompt_template, text_field=text_field,
                                     label_field=label_field, label_ids=label_ids))
        except ChatTemplateError as err:
            raise ChatTemplateError(f"{_place(where, indices, k)}: {err}") from None
        except TemplateError as err:  # the template's own raise_exception, e.g. roles must alternate
            raise UserError(f"{_place(where, indices, k)}: the tokenizer's chat template refused this "
                            f"conversation: {err}") from None
    return {"input_ids": [e["input_ids"] for e in out], "labels": [e["labels"] for e in out],
            "has_target": [has_target(e["labels"]) for e in out]}
