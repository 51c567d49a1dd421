"""A model's shape from its configuration alone: never its weights, never torch.

Sources, as `model.name` allows them: a local folder's config.json; a .gguf file's metadata
(its header alone, by `read_gguf_header`); a zipped model folder inside a package (config.json
read from the archive); a finished tunefleet run folder (its artifact's config, or its base
model's); a hub id whose config is in the local Hugging Face cache. Two families are described:
llama-like decoders (llama, mistral, qwen2/3, smollm: gated MLP, grouped-query attention) and
BERT-like encoders.
"""

from __future__ import annotations

import functools
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra")


@dataclass(frozen=True)
class ModelShape:
    family: str  # "decoder" or "encoder"
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool = False
    positions: int = 0  # learned position embeddings (encoders)
    token_types: int = 0
    attention_dropout: float = 0.0  # on the attention probabilities, in training
    hidden_dropout: float = 0.0  # on each sublayer's output and the embeddings (encoders), in training
    checkpoint_dtype: str = "float32"  # what the weights files hold (config's torch_dtype; GGUF converts to float32)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        """Width of the queries and of the attention output: heads x head_dim, which need not be hidden
        (Gemma, Qwen3)."""
        return self.heads * self.head_dim


def _checkpoint_dtype(config: dict) -> str:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def shape_from_config(config: dict, where: str) -> ModelShape:
    model_type = config.get("model_type", "")
    if model_type in DECODER_TYPES:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        return ModelShape(
            family="decoder", model_type=model_type, vocab=config["vocab_size"], hidden=hidden,
            intermediate=config["intermediate_size"], layers=config["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            tied_embeddings=bool(config.get("tie_word_embeddings", model_type != "llama")),
            qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            attention_dropout=float(config.get("attention_dropout") or 0.0), checkpoint_dtype=_checkpoint_dtype(config),
        )
    if model_type in ENCODER_TYPES:
        heads = config["num_attention_heads"]
        return ModelShape(
            family="encoder", model_type=model_type, vocab=config["vocab_size"], hidden=config["hidden_size"],
            intermediate=config["intermediate_size"], layers=config["num_hidden_layers"], heads=heads,
            kv_heads=heads, head_dim=config["hidden_size"] // heads, tied_embeddings=True, qkv_bias=True,
            positions=config.get("max_position_embeddings", 512), token_types=config.get("type_vocab_size", 2),
            attention_dropout=float(config.get("attention_probs_dropout_prob", 0.1)),
            hidden_dropout=float(config.get("hidden_dropout_prob", 0.1)), checkpoint_dtype=_checkpoint_dtype(config),
        )
    raise UserError(f"{where}: model_type '{model_type}' is not one tunefleet plan can size yet "
                    f"(decoders: {', '.join(DECODER_TYPES)}; encoders: {', '.join(ENCODER_TYPES)})")


# GGUF metadata value types (the spec's gguf_metadata_value_type) -> struct format of one scalar.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: Path) -> tuple[dict, list[str]]:
    """(metadata, tensor names) of a .gguf file, reading only its header.

    Why not gguf.GGUFReader: it builds a numpy view of every metadata item, the tokenizer's ~100,000
    strings included, which takes 2-3 s per read on this CPU; the plan needs a handful of integers and
    the array lengths. Arrays come back as {"length": n} (strings and numbers alike), skipped unread.
    """
    import struct

    with path.open("rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def skip_array() -> int:
            """Skip an array value, its header included; return its length."""
            item, count = read("I"), read("Q")
            if item in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
            elif item == _GGUF_STRING:
                for _ in range(count):
                    f.seek(read("Q"), 1)
            else:  # an array of arrays
                for _ in range(count):
                    skip_array()
            return count

        if f.read(4) != b"GGUF":
            raise UserError(f"model.name={path}: not a GGUF file (its first bytes are not GGUF)")
        version = read("I")
        if version < 2:
            raise UserError(f"model.name={path}: GGUF version {version} is too old to read (2 or later)")
        tensor_count, kv_count = read("Q"), read("Q")
        metadata: dict = {}
        for _ in range(kv_count):
            key, kind = string(), read("I")
            if kind == _GGUF_STRING:
                metadata[key] = string()
            elif kind == _GGUF_ARRAY:
                metadata[key] = {"length": skip_array()}
            else:
                metadata[key] = read(_GGUF_SCALARS[kind])
        names = []
        for _ in range(tensor_count):
            names.append(string())
            dims = read("I")
            f.seek(8 * dims + 4 + 8, 1)  # the dimensions, the tensor type, the data offset
    return metadata, names


def gguf_config(path: Path) -> dict:
    """The transformers config a GGUF file converts to (launcher.model.sources), the fields the plan reads."""
    stat = path.stat()  # the plan's advice sizes a dozen variants of one recipe: read the file once
    return dict(_gguf_config(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _gguf_config(path_text: str, _size: int, _mtime_ns: int) -> dict:
    path = Path(path_text)
    metadata, tensor_names = read_gguf_header(path)
    arch = metadata["general.architecture"]
    prefix = f"{arch}."
    heads = metadata[prefix + "attention.head_count"]
    config = {
        "model_type": arch, "vocab_size": metadata["tokenizer.ggml.tokens"]["length"],
        "hidden_size": metadata[prefix + "embedding_length"],
        "intermediate_size": metadata[prefix + "feed_forward_length"],
        "num_hidden_layers": metadata[prefix + "block_count"],
        "num_attention_heads": heads, "num_key_value_heads": metadata.get(prefix + "attention.head_count_kv", heads),
        # A separate output matrix is stored only when the head is not tied to the embeddings.
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    return config


def read_shape(name: str, revision: str | None = None) -> ModelShape:
    return shape_from_config(*_located_config(name, revision))


def read_config(name: str, revision: str | None = None) -> dict:
    """A model source's config.json as saved (for a GGUF file, the fields of the one it converts to)."""
    return _located_config(name, revision)[0]


