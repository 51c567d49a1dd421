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

    @property
    def role(self) -> str:
        """Where in its block the map sits, which says what its input is (launcher.planning.activations):
        attn_in (queries, keys, values), attn_out (the attention output projection), mlp_in (gate, up,
        BERT's intermediate), mlp_mid (down, BERT's output), head (outside the blocks)."""
        last = self.name.rsplit(".", 1)[-1]
        if self.layer is None:
            return "head"
        if last in ("q_proj", "k_proj", "v_proj", "query", "key", "value"):
            return "attn_in"
        if last == "o_proj" or self.name.endswith("attention.output.dense"):
            return "attn_out"
        if last in ("gate_proj", "up_proj") or self.name.endswith("intermediate.dense"):
            return "mlp_in"
        return "mlp_mid"  # down_proj, BERT's output.dense


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
class Adapter:
    """A method's own module on one linear map of a block."""
    linear: Linear
    kind: str  # lora (DoRA too, with dora=True), ia3_in (scales the map's input), ia3_out (scales its output)
    r: int = 0
    dropout: float = 0.0  # on the adapter's input, in training
    dora: bool = False


@dataclass(frozen=True)
class BlockTraining:
    """What trains in one transformer block, which decides what its forward keeps for backward."""
    flows: bool  # gradients pass through the block: something trains in it or below it
    weights_train: bool  # the block's own weights and norms train (full fine-tuning, partial freeze)
    adapters: tuple[Adapter, ...] = ()


@dataclass(frozen=True)
class Trainable:
    total: int  # parameters that train (kept in float32)
    adapter: int  # of which new adapter parameters (not part of the base model)
    blocks: tuple[BlockTraining, ...]  # one per transformer block
    head_trains: bool = False  # the output head's weight (lm_head, or the embeddings tied to it; a classifier)
    largest: int = 0  # elements of the largest trainable tensor (the optimizer step's scratch)
    virtual_tokens: int = 0  # prompt tuning: positions prepended to every row
    prefix_tokens: int = 0  # prefix tuning: key/value positions prepended in every block
    embeddings_train: bool = False  # the input embeddings train (gradients reach below the first block)

    @property
    def trained_blocks(self) -> int:
        return sum(b.weights_train or bool(b.adapters) for b in self.blocks)


def _blocks(layers: int, trained: list[bool], adapters: dict[int, list[Adapter]] | None = None,
            below: bool = False) -> tuple[BlockTraining, ...]:
    """Blocks from what trains in each (its weights, its adapters); `below`: something under block 0
    trains (embeddings, virtual tokens), so gradients flow through every block."""
    adapters = adapters or {}
    flows, out = below, []
    for b in range(layers):
        flows = flows or trained[b] or bool(adapters.get(b))
        out.append(BlockTraining(flows=flows, weights_train=trained[b], adapters=tuple(adapters.get(b, ()))))
    return tuple(out)


