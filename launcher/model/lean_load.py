"""How weights reach a sharded model: lean loading (only global rank 0 reads the weights; every other
rank builds the same model on the meta device and, once the model is sharded, receives its shards
from rank 0), and sharding a model a rank holds whole on the host without moving it to the device.

Why: when every rank loads, each process holds a whole copy of the model in host memory before
sharding keeps its part, so host memory grows with the processes per machine. Here a rank other
than 0 never holds more than its shards plus the one tensor being broadcast.

All ranks go through the same steps, in step:

1. `build_everywhere`: rank 0 builds for real, the others with `build(on_meta=True)`, which applies
   the fine-tuning method the same way (LoRA layers are created on meta). Rank 0 then sends a
   description of its model (names, shapes, dtypes, trainable flags, tied parameters). If a rank
   could not build on meta, or built something else, every rank falls back to loading the weights
   itself and the reason is recorded.
2. `source_state`, on rank 0 before sharding: the whole tensors it will send.
3. After sharding, `fill_from_rank0`: every rank allocates its shards, then
   `set_model_state_dict(..., broadcast_from_rank0=True)` sends tensor after tensor and each rank
   keeps its slice. Buffers left out of the state dict (rotary `inv_freq`) are uninitialised
   memory on the meta ranks: they are broadcast too. Adapter initial values, random on rank 0, reach
   every rank the same way.

Whole weights never go to the device before sharding. FSDP2's fully_shard moves every parameter it
is handed that is not on meta to the mesh's device whole, then cuts its shard there
(torch/distributed/fsdp/_fully_shard/_fsdp_init.py `_move_states_to_device`, also with
CPUOffloadPolicy, which copies the shard back to the host afterwards: _fsdp_param.py
`_init_sharded_param`). So a rank holding weights (every rank when each loads, rank 0 when lean)
first swaps its parameters for meta ones (`park_on_meta`), keeping the host tensors; fully_shard then
moves only buffers; after sharding each rank copies its slice straight into its shard
(`fill_from_host`), or rank 0 sends its tensors (`fill_from_rank0`). The device never holds more
than this rank's shards (plus, when lean, the one tensor being broadcast), and with
fsdp_cpu_offload parameters never leave the host.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from launcher.errors import UserError

LEAN = "rank 0 loads, others meta + broadcast"
EVERY_RANK = "every rank loads"


@dataclass
class LoadRecord:
    """How the model reached each rank, as written to distributed.json."""

    how: str  # LEAN or EVERY_RANK
    why: str | None = None  # why every rank loads, where it does
    tied: list[list[str]] = field(default_factory=list)  # parameter names sharing one tensor (kept after filling)
    params_on_meta_before_sharding: list[bool] = field(default_factory=list)  # one entry per rank
    broadcast_buffers: list[str] = field(default_factory=list)  # buffers outside the state dict, sent by rank 0

    @property
    def lean(self) -> bool:
        return self.how == LEAN

    def as_json(self) -> dict:
        return asdict(self)


def build_on_meta(auto_class, model_path: str, kwargs: dict) -> nn.Module:
    """The model `auto_class.from_pretrained(model_path, **kwargs)` would give, with no weights read:
    built from its config under the meta device, same dtype, remote code and revision."""
    from transformers import AutoConfig, GenerationConfig

    kwargs = dict(kwargs)
    dtype, trust, revision = kwargs.pop("dtype"), kwargs.pop("trust_remote_code"), kwargs.pop("revision")
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust, revision=revision, **kwargs)
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust)
    model.eval()  # as from_pretrained leaves it
    if model.can_generate():
        # Sharded generation is a collective: every rank must stop where rank 0 stops.
        try:
            model.generation_config = GenerationConfig.from_pretrained(model_path, revision=revision)
        except OSError:
            pass  # no generation_config.json: from_pretrained keeps the one derived from the config too
    return model


def build_everywhere(build: Callable[[bool], nn.Module]) -> tuple[nn.Module, LoadRecord]:
    """Rank 0 builds with `build(False)`, the others with `build(True)`; a collective.

    Falls back to `build(False)` on every rank when a rank cannot build on meta or its model differs
    from rank 0's; the record says which rank and why.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    problem = None
    if rank == 0:
        model = build(False)
    else:
        try:
            model = build(True)
        except UserError:
            raise  # the recipe's fault: rank 0 stops on it too
        except Exception as err:  # noqa: BLE001 - any failure on meta means: load for real instead
            model = None
            problem = f"could not build on the meta device: {type(err).__name__}: {str(err).splitlines()[0]}"
    expected = [describe(model) if rank == 0 else None]
    dist.broadcast_object_list(expected, src=0)
    if problem is None and rank != 0:
        problem = _adopt(model, expected[0])
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((f"rank {r} {p}" for r, p in enumerate(problems) if p), None)
    if first is None:
        return model, LoadRecord(how=LEAN, tied=expected[0]["tied"])
    if rank != 0:
        del model
        model = build(False)
    return model, LoadRecord(how=EVERY_RANK, why=first)


