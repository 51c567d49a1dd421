"""The key reference (`tunefleet keys`), generated from the schema's field descriptions."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.config.schema import PEFT_CLASSES, Recipe


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("launcher.config.schema.", "")
    return text.replace("<class '", "").replace("'>", "")


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    return repr(value) if not isinstance(value, BaseModel) else "(section)"


def _rows(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if name == "method":
            continue
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):  # a nested section
            rows.append(f"  {prefix}{name}: {field.description}")
            rows.extend(_rows(f"{prefix}{name}.", field.annotation))
            continue
        rows.append(f"  {prefix}{name}  [{_type_name(field.annotation)}, default {_default(field)}]\n"
                    f"      {field.description}")
    return rows


def keys_reference(section: str | None = None) -> str:
    out = []
    for name, field in Recipe.model_fields.items():
        if section and name != section:
            continue
        if name == "peft":
            out.append("peft: the fine-tuning method; peft.method picks which other keys apply")
            for method, cls in PEFT_CLASSES.items():
                out.append(f" peft.method={method}: {cls.model_fields['method'].description}")
                out.extend(_rows("peft.", cls))
            continue
        classes = [a for a in typing.get_args(field.annotation) or (field.annotation,)
                   if isinstance(a, type) and issubclass(a, BaseModel)]
        if not classes:
            out.append(f"{name}: {field.description}")
            continue
        out.append(f"{name}:")
        out.extend(_rows(f"{name}.", classes[0]))
    return "\n".join(out)
