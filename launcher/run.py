"""Run one recipe in this process (or in each process of an `accelerate launch`).

    python launcher/run.py recipe=lora train.lr=2e-4
    accelerate launch launcher/run.py recipe=lora distributed.num_processes=2

Parses and validates (fast, no heavy imports), then hands over to the training loop.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script: put the project root, not launcher/, first on the path (launcher/ holds
    # modules whose names would shadow installed packages).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from launcher.errors import UserError  # noqa: E402
from launcher.train.preemption import Preempted  # noqa: E402


def launched_world_overrides() -> list[str]:
    """When started by a launcher (torchrun/accelerate), adopt its process layout as recipe keys."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return []
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    return [f"distributed.num_processes={local}", f"distributed.num_machines={world // local}",
            f"distributed.machine_rank={int(os.environ.get('GROUP_RANK', os.environ.get('NODE_RANK', 0)))}"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(word in ("-h", "--help") for word in argv):
        from launcher.config.docs import keys_reference

        print(__doc__.strip() + "\n\nRecipe keys (set any as key.sub=value):\n" + keys_reference())
        return 0
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun, record() puts a failing rank's exception into the launcher's root-cause report.
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        from launcher.config.load import load_recipe
        from launcher.config.preflight import preflight

        name, recipe = load_recipe(argv + launched_world_overrides())
        preflight(recipe, name)
        from launcher.train.loop import run_training

        run_training(recipe, name, ["launcher/run.py", *argv])
    except UserError as err:
        if os.environ.get("RANK") in (None, "0"):
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Preempted as stop:
        status_file = os.environ.get("TUNEFLEET_STATUS_FILE")
        if status_file and os.environ.get("RANK") in (None, "0"):
            with open(status_file, "w") as f:
                f.write("preempted\n")
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
