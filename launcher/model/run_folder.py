"""A finished tunefleet run folder used as a model source (`model.name` or `distill.teacher`).

The folder's artifact is `best/` when the run kept one, else `final/` (as `tunefleet collect` picks).
A full model (full, partial_freeze, head_only) is a transformers folder already; an adapter is
applied to the base model the run's own recipe.yaml names and folded into it, once, into the
model cache (keyed by the artifact's files, so a re-run invalidates it). The run folder itself is
never written to: it may be someone else's, or shipped read-only.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cache import build_once, cache_root, digest
from launcher.errors import UserError

ARTIFACT_NAMES = ("best", "final")


def is_run_folder(path: Path) -> bool:
    """A folder holding a run's recipe.yaml and a saved artifact (not itself a model folder)."""
    return (path.is_dir() and not (path / "config.json").is_file() and (path / "recipe.yaml").is_file()
            and any((path / name).is_dir() for name in ARTIFACT_NAMES))


def run_artifact(run_dir: Path) -> Path:
    for name in ARTIFACT_NAMES:
        folder = run_dir / name
        if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            return folder
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
    return str(build_once(target, lambda tmp: _merge_adapter(run_dir, artifact, tmp)))


def _merge_adapter(run_dir: Path, artifact: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from launcher.config.compat import MERGEABLE
    from launcher.config.load import load_recipe
    from launcher.model.sources import materialize

    _, recipe = load_recipe([f"recipe={run_dir / 'recipe.yaml'}"])
    if recipe.peft.method not in MERGEABLE:
        raise UserError(f"{run_dir} trained peft.method={recipe.peft.method}, which cannot be folded into its base "
                        f"to make one model; a run folder source needs {', '.join(MERGEABLE)} or a full model")
    base_path = materialize(recipe.model.name)
    hub = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.task == "classification":
        labels_file = artifact / "labels.json"
        names = json.loads(labels_file.read_text()) if labels_file.is_file() else None
        labels = ({"num_labels": len(names), "id2label": dict(enumerate(names)),
                   "label2id": {n: i for i, n in enumerate(names)}} if names else {})
        base = AutoModelForSequenceClassification.from_pretrained(base_path, dtype=torch.float32, **hub, **labels)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **hub)
    merged = PeftModel.from_pretrained(base, str(artifact)).merge_and_unload()
    merged.save_pretrained(str(out))
    # The run saves its tokenizer with the adapter; a trimmed copy (no tokenizer files) falls back to the base's.
    has_tokenizer = any((artifact / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    AutoTokenizer.from_pretrained(str(artifact) if has_tokenizer else base_path, **hub).save_pretrained(str(out))
