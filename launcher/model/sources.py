"""Turn `model.name` into a folder that transformers loads, converting once and caching.

Sources: a local folder; a hub id; a `.gguf` file (dequantized once to safetensors, because a
model loaded straight from GGUF is flagged as quantized and cannot be saved or fully fine-tuned);
`pkg:PACKAGE/PATH`, a file inside an installed Python package (how real small models reach a
machine with no hub), which may be a `.gguf` or a zipped model folder.

Conversions are cached under `$TUNEFLEET_CACHE/models` (default ~/.cache/tunefleet), keyed by
the source file's path, size and mtime, written to a temporary folder and renamed into place,
so a half-written conversion is never used. A file lock makes the other local ranks wait
for the first one instead of converting in parallel.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

from launcher.cache import build_once, cache_root, digest
from launcher.errors import UserError


def resolve_package_path(name: str) -> Path:
    """`pkg:PACKAGE/REL` -> the file inside the installed package, without importing it."""
    package, _, relative = name.removeprefix("pkg:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.name={name}: Python package '{package}' is not installed "
            "(the CPU setup installs it from requirements/assets.txt: `make venv`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise UserError(f"model.name={name}: {relative} is not inside package {package} ({path.parent})")
    return path


def local_path_of(name: str) -> Path | None:
    """The local file or folder `name` points to, or None for a hub id. Cheap: no model code."""
    if name.startswith("pkg:"):
        return resolve_package_path(name)
    from launcher.config.assets import relative_to_shipped

    path = relative_to_shipped(name) or Path(name).expanduser()  # the shipped recipes name data/teachers/...
    looks_local = name.startswith((".", "/", "~")) or name.endswith((".gguf", ".zip")) or path.exists()
    if looks_local and not path.exists():
        raise UserError(f"model.name={name}: no such file or folder")
    return path if looks_local else None


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.stem}-{digest([str(path.resolve()), stat.st_size, int(stat.st_mtime)])}"


def _unzip(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(out)


def _model_folder_in(root: Path) -> Path:
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise UserError(f"{root} holds no config.json: not a transformers model folder")
    return configs[0].parent


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)  # the dequantized weights are plain floats
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict(), strict=True)
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def materialize(name: str) -> str:
    """Return what to pass to `from_pretrained`: a local folder, or the hub id unchanged."""
    path = local_path_of(name)
    if path is None:
        return name
    from launcher.model.run_folder import is_run_folder, model_from_run

    if is_run_folder(path):  # a finished tunefleet run: its trained model (launcher.model.run_folder)
        return model_from_run(path)
    if path.is_dir():
        return str(path)
    if path.suffix == ".zip":
        target = build_once(cache_root() / "models" / _cache_key(path), lambda tmp: _unzip(path, tmp))
        return str(_model_folder_in(target))
    if path.suffix == ".gguf":
        target = cache_root() / "models" / _cache_key(path)
        if not target.exists():  # said only when it happens: a cached conversion costs nothing
            print(f"[tunefleet] converting {path.name} to safetensors once (cached in {target.parent})", flush=True)
        return str(build_once(target, lambda tmp: _convert_gguf(path, tmp)))
    raise UserError(f"model.name={name}: expected a model folder, a .gguf file or a .zip of a model folder")
