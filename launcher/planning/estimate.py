"""The memory estimate of one recipe on one device, and the facts `tunefleet plan` shows beside it.

Resolves the device settings the run would get on that device (launcher.distributed.device_settings:
precision, weight dtype, attention kernel, fused AdamW), reads the model's shape (never its weights),
and adds up model states, activations (launcher.planning.activations) and the peaks of a step and of
loading (launcher.planning.memory). Imports nothing heavier than pydantic, yaml and gguf.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import UserError
from launcher.planning.activations import Run, activation_bytes, kl_transient_bytes
from launcher.planning.memory import (
    CPU_OVERHEAD, DTYPE_BYTES, GPU_OVERHEAD, Estimate, Precision, Setup, loading_bytes, model_state_bytes, step_peak,
)
from launcher.planning.params import parameters, trainable
from launcher.planning.shapes import read_shape

GiB = 2**30


# `--gpu`: a GPU with bf16 whose name and memory are unknown.
ANY_GPU = {"name": "gpu", "gpu": True, "bf16": True, "tf32": True, "memory_gib": None}


def setup_of(recipe) -> Setup:
    from launcher.distributed.deepspeed_config import read_ds_config

    dist = recipe.distributed
    if dist.backend == "ddp":
        return Setup("ddp", dist.world_size, words=["nothing sharded: every rank holds the whole model states"])
    if dist.backend == "fsdp":
        shards = dist.num_processes if dist.fsdp_sharding == "hybrid_shard" else dist.world_size
        words = [f"FSDP2 {dist.fsdp_sharding}: weights, gradients and optimizer states sharded over {shards} ranks"]
        if dist.fsdp_sharding == "shard_grad_op":
            words.append("weights stay gathered from forward to backward")
        if dist.fsdp_cpu_offload:
            words.append("sharded weights, gradients and optimizer states offloaded to host memory")
        if dist.fsdp_defer_gradient_sync and recipe.gradient_accumulation_steps > 1:
            words.append("gradients unsharded on every rank until the step's last micro batch "
                         "(fsdp_defer_gradient_sync)")
        return Setup("fsdp", shards, offload_optimizer=dist.fsdp_cpu_offload, offload_params=dist.fsdp_cpu_offload,
                     shard_grad_op=dist.fsdp_sharding == "shard_grad_op", words=words,
                     defer_grad_sync=dist.fsdp_defer_gradient_sync, lean_loading=dist.world_size > 1)
    zero = read_ds_config(dist.config).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    off_par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    sharded = {1: "optimizer states", 2: "optimizer states and gradients",
               3: "optimizer states, gradients and weights"}.get(stage, "nothing")
    words = [f"DeepSpeed ZeRO-{stage}: {sharded} sharded over {dist.world_size} ranks"]
    if off_opt:
        words.append("optimizer states offloaded to host memory")
    if off_par:
        words.append("weights offloaded to host memory")
    live = [zero.get(key, 10**9) for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance")]
    live = min(int(v) if isinstance(v, (int, float)) else 10**9 for v in live)
    if stage == 3:
        words.append(f"parameters gathered in forward stay gathered until backward, up to {live:.3g} of them "
                     "(stage3_max_live_parameters, stage3_max_reuse_distance)")
    return Setup(f"zero{stage}" if stage else "ddp", dist.world_size, off_opt, off_par, words=words, zero3_live=live)


def device_profile(name: str | None, gpu: bool = False, gpu_type: str | None = None):
    """The device a plan is for: --device NAME, else a cluster profile's GPU type where it is one we
    know, else an unnamed GPU (--gpu, a cluster with GPUs, nvidia-smi here), else the CPU."""
    from launcher.distributed.device_settings import PROFILES, DeviceProfile

    if name is not None:
        if name.lower() not in PROFILES:
            raise UserError(f"--device {name}: not a device tunefleet plan knows; choose one of {', '.join(PROFILES)}")
        return PROFILES[name.lower()]
    if gpu_type and gpu_type.lower() in PROFILES:
        return PROFILES[gpu_type.lower()]
    return DeviceProfile(**ANY_GPU) if gpu else PROFILES["cpu"]


def _num_labels(recipe) -> int | None:
    if recipe.model.task != "classification":
        return None
    if recipe.data.labels:
        return len(recipe.data.labels)
    labels = set()
    for source in recipe.data.sources:
        path = Path(source.path)
        if path.suffix == ".jsonl" and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    labels.add(str(json.loads(line).get(recipe.data.label_field)))
    return len(labels) or 2


def estimate(recipe, device) -> tuple[Estimate, dict]:
    """The per-device memory of `recipe` on `device` (a DeviceProfile), and the facts the plan shows."""
    from launcher.distributed.device_settings import resolve

    settings = resolve(recipe, device)
    shape = read_shape(recipe.model.name, recipe.model.revision)
    labels = _num_labels(recipe)
    teacher_shape = teaching = None
    if recipe.distill:
        teacher_shape, shape, teaching = _distill_shapes(recipe, shape)
    params_total = sum(p.numel for p in parameters(shape, labels))
    train = trainable(shape, recipe.peft, recipe.model.task, labels)
    precision = {"no": "fp32"}.get(settings.precision, settings.precision)
    prec = Precision(precision, settings.weight_dtype, fused_adamw=settings.fused_adamw)
    setup = setup_of(recipe)
    qlora = {"double_quant": recipe.peft.double_quant} if recipe.peft.method == "qlora" else None
    accumulation = recipe.gradient_accumulation_steps
    states = model_state_bytes(shape, params_total + train.adapter, train, setup, prec, recipe.train.optimizer,
                               qlora, labels, accumulation)
    classification = recipe.model.task == "classification"
    # Under FSDP2 and DeepSpeed a 16-bit precision makes the parameters 16-bit (gathered so, or converted);
    # elsewhere accelerate's autocast casts float32 weights per use.
    native = prec.sixteen_bit and setup.backend != "ddp"
    run = Run(rows=recipe.batch.micro, seq_len=recipe.data.max_seq_len,
              compute_bytes=2 if prec.sixteen_bit else 4,
              stream_bytes=2 if native else 4 if qlora else DTYPE_BYTES[settings.weight_dtype],
              float32_weights=settings.weight_dtype == "float32" and not native, quantized=bool(qlora), gpu=device.gpu,
              checkpointing=recipe.train.gradient_checkpointing, attention=settings.attn_implementation,
              zero3=setup.backend == "zero3", native_16bit=native,
              loss="classification" if classification else "chunked" if recipe.train.chunked_loss else "full")
    act = activation_bytes(shape, train, run)
    transient = act.transient
    teacher_part = None
    distill_facts = None
    if teaching:
        teacher_params = sum(p.numel for p in parameters(teacher_shape, labels))
        teacher_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(
            precision, "float32" if recipe.model.dtype == "auto" else recipe.model.dtype)
        # Frozen and replicated whole on every rank (launcher.train.distill), in the training precision.
        teacher_part = teacher_params * DTYPE_BYTES[teacher_dtype]
        if not classification and run.loss == "chunked":
            # The teacher hands back its final hidden states, kept through the student's forward; the
            # KL runs a chunk at a time inside the student's head (launcher.train.distill).
            tokens = run.rows * (run.seq_len + train.virtual_tokens)
            transient = max(transient, kl_transient_bytes(tokens, shape.vocab, shape.hidden)) + \
                tokens * teacher_shape.hidden * DTYPE_BYTES[teacher_dtype]
        elif not classification:  # the teacher's logits beside the student's
            transient += run.rows * run.seq_len * teacher_shape.vocab * (DTYPE_BYTES[teacher_dtype] + 4)
        distill_facts = {"teacher": recipe.distill.teacher or recipe.model.name, "teacher_layers": teacher_shape.layers,
                         "teacher_parameters": teacher_params, "teacher_dtype": teacher_dtype,
                         "student_layers": shape.layers}
    phase, parts, phases = step_peak(states, act.kept, transient)
    overhead = GPU_OVERHEAD if device.gpu else CPU_OVERHEAD
    loading = loading_bytes(shape, params_total + train.adapter, train, setup, prec, qlora, labels,
                            on_host=not device.gpu)
    if teacher_part is not None:
        parts["teacher"] = teacher_part
        loading["teacher"] = teacher_part  # loaded after the student is sharded and filled
    parts["overhead"] = loading["overhead"] = overhead
    result = Estimate(device=parts, host=states.host, loading=loading, phase=phase,
                      phases={k: v + overhead + (teacher_part or 0) for k, v in phases.items()})
    facts = {"model": {"family": shape.family, "type": shape.model_type, "layers": shape.layers,
                       "hidden": shape.hidden, "vocab": shape.vocab, "parameters": params_total},
             "weights": _weight_words(recipe, shape, labels, params_total, train, settings.weight_dtype),
             "trainable_parameters": train.total, "adapter_parameters": train.adapter, "precision": precision,
             "device_settings": {"precision": precision, "weight_dtype": settings.weight_dtype,
                                 "attn_implementation": settings.attn_implementation, "attn_why": settings.attn_why,
                                 "tf32": settings.tf32, "fused_adamw": settings.fused_adamw,
                                 **({"qlora_compute_dtype": settings.qlora_compute_dtype} if qlora else {})},
             "sharding": setup.words, "tokens_per_micro_batch": run.rows * (run.seq_len + train.virtual_tokens),
             "peak_phase": phase, "autocast_weight_copies_gib": round(act.weight_copies / GiB, 3)}
    if distill_facts:
        facts["distillation"] = distill_facts
    return result, facts


def _distill_shapes(recipe, model_shape):
    """(teacher's shape, the student's shape, whether a teacher is loaded) of a recipe that distills."""
    from dataclasses import replace

    from launcher.model.student_layers import kept_layers

    distill = recipe.distill
    teacher = read_shape(distill.teacher, recipe.model.revision) if distill.teacher else model_shape
    student = model_shape
    if distill.student_layers is not None:
        student = replace(model_shape, layers=len(kept_layers(distill.student_layers, model_shape.layers)))
    return teacher, student, distill.alpha > 0


def _weight_words(recipe, shape, labels, params_total: int, train, weight_dtype: str) -> str:
    from launcher.planning.params import linears

    frozen = params_total - (train.total - train.adapter)
    parts = []
    if recipe.peft.method == "qlora":
        quantized = sum(lin.inp * lin.out for lin in linears(shape, labels) if lin.layer is not None)
        parts.append(f"{quantized:,} in 4-bit {recipe.peft.quant_type}")
        frozen -= quantized
        weight_dtype = "float32"  # peft's prepare_model_for_kbit_training upcasts what is not quantized
    if frozen:
        parts.append(f"{frozen:,} frozen in {weight_dtype}")
    if train.total:
        parts.append(f"{train.total:,} trainable in float32")
    return ", ".join(parts)
