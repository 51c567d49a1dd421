"""Run one recipe in this process (or in each process of an `accelerate launch`).

    python launcher/run.py recipe=lora train.lr=2e-4
    accelerate launch launcher/run.py recipe=lora distributed.num_processes=2

Parses and validates (fast, no heavy imports), then hands over to the training loop.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys

if __package__ in (None, ""):
    # Run as a script: put the project root, not launcher/, first on the path (launcher/ holds
    # modules whose names would shadow installed packages).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from launcher.errors import UserError  # noqa: E402
from launcher.train.preemption import Preempted, StopAtOnceUntilTraining, StoppedBeforeTraining  # noqa: E402


def launched_world_overrides() -> list[str]:
    """When started by a launcher (torchrun/accelerate), adopt its process layout as recipe keys."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return []
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    words = [f"distributed.num_processes={local}", f"distributed.num_machines={world // local}",
             f"distributed.machine_rank={int(os.environ.get('GROUP_RANK', os.environ.get('NODE_RANK', 0)))}"]
    if os.environ.get("MASTER_ADDR"):
        # The address the launcher really used; without it a multi-machine recipe would be refused
        # for leaving main_process_ip at its default (launcher/config/compat.py).
        words.append(f"distributed.main_process_ip={os.environ['MASTER_ADDR']}")
    return words


def report_error(err: UserError) -> None:
    """Print a UserError on every rank; other ranks say which one and where (e.g. a file missing on machine 2)."""
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" else f" (rank {rank} on {socket.gethostname()})"
    # One write, so that ranks printing at once do not interleave within a message.
    sys.stderr.write(f"error{where}: {err}\n")
    sys.stderr.flush()


def write_status(status: str) -> None:
    """Tell `tunefleet run` (cli.run_workers) how the run ended, if it still listens.

    The file lies in the CLI's temporary folder, which is gone when the CLI (or its agent) was killed
    and this worker is stopping on its own: that must not turn a clean stop into a crash.
    """
    status_file = os.environ.get("TUNEFLEET_STATUS_FILE")
    # Each machine has its own launcher and its own status file: its first local worker answers it.
    if not status_file or os.environ.get("LOCAL_RANK", os.environ.get("RANK")) not in (None, "0"):
        return
    try:
        with open(status_file, "w") as f:
            f.write(status + "\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(word in ("-h", "--help") for word in argv):
        from launcher.config.docs import keys_reference

        print(__doc__.strip() + "\n\nRecipe keys (set any as key.sub=value):\n" + keys_reference())
        return 0
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from launcher.distributed.lifetime import tie_worker_to_launcher

        tie_worker_to_launcher()  # a worker never outlives its launcher (SIGKILL, OOM killer)
        # Under torchrun, record() puts a failing rank's exception into the launcher's root-cause report.
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str]) -> int:
    if "WORLD_SIZE" not in os.environ:  # one process: a launcher sized the threads of multi-process runs
        from launcher.distributed.cpus import size_threads_for_this_process

        size_threads_for_this_process()
    try:
        with StopAtOnceUntilTraining():
            return _prepare_and_train(argv)
    except StoppedBeforeTraining as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"[tunefleet] {stop.args[0]} before training began: nothing to checkpoint; exiting with code "
                  f"{stop.exit_code} (requeue with train.resume=auto)", file=sys.stderr, flush=True)
        write_status("preempted")
        return stop.exit_code


def _prepare_and_train(argv: list[str]) -> int:
    try:
        from launcher.config.load import load_recipe
        from launcher.preflight import preflight

        name, recipe = load_recipe(argv + launched_world_overrides())
        preflight(recipe, name)
        from launcher.optional_libraries import leave_out_unneeded
        from launcher.outputs.console import import_quietly, quiet_libraries

        leave_out_unneeded(recipe)  # before peft is imported: it imports bitsandbytes wherever installed
        verbosity = recipe.output.verbosity
        quiet_libraries(verbosity, main_process=os.environ.get("RANK", "0") == "0")
        noisy = ["transformers", "peft", *(["deepspeed"] if recipe.distributed.backend == "deepspeed" else [])]
        import_quietly(*noisy, verbosity=verbosity)  # (peft brings bitsandbytes)
        from launcher.train.loop import run_training

        typed = os.environ.get("TUNEFLEET_COMMAND")  # set by `tunefleet run`
        run_training(recipe, name, shlex.split(typed) if typed else ["launcher/run.py", *argv])
    except UserError as err:
        report_error(err)
        return err.exit_code
    except Preempted as stop:
        write_status("preempted")
        return stop.exit_code
    return 0


if __name__ == "__main__":
    from launcher.optional_libraries import in_a_fresh_process
    from launcher.process_exit import exit_with

    in_a_fresh_process()
    exit_with(main())
