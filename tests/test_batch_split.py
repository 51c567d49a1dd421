"""How the global batch follows the world size (launcher.config.compat.split_batch): kept fixed, the
micro batch lowered where it must be, a world size that cannot take it refused with the exact fix, and
train.global_batch_size=null for a batch that grows with the world size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.compat import split_batch
from launcher.config.load import load_recipe
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("global_batch, micro, world, expected", [
    (8, 4, 1, (8, 4, 2)),
    (8, 4, 2, (8, 4, 1)),
    (8, 4, 8, (8, 1, 1)),     # lowered: 4 x 8 > 8
    (12, 4, 2, (12, 3, 2)),   # lowered to the largest micro batch that divides 6 per process
    (10, 4, 1, (10, 2, 5)),   # (refused before: "not a multiple of micro batch 4 x world size 1")
    (64, 4, 16, (64, 4, 1)),
    (None, 4, 16, (64, 4, 1)),  # null: the micro batch on every process
])
def test_the_global_batch_is_kept_and_the_micro_batch_lowered_only_where_it_must_be(global_batch, micro, world,
                                                                                    expected):
    split = split_batch(global_batch, micro, world)
    assert (split.global_batch, split.micro, split.accumulation) == expected
    assert split.global_batch == split.micro * split.accumulation * world
    assert (split.note is None) == (split.micro == micro)


def test_a_shipped_recipe_moves_from_one_process_to_eight_without_arithmetic():
    _, one = load_recipe(["recipe=lora_zero3", "distributed.num_processes=1"])
    _, eight = load_recipe(["recipe=lora_zero3", "distributed.num_processes=8"])
    assert one.batch.global_batch == eight.batch.global_batch == 8
    assert (eight.batch.micro, eight.batch.accumulation) == (1, 1)
    from launcher.distributed.deepspeed_config import recipe_values

    values = recipe_values(eight, eight.gradient_accumulation_steps, None)
    assert (values["train_micro_batch_size_per_gpu"], values["train_batch_size"]) == (1, 8)


def test_a_world_size_that_cannot_take_the_global_batch_gets_the_exact_fix():
    with pytest.raises(UserError) as info:
        load_recipe(["recipe=lora", "distributed.num_processes=8", "distributed.num_machines=2",
                     "distributed.main_process_ip=10.0.0.1"])
    message = str(info.value)
    assert "train.global_batch_size=8 does not split over world size 16" in message
    assert "train.global_batch_size=16" in message and "train.global_batch_size=null" in message
    _, fixed = load_recipe(["recipe=lora", "distributed.num_processes=8", "distributed.num_machines=2",
                            "distributed.main_process_ip=10.0.0.1", "train.global_batch_size=16"])
    assert fixed.batch.global_batch == 16


def test_validate_says_when_the_micro_batch_was_lowered():
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", "recipe=lora", "distributed.num_processes=8"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "# ok: global batch 8 = micro batch 1 x accumulation 1 x world size 8" in done.stdout
    assert "train.micro_batch_size=4 lowered" in done.stdout


def test_a_batch_that_follows_the_world_size_cannot_resume_at_another_one(tmp_path):
    """train.global_batch_size=null reads the same in both recipes, but the examples per step differ."""
    from launcher.train.checkpoint import STATE_FILE
    from launcher.train.resume import check_resumable

    _, recipe = load_recipe(["recipe=lora", "train.global_batch_size=null"])

    class Backend:
        sharded_state = False

        def resume_fingerprint(self):
            return {"backend": "ddp"}

    checkpoint = tmp_path / "step-10"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(json.dumps({
        "recipe": recipe.model_dump(mode="json"), "backend": {"backend": "ddp"}, "world_size": 2, "global_batch": 8}))
    assert check_resumable(checkpoint, recipe, 2, Backend(), None).global_batch == 8
    with pytest.raises(UserError, match="the global batch changed \\(8 examples per step then, 16 now"):
        check_resumable(checkpoint, recipe, 4, Backend(), None)
