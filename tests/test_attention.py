"""model.attn_implementation resolved per device (launcher/model/attention.py): the rules as a table over
the device profiles, which are data (no GPU needed); the real kernels run in the GPU check."""

import pytest

from launcher.config.load import load_recipe
from launcher.distributed import device_settings
from launcher.distributed.device_settings import PROFILES
from launcher.errors import UserError
from launcher.model import attention
from launcher.model.attention import resolve_attn_implementation

FLASH = "flash_attention_2"


@pytest.mark.parametrize("requested, device, precision, installed, expected", [
    # auto: flash attention only where the package, an sm80+ GPU and a 16-bit precision all are.
    ("auto", "h100", "bf16", True, FLASH),
    ("auto", "a100", "fp16", True, FLASH),
    ("auto", "h100", "bf16", False, "sdpa"),
    ("auto", "h100", "no", True, "sdpa"),
    ("auto", "v100", "fp16", True, "sdpa"),
    ("auto", "cpu", "no", True, "sdpa"),
    # What the user names runs, where it can.
    (FLASH, "l4", "bf16", True, FLASH),
    ("sdpa", "h100", "bf16", True, "sdpa"),
    ("eager", "cpu", "no", False, "eager"),
    ("flex_attention", "cpu", "no", False, "flex_attention"),
])
def test_the_kernel_each_device_and_precision_resolve_to(requested, device, precision, installed, expected):
    impl, why = resolve_attn_implementation(requested, PROFILES[device], precision, flash_attn_installed=installed)
    assert impl == expected
    if requested == "auto" and impl == "sdpa":  # the record says why not flash attention
        assert "not flash_attention_2" in why


@pytest.mark.parametrize("device, precision, installed, reason, fix", [
    ("h100", "bf16", False, "not installed", "pip install flash-attn"),
    ("cpu", "no", True, "NVIDIA GPUs only", "run on a GPU"),
    ("v100", "fp16", True, "compute capability 8.0", "A100"),
    ("h100", "no", True, "bf16 or fp16 only", "train.precision=bf16"),
])
def test_flash_attention_named_where_it_cannot_run_is_refused_with_the_fix(device, precision, installed, reason,
                                                                           fix):
    with pytest.raises(UserError) as err:
        resolve_attn_implementation(FLASH, PROFILES[device], precision, flash_attn_installed=installed)
    message = str(err.value)
    assert "model.attn_implementation=flash_attention_2" in message and reason in message and fix in message
    assert "model.attn_implementation=sdpa" in message


def test_flex_attention_needs_torch_2_5(monkeypatch):
    monkeypatch.setattr(attention, "torch_version", lambda: (2, 4))
    with pytest.raises(UserError, match="flex_attention needs torch 2.5"):
        resolve_attn_implementation("flex_attention", PROFILES["h100"], "bf16", flash_attn_installed=False)


def test_none_means_look_for_the_package_on_this_machine(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_importable", lambda: True)
    assert resolve_attn_implementation("auto", PROFILES["h100"], "bf16")[0] == FLASH
    monkeypatch.setattr(attention, "flash_attn_importable", lambda: False)
    assert resolve_attn_implementation("auto", PROFILES["h100"], "bf16")[0] == "sdpa"


def test_the_choice_and_why_reach_the_device_settings():
    _, recipe = load_recipe(["recipe=lora"])
    gpu = device_settings.resolve(recipe, PROFILES["h100"], flash_attn_installed=True)
    assert (gpu.attn_implementation, gpu.precision) == (FLASH, "bf16") and "sm80" in gpu.attn_why
    assert device_settings.resolve(recipe, PROFILES["cpu"], flash_attn_installed=True).attn_implementation == "sdpa"
    _, named = load_recipe(["recipe=lora", f"model.attn_implementation={FLASH}"])
    with pytest.raises(UserError, match="NVIDIA GPUs only"):
        device_settings.resolve(named, PROFILES["cpu"], flash_attn_installed=True)


def test_auto_falls_back_to_eager_for_a_model_without_an_sdpa_path(tmp_path, tiny_llama):
    """Bloom has no sdpa path in transformers 5.23: from_pretrained would refuse auto's sdpa outright."""
    from transformers import BloomConfig

    from launcher.config.load import load_recipe
    from launcher.distributed import device_settings
    from launcher.model.attention import fit_to_model

    BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4).save_pretrained(tmp_path / "bloom")
    _, recipe = load_recipe(["recipe=lora"])
    settings = device_settings.resolve(recipe, device_settings.PROFILES["cpu"], flash_attn_installed=False)
    fitted = fit_to_model(settings, recipe, str(tmp_path / "bloom"))
    assert fitted.attn_implementation == "eager" and "BloomForCausalLM does not implement sdpa" in fitted.attn_why
    assert fit_to_model(settings, recipe, str(tiny_llama)).attn_implementation == "sdpa"
    _, explicit = load_recipe(["recipe=lora", "model.attn_implementation=sdpa"])
    assert fit_to_model(settings, explicit, str(tmp_path / "bloom")).attn_implementation == "sdpa"  # said, kept
