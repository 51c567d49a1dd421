"""`tunefleet`: run, validate, list recipes, describe keys, merge adapters.

    tunefleet run recipe=lora train.lr=2e-4 distributed.num_processes=2
    tunefleet validate recipe=qlora
    tunefleet recipes
    tunefleet keys [section]
    tunefleet merge runs/lora-20261122-101500
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launcher.errors import UserError

USAGE = __doc__.strip()


def cmd_recipes(_: list[str]) -> int:
    from launcher.config.load import available_recipes, read_yaml

    recipes = available_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {read_yaml(path).get('description', '')}")
    return 0


def cmd_keys(words: list[str]) -> int:
    from launcher.config.docs import keys_reference

    print(keys_reference(words[0] if words else None))
    return 0


def cmd_validate(words: list[str]) -> int:
    import yaml

    from launcher.config.load import load_recipe
    from launcher.config.preflight import preflight

    name, recipe = load_recipe(words)
    preflight(recipe, name)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
    t, d = recipe.train, recipe.distributed
    print(f"# ok: global batch {t.global_batch_size} = micro batch {t.micro_batch_size} x accumulation "
          f"{recipe.gradient_accumulation_steps} x world size {d.world_size} "
          f"({d.num_machines} machine(s) x {d.num_processes} process(es))")
    return 0


def cmd_run(words: list[str]) -> int:
    from launcher.config.load import load_recipe
    from launcher.config.preflight import preflight

    name, recipe = load_recipe(words)
    preflight(recipe, name)
    if recipe.distributed.world_size == 1:
        from launcher import run

        return run.main(words)
    import torch

    from launcher.launch import accelerate_command

    argv, extra_env = accelerate_command(recipe, words, has_gpu=torch.cuda.is_available())
    print("[tunefleet] launching: " + " ".join(f"{k}={v}" for k, v in extra_env.items()) + " " + " ".join(argv),
          flush=True)
    env = {**os.environ, **extra_env}
    return subprocess.call(argv, env=env)


def cmd_merge(words: list[str]) -> int:
    if len(words) != 1:
        raise UserError("usage: tunefleet merge RUN_DIR")
    from launcher.outputs.artifacts import merge_run

    out = merge_run(Path(words[0]))
    print(f"[tunefleet] merged model written to {out}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "recipes": cmd_recipes, "keys": cmd_keys, "merge": cmd_merge}


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
        return COMMANDS[command](words)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
