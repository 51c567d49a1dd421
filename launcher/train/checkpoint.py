"""Checkpoints: complete or ignored, never half-used.

Layout: RUN/checkpoints/step-00000040/ holds the backend's state (trainable weights, optimizer,
schedule, every rank's RNG) plus trainer_state.json (step, best metric, early-stopping count,
world size, the recipe, the backend's and the data's fingerprints). A checkpoint is written into
step-N.tmp by all ranks; the main process writes trainer_state.json last, fsyncs, and renames
the folder: a crash at any point leaves either a complete checkpoint or a .tmp folder that resume
ignores. The newest `train.keep_checkpoints` are kept; older ones are deleted only after the new
one is in place.

For adapter and partially frozen models only trainable tensors are written (the frozen base is
the model the run starts from anyway), which keeps a LoRA checkpoint at megabytes, not gigabytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from launcher.outputs.atomic import replace_dir, write_text_atomic
from launcher.train.state import CheckpointRecord

STATE_FILE = "trainer_state.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .tmp folder or one without its state file is ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.suffix != ".tmp"
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def read_record(checkpoint: Path) -> CheckpointRecord:
    return CheckpointRecord.from_json(json.loads((checkpoint / STATE_FILE).read_text()))


def save_checkpoint(run, record: CheckpointRecord, keep: int) -> Path:
    """Write the checkpoint of `step` on all ranks (a collective); return its folder."""
    accelerator, run_dir = run.accelerator, run.run_dir
    step = record.state.step
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    run.backend.save_state(accelerator, str(tmp), run.model, run.optimizer, run.scheduler)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file last: its presence marks the checkpoint complete.
        write_text_atomic(tmp / STATE_FILE, json.dumps(record.to_json(), indent=1))
        replace_dir(tmp, final)  # fsyncs the contents first; an older copy of this step is swapped out whole
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
