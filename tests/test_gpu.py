"""On a CUDA machine (skipped elsewhere, e.g. in CI): bf16 mixed precision, QLoRA with the GPU
kernels, and the reported peak memory."""

import json

import pytest
import torch

from tests.helpers import run_in_process

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("recipe", ["lora", "qlora", "full"])
def test_bf16_runs_on_the_gpu(recipe, tiny_llama, tmp_path):
    run, result = run_in_process(recipe, tiny_llama, tmp_path / "run", "train.precision=bf16",
                                 "peft.compute_dtype=bfloat16" if recipe == "qlora" else "train.seed=42")
    written = json.loads((tmp_path / "run" / "distributed.json").read_text())
    assert written["mixed_precision"] == "bf16" and written["accelerate"]["device"].startswith("cuda")
    assert result["peak_memory_mb"] > 0 and result["train_loss"] == result["train_loss"]


def test_fsdp_checkpoints_carry_the_cuda_rng_state():
    """Dropout on the GPU draws from the CUDA generators: a resume must restore them too."""
    from launcher.distributed.fsdp_backend import _rng_state, _set_rng_state

    state = _rng_state()
    assert "cuda" in state
    expected = torch.rand(4, device="cuda")
    _set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
