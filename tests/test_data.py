"""Rows are checked with FILE:LINE errors; formats tokenize with response-only labels; caching and mixing."""

import json
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
    monkeypatch.setenv("TUNEFLEET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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


def test_tokenization_is_cached_and_rebuilt_when_the_file_changes(tmp_path, tiny_llama, cache):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 10)
    prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    entries = sorted(p.name for p in (cache / "datasets").iterdir() if p.is_dir())
    prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    assert sorted(p.name for p in (cache / "datasets").iterdir() if p.is_dir()) == entries
    write_jsonl(data, [GOOD] * 12)
    prepare(tmp_path, tiny_llama, f"data.train={data}", "data.eval=null")
    assert len([p for p in (cache / "datasets").iterdir() if p.is_dir()]) == len(entries) + 1


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
