"""Keeping bitsandbytes out of a training process that does not quantize.

Why: peft imports bitsandbytes whenever it is installed (peft 0.21, peft/helpers.py), whatever the
method. Importing it cost each process 1.3 s on this 2-core CPU (`import transformers, peft`: 6.3 s
with it, 5.0 s without, 3 runs each; it loads torch's compiler for its CPU kernels, 577 modules), on a
GPU node it loads its CUDA libraries, and a bitsandbytes built for another CUDA than the site's then
breaks LoRA runs that never quantize. A run needs it for peft.method=qlora, train.optimizer=adamw_8bit
or a model (or teacher) saved quantized; any other run marks it absent before peft is imported, which
peft, transformers and accelerate read as "not installed" (`importlib.util.find_spec` answers None).

Only a fresh process does this: the entry points (launcher/run.py as a script, the `tunefleet` command)
say so with `in_a_fresh_process()`. A test's long-lived process calls `main()` directly and may import
bitsandbytes later for a QLoRA run.
"""

from __future__ import annotations

import sys

_fresh_process = False


def in_a_fresh_process() -> None:
    """Called by an entry point: this process runs one command and may leave libraries out."""
    global _fresh_process
    _fresh_process = True


def needs_bitsandbytes(recipe) -> bool:
    if recipe.peft.method == "qlora" or recipe.train.optimizer == "adamw_8bit":
        return True
    sources = [(recipe.model.name, recipe.model.revision)]
    if recipe.distill and recipe.distill.teacher:  # (no teacher named: model.name teaches)
        sources.append((recipe.distill.teacher, None))
    return any(_saved_quantized(name, revision) for name, revision in sources)


def _saved_quantized(name: str, revision: str | None) -> bool:
    """Whether the source's config says its weights are saved quantized; True when it cannot be read here."""
    from launcher.planning.shapes import read_config

    try:
        config = read_config(name, revision)
    except Exception:  # unreadable before loading (a hub id not cached yet): keep every library at hand
        return True
    return bool(config.get("quantization_config"))


def leave_out_unneeded(recipe) -> None:
    """In a fresh process, before peft is imported: mark bitsandbytes absent unless the run needs it."""
    if _fresh_process and "bitsandbytes" not in sys.modules and not needs_bitsandbytes(recipe):
        sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError, find_spec answers None
