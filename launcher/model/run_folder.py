"""A finished tunefleet run folder used as a model source (`model.name` or `distill.teacher`).

The folder's artifact is `best/` when the run kept one, else `final/` (as `tunefleet collect` picks).
A full model (full, partial_freeze, head_only) is a transformers folder already; an adapter is
applied to the base model the run's own recipe.yaml names and folded into it, once, into the
model cache (keyed by the artifact's files, so a re-run invalidates it). The run folder itself is
never written to: it may be someone else's, or shipped read-only.
"""

from __future__ import annotations

from pathlib import Path

from launcher.cache import build_once, cache_root, digest
from launcher.errors import UserError
from launcher.outputs.run_files import ARTIFACT_NAMES, saved_artifact


def is_run_folder(path: Path) -> bool:
    """A folder holding a run's recipe.yaml and a saved artifact (not itself a model folder)."""
    return (path.is_dir() and not (path / "config.json").is_file() and (path / "recipe.yaml").is_file()
            and any((path / name).is_dir() for name in ARTIFACT_NAMES))


def run_artifact(run_dir: Path) -> Path:
    artifact = saved_artifact(run_dir)
    if artifact is not None:
        return artifact
    raise UserError(f"{run_dir} is a run folder without a finished artifact (best/ or final/ holding "
                    "adapter_config.json or config.json): let that run finish, or name a model folder")


def model_from_run(run_dir: Path) -> str:
    """A transformers folder with the run's trained model: its full-model artifact, or base + adapter merged."""
    artifact = run_artifact(run_dir)
    if (artifact / "config.json").is_file():
        return str(artifact)
    files = sorted(p for p in artifact.iterdir() if p.is_file())
    key = digest([str(artifact.resolve())] + [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files])
    target = cache_root() / "models" / f"run-{run_dir.resolve().name}-{key}"
    if not target.exists():
        print(f"[tunefleet] folding the adapter of {artifact} into its base once (cached in {target.parent})",
              flush=True)
    return str(build_once(target, lambda tmp: _write_merged(run_dir, artifact, tmp)))


def _write_merged(run_dir: Path, artifact: Path, out: Path) -> None:
    from launcher.config.compat import MERGEABLE
    from launcher.config.load import load_recipe
    from launcher.outputs.artifacts import merge_adapter

    _, recipe = load_recipe([f"recipe={run_dir / 'recipe.yaml'}"])
    if recipe.peft.method not in MERGEABLE:
        raise UserError(f"{run_dir} trained peft.method={recipe.peft.method}, which cannot be folded into its base "
                        f"to make one model; a run folder source needs {', '.join(MERGEABLE)} or a full model")
    # Cached in float32: whoever loads it (a teacher, a student's base) casts to the dtype it computes in.
    merge_adapter(recipe, artifact, out, dtype="float32")
