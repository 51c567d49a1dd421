"""`tunefleet`: run, submit to Slurm, validate, list recipes, describe keys, merge adapters.

    tunefleet run recipe=lora train.lr=2e-4 distributed.num_processes=2
    tunefleet submit recipe=lora cluster=NAME slurm.nodes=2 [--dry-run]
    tunefleet submit recipe=lora,qlora train.lr=1e-4,2e-4 cluster=NAME      (a sweep: one job array)
    tunefleet status SWEEP_OR_RUN [--watch [SECONDS]]
    tunefleet cancel SWEEP_OR_RUN
    tunefleet collect SWEEP
    tunefleet logs RUN | SWEEP | SWEEP/RUN [-f]                      (Slurm or local log, across requeues)
    tunefleet search SEARCH.yaml [recipe words] [search.dir=DIR]   (Optuna; each trial a run)
    tunefleet validate recipe=qlora
    tunefleet plan recipe=lora_zero3 distributed.num_processes=8 --device h100 [--json]
    tunefleet recipes
    tunefleet keys [section]
    tunefleet merge runs/lora-20261122-101500 [--dtype bfloat16]
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from launcher.errors import UserError

USAGE = __doc__.strip()


def cmd_recipes(_: list[str]) -> int:
    from launcher.config.assets import is_shipped, search_path
    from launcher.config.load import available_recipes, read_yaml

    recipes = available_recipes()
    if not recipes:
        folders = ", ".join(str(p) for p in search_path("recipes"))
        raise UserError(f"no recipes found (searched {folders}); reinstall tunefleet, or set TUNEFLEET_RECIPES "
                        "to a folder of recipe YAML files")
    width = max(map(len, recipes))
    for name, path in recipes.items():
        origin = "" if is_shipped(path) else f"  [{path}]"  # a user's own recipe, or one hiding a shipped name
        print(f"{name:<{width}}  {read_yaml(path).get('description', '')}{origin}")
    return 0


def cmd_keys(words: list[str]) -> int:
    from launcher.config.docs import keys_reference

    print(keys_reference(words[0] if words else None))
    return 0


def cmd_validate(words: list[str]) -> int:
    import yaml

    from launcher.config.load import load_recipe
    from launcher.preflight import preflight

    name, recipe = load_recipe(words)
    preflight(recipe, name)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
    b, d = recipe.batch, recipe.distributed
    print(f"# ok: global batch {b.global_batch} = micro batch {b.micro} x accumulation {b.accumulation} x world size "
          f"{d.world_size} ({d.num_machines} machine(s) x {d.num_processes} process(es))"
          + (f"; {b.note}" if b.note else ""))
    return 0


def cmd_run(words: list[str]) -> int:
    from launcher.config.load import load_recipe
    from launcher.preflight import preflight

    name, recipe = load_recipe(words)
    preflight(recipe, name)
    # What the user typed, for the "Started as" line of RUN/recipe.yaml (workers see only run.py's words).
    typed = {"TUNEFLEET_COMMAND": shlex.join(["tunefleet", "run", *words])}
    if recipe.distributed.world_size == 1:
        from launcher import run

        previous = os.environ.get("TUNEFLEET_COMMAND")
        os.environ.update(typed)
        try:
            return run.main(words)
        finally:
            os.environ.pop("TUNEFLEET_COMMAND")
            if previous is not None:
                os.environ["TUNEFLEET_COMMAND"] = previous
    from launcher.launch import accelerate_command, has_usable_gpu

    argv, extra_env = accelerate_command(recipe, words, has_gpu=has_usable_gpu(), environ=os.environ)
    print("[tunefleet] launching: " + shell_command(argv, extra_env), flush=True)
    return run_workers(argv, {**os.environ, **extra_env, **typed})


def shell_command(argv: list[str], env: dict[str, str]) -> str:
    """`VAR=value ... argv` quoted for a POSIX shell, so the printed line can be copied and run.

    Only the value of an assignment is quoted: a quoted 'VAR=value' would be taken as a command name.
    """
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def run_workers(argv: list[str], env: dict[str, str], relay_stop_signals: bool = True) -> int:
    """Run the launcher; pass stop signals on; report preemption with its own exit code.

    torchrun turns any worker's non-zero exit into its own status 1, so the main worker also
    writes its outcome to TUNEFLEET_STATUS_FILE, which we read back here. Inside a Slurm step
    (`relay_stop_signals=False`) Slurm delivers a stop signal to every process of the step, the
    agent included: relaying it too would hit the agent twice, and a second SIGTERM during its
    shutdown crashes it, so the signal is only noted here.
    """
    import signal
    import tempfile

    from launcher.distributed.lifetime import LAUNCHER_PID_ENV, agent_preexec
    from launcher.train.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS

    with tempfile.TemporaryDirectory(prefix="tunefleet-") as tmp:
        status_file = Path(tmp) / "status"
        # If this process dies unannounced (SIGKILL, OOM killer), the agent gets SIGTERM and stops
        # the workers, and the workers watch this pid too (launcher/distributed/lifetime.py).
        child = subprocess.Popen(argv, env={**env, "TUNEFLEET_STATUS_FILE": str(status_file),
                                            LAUNCHER_PID_ENV: str(os.getpid())}, preexec_fn=agent_preexec())
        # Every stop signal reaches the agent as SIGTERM: torchrun forwards SIGTERM to its workers, but
        # SIGUSR1's default action would kill the agent and, with it, the workers before they checkpoint.
        signalled = []

        def relay(signum, _frame) -> None:
            signalled.append(signum)
            if relay_stop_signals:
                child.send_signal(signal.SIGTERM)

        previous = {sig: signal.signal(sig, relay) for sig in STOP_SIGNALS}
        try:
            try:
                code = child.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached the agent too (same process group): it stops its workers; wait for that.
                print("[tunefleet] interrupted (Ctrl-C): stopping the workers", file=sys.stderr, flush=True)
                child.wait()
                return 130
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        status = status_file.read_text().strip() if status_file.exists() else ""
    # A stop signal that came while the agent was still starting its workers ends it before any worker
    # could answer: nothing was trained, and the run stopped rather than failed.
    if status == "preempted" or (signalled and not status and code != 0):
        return PREEMPTED_EXIT_CODE
    if code < 0:
        print(f"error: the accelerate launcher (pid {child.pid}) was killed by {signal.Signals(-code).name}; "
              "its workers were sent SIGTERM and stop after their current step, writing a checkpoint if "
              "training had begun (continue with train.resume=auto)", file=sys.stderr)
        return 128 - code  # what a shell reports for a process killed by that signal
    if code not in (0, 2):  # 2: a UserError, already explained by the main worker
        print(f"error: a worker process failed (exit status {code}) and the whole run was stopped; "
              "the launcher's 'Root Cause' report above names the rank and the reason", file=sys.stderr)
    return code


def cmd_merge(words: list[str]) -> int:
    """`tunefleet merge RUN_DIR [--dtype float32|bfloat16|float16]` (also --dtype=D, before or after RUN_DIR)."""
    from launcher.outputs.artifacts import MERGE_DTYPES, check_merge_dtype, merge_run

    usage = f"usage: tunefleet merge RUN_DIR [--dtype {'|'.join(MERGE_DTYPES)}]"
    positional, dtype, rest = [], "float32", list(words)
    while rest:
        word = rest.pop(0)
        if word == "--dtype":
            if not rest:
                raise UserError(f"--dtype needs a value; {usage}")
            dtype = rest.pop(0)
        elif word.startswith("--dtype="):
            dtype = word.split("=", 1)[1]
        elif word.startswith("-"):
            raise UserError(f"unknown option {word}; {usage}")
        else:
            positional.append(word)
    if len(positional) != 1:
        raise UserError(usage)
    check_merge_dtype(dtype)  # before anything loads
    out = merge_run(Path(positional[0]), dtype=dtype)
    print(f"[tunefleet] merged model ({dtype}) written to {out}")
    return 0


def cmd_plan(words: list[str]) -> int:
    from launcher.planning.plan import plan_command

    return plan_command(words)


def cmd_submit(words: list[str]) -> int:
    from launcher.cluster.submit import cmd_submit as submit

    return submit(words)


def cmd_status(words: list[str]) -> int:
    from launcher.cluster.status import cmd_status as status

    return status(words)


def cmd_cancel(words: list[str]) -> int:
    from launcher.cluster.status import cmd_cancel as cancel

    return cancel(words)


def cmd_collect(words: list[str]) -> int:
    from launcher.cluster.collect import cmd_collect as collect

    return collect(words)


def cmd_logs(words: list[str]) -> int:
    from launcher.cluster.logs import cmd_logs as logs

    return logs(words)


def cmd_search(words: list[str]) -> int:
    from launcher.search.driver import cmd_search as search

    return search(words)


COMMANDS = {"search": cmd_search, "run": cmd_run, "submit": cmd_submit, "status": cmd_status, "cancel": cmd_cancel, "collect": cmd_collect, "logs": cmd_logs, "validate": cmd_validate, "plan": cmd_plan, "recipes": cmd_recipes, "keys": cmd_keys, "merge": cmd_merge}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        print("\nEvery recipe key, with its type, default and meaning: tunefleet keys")
        return 0
    command, words = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command in ("run", "validate") and any(w in ("-h", "--help") for w in words):
        return cmd_keys([])
    try:
        code = COMMANDS[command](words)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # `tunefleet plan | head`: the reader has what it wanted. Quiet, as `cat` is; point stdout at
        # /dev/null so that flushing it at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def console() -> None:
    """The `tunefleet` command (pyproject's console script) and `python -m launcher.cli`."""
    from launcher.optional_libraries import in_a_fresh_process
    from launcher.process_exit import exit_with

    in_a_fresh_process()
    exit_with(main())


if __name__ == "__main__":
    console()
