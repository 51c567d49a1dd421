"""Parameter counts from a model's shape, and what each fine-tuning method trains.

The parameters are listed by name as transformers names them (model.layers.3.self_attn.q_proj.weight,
bert.encoder.layer.0.attention.self.query.weight, ...), so a method's targets (LoRA target_modules,
partial-freeze patterns) select them the way peft and launcher.methods do on the real model.
tests/test_plan.py checks the totals against real models and peft.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from launcher.planning.shapes import ModelShape

HEAD_NAMES = ("lm_head", "score", "classifier")


@dataclass(frozen=True)
class Linear:
    name: str  # module path
    inp: int
    out: int
    bias: bool
    layer: int | None  # transformer block index, None outside the blocks


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    layer: int | None
    linear: bool  # the weight of a linear map (quantized by QLoRA unless it is the head)


def linears(shape: ModelShape, num_labels: int | None) -> list[Linear]:
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    found: list[Linear] = []
    if shape.family == "decoder":
        q = shape.heads * shape.head_dim
        for n in range(shape.layers):
            a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
            found += [Linear(a + "q_proj", h, q, shape.qkv_bias, n), Linear(a + "k_proj", h, kv, shape.qkv_bias, n),
                      Linear(a + "v_proj", h, kv, shape.qkv_bias, n), Linear(a + "o_proj", q, h, False, n),
                      Linear(m + "gate_proj", h, i, False, n), Linear(m + "up_proj", h, i, False, n),
                      Linear(m + "down_proj", i, h, False, n)]
        if num_labels:
            found.append(Linear("score", h, num_labels, False, None))
        elif not shape.tied_embeddings:
            found.append(Linear("lm_head", h, shape.vocab, False, None))
        return found
    for n in range(shape.layers):
        base = f"bert.encoder.layer.{n}."
        found += [Linear(base + "attention.self.query", h, h, True, n), Linear(base + "attention.self.key", h, h, True, n),
                  Linear(base + "attention.self.value", h, h, True, n),
                  Linear(base + "attention.output.dense", h, h, True, n),
                  Linear(base + "intermediate.dense", h, i, True, n), Linear(base + "output.dense", i, h, True, n)]
    found.append(Linear("bert.pooler.dense", h, h, True, None))
    found.append(Linear("classifier", h, num_labels or 2, True, None))
    return found


def parameters(shape: ModelShape, num_labels: int | None) -> list[Param]:
    h = shape.hidden
    params: list[Param] = []
    for lin in linears(shape, num_labels):
        params.append(Param(lin.name + ".weight", lin.inp * lin.out, lin.layer, True))
        if lin.bias:
            params.append(Param(lin.name + ".bias", lin.out, lin.layer, False))
    if shape.family == "decoder":
        params.append(Param("model.embed_tokens.weight", shape.vocab * h, None, False))
        for n in range(shape.layers):
            params += [Param(f"model.layers.{n}.input_layernorm.weight", h, n, False),
                       Param(f"model.layers.{n}.post_attention_layernorm.weight", h, n, False)]
        params.append(Param("model.norm.weight", h, None, False))
        return params
    params += [Param("bert.embeddings.word_embeddings.weight", shape.vocab * h, None, False),
               Param("bert.embeddings.position_embeddings.weight", shape.positions * h, None, False),
               Param("bert.embeddings.token_type_embeddings.weight", shape.token_types * h, None, False),
               Param("bert.embeddings.LayerNorm.weight", h, None, False),
               Param("bert.embeddings.LayerNorm.bias", h, None, False)]
    for n in range(shape.layers):
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            params += [Param(f"bert.encoder.layer.{n}.{norm}.weight", h, n, False),
                       Param(f"bert.encoder.layer.{n}.{norm}.bias", h, n, False)]
    return params


def _targeted(lin: Linear, targets) -> bool:
    """peft's rule: a name or a dotted suffix of the module path; 'all-linear' spares the output head."""
    if targets == "all-linear":
        return lin.name.split(".")[0] not in HEAD_NAMES
    return any(lin.name == t or lin.name.endswith("." + t) for t in targets)


def _head_params(params: list[Param]) -> int:
    return sum(p.numel for p in params if p.name.split(".")[0] in HEAD_NAMES)


@dataclass(frozen=True)
class Trainable:
    total: int  # parameters that train (kept in float32)
    adapter: int  # of which new adapter parameters (not part of the base model)
    trained_layers: str  # "all", "attention", "mlp+attention", "none", or "last N"
    grads_reach_layers: bool  # gradients flow through the blocks (to inputs of trainable parts below)


def trainable(shape: ModelShape, peft, task: str, num_labels: int | None) -> Trainable:
    """What `peft` (the recipe's section) trains on a model of this shape."""
    params = parameters(shape, num_labels)
    lins = linears(shape, num_labels)
    head = _head_params(params) if task == "classification" else 0
    method = peft.method
    if method == "full":
        return Trainable(sum(p.numel for p in params), 0, "all", True)
    if method == "head_only":
        return Trainable(head, 0, "none", False)
    if method in ("lora", "qlora", "dora"):
        hit = [lin for lin in lins if _targeted(lin, peft.target_modules)]
        adapter = sum(peft.r * (lin.inp + lin.out) + (lin.out if method == "dora" else 0) for lin in hit)
        saved = sum(p.numel for p in params if any(p.name.startswith(m + ".") or f".{m}." in p.name
                                                   for m in peft.modules_to_save))
        mlp = any(".mlp." in lin.name or "intermediate" in lin.name or lin.name.endswith("output.dense")
                  for lin in hit)
        return Trainable(adapter + saved + head, adapter, "mlp+attention" if mlp else "attention", True)
    if method == "ia3":
        hit = [lin for lin in lins if _targeted(lin, peft.target_modules)]
        adapter = sum(lin.inp if any(lin.name.endswith(f) for f in peft.feedforward_modules) else lin.out
                      for lin in hit)
        return Trainable(adapter + head, adapter, "attention", True)
    if method == "prompt_tuning":
        return Trainable(peft.num_virtual_tokens * shape.hidden, peft.num_virtual_tokens * shape.hidden, "none", True)
    if method == "prefix_tuning":
        per_token = shape.layers * 2 * shape.kv_dim
        if peft.prefix_projection:  # peft: an embedding of the key/value width d, then d -> d -> per_token MLP
            d = shape.kv_dim
            adapter = peft.num_virtual_tokens * d + (d * d + d) + (d * per_token + per_token)
        else:
            adapter = peft.num_virtual_tokens * per_token
        return Trainable(adapter, adapter, "none", True)
    if method == "partial_freeze":
        chosen = set()
        if peft.train_last_n_layers:
            first = shape.layers - peft.train_last_n_layers
            chosen |= {p.name for p in params if p.layer is not None and p.layer >= first}
            chosen |= {p.name for p in params if re.search(r"(^|\.)norm\.|final_layer_norm|(^|\.)ln_f\.", p.name)}
        for pattern in peft.train_patterns:
            chosen |= {p.name for p in params if re.search(pattern, p.name)}
        total = sum(p.numel for p in params if p.name in chosen)
        if task == "classification":
            total += sum(p.numel for p in params if p.name.split(".")[0] in HEAD_NAMES and p.name not in chosen)
        return Trainable(total, 0, f"last {peft.train_last_n_layers or 0}", False)
    raise ValueError(f"unknown method {method}")
