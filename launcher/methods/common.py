"""Helpers the method modules share: task types, layer discovery, parameter counts."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from launcher.errors import UserError

# Module names transformers gives the freshly initialised head of a sequence classifier
# (BERT-style: classifier, decoder-style: score). peft uses the same list for SEQ_CLS.
HEAD_MODULE_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class MethodContext:
    """What a method needs to know beyond its own config section."""

    task: str  # "causal_lm" or "classification"
    model_path: str  # folder the model and tokenizer load from
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict | None = None  # how the launcher enabled it (methods must not override)


def peft_task_type(task: str):
    from peft import TaskType

    return TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS


def wrap_with_peft(model: nn.Module, peft_config) -> nn.Module:
    """get_peft_model, turning peft's 'target modules not found' into a message that lists the candidates."""
    from peft import get_peft_model

    try:
        from peft.utils.error import NoMatchingPeftModuleError
    except ImportError:  # older peft raised a plain ValueError
        NoMatchingPeftModuleError = ValueError
    try:
        return get_peft_model(model, peft_config)
    except (ValueError, NoMatchingPeftModuleError) as err:
        text = str(err)
        if not isinstance(err, NoMatchingPeftModuleError) and "not found in the base model" not in text:
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(
            f"peft.target_modules {list(peft_config.target_modules)} not found in this model; "
            f"its linear modules are: {', '.join(linear)}"
        ) from None


def _block_class_names(model: nn.Module) -> set[str]:
    """The classes the model itself declares as its blocks (transformers' `_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if isinstance(declared, (list, tuple, set)):
            names.update(declared)
    return names


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks, as the model declares them.

    A ModuleList whose entries are all of a class the model lists in `_no_split_modules` (the
    decoder or encoder layers): not merely the longest ModuleList, which in a mixture-of-experts
    model is a list of experts. Where a model declares nothing, the outermost ModuleList of
    identical modules. FSDP units, layer-wise learning rates and partial freezing all use this.
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    declared = _block_class_names(model)
    if declared:
        matching = [m for m in lists if all(type(block).__name__ in declared for block in m)]
        if matching:
            return max(matching, key=len)
    uniform = [m for m in lists if len({type(block) for block in m}) == 1]
    if not uniform:
        raise UserError("could not find the model's transformer blocks (no list of identical layers, and the model "
                        "declares none in _no_split_modules)")
    inner = {id(sub) for m in uniform for sub in m.modules() if sub is not m}
    outermost = [m for m in uniform if id(m) not in inner]
    return max(outermost, key=len)


def layer_index_by_param(model: nn.Module) -> dict[str, int]:
    """Map each parameter name inside a transformer block to that block's index."""
    layers = transformer_layers(model)
    owner = {id(block): i for i, block in enumerate(layers)}
    index: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if id(module) in owner:
            for param_name, _ in module.named_parameters():
                index[f"{module_name}.{param_name}"] = owner[id(module)]
    return index


def freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def unfreeze_matching(model: nn.Module, patterns: list[str]) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    matched = []
    for name, param in model.named_parameters():
        if any(p.search(name) for p in compiled):
            param.requires_grad_(True)
            matched.append(name)
    return matched


def unfreeze_head(model: nn.Module) -> list[str]:
    names = unfreeze_matching(model, [rf"(^|\.){h}\." for h in HEAD_MODULE_NAMES])
    if not names:
        raise UserError("this model has no classification head (classifier or score) to train")
    return names


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for param in model.parameters():
        # Under ZeRO-3 the model is partitioned while it loads: the local tensor is empty.
        n = getattr(param, "ds_numel", None) or param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def float32_trainable(model: nn.Module) -> None:
    """Keep trainable weights in float32 even when the frozen ones are half precision."""
    for param in model.parameters():
        # ZeRO-3 parameters are partitioned from load time: the local tensor is an empty placeholder,
        # and DeepSpeed keeps float32 master weights of its partitions itself.
        if param.requires_grad and param.dtype != torch.float32 and not hasattr(param, "ds_id"):
            param.data = param.data.float()