def _located_config(name: str, revision: str | None) -> tuple[dict, str]:
    """(config of a model source, where it was read) for a hub id, folder, run folder, .zip or .gguf."""
    from launcher.model.sources import local_path_of

    path = local_path_of(name)
    if path is None:
        return _hub_config(name, revision), name
    if path.suffix == ".gguf":
        return gguf_config(path), str(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.exists():
            from launcher.model.run_folder import is_run_folder

            if is_run_folder(path):
                return _run_folder_config(path)
            raise UserError(f"model.name={name}: the folder has no config.json")
        return json.loads(config.read_text()), str(config)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            configs = sorted((n for n in archive.namelist() if n.endswith("config.json")
                              and Path(n).name == "config.json"), key=len)
            if not configs:
                raise UserError(f"model.name={name}: the archive holds no config.json")
            return json.loads(archive.read(configs[0])), f"{path}:{configs[0]}"
    raise UserError(f"model.name={name}: cannot read a model configuration from {path.name}")


def _run_folder_config(run_dir: Path) -> tuple[dict, str]:
    """A finished tunefleet run: its full-model artifact's config, or (an adapter) its base model's."""
    import yaml

    from launcher.model.run_folder import run_artifact

    artifact = run_artifact(run_dir)
    if (artifact / "config.json").is_file():
        return json.loads((artifact / "config.json").read_text()), str(artifact / "config.json")
    model = (yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}).get("model") or {}
    return _located_config(model["name"], model.get("revision"))  # an adapter adds no shape of its own


def _hub_config(name: str, revision: str | None) -> dict:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise UserError(f"model.name={name}: its config.json is not in the local Hugging Face cache and no hub "
                        "is reachable; point model.name at a local model folder, .gguf file or pkg: source")
    return json.loads(Path(cached).read_text())
