"""`tunefleet merge`: the merged model's dtype, the base loaded as in training, one-line errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from launcher.cli import main as cli
from tests.helpers import run_in_process

QUICK_RUN = ["train.max_steps=2", "eval.sample_prompts=[]"]


def saved_dtypes(folder) -> set[torch.dtype]:
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            dtypes |= {f.get_tensor(key).dtype for key in f.keys()}
    return dtypes


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    # Module-scoped: set up before the per-test isolated_cache fixture, so isolate the data cache here.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNEFLEET_DATA_CACHE", str(root / "data-cache"))
        run_in_process("lora", tiny_llama, root / "run", *QUICK_RUN)
    return root / "run"


def test_merge_writes_the_requested_dtype(lora_run, capsys):
    assert cli(["merge", str(lora_run)]) == 0
    assert saved_dtypes(lora_run / "merged") == {torch.float32}
    full = {k: v for k, v in _tensors(lora_run / "merged").items()}

    assert cli(["merge", str(lora_run), "--dtype", "bfloat16"]) == 0
    assert saved_dtypes(lora_run / "merged") == {torch.bfloat16}
    assert json.loads((lora_run / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # The fold runs in float32 and is rounded once: the same weights, cast.
    for name, tensor in _tensors(lora_run / "merged").items():
        torch.testing.assert_close(tensor, full[name].to(torch.bfloat16), atol=0, rtol=0)

    assert cli(["merge", "--dtype=float16", str(lora_run)]) == 0
    assert saved_dtypes(lora_run / "merged") == {torch.float16}
    assert "merged model (float16) written to" in capsys.readouterr().out


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.mark.parametrize("words", [["--dtype", "int8"], ["--dtype=fp16"], ["--dtype"], ["--dtpye", "float16"]])
def test_a_bad_merge_option_is_one_line_and_exit_2_before_anything_loads(words, tmp_path, capsys):
    # The run folder does not exist: the option is refused before anything is read.
    assert cli(["merge", str(tmp_path / "no-run"), *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no-run" not in err
    assert "float32, bfloat16, float16" in err or "float32|bfloat16|float16" in err


def _set_model_keys(run_dir, **keys) -> None:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["model"].update(keys)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def _spy(monkeypatch, cls, calls: list) -> None:
    original = cls.from_pretrained

    def from_pretrained(*args, **kwargs):
        calls.append((cls.__name__, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", from_pretrained)


@pytest.mark.parametrize("recipe_name", ["lora", "classify_lora"])
def test_merge_loads_base_and_tokenizer_at_the_recipes_revision_and_trust(recipe_name, tiny_llama, tiny_bert,
                                                                          tmp_path, monkeypatch):
    import transformers

    model = tiny_bert if recipe_name.startswith("classify") else tiny_llama
    run_in_process(recipe_name, model, tmp_path / "run", *QUICK_RUN)
    # A local folder ignores the revision; what matters is that merge passes on what the recipe says.
    _set_model_keys(tmp_path / "run", revision="v1.0", trust_remote_code=True)
    calls: list = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM,
                transformers.AutoModelForSequenceClassification):
        _spy(monkeypatch, cls, calls)
    assert cli(["merge", str(tmp_path / "run")]) == 0
    expected_model = ("AutoModelForSequenceClassification" if recipe_name.startswith("classify")
                      else "AutoModelForCausalLM")
    assert {name for name, _ in calls} == {"AutoTokenizer", expected_model}
    for _, kwargs in calls:
        assert kwargs["revision"] == "v1.0" and kwargs["trust_remote_code"] is True


def test_a_run_folder_as_model_source_is_the_merge_tunefleet_merge_writes(lora_run, monkeypatch):
    """One merge path: a run folder named as model.name or distill.teacher gets the weights `tunefleet merge`
    writes (float32), and both check the files they wrote."""
    from launcher.model.run_folder import model_from_run, run_artifact
    from launcher.outputs import artifacts

    checked = []
    verify = artifacts.verify_artifact

    def verify_and_note(folder, *args, **kwargs):
        checked.append(folder)
        verify(folder, *args, **kwargs)

    monkeypatch.setattr(artifacts, "verify_artifact", verify_and_note)
    merged = artifacts.merge_run(lora_run, artifact=run_artifact(lora_run).name)
    source = Path(model_from_run(lora_run))  # folded into the model cache, not the run folder
    assert len(checked) == 2
    ours, theirs = _tensors(merged), _tensors(source)
    assert ours.keys() == theirs.keys() and saved_dtypes(source) == {torch.float32}
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_an_adapter_copied_without_its_tokenizer_merges_with_the_base_s(lora_run, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from launcher.outputs.artifacts import merge_run

    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(lora_run / "recipe.yaml", copy)
    shutil.copytree(lora_run / "final", copy / "final",
                    ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt"))
    merged = merge_run(copy)
    assert AutoTokenizer.from_pretrained(merged).get_vocab() == AutoTokenizer.from_pretrained(tiny_llama).get_vocab()