def trainable(shape: ModelShape, peft, task: str, num_labels: int | None) -> Trainable:
    """What `peft` (the recipe's section) trains on a model of this shape."""
    params = parameters(shape, num_labels)
    lins = linears(shape, num_labels)
    head = _head_params(params) if task == "classification" else 0
    head_largest = max((p.numel for p in params if p.name.split(".")[0] in HEAD_NAMES), default=0) if head else 0
    method = peft.method
    n = shape.layers
    nothing = [False] * n
    if method == "full":
        return Trainable(sum(p.numel for p in params), 0, _blocks(n, [True] * n, below=True), head_trains=True,
                         largest=max(p.numel for p in params), embeddings_train=True)
    if method == "head_only":
        return Trainable(head, 0, _blocks(n, nothing), head_trains=True, largest=head_largest)
    if method in ("lora", "qlora", "dora"):
        hit = [lin for lin in lins if _targeted(lin, peft.target_modules)]
        dora = method == "dora"
        adapter = sum(peft.r * (lin.inp + lin.out) + (lin.out if dora else 0) for lin in hit)
        saved = [p for p in params if any(p.name.startswith(m + ".") or f".{m}." in p.name
                                          for m in peft.modules_to_save)]
        by_block: dict[int, list[Adapter]] = {}
        for lin in hit:
            if lin.layer is not None:
                by_block.setdefault(lin.layer, []).append(Adapter(lin, "lora", peft.r, peft.dropout, dora))
        embeddings = any("embed" in p.name for p in saved)
        # modules_to_save=[lm_head] trains the head; with tied embeddings, embed_tokens is the head too.
        head_saved = any(p.name.split(".")[0] in HEAD_NAMES or (shape.tied_embeddings and "embed_tokens" in p.name)
                         for p in saved)
        largest = max([head_largest, *(p.numel for p in saved), *(max(peft.r * lin.inp, peft.r * lin.out)
                                                                   for lin in hit)])
        return Trainable(adapter + sum(p.numel for p in saved) + head, adapter,
                         _blocks(n, nothing, by_block, below=embeddings),
                         head_trains=bool(head) or head_saved, largest=largest, embeddings_train=embeddings)
    if method == "ia3":
        hit = [lin for lin in lins if _targeted(lin, peft.target_modules)]
        by_block = {}
        sizes = []
        for lin in hit:
            feedforward = any(lin.name.endswith(f) for f in peft.feedforward_modules)
            sizes.append(lin.inp if feedforward else lin.out)
            if lin.layer is not None:
                by_block.setdefault(lin.layer, []).append(Adapter(lin, "ia3_in" if feedforward else "ia3_out"))
        adapter = sum(sizes)
        return Trainable(adapter + head, adapter, _blocks(n, nothing, by_block), head_trains=bool(head),
                         largest=max([head_largest, *sizes]))
    if method == "prompt_tuning":
        size = peft.num_virtual_tokens * shape.hidden
        return Trainable(size, size, _blocks(n, nothing, below=True), largest=size,
                         virtual_tokens=peft.num_virtual_tokens)
    if method == "prefix_tuning":
        per_token = shape.layers * 2 * shape.kv_dim
        if peft.prefix_projection:  # peft: an embedding of the key/value width d, then d -> d -> per_token MLP
            d = shape.kv_dim
            adapter = peft.num_virtual_tokens * d + (d * d + d) + (d * per_token + per_token)
            largest = d * per_token
        else:
            adapter = largest = peft.num_virtual_tokens * per_token
        # The prefixes sit in every block: gradients reach each block's attention.
        return Trainable(adapter, adapter, _blocks(n, nothing, below=True), largest=largest,
                         prefix_tokens=peft.num_virtual_tokens)
    if method == "partial_freeze":
        chosen = set()
        if peft.train_last_n_layers:
            first = shape.layers - peft.train_last_n_layers
            chosen |= {p.name for p in params if p.layer is not None and p.layer >= first}
            chosen |= {p.name for p in params if re.search(r"(^|\.)norm\.|final_layer_norm|(^|\.)ln_f\.", p.name)}
        for pattern in peft.train_patterns:
            chosen |= {p.name for p in params if re.search(pattern, p.name)}
        if task == "classification":
            chosen |= {p.name for p in params if p.name.split(".")[0] in HEAD_NAMES}
        trained = [any(p.name in chosen for p in params if p.layer == b) for b in range(n)]
        embeddings = any("embed" in name for name in chosen)
        head_trains = any(name.split(".")[0] in HEAD_NAMES or (shape.tied_embeddings and "embed_tokens" in name)
                          for name in chosen)
        return Trainable(sum(p.numel for p in params if p.name in chosen), 0, _blocks(n, trained, below=embeddings),
                         head_trains=head_trains, largest=max((p.numel for p in params if p.name in chosen), default=0),
                         embeddings_train=embeddings)
    raise ValueError(f"unknown method {method}")
