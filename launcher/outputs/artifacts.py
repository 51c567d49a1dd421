"""Save the trained artifact so stock peft/transformers load it, check what was written, merge adapters.

Adapters (LoRA, DoRA, QLoRA, IA3, prompt and prefix tuning) are saved with peft's
`save_pretrained`; full, partially frozen and head-only models with transformers'. Each save
goes to a temporary folder that replaces the target only when complete, and is then read back:
a missing, empty or mis-shaped tensor is an error at save time, not a surprise at load time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from launcher.errors import UserError
from launcher.outputs.atomic import replace_dir


def expected_tensors(model, state_dict: dict | None = None) -> dict[str, tuple]:
    """Names and shapes the saved files must hold, from whole (gathered) tensors."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items()}
    return {k: tuple(v.shape) for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}


def tensors_to_gather(model) -> set[str] | None:
    """The state-dict names an artifact of `model` (unwrapped) is made of, or None for all of them.

    Sharded backends gather whole tensors to save; for an adapter that must be the adapter's few
    MB, not the model. The names are what peft's own selection takes from a state dict, found by
    running it on shape-only placeholders, plus every trainable parameter (the run's checksum
    reads them). Anything it returns that is not one of the placeholders means we cannot tell
    what it read: then everything is gathered, as before.
    """
    if not hasattr(model, "peft_config"):
        return None
    import torch

    names = {name for name, param in model.named_parameters() if param.requires_grad}
    if computes_on_save(model):
        return names  # prompt learning saves embeddings computed from the live, trainable encoder
    from peft import get_peft_model_state_dict

    placeholders = {key: torch.empty(tuple(getattr(value, "ds_shape", value.shape)), device="meta")
                    for key, value in model.state_dict().items()}  # FSDP2: global shapes; ZeRO-3: ds_shape
    by_identity = {id(value): key for key, value in placeholders.items()}
    picked = get_peft_model_state_dict(model, state_dict=placeholders).values()
    if any(id(value) not in by_identity for value in picked):
        return None
    return names | {by_identity[id(value)] for value in picked}


def _modern_name(key: str) -> str:
    """transformers may write BERT-era LayerNorm names (gamma/beta) for weight/bias, and reads both."""
    for legacy, modern in ((".gamma", ".weight"), (".beta", ".bias")):
        if key.endswith(legacy) and "LayerNorm" in key:
            return key[: -len(legacy)] + modern
    return key


def verify_artifact(folder: Path, expected: dict[str, tuple], is_adapter: bool) -> None:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"save check failed: {folder} has no .safetensors file")
    saved = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                saved[key] = tuple(f.get_slice(key).get_shape())
    saved = {_modern_name(k): shape for k, shape in saved.items()}
    empty = [k for k, shape in saved.items() if 0 in shape]
    wrong = [k for k, shape in saved.items() if k in expected and expected[k] != shape]
    unknown = [k for k in saved if k not in expected]
    # transformers drops a tied output embedding from full-model files; adapters must be complete.
    missing = [k for k in expected if k not in saved and (is_adapter or not k.endswith("lm_head.weight"))]
    problems = [(label, keys) for label, keys in
                (("empty", empty), ("wrong shape", wrong), ("unexpected", unknown), ("missing", missing)) if keys]
    if not saved or problems:
        detail = "; ".join(f"{label}: {keys[:5]}" for label, keys in problems) or "no tensors"
        raise RuntimeError(f"save check failed for {folder}: {detail}")


def computes_on_save(model) -> bool:
    """peft saves prompt-learning adapters by running the prompt encoder (a forward pass)."""
    configs = getattr(model, "peft_config", {})
    return any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def _without_tied_aliases(model, state_dict: dict | None) -> dict | None:
    """A gathered state dict holds tied weights (input/output embedding) as separate copies, which
    transformers then saves twice; keep the first name of each shared parameter, as it does."""
    if state_dict is None:
        return None
    first_name: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases.add(name)
        else:
            first_name[id(param)] = name
    return {k: v for k, v in state_dict.items() if k not in aliases}