def describe(model: nn.Module) -> dict:
    """What every rank's model must share with rank 0's: tensors' names, shapes, dtypes, flags, ties."""
    return {
        "params": {name: (tuple(p.shape), p.dtype, p.requires_grad)
                   for name, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {name: (tuple(b.shape), b.dtype) for name, b in model.named_buffers(remove_duplicate=False)},
        "tied": tied_parameters(model),
    }


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of names under which one parameter object appears (tied embeddings and head)."""
    names = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return sorted(group for group in names.values() if len(group) > 1)


def _adopt(model: nn.Module, expected: dict) -> str | None:
    """Check this rank's meta model against rank 0's description and take rank 0's dtypes (a model
    may keep some modules in float32 only when loaded); return what differs, or None."""
    mine = describe(model)
    for kind in ("params", "buffers"):
        if mine[kind].keys() != expected[kind].keys():
            differ = sorted(mine[kind].keys() ^ expected[kind].keys())[:3]
            return f"built a model with other {kind} than rank 0 (e.g. {differ})"
    for name, (shape, _, trains) in mine["params"].items():
        if (shape, trains) != (expected["params"][name][0], expected["params"][name][2]):
            return f"built {name} with shape {shape} trainable={trains}, rank 0 {expected['params'][name]}"
    if mine["tied"] != expected["tied"]:
        return f"ties parameters {mine['tied']}, rank 0 {expected['tied']}"
    for name, param in model.named_parameters():
        dtype = expected["params"][name][1]
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            dtype = expected["buffers"].get(f"{module_name}.{name}".lstrip("."), (None, None))[1]
            if buffer is not None and dtype is not None and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)
    return None


def source_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's whole tensors, taken before sharding (no copies: the model's own tensors)."""
    aliases = _alias_prefixes(model)
    return {key: value for key, value in model.state_dict().items() if not key.startswith(aliases)}


def _alias_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Second paths to a module already reached by another (peft's prompt learning registers the
    input embedding again as `word_embeddings`). set_model_state_dict fills each module under its
    first path only, and a whole tensor sent under the second would be copied into a shard."""
    seen, aliases = set(), []
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            aliases.append(f"{name}.")
        seen.add(id(module))
    return tuple(aliases)


def fill_from_rank0(model: nn.Module, source: dict | None, device: torch.device, buffer_device: torch.device,
                    tied: list[list[str]]) -> list[str]:
    """After sharding: give every rank rank 0's values; a collective. Rank 0 passes `source_state`,
    the others None. Parameters land on `device`, buffers on `buffer_device` (they differ when
    parameters are offloaded to the CPU). Returns the names of the buffers broadcast outside the
    state dict."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _materialize(model, device)  # uninitialised memory for this rank's shards, overwritten below
    # Rank 0 sends each whole tensor in turn; every rank copies its own slice into its shard. Keys under
    # a module's second path are left out (see _alias_prefixes): the first path fills that module.
    aliases = _alias_prefixes(model)
    result = set_model_state_dict(model, source if dist.get_rank() == 0 else {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=not aliases))
    unfilled = [key for key in result.missing_keys if not key.startswith(aliases)] + list(result.unexpected_keys)
    if unfilled:
        raise RuntimeError(f"rank 0's state dict does not match this rank's model: {unfilled[:5]}")
    sent = _broadcast_unsaved_buffers(model, buffer_device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != buffer_device:
                module._buffers[name] = buffer.to(buffer_device)
    if tied_parameters(model) != tied:
        raise RuntimeError(f"sharding untied parameters: expected {tied}, found {tied_parameters(model)}")
    return sent


def _broadcast_unsaved_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Buffers registered with persistent=False are not in the state dict; derived from the config
    (rotary frequencies), they are garbage after `to_empty`. Rank 0 holds them computed: send them."""
    import torch.distributed as dist

    unsaved = {f"{prefix}.{name}".lstrip("."): (module, name)
               for prefix, module in model.named_modules()
               for name in sorted(module._non_persistent_buffers_set) if module._buffers.get(name) is not None}
    shapes = [{key: (module._buffers[name].shape, module._buffers[name].dtype)
               for key, (module, name) in unsaved.items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shapes, src=0)
    if shapes[0].keys() != unsaved.keys():
        raise RuntimeError(f"buffers outside the state dict differ from rank 0's: {sorted(unsaved)} vs {sorted(shapes[0])}")
    for key, (shape, dtype) in shapes[0].items():
        module, name = unsaved[key]
        if dist.get_rank() == 0:
            tensor = module._buffers[name].detach().to(device).clone()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        module._buffers[name] = tensor
    return sorted(unsaved)


def park_on_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Before sharding: swap every parameter that holds data for an empty one on the meta device, so
    that fully_shard cannot move it to the device whole; return the host tensors under every name
    of each parameter (tied ones under each). Buffers stay: fully_shard moves them, they are small."""
    swapped: dict[int, nn.Parameter] = {}
    whole: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is None or param.is_meta:
                continue
            whole[f"{prefix}.{name}".lstrip(".")] = param.detach()
            if id(param) not in swapped:  # one new parameter per old one: ties stay ties
                swapped[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                  requires_grad=param.requires_grad)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) in swapped:
                module._parameters[name] = swapped[id(param)]
    return whole


def fill_from_host(model: nn.Module, whole: dict[str, torch.Tensor], device: torch.device) -> None:
    """After sharding a model whose parameters `park_on_meta` took aside: allocate this rank's shards
    on `device` and copy into each only its own slice of the whole host tensor. No collective: every
    rank holds the whole tensors."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _materialize(model, device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = whole[name]
            if isinstance(param, DTensor):
                # The same slice torch's own state-dict loading cuts (_state_dict_utils._distribute_tensors).
                shape, offset = compute_local_shape_and_global_offset(source.shape, param.device_mesh, param.placements)
                source = source[tuple(slice(start, start + size) for size, start in zip(shape, offset))]
                param = param.to_local()
            param.copy_(source)  # host to device: one shard, never the whole tensor


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Uninitialised memory on `device` for every tensor still on meta (`to_empty` for those alone:
    buffers fully_shard already moved to the device keep their values). Through `_apply`, which
    FSDP2 overrides to re-register the new local shards."""
    if any(t.is_meta for t in model.parameters()) or any(b.is_meta for b in model.buffers()):
        model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
