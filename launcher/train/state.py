"""What the training loop carries from step to step, and what a checkpoint stores of it.

A checkpoint's trainer_state.json holds TrainState's fields under the keys `to_json` writes, then
the fingerprints of the run that wrote it (CheckpointRecord), which resume checks. The keys are a
file format: checkpoints written before these classes existed resume through `from_json`, and a
key added later falls back to its default.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields


@dataclass
class Clock:
    """Seconds spent in one part of the run, summed over every visit (and over resumed attempts)."""

    seconds: float = 0.0

    @contextlib.contextmanager
    def timing(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


@dataclass
class TrainState:
    step: int = 0
    train_loss: float = math.nan  # of the last step
    best_value: float | None = None  # of eval.metric, at best_step
    best_step: int | None = None
    evals_without_gain: int = 0  # early stopping's count
    stopped_early: bool = False
    samples_before: list = field(default_factory=list)  # answers before training, kept for a resumed run
    eval_start: dict | None = None
    eval_final: dict | None = None
    tokens_done: int = 0
    elapsed: float = 0.0  # wall time of the run so far, opening evaluation included
    # Throughput over training steps only (evaluation excluded), data waits included.
    slots_done: int = 0
    flops_done: float = 0.0
    train_seconds: float = 0.0
    # Where the rest of the time goes (metrics.json "seconds"): under sharded backends evaluation
    # and sample answers can cost more than training itself.
    eval_time: Clock = field(default_factory=Clock)
    samples_time: Clock = field(default_factory=Clock)
    checkpoint_time: Clock = field(default_factory=Clock)

    def to_json(self) -> dict:
        """The trainer_state.json keys, in the order checkpoints have always written them."""
        saved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            saved[JSON_KEYS.get(f.name, f.name)] = value.seconds if isinstance(value, Clock) else value
        return saved

    @classmethod
    def from_json(cls, saved: dict) -> TrainState:
        """The state a trainer_state.json records; its other keys (world size, recipe, ...) are ignored."""
        state = cls()
        for f in fields(cls):
            key = JSON_KEYS.get(f.name, f.name)
            if key not in saved:  # an older checkpoint, from before the key existed
                continue
            if isinstance(getattr(state, f.name), Clock):
                getattr(state, f.name).seconds = saved[key]
            else:
                setattr(state, f.name, saved[key])
        return state


# The file keeps the flat names it had when the clocks were plain numbers.
JSON_KEYS = {"eval_time": "eval_seconds", "samples_time": "samples_seconds", "checkpoint_time": "checkpoint_seconds"}


@dataclass
class CheckpointRecord:
    """A checkpoint's trainer_state.json: the loop's state and what the run that wrote it was."""

    state: TrainState
    world_size: int
    global_batch: int | None = None  # examples per optimizer step; None in checkpoints from before it was kept
    recipe: dict = field(default_factory=dict)  # the whole recipe, as recipe.yaml holds it
    backend: dict | None = None  # Backend.resume_fingerprint(): the backend and its DeepSpeed JSON's content
    data_key: str | None = None  # the tokenized training data's content key
    total_steps: int | None = None

    def to_json(self) -> dict:
        return {**self.state.to_json(), "world_size": self.world_size, "global_batch": self.global_batch,
                "recipe": self.recipe, "backend": self.backend, "data_key": self.data_key,
                "total_steps": self.total_steps}

    @classmethod
    def from_json(cls, saved: dict) -> CheckpointRecord:
        return cls(state=TrainState.from_json(saved), world_size=saved["world_size"],
                   global_batch=saved.get("global_batch"), recipe=saved.get("recipe", {}),
                   backend=saved.get("backend"), data_key=saved.get("data_key"),
                   total_steps=saved.get("total_steps"))
