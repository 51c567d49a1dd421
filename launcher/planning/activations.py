"""What one micro batch keeps for backward, and the transient peak on top, per device.

Counted from the tensors autograd saves in transformers' Llama-like and BERT-like layers, listed
with saved-tensor hooks (tests/test_plan.py and benchmarks/plan_memory.py hold the measurements).
Per token, with H hidden, Q = heads x head_dim (queries and attention output, which need not be H:
Gemma, Qwen3), K key/value width, I MLP width, c the bytes of the compute dtype (2 under bf16/fp16
autocast, else 4) and s those of the hidden states (the frozen weights' dtype), a block that
gradients pass through keeps, whatever trains in it:
- decoder: both norms' float32 inputs (2H x 4: the RMSNorm upcasts), the attention kernel's query,
  key, value and output ((2Q + 2K) x c; SDPA's fused kernels keep no len x len scores), the MLP's
  gate, activation and up outputs (3I x c);
- encoder: query, key and value (3H x c), both LayerNorms' float32 inputs, the GELU's input (I x c),
  and with hidden dropout its two masks.
Attention dropout: GPUs run it inside the fused kernels (nothing more kept); on a CPU SDPA falls back
to its math kernel, which keeps the scores, the dropout noise and the dropped scores (3 x heads x
len x c per token) and a context the output projection cannot share.
Dropout masks: a bool per element on a GPU (native_dropout); on a CPU torch multiplies by a noise
tensor in the input's dtype, and that is what backward keeps.
A weight that trains (or an adapter that reads the same input; under DeepSpeed ZeRO-3 every weight, as
its linear function keeps the input whatever trains) needs its input: once per input when
no cast is needed (the query, key and value maps share the normed hidden states), one 16-bit copy
per map where autocast casts it. LoRA keeps its B's input (r per token); with dropout its A reads a
dropped copy (the copy plus the mask) instead of the shared input. IA3 keeps the input (feed-forward
maps) or output it scales. DoRA adds the magnitude path's two outputs per token. Under autocast
with float32 weights every matmul whose input needs a gradient keeps the 16-bit copy of its weight
(in x out x 2, once per micro batch); 16-bit frozen weights (model.dtype=auto) need none.
The loss: the chunked cross-entropy keeps the hidden states' gradient (N x H x s) and, when the head
trains, its weight's (V x H x 4), and holds one chunk of logits while it runs; the full-vocabulary
loss keeps the float32 log-probabilities. Gradient checkpointing keeps each block's input and
recomputes one block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.planning.params import Adapter, BlockTraining, Trainable, linears
from launcher.planning.shapes import ModelShape

MIN_CHUNK_TOKENS = 256  # launcher.train.chunked_loss.MIN_CHUNK_TOKENS


def chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk of train.chunked_loss: one chunk's logits about as large as the hidden states,
    but at least 256 tokens. A torch-free twin of launcher.train.chunked_loss.chunk_tokens (the
    planner may not import torch); tests/test_plan.py checks they agree."""
    wanted = max(1, -(-tokens // max(1, -(-vocab // hidden))))
    return max(1 << (wanted - 1).bit_length(), MIN_CHUNK_TOKENS)


def kl_transient_bytes(tokens: int, vocab: int, hidden: int) -> int:
    """The chunked distillation loss's peak on top of what stays for backward: three float32 chunks of
    logits and one 16-bit chunk. A torch-free twin of launcher.train.distill.kl_transient_bytes."""
    return chunk_tokens(tokens, vocab, hidden) * vocab * (3 * 4 + 2)


@dataclass(frozen=True)
class Run:
    """The micro batch and the device, as far as activations care."""
    rows: int  # examples per micro batch
    seq_len: int  # positions per row (data.max_seq_len)
    compute_bytes: int  # 2 under bf16/fp16 autocast, else 4
    stream_bytes: int  # the hidden states' dtype: that of the frozen embeddings and norms (float32 under QLoRA)
    float32_weights: bool  # the block weights are float32 (trained in full, or model.dtype=float32)
    quantized: bool  # 4-bit block weights (QLoRA): dequantized per use, never copied for backward
    gpu: bool
    checkpointing: bool
    loss: str  # chunked, full (the whole vocabulary's logits), classification
    attention: str = "sdpa"  # the kernel (model.attn_implementation as resolved)
    zero3: bool = False  # DeepSpeed ZeRO-3: its linear function keeps every map's input, frozen or not
    # 16-bit parameters instead of autocast: FSDP2's mixed precision gathers them in bf16, DeepSpeed's bf16
    # and fp16 modes convert the model; adapters then are 16-bit too and nothing is cast per use.
    native_16bit: bool = False

    @property
    def autocast(self) -> bool:
        return self.compute_bytes == 2 and not self.native_16bit

    @property
    def adapter_bytes(self) -> int:
        return 2 if self.native_16bit else 4


@dataclass(frozen=True)
class Activations:
    kept: float  # bytes kept for backward by one micro batch
    transient: float  # bytes on top of that at the micro batch's peak (loss chunk, recomputed block)
    weight_copies: float  # of kept: autocast's 16-bit copies of the float32 base weights


def _mask_bytes(run: Run, dtype_bytes: int) -> int:
    return 1 if run.gpu else dtype_bytes


def _math_attention(shape: ModelShape, run: Run) -> bool:
    """Whether the len x len scores are kept: eager attention, or SDPA's math kernel, which it falls back
    to for attention dropout on a CPU."""
    return run.attention == "eager" or (run.attention == "sdpa" and shape.attention_dropout > 0 and not run.gpu)


def _input_bytes(shape: ModelShape, run: Run, block: BlockTraining, role: str, width: int, free: bool,
                 dtype: int) -> float:
    """Bytes per token that the maps of one input (`role`) keep of it: once if some map reads it as it
    is (nothing if the attention kernel keeps it anyway: `free`), plus the copy each casting map keeps."""
    readers: dict[str, tuple[int, bool]] = {}  # map -> (bytes it reads, whether that is a copy of its own)
    if block.weights_train or run.zero3:
        for lin in linears(shape, None):
            if lin.layer == 0 and lin.role == role:  # autocast casts to c; else the map reads the input as is
                m = run.compute_bytes if run.autocast else dtype
                readers[lin.name.rsplit(".", 1)[-1]] = (m, m != dtype)
    for adapter in block.adapters:
        if adapter.linear.role != role:
            continue
        name = adapter.linear.name.rsplit(".", 1)[-1]
        if adapter.kind == "lora" and not adapter.dropout:
            # peft casts the input to its float32 weights' dtype; autocast then casts that to c: a copy
            # per adapter. In float32 the adapters share the input.
            a = run.adapter_bytes
            readers[name] = (run.compute_bytes, True) if run.autocast else (a, dtype != a)
        elif adapter.kind == "ia3_in":  # peft casts the input to its (float32) vector's dtype before scaling
            readers[name] = (run.adapter_bytes, dtype != run.adapter_bytes)
    shared = any(not copy for _, copy in readers.values())
    copies = sum(m for m, copy in readers.values() if copy)
    return width * ((dtype if shared and not free else 0) + copies)


def _adapter_bytes(run: Run, adapter: Adapter, input_needs_grad: bool) -> float:
    """Bytes per token an adapter keeps beyond the inputs counted by _input_bytes. Dropout keeps its mask
    only for its input's gradient: not in the lowest trained block's first maps."""
    d, e = adapter.linear.inp, adapter.linear.out
    m = run.compute_bytes if run.autocast else run.adapter_bytes  # the adapter's matmuls: its weights' or autocast's
    if adapter.kind == "ia3_out":
        return e * run.compute_bytes if run.autocast else e * run.stream_bytes
    if adapter.kind == "ia3_in":
        return 0.0  # its input, counted with the map's input
    kept = adapter.r * m  # B's input
    if adapter.dropout:
        kept += d * m  # A's input, the dropped copy
        if input_needs_grad or adapter.linear.role != "attn_in":
            kept += d * _mask_bytes(run, run.adapter_bytes)  # the noise, in the adapter's dtype (peft's cast)
    if adapter.dora:
        kept += 2 * e * m  # the magnitude path's scaled base output and adapter output
    return kept


def block_bytes(shape: ModelShape, run: Run, block: BlockTraining, positions: int, prefix: int = 0,
                input_needs_grad: bool = True) -> float:
    """Bytes per token that one block keeps for backward (0 if no gradient passes through it). In the
    lowest block that trains, whose input needs no gradient (nothing below trains), the first norm keeps
    nothing and dropout on the first maps' input keeps no mask."""
    if not block.flows:
        return 0.0
    h, q, k, i, c, s = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate, run.compute_bytes, run.stream_bytes
    act = c if run.autocast else s  # matmul outputs: autocast's dtype, else the weights'
    math = _math_attention(shape, run)
    # bitsandbytes' 4-bit matmuls hand back their input's dtype, not autocast's.
    mlp_act = s if run.quantized else act
    if shape.family == "decoder":
        kept = (2 if input_needs_grad else 1) * h * 4 + 3 * i * mlp_act  # norms' float32 inputs; gate, activation, up
        if prefix:  # an explicit mask: SDPA gets keys and values repeated to every head, over len + prefix
            kept += 2 * q * act + 2 * q * act * (positions + prefix) / positions + (3 * positions + prefix) * 4
        else:
            kept += (2 * q + 2 * k) * act
        if block.weights_train:
            kept += 2 * h * 4  # the normalised hidden states, for the norm weights' gradient
    else:
        # BERT's LayerNorms see the residual sum; CUDA's autocast runs them in float32 (a float32 copy of
        # the input), CPU's in the sum's dtype. On a CPU, autocast runs the math attention in float32.
        ln = 4 if run.gpu and run.autocast else max(act, s)
        attn = 4 if math and run.autocast else act
        # The math kernel keeps the query for the key's gradient: none in the lowest trained block unless
        # the key map trains.
        key_trains = block.weights_train or any(a.linear.name.endswith("key") for a in block.adapters)
        qkv = 3 if (input_needs_grad or key_trains or not math) else 2
        kept = qkv * h * attn + 2 * h * ln + i * act  # query, key, value; LayerNorm inputs; GELU input
        if shape.hidden_dropout:
            kept += 2 * h * _mask_bytes(run, act)
        if not math:
            kept += h * act  # the fused kernel's output (shared with the output projection's input)
    if math:
        kept += 3 * shape.heads * positions * (4 if run.autocast else act)  # scores, dropout noise, dropped scores
    if shape.family == "decoder":
        attn_out_width, stream, context = q, s, act
    else:  # the LayerNorm's output feeds the next maps; the math kernel's context is float32 under CPU autocast
        attn_out_width, stream, context = h, ln, attn
    kept += _input_bytes(shape, run, block, "attn_in", h, False, stream)
    kept += _input_bytes(shape, run, block, "attn_out", attn_out_width, not math, context)
    kept += _input_bytes(shape, run, block, "mlp_in", h, False, stream)
    kept += _input_bytes(shape, run, block, "mlp_mid", i, False, mlp_act)
    kept += sum(_adapter_bytes(run, a, input_needs_grad) for a in block.adapters)
    return kept


def block_constants(shape: ModelShape, run: Run, block: BlockTraining, input_needs_grad: bool) -> tuple[float, float]:
    """(bytes kept once per micro batch by one block, of which autocast's weight copies). A matmul keeps
    its weight only for its input's gradient: in the lowest block that trains, whose input needs none,
    the query, key and value maps keep no copy."""
    if not block.flows:
        return 0.0, 0.0
    copies = adapters = 0.0
    if run.autocast and run.float32_weights and not run.quantized:
        copies += 2 * sum(lin.inp * lin.out for lin in linears(shape, None)
                          if lin.layer == 0 and (input_needs_grad or lin.role != "attn_in"))
    for adapter in block.adapters:
        if adapter.kind == "lora" and run.autocast:
            d, e = adapter.linear.inp, adapter.linear.out
            adapters += 2 * adapter.r * (d + e)  # A and B, float32, cast for their matmuls
            if adapter.dora:  # peft recomputes the base output from the weight cast to float32: autocast recasts it
                copies += 2 * d * e
    return copies + adapters, copies


def loss_bytes(shape: ModelShape, run: Run, train: Trainable, tokens: int) -> tuple[float, float]:
    """(kept, transient) of the loss over one micro batch of `tokens` positions."""
    h, v, c, s = shape.hidden, shape.vocab, run.compute_bytes, run.stream_bytes
    if run.loss == "classification":
        return run.rows * h * 4 * 4, 0.0  # the pooled rows through pooler, dropout and head: a few per example
    if run.loss == "full":
        return tokens * 4 * v, tokens * 2 * 4 * v  # float32 log-probabilities; logits and their gradient
    kept = tokens * h * s  # the hidden states' gradient, computed in the forward pass
    if train.head_trains:
        kept += v * h * 4  # and the head weight's, in float32
    chunk = min(chunk_tokens(tokens, v, h), tokens)
    # One chunk of float32 logits (16-bit matmuls add their output and the gradient's cast back).
    transient = chunk * v * (4 + (2 if c == 2 else 0))
    head_bytes = 4 if train.head_trains else s
    if run.autocast and head_bytes != c:
        transient += v * h * c  # the head weight cast to the compute dtype, for the chunk loop
    return kept, transient


def working_bytes(shape: ModelShape, run: Run, positions: int) -> float:
    """Bytes per token one block's forward holds at once whether or not they are kept: its input, then
    the MLP's four I-wide tensors (decoder) or the query, key, value and the scores through dropout
    (encoder, math kernel). What a frozen model's forward costs beyond its weights (classify_head)."""
    h, i = shape.hidden, shape.intermediate
    act = run.compute_bytes if run.autocast else run.stream_bytes
    if shape.family == "decoder":
        return (h + 4 * i) * act
    if _math_attention(shape, run):
        return 4 * h * act + 3 * shape.heads * positions * (4 if run.autocast else act)
    return 5 * h * act


def _ends_bytes(shape: ModelShape, run: Run, train: Trainable) -> float:
    """Bytes per token kept outside the blocks: the final norm's input (decoder), the embeddings'
    norm and dropout when they train (encoder)."""
    if not any(b.flows for b in train.blocks):
        return 0.0
    h = shape.hidden
    if shape.family == "decoder":  # the final norm's input, and its output where its weight trains
        return h * 4 * (2 if train.blocks[-1].weights_train else 1)
    if train.embeddings_train:  # their LayerNorm's input and dropout's mask
        return h * 4 + (h * _mask_bytes(run, run.stream_bytes) if shape.hidden_dropout else 0)
    return 0.0


def activation_bytes(shape: ModelShape, train: Trainable, run: Run) -> Activations:
    """What one micro batch of `run.rows` rows keeps for backward, and its transient peak."""
    positions = run.seq_len + train.virtual_tokens
    tokens = run.rows * positions
    # Whether each block's input needs a gradient: something below it trains.
    reach = [train.embeddings_train or bool(train.virtual_tokens or train.prefix_tokens)]
    reach += [b.flows for b in train.blocks[:-1]]
    per_block = [block_bytes(shape, run, b, positions, train.prefix_tokens, r) for b, r in zip(train.blocks, reach)]
    constants = [block_constants(shape, run, b, r) for b, r in zip(train.blocks, reach)]
    kept_constants = sum(k for k, _ in constants)
    copies = sum(c for _, c in constants)
    loss_kept, loss_transient = loss_bytes(shape, run, train, tokens)
    loss_transient = max(loss_transient, tokens * working_bytes(shape, run, positions))
    ends = tokens * _ends_bytes(shape, run, train)
    if run.checkpointing:
        # Each block's input is kept; in backward one block at a time is recomputed, whole.
        kept = sum(tokens * shape.hidden * run.stream_bytes for b in train.blocks if b.flows)
        biggest = max((tokens * p + k for p, (k, _) in zip(per_block, constants)), default=0.0)
        return Activations(kept=kept + ends + loss_kept, transient=max(biggest, loss_transient), weight_copies=0.0)
    kept = tokens * sum(per_block) + kept_constants + ends + loss_kept
    return Activations(kept=kept, transient=loss_transient, weight_copies=copies)