def save_artifact(model, tokenizer, folder: Path, state_dict: dict | None = None, is_main: bool = True,
                  extra_files: dict[str, str] | None = None) -> None:
    """Write `model` (unwrapped) and its tokenizer to `folder`, atomically, then verify the files.

    `state_dict` holds whole tensors where the live parameters are shards (ZeRO-3, FSDP): saving
    the live, partitioned parameters is how peers end up with empty adapters. Call on every rank:
    where peft runs the model to save (prompt learning), that forward is a collective when
    parameters are sharded; only the main process writes.
    """
    if not is_main and not computes_on_save(model):
        return
    is_adapter = hasattr(model, "peft_config")
    tmp = folder.with_name(folder.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if is_adapter:
        model.save_pretrained(str(tmp), state_dict=state_dict, is_main_process=is_main)
    else:
        model.save_pretrained(str(tmp), state_dict=_without_tied_aliases(model, state_dict))
    expected = expected_tensors(model, state_dict)  # may run the prompt encoder too: on every rank
    if not is_main:
        return
    tokenizer.save_pretrained(str(tmp))
    verify_artifact(tmp, expected, is_adapter)
    load_check(tmp, is_adapter)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    replace_dir(tmp, folder)  # never a moment without a complete artifact under the name


def load_check(folder: Path, is_adapter: bool) -> None:
    """Read the artifact back with the stock loaders' own functions (config and weights)."""
    if is_adapter:
        from peft import PeftConfig
        from peft.utils import load_peft_weights

        PeftConfig.from_pretrained(str(folder))
        if not load_peft_weights(str(folder), device="cpu"):
            raise RuntimeError(f"save check failed: peft loads no weights from {folder}")
    else:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(folder))


MERGE_DTYPES = ("float32", "bfloat16", "float16")


def check_merge_dtype(dtype: str) -> None:
    if dtype not in MERGE_DTYPES:
        raise UserError(f"merge dtype '{dtype}' is not one of {', '.join(MERGE_DTYPES)}")


def merge_run(run_dir: Path, artifact: str = "final", dtype: str = "float32") -> Path:
    """Fold a run's adapter into its base model and save the result as run_dir/merged, in `dtype`."""
    from launcher.config.compat import MERGEABLE
    from launcher.config.load import load_recipe

    check_merge_dtype(dtype)
    recipe_file = run_dir / "recipe.yaml"
    adapter_dir = run_dir / artifact
    if not recipe_file.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} is not a finished adapter run (needs recipe.yaml and {artifact}/adapter_config.json)")
    _, recipe = load_recipe([f"recipe={recipe_file}"])
    if recipe.peft.method not in MERGEABLE:
        raise UserError(f"peft.method={recipe.peft.method} cannot be merged into the base weights")
    out = run_dir / "merged"
    tmp = out.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merge_adapter(recipe, adapter_dir, tmp, dtype)
    replace_dir(tmp, out)
    return out


def merge_adapter(recipe, adapter_dir: Path, out: Path, dtype: str = "float32") -> None:
    """Fold the adapter saved in `adapter_dir` into the base model of the run's `recipe`; write the merged
    model, in `dtype`, and its tokenizer to `out` (a fresh folder the caller publishes), then check the files.

    The one merge `tunefleet merge`, output.merge and a run folder used as a model source all go through.
    The base is loaded from model.name at model.revision, with model.trust_remote_code, as in training.
    The merge itself runs in float32 and the result is cast afterwards, so a bfloat16/float16 artifact is
    rounded once, not at every step of the fold.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from launcher.model.sources import materialize

    base_path = materialize(recipe.model.name)
    hub = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}
    # The run saves its tokenizer next to the adapter (custom tokenizer code still comes from the base
    # repo); a trimmed copy of the folder without tokenizer files falls back to the base's.
    has_tokenizer = any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir) if has_tokenizer else base_path, **hub)
    # The base is loaded unquantized even for QLoRA: merging into 4-bit weights would round the update away.
    if recipe.model.task == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(base_path, dtype=torch.float32, **hub,
                                                                  **_label_kwargs(adapter_dir))
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **hub)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().to(getattr(torch, dtype))
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    verify_artifact(out, expected_tensors(merged), is_adapter=False)


def _label_kwargs(adapter_dir: Path) -> dict:
    import json

    labels_file = adapter_dir / "labels.json"
    names = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    if not names:
        return {}
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
