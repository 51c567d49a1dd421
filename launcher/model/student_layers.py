"""A smaller student cut from a model by keeping some of its transformer blocks (DistilBERT-style).

The cut model is written once, as an ordinary transformers folder (config with the new depth,
weights, tokenizer), into the model cache; the run then loads it like any model.name. So every
backend (lean FSDP loading builds it from its config), every method and every stock loader sees
a plain model, and a full fine-tune's artifact is a complete, self-contained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from launcher.cache import build_once, cache_root, digest
from launcher.errors import UserError

LayerChoice = Union[str, list[int]]


def model_depth(model_path: str, trust_remote_code: bool = False) -> int:
    """Transformer blocks in the model at `model_path`, from its config alone (no weights read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    depth = getattr(config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise UserError(f"distill.student_layers: the config of {model_path} names no num_hidden_layers, so the "
                        "blocks to keep cannot be chosen; give the student as model.name instead")
    return depth


def kept_layers(choice: LayerChoice, depth: int) -> list[int]:
    """The block indices `distill.student_layers` keeps out of `depth`."""
    if choice == "every_other":
        return list(range(0, depth, 2))
    out_of_range = [i for i in choice if i >= depth]
    if out_of_range:
        raise UserError(f"distill.student_layers={choice}: the model has {depth} transformer blocks (0..{depth - 1}), "
                        f"so {out_of_range} do not exist")
    if len(choice) == depth:
        raise UserError(f"distill.student_layers={choice} keeps all {depth} blocks; keep fewer, or remove the key")
    return list(choice)


def student_folder(source_path: str, choice: LayerChoice, trust_remote_code: bool = False) -> tuple[str, list[int]]:
    """The cached folder of `source_path` with only the chosen blocks; and the indices kept."""
    keep = kept_layers(choice, model_depth(source_path, trust_remote_code))
    source = Path(source_path)
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in sorted(source.glob("*")) if p.is_file()] \
        if source.is_dir() else []
    key = digest([str(source.resolve()) if source.is_dir() else source_path, stamp, keep])
    target = cache_root() / "models" / f"student-{len(keep)}of-{source.name}-{key}"
    return str(build_once(target, lambda tmp: _write_student(source_path, keep, tmp, trust_remote_code))), keep


def _write_student(source_path: str, keep: list[int], out: Path, trust_remote_code: bool) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from launcher.methods.common import transformer_layers

    config = AutoConfig.from_pretrained(source_path, trust_remote_code=trust_remote_code)
    # The class the folder was saved with, so its own head (a trained classifier, an LM head) is kept;
    # a bare encoder stays bare and the run adds its task head as for any model.name.
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    model = (model_class or AutoModel).from_pretrained(source_path, dtype=torch.float32,
                                                       trust_remote_code=trust_remote_code)
    blocks = transformer_layers(model)
    depth = len(blocks)
    kept = torch.nn.ModuleList([blocks[i] for i in keep])
    for parent in model.modules():  # swap the block list in place wherever it hangs
        for child_name, child in list(parent.named_children()):
            if child is blocks:
                setattr(parent, child_name, kept)
    text_config = model.config.get_text_config()
    text_config.num_hidden_layers = len(keep)
    layer_types = getattr(text_config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == depth:  # per-block attention kinds follow their blocks
        text_config.layer_types = [layer_types[i] for i in keep]
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(source_path, trust_remote_code=trust_remote_code).save_pretrained(str(out))
