"""Every shipped DeepSpeed JSON leaves the recipe's decisions to the recipe; drift and unsupported
method/backend pairs are refused before anything loads."""

import json
from pathlib import Path

import pytest

from launcher.config.load import load_recipe
from launcher.preflight import preflight
from launcher.distributed import deepspeed_config as ds
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "ds_configs").rglob("*.json"))


def test_the_promised_configs_ship():
    assert {p.stem for p in CONFIGS} >= {"zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_leaves_recipe_values_auto(path):
    config = json.loads(path.read_text())
    assert isinstance(config["zero_optimization"]["stage"], int)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    _, recipe = load_recipe(["recipe=lora", "distributed.backend=deepspeed", f"distributed.config={path.stem}",
                             "train.global_batch_size=16", "train.max_grad_norm=0.5"])
    resolved = ds.resolve(config, recipe, accumulation=4, precision="bf16")
    assert resolved["train_micro_batch_size_per_gpu"] == 4 and resolved["gradient_accumulation_steps"] == 4
    assert resolved["train_batch_size"] == 16 and resolved["gradient_clipping"] == 0.5
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False


def test_hard_coded_value_that_disagrees_is_refused(tmp_path):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}))
    _, recipe = load_recipe(["recipe=lora", "distributed.backend=deepspeed", f"distributed.config={custom}"])
    with pytest.raises(UserError, match=r"gradient_accumulation_steps=8 \(the recipe gives 2\)"):
        preflight(recipe, "lora")


def test_hard_coded_value_that_agrees_is_fine(tmp_path):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}))
    _, recipe = load_recipe(["recipe=lora", "distributed.backend=deepspeed", f"distributed.config={custom}"])
    preflight(recipe, "lora")


@pytest.mark.parametrize("words, expected", [
    (["recipe=qlora", "distributed.backend=deepspeed", "distributed.config=zero3"], "use distributed.config=zero2"),
    (["recipe=qlora", "distributed.backend=deepspeed", "distributed.config=zero3_offload"], "does not run under zero3"),
    (["recipe=qlora", "distributed.backend=fsdp"], "cannot shard bitsandbytes 4-bit weights"),
    (["recipe=lora", "distributed.backend=deepspeed"], "needs distributed.config"),
    (["recipe=lora", "distributed.config=zero2"], "set distributed.backend=deepspeed"),
    (["recipe=lora", "distributed.backend=deepspeed", "distributed.config=zero7"], "shipped: zero1, zero2"),
])
def test_unsupported_setups_fail_before_loading(words, expected):
    with pytest.raises(UserError, match=expected):
        name, recipe = load_recipe(words)
        preflight(recipe, name)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_a_config_with_its_own_optimizer_or_scheduler_is_refused(block, tmp_path):
    """DeepSpeed would train with its own optimizer/schedule and silently ignore the recipe's."""
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2}, block: {"type": "AdamW", "params": {}}}))
    _, recipe = load_recipe(["recipe=lora", "distributed.backend=deepspeed", f"distributed.config={custom}"])
    with pytest.raises(UserError, match=f'own "{block}" block'):
        preflight(recipe, "lora")


@pytest.mark.parametrize("config", ["zero2_offload", "zero3_offload"])
def test_8bit_adamw_with_an_offloaded_optimizer_is_refused(config):
    """ZeRO-Offload steps with DeepSpeed's CPU Adam: 8-bit AdamW would be silently replaced."""
    _, recipe = load_recipe(["recipe=lora", "distributed.backend=deepspeed", f"distributed.config={config}",
                             "train.optimizer=adamw_8bit"])
    with pytest.raises(UserError, match="train.optimizer=adamw_8bit cannot run with the optimizer offloaded"):
        preflight(recipe, "lora")


def test_fp16_under_fsdp_is_refused_not_silently_fp32():
    with pytest.raises(UserError, match="train.precision=fp16 is not supported with distributed.backend=fsdp"):
        load_recipe(["recipe=lora", "distributed.backend=fsdp", "train.precision=fp16"])
