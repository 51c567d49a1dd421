"""A tiny twin of a model: its architecture with narrow widths and random weights, built on the CPU.

Some questions are answered by what a model does, not by a list of names that goes stale with every
release: whether packed examples stay apart (launcher.data.packing_check), whether the model's own
loss is cross-entropy over its output head (launcher.train.loss_check). A twin answers them: the
model's class and config, with narrow widths but the same layers and layer types (`twin_config`),
random weights, float32, on the CPU. A twin, not the model: under lean loading (FSDP) other ranks
hold the model on the meta device, ZeRO-3 partitions its weights, QLoRA's sit on a GPU; a twin is
the same on every rank (seeded, in a forked random stream that leaves the run's draws as they were)
and costs milliseconds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

# Narrow widths for the twin; layers and layer types stay as they are.
HEADS, HEAD_DIM, FFN, VOCAB = 4, 16, 128, 512
FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size",
            "shared_expert_intermediate_size")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# A twin whose widths twin_config does not know how to narrow could be the full model: refuse to
# build it rather than allocate billions of parameters (a vocabulary that cannot shrink stays under this).
MAX_TWIN_PARAMETERS = 64_000_000


def twin_config(config):
    """`config` with narrow widths (and every sub-config's), the layers and layer types as they are."""
    config = copy.deepcopy(config)
    for sub in _configs_in(config):
        _narrow(sub)
    return config


def _configs_in(config) -> list:
    found = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            found += _configs_in(sub)
    return found


def _narrow(config) -> None:
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0:
        config.num_attention_heads = HEADS
        for kv_key in ("num_key_value_heads", "num_kv_heads"):
            kv = getattr(config, kv_key, None)
            if isinstance(kv, int) and kv > 0:
                # Multi-head stays multi-head; grouped or multi-query attention keeps sharing keys.
                setattr(config, kv_key, HEADS if kv >= heads else min(kv, 2))
        if isinstance(getattr(config, "head_dim", None), int):
            config.head_dim = HEAD_DIM
    if isinstance(getattr(config, "hidden_size", None), int):
        config.hidden_size = HEADS * HEAD_DIM
    for ffn_key in FFN_KEYS:
        if isinstance(getattr(config, ffn_key, None), int):
            setattr(config, ffn_key, FFN)
    for expert_key in EXPERT_KEYS:
        experts = getattr(config, expert_key, None)
        if isinstance(experts, int) and experts > 4:
            setattr(config, expert_key, 4)
    if isinstance(getattr(config, "num_experts_per_tok", None), int):
        config.num_experts_per_tok = min(config.num_experts_per_tok, 2)
    # A smaller vocabulary only where no special token id would fall outside it.
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > VOCAB and max(_token_ids(config), default=0) < VOCAB:
        config.vocab_size = VOCAB


def _token_ids(config) -> list[int]:
    ids = []
    for name, value in config.to_dict().items():
        if name.endswith("_token_id") or name.endswith("_token_ids"):
            ids += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
    return ids


def build_twin(make: Callable[[], nn.Module]) -> nn.Module:
    """The module `make` builds (from a twin_config, drawing its weights from torch's random stream),
    built on the CPU with seed 0 in a forked stream: the same twin on every rank, and the run's random
    draws as they were. `make` runs first on the meta device, to count the parameters before a single
    weight is allocated: more than MAX_TWIN_PARAMETERS is refused (ValueError)."""
    with torch.device("meta"):
        size = sum(p.numel() for p in make().parameters())
    if size > MAX_TWIN_PARAMETERS:
        raise ValueError(f"the twin would still have {size:,} parameters: its widths have names twin_config "
                         "does not know")
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make()
