"""Evaluation and sample answers under sharded backends (launcher/distributed/inference_weights.py):
gathered once where they fit, block by block otherwise, the same answers and losses either way."""

import json

import pytest

from launcher.distributed.inference_weights import gathered_bytes
from tests.helpers import read_jsonl
from tests.helpers import launch

pytestmark = pytest.mark.slow

SAMPLES = ["train.max_steps=1", "eval.every_steps=1", "eval.at_start=true",
           "train.global_batch_size=4", "train.micro_batch_size=2", "data.max_eval_samples=6",
           "eval.sample_prompts=[Define the noun cat.]", "eval.sample_max_new_tokens=6"]
ZERO3 = ["distributed.backend=deepspeed", "distributed.config=zero3"]
FSDP = ["distributed.backend=fsdp"]
# A hang (a rank in a collective the others never reach) shows as a time-out well before the launcher's.
HANG_SECONDS = 240


def assert_a_quiet_log(text: str) -> None:
    """output.verbosity=normal (launcher/outputs/console.py): before it, a 3-step ZeRO-3 run at world size 2
    wrote 75 lines, 23 of them torch.distributed FutureWarnings, and import notices from every process."""
    for noise in ("FutureWarning", "DeprecationWarning", "gemm_4bit_forward", "Setting accelerator to CPU"):
        assert noise not in text, f"{noise} in the log:\n{text[-3000:]}"
    ours = [line for line in text.splitlines() if line.startswith("[tunefleet]")]
    assert ours and len(ours) == len(set(ours)), "a tunefleet line said by more than one rank"


def outcome(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics, read_jsonl(run_dir / "samples.jsonl")


@pytest.mark.parametrize("method, words", [
    # ZeRO-3 with every parameter trainable: the main process generating alone after the start's gathered
    # evaluation hung in DeepSpeed's start-of-forward hook (a broadcast) until that hook was taken off too.
    ("full", ZERO3),
    ("lora", [*FSDP, "peft.dropout=0"]),
], ids=["zero3_full", "fsdp_lora"])
def test_gathered_once_gives_the_answers_and_losses_of_gathering_block_by_block(method, words, tiny_llama, tmp_path):
    gathered = launch(tmp_path / "gathered", method, tiny_llama, *SAMPLES, *words, timeout=HANG_SECONDS)
    assert "gathered once for evaluation and samples" in gathered.stdout
    assert_a_quiet_log(gathered.stdout + gathered.stderr)
    blockwise = launch(tmp_path / "blockwise", method, tiny_llama, *SAMPLES, *words, "eval.gather_weights_gib=0",
                       timeout=HANG_SECONDS)
    assert "gathered once" not in blockwise.stdout
    (m_gathered, s_gathered), (m_blockwise, s_blockwise) = outcome(tmp_path / "gathered"), outcome(tmp_path / "blockwise")
    assert m_gathered["eval_start"]["eval_loss"] == pytest.approx(m_blockwise["eval_start"]["eval_loss"], rel=1e-5)
    assert m_gathered["eval_final"]["eval_loss"] == pytest.approx(m_blockwise["eval_final"]["eval_loss"], rel=1e-5)
    assert [s["answer"] for s in s_gathered] == [s["answer"] for s in s_blockwise]
    assert [s["before_training"] for s in s_gathered] == [s["before_training"] for s in s_blockwise]
    assert len(s_gathered) == 1 and "answer" in s_gathered[0]  # (a 2-block random model may answer with nothing)
    assert set(m_gathered["seconds"]) == {"training", "evaluation", "samples", "checkpoints", "total"}


def test_gathered_size_counts_whole_tensors_in_the_gathered_dtype():
    import torch

    model = torch.nn.Linear(10, 10)  # 110 parameters
    assert gathered_bytes(model, None) == 440
    assert gathered_bytes(model, torch.bfloat16) == 220
