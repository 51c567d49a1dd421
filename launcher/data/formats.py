"""Turn checked rows into token ids and labels, one function per data format.

Instruction formats (alpaca, chat) train on responses only: every prompt token gets label -100,
so the loss counts the assistant's tokens alone. With a chat template the conversation is
rendered once and assistant spans are found by character offsets, which is exact even where a
template's tokens merge across the prompt/response boundary.
"""

from __future__ import annotations

IGNORE = -100

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


def tokenize_chat(tokenizer, messages: list[dict], max_len: int) -> dict:
    """Render with the chat template; label only the characters of assistant turns."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        spans.append((start, end))
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


def tokenize_rows(batch: dict, *, tokenizer, fmt: str, max_len: int, prompt_template: str,
                  text_field: str, label_field: str, label_ids: dict | None) -> dict:
    """A `datasets.map(batched=True)` function: rows of `fmt` -> input_ids and labels (or label)."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: list[dict] = []
    for row in rows:
        if fmt == "classification":
            ids = tokenizer(row[text_field], truncation=True, max_length=max_len)["input_ids"]
            out.append({"input_ids": ids, "labels": label_ids[str(row[label_field])]})
        elif fmt == "text":
            out.extend(tokenize_text(tokenizer, row[text_field], max_len))
        else:
            messages = row["messages"] if fmt == "chat" else alpaca_messages(row)
            if uses_chat_template(tokenizer, prompt_template):
                example = tokenize_chat(tokenizer, messages, max_len)
            else:
                example = tokenize_alpaca_classic(tokenizer, row, max_len)
            if any(label != IGNORE for label in example["labels"][1:]):  # else the prompt filled max_seq_len
                out.append(example)
    return {"input_ids": [e["input_ids"] for e in out], "labels": [e["labels"] for e in out]}
