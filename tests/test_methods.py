"""Each method trains exactly the parameters it should, on a tiny model."""

import re

import pytest
import torch

from launcher.config.load import load_recipe
from launcher.methods import METHODS
from launcher.methods.common import MethodContext, parameter_counts, trainable_names
from launcher.train.build import load_model


def apply_method(recipe_name, model_path, *words):
    _, recipe = load_recipe([f"recipe={recipe_name}", f"model.name={model_path}", *words])
    labels = ["a", "b", "c"] if recipe.model.task == "classification" else None
    model = load_model(str(model_path), recipe, labels, torch.device("cpu"))
    ctx = MethodContext(task=recipe.model.task, model_path=str(model_path))
    return METHODS[recipe.peft.method].apply(model, recipe.peft, ctx)


def all_match(names, pattern):
    return names and all(re.search(pattern, n) for n in names)


def test_lora_trains_only_adapters_on_the_targets(tiny_llama):
    names = trainable_names(apply_method("lora", tiny_llama))
    assert all_match(names, r"\.(q|k|v|o)_proj\.lora_[AB]\.default\.weight$")
    assert len(names) == 2 * 4 * 2  # A and B, four projections, two layers


def test_dora_adds_a_magnitude_vector(tiny_llama):
    names = trainable_names(apply_method("dora", tiny_llama))
    assert any("lora_magnitude_vector" in n for n in names)
    assert all_match(names, r"lora_(A|B|magnitude_vector)")


def test_qlora_quantizes_the_base_and_trains_adapters(tiny_llama):
    model = apply_method("qlora", tiny_llama)
    names = trainable_names(model)
    assert all_match(names, r"\.(q|v)_proj\.lora_[AB]\.default\.weight$")
    import bitsandbytes as bnb

    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and quantized[0].weight.quant_type == "nf4"


def test_prompt_tuning_trains_only_the_soft_prompt(tiny_llama):
    model = apply_method("prompt_tuning", tiny_llama)
    names = trainable_names(model)
    assert all_match(names, r"^prompt_encoder\.")
    assert parameter_counts(model)[0] == 16 * model.config.hidden_size


def test_prefix_tuning_trains_only_the_prefix(tiny_llama):
    names = trainable_names(apply_method("prefix_tuning", tiny_llama))
    assert all_match(names, r"^prompt_encoder\.")


def test_ia3_trains_only_scaling_vectors(tiny_llama):
    names = trainable_names(apply_method("ia3", tiny_llama))
    assert all_match(names, r"\.(k_proj|v_proj|down_proj)\.ia3_l\.default$") and len(names) == 6


def test_partial_freeze_trains_last_layers_and_final_norm(tiny_llama):
    names = trainable_names(apply_method("partial_freeze", tiny_llama, "peft.train_last_n_layers=1"))
    assert any(".layers.1." in n for n in names) and not any(".layers.0." in n for n in names)
    assert "model.norm.weight" in names and not any("embed_tokens" in n for n in names)


def test_partial_freeze_by_pattern(tiny_llama):
    names = trainable_names(apply_method("partial_freeze", tiny_llama, "peft.train_last_n_layers=null",
                                         "peft.train_patterns=[mlp\\.down_proj]"))
    assert all_match(names, r"mlp\.down_proj") and len(names) == 2


def test_partial_freeze_pattern_matching_nothing_is_an_error(tiny_llama):
    from launcher.errors import UserError

    with pytest.raises(UserError, match="match no parameter"):
        apply_method("partial_freeze", tiny_llama, "peft.train_patterns=[nothing_here]")


def test_full_trains_everything(tiny_llama):
    model = apply_method("full", tiny_llama)
    trainable, total = parameter_counts(model)
    assert trainable == total


def test_head_only_trains_just_the_new_head(tiny_bert):
    names = trainable_names(apply_method("classify_head", tiny_bert))
    assert sorted(names) == ["classifier.bias", "classifier.weight"]


def test_classify_lora_trains_adapters_and_the_new_head(tiny_bert):
    names = trainable_names(apply_method("classify_lora", tiny_bert))
    assert any("classifier" in n and "modules_to_save" in n for n in names)
    assert any(re.search(r"\.(query|value)\.lora_A", n) for n in names)
    assert not any(".key." in n for n in names)


def test_missing_target_module_lists_the_real_ones(tiny_bert):
    from launcher.errors import UserError

    with pytest.raises(UserError, match=r"not found in this model; its linear modules are: .*query"):
        apply_method("classify_lora", tiny_bert, "peft.target_modules=[q_proj]")
