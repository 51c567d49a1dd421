"""The loop's state as a checkpoint stores it: trainer_state.json keeps its keys, so old checkpoints resume."""

import json
import math

from launcher.train.state import CheckpointRecord, TrainState

# A trainer_state.json as checkpoints wrote it before TrainState existed (the loop's state dict,
# then the run's fingerprints; the recipe shortened).
WRITTEN_BEFORE = """{
 "step": 4,
 "train_loss": 2.5,
 "best_value": 2.75,
 "best_step": 4,
 "evals_without_gain": 1,
 "stopped_early": false,
 "samples_before": [{"prompt": "Define the noun \\"river\\".", "answer": "a stream"}],
 "eval_start": {"eval_loss": 3.5, "eval_perplexity": 33.1},
 "eval_final": {"eval_loss": 2.75, "eval_perplexity": 15.6},
 "tokens_done": 1234,
 "elapsed": 12.5,
 "slots_done": 2048,
 "flops_done": 1000000.0,
 "train_seconds": 8.25,
 "eval_seconds": 2.0,
 "samples_seconds": 1.5,
 "checkpoint_seconds": 0.75,
 "world_size": 2,
 "global_batch": 8,
 "recipe": {"peft": {"method": "lora"}},
 "backend": {"backend": "ddp"},
 "data_key": "0123abcd",
 "total_steps": 6
}"""
RUN_KEYS = ("world_size", "global_batch", "recipe", "backend", "data_key", "total_steps")


def test_a_trainer_state_written_before_the_class_existed_resumes():
    saved = json.loads(WRITTEN_BEFORE)
    state = TrainState.from_json(saved)
    assert (state.step, state.train_loss, state.best_value, state.best_step) == (4, 2.5, 2.75, 4)
    assert (state.evals_without_gain, state.stopped_early, state.tokens_done, state.slots_done) == (1, False, 1234, 2048)
    assert state.samples_before == [{"prompt": 'Define the noun "river".', "answer": "a stream"}]
    assert state.eval_start["eval_loss"] == 3.5 and state.eval_final["eval_loss"] == 2.75
    assert (state.elapsed, state.flops_done, state.train_seconds) == (12.5, 1e6, 8.25)
    assert (state.eval_time.seconds, state.samples_time.seconds, state.checkpoint_time.seconds) == (2.0, 1.5, 0.75)
    # Written again, it is the same file less the run's fingerprints (which the loop adds), keys in order.
    assert list(state.to_json().items()) == [(k, v) for k, v in saved.items() if k not in RUN_KEYS]


def test_keys_an_older_checkpoint_lacks_take_their_defaults():
    saved = {k: v for k, v in json.loads(WRITTEN_BEFORE).items()
             if k not in ("eval_seconds", "samples_seconds", "checkpoint_seconds")}
    state = TrainState.from_json(saved)
    assert state.step == 4 and state.eval_time.seconds == state.checkpoint_time.seconds == 0.0


def test_the_state_survives_its_json_round_trip():
    state = TrainState(step=7, train_loss=1.25, best_value=0.5, best_step=6, evals_without_gain=2, stopped_early=True,
                       samples_before=[{"prompt": "p", "answer": "a"}], eval_start={"eval_loss": 1.0},
                       eval_final={"eval_loss": 0.5}, tokens_done=99, elapsed=3.0, slots_done=120, flops_done=4.5,
                       train_seconds=2.0)
    with state.checkpoint_time.timing():
        pass
    state.eval_time.seconds = 0.25
    assert TrainState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_a_fresh_state_writes_every_key_the_loop_ever_wrote():
    fresh = TrainState().to_json()
    assert list(fresh) == [k for k in json.loads(WRITTEN_BEFORE) if k not in RUN_KEYS]
    assert math.isnan(fresh["train_loss"]) and fresh["step"] == 0 and fresh["samples_before"] == []
    assert TrainState().samples_before is not TrainState().samples_before  # no list shared between runs


def test_a_checkpoint_record_reads_and_writes_the_file_as_it_always_was():
    saved = json.loads(WRITTEN_BEFORE)
    record = CheckpointRecord.from_json(saved)
    assert (record.world_size, record.global_batch, record.data_key, record.total_steps) == (2, 8, "0123abcd", 6)
    assert record.backend == {"backend": "ddp"} and record.recipe == {"peft": {"method": "lora"}}
    assert record.state == TrainState.from_json(saved)
    assert list(record.to_json().items()) == list(saved.items())  # same keys, same order, same values


def test_a_checkpoint_from_before_the_global_batch_was_kept_reads_as_unknown():
    saved = {k: v for k, v in json.loads(WRITTEN_BEFORE).items() if k not in ("global_batch", "backend", "data_key")}
    record = CheckpointRecord.from_json(saved)
    assert record.global_batch is None and record.backend is None and record.data_key is None
