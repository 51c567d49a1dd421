"""Overrides are coerced to the field's type; every kind of bad input gets one clear message."""

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.load import load_recipe, split_overrides
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def error_of(*words: str) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(list(words))
    return str(info.value)


def test_overrides_are_coerced_to_field_types():
    _, recipe = load_recipe(["recipe=lora", "train.lr=2e-4", "train.max_steps=7", "peft.target_modules=[q_proj]",
                             "train.gradient_checkpointing=true", "train.max_grad_norm=null"])
    assert recipe.train.lr == pytest.approx(2e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 7
    assert recipe.peft.target_modules == ["q_proj"]
    assert recipe.train.gradient_checkpointing is True
    assert recipe.train.max_grad_norm is None


def test_value_split_on_first_equals_and_string_fields_keep_literal_text():
    _, overrides = split_overrides(["recipe=lora", "eval.sample_prompts=[a=b]"])
    assert overrides == [("eval.sample_prompts", "[a=b]")]
    _, recipe = load_recipe(["recipe=lora", "model.name=123", "model.revision=true"])
    assert recipe.model.name == "123" and recipe.model.revision == "true"


def test_required_keys_exist_with_their_names():
    _, recipe = load_recipe(["recipe=lora", "model.name=m", "peft.method=lora", "train.lr=0.1", "train.max_steps=3",
                             "train.micro_batch_size=2", "train.global_batch_size=4", "data.train=x.jsonl",
                             "data.eval=y.jsonl", "data.format=alpaca", "output.dir=o", "distributed.backend=ddp",
                             "distributed.num_processes=2"])
    assert recipe.distributed.world_size == 2 and recipe.gradient_accumulation_steps == 1


def test_unknown_key_suggests_the_closest():
    message = error_of("recipe=lora", "train.lrr=1")
    assert "train.lrr: unknown key" in message and "Did you mean train.lr?" in message


def test_unknown_section_suggests_the_closest():
    assert "Did you mean train?" in error_of("recipe=lora", "trian.lr=1")


def test_wrong_type_names_key_and_value():
    message = error_of("recipe=lora", "train.max_steps=ten")
    assert "train.max_steps" in message and "'ten'" in message


def test_out_of_range_value():
    assert "train.micro_batch_size" in error_of("recipe=lora", "train.micro_batch_size=0")


def test_all_problems_reported_together():
    message = error_of("recipe=lora", "train.lrr=1", "eval.every_step=3")
    assert "2 problems" in message and "train.lrr" in message and "eval.every_step" in message


def test_unknown_method_suggests_one():
    assert "Did you mean lora?" in error_of("recipe=lora", "peft.method=lorra")


def test_method_specific_keys_are_checked_against_the_method():
    message = error_of("recipe=prompt_tuning", "peft.r=4")
    assert "peft.r: unknown key" in message and "num_virtual_tokens" in message


def test_batch_split_that_does_not_divide():
    message = error_of("recipe=lora", "train.global_batch_size=10", "train.micro_batch_size=4")
    assert "train.global_batch_size=10" in message and "global_batch_size=8 or 12" in message


def test_batch_split_counts_world_size():
    message = error_of("recipe=lora", "distributed.num_processes=3")
    assert "world size 3" in message


@pytest.mark.parametrize("words, expected", [
    (["recipe=lora", "model.task=classification"], "model.task=classification needs data.format classification"),
    (["recipe=classify_lora", "peft.method=prompt_tuning"], "does not work with model.task=classification"),
    (["recipe=lora", "peft.method=head_only"], "a causal LM has no new task head"),
    (["recipe=lora", "eval.metric=f1"], "eval.metric=f1 is not reported for model.task=causal_lm"),
    (["recipe=prompt_tuning", "output.merge=true"], "cannot be merged"),
    (["recipe=lora", "eval.every_steps=null", "eval.early_stopping_patience=2"], "needs eval.every_steps"),
    (["recipe=lora", "distributed.machine_rank=1"], "machine_rank=1 must be below"),
])
def test_incompatible_combinations(words, expected):
    assert expected in error_of(*words)


def test_missing_recipe_lists_available():
    message = error_of("recipe=lorra")
    assert "Did you mean recipe=lora?" in message and "classify_head" in message


def test_no_recipe_and_dash_flags():
    assert "no recipe given" in error_of("train.lr=1")
    assert "without dashes" in error_of("recipe=lora", "--train.lr=1")
    assert "not key=value" in error_of("recipe=lora", "train.lr")


def test_user_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((ROOT / "recipes" / "lora.yaml").read_text().replace("r: 8 ", "r: 4 "))
    name, recipe = load_recipe([f"recipe={path}"])
    assert name == "mine" and recipe.peft.r == 4
    path.write_text("model: [unclosed")
    assert "not valid YAML" in error_of(f"recipe={path}")


def run_cli(*args: str, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("words", [
    ["validate", "recipe=lora", "train.lrr=1"],
    ["validate", "recipe=nope"],
    ["validate", "recipe=lora", "--lr=3"],
    ["validate", "recipe=lora", "data.train=missing.jsonl"],
    ["run", "recipe=lora", "data.train=missing.jsonl"],
    ["validate", "recipe=lora", "model.name=./no/such/model"],
])
def test_cli_errors_are_one_message_without_traceback(words):
    out = run_cli(*words)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_run_script_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launcher" / "run.py"), "recipe=lora", "train.lrr=1",
                          f"output.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Did you mean train.lr?" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_validation_path_imports_no_heavy_library():
    code = ("import sys; from launcher.cli import main; main(['validate', 'recipe=lora']); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'accelerate') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_validate_prints_resolved_recipe_and_batch_arithmetic():
    out = run_cli("validate", "recipe=lora", "train.lr=3e-4", "train.global_batch_size=16")
    assert out.returncode == 0
    assert "lr: 0.0003" in out.stdout
    assert "global batch 16 = micro batch 4 x accumulation 4 x world size 1" in out.stdout


def test_keys_reference_documents_every_field():
    from launcher.config.docs import keys_reference
    from launcher.config.schema import PEFT_CLASSES, Recipe

    text = keys_reference()
    for section in ("model", "distributed", "data", "train", "eval", "output"):
        cls = Recipe.model_fields[section].annotation
        for field_name, field in cls.model_fields.items():
            assert f"{section}.{field_name}  [" in text
            assert field.description, f"{section}.{field_name} has no description"
    for cls in PEFT_CLASSES.values():
        for field_name, field in cls.model_fields.items():
            assert field.description, f"peft.{field_name} has no description"
