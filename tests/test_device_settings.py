"""Device-dependent defaults (launcher/distributed/device_settings.py): what a GPU and a CPU resolve to,
and that a run really holds its tensors in those dtypes. The GPU profiles are data here (no GPU is
needed to resolve them); `make gpu-check` confirms them on a real device."""

import json

import pytest
import torch

from launcher.config.load import load_recipe
from launcher.distributed import deepspeed_config, device_settings
from launcher.distributed.device_settings import PROFILES
from tests.helpers import run_in_process


def settings_of(*words, device="cpu", flash=False):
    _, recipe = load_recipe(list(words))
    return device_settings.resolve(recipe, PROFILES[device], flash_attn_installed=flash)


def test_a_gpu_with_bf16_trains_bf16_with_frozen_weights_in_bf16_and_the_fast_paths_on():
    lora = settings_of("recipe=lora", device="h100")
    assert (lora.precision, lora.weight_dtype) == ("bf16", "bfloat16")
    assert lora.tf32 and lora.fused_adamw and lora.pin_memory and lora.overlap_comm
    # A full fine-tune keeps float32 master weights: every weight trains.
    assert settings_of("recipe=full", device="h100").weight_dtype == "float32"
    assert settings_of("recipe=qlora", device="h100").qlora_compute_dtype == "bfloat16"
    # Parameters offloaded to the host are stepped there: no fused GPU kernel for them.
    assert not settings_of("recipe=full_fsdp", "distributed.fsdp_cpu_offload=true", device="h100").fused_adamw


def test_a_cpu_trains_float32_with_nothing_that_needs_cuda():
    cpu = settings_of("recipe=lora")
    assert (cpu.precision, cpu.weight_dtype) == ("no", "float32")
    assert not (cpu.tf32 or cpu.fused_adamw or cpu.pin_memory or cpu.overlap_comm)
    assert settings_of("recipe=qlora").qlora_compute_dtype == "float32"
    # What the user says wins over auto.
    said = settings_of("recipe=qlora", "train.precision=bf16", "peft.compute_dtype=float16", "model.dtype=float32")
    assert (said.precision, said.qlora_compute_dtype, said.weight_dtype) == ("bf16", "float16", "float32")
    assert settings_of("recipe=lora", device="v100").precision == "no"  # no bf16 on a V100: fp32, not a crash


@pytest.mark.parametrize("device, on", [("h100", True), ("cpu", False)])
def test_shipped_deepspeed_jsons_overlap_and_pin_on_gpus_only(device, on):
    _, recipe = load_recipe(["recipe=lora_zero3", "distributed.config=zero3_offload"])
    settings = device_settings.resolve(recipe, PROFILES[device], flash_attn_installed=False)
    raw = deepspeed_config.read_ds_config("zero3_offload")
    resolved = deepspeed_config.resolve(raw, recipe, 1, settings.precision, settings=settings)
    zero = resolved["zero_optimization"]
    assert zero["overlap_comm"] is on
    assert zero["offload_optimizer"]["pin_memory"] is on and zero["offload_param"]["pin_memory"] is on
    # A JSON that says what it wants is followed.
    raw["zero_optimization"]["overlap_comm"] = False
    assert deepspeed_config.resolve(raw, recipe, 1, settings.precision,
                                    settings=settings)["zero_optimization"]["overlap_comm"] is False


def test_fused_adamw_is_asked_for_when_the_settings_say_so():
    from launcher.train.optim import build_optimizer

    _, recipe = load_recipe(["recipe=full"])
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, recipe.train, fused=True).defaults["fused"] is True
    assert not build_optimizer(model, recipe.train).defaults.get("fused")


@pytest.mark.parametrize("recipe_name, frozen_dtype", [("lora", torch.bfloat16), ("full", None)])
def test_under_bf16_frozen_weights_are_bf16_and_trainable_ones_float32(recipe_name, frozen_dtype, tiny_llama,
                                                                        tmp_path):
    """Under bf16 autocast every matmul reads a bf16 copy: a float32 frozen base would cost twice the
    weight memory, plus the per-use casts autocast saves for backward."""
    run, _ = run_in_process(recipe_name, tiny_llama, tmp_path / "run", "train.precision=bf16", "train.max_steps=1",
                            "eval.every_steps=null", "eval.at_start=false", "eval.sample_prompts=[]")
    params = dict(run.model.named_parameters())
    trainable = {n: p.dtype for n, p in params.items() if p.requires_grad}
    frozen = {n: p.dtype for n, p in params.items() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    if frozen_dtype is None:
        assert not frozen
    else:
        assert frozen and set(frozen.values()) == {frozen_dtype}
    written = json.loads((tmp_path / "run" / "distributed.json").read_text())["device_settings"]
    assert written["precision"] == "bf16" and written["weight_dtype"] == ("bfloat16" if frozen_dtype else "float32")
