"""The recipe schema: every key a recipe may hold, its type, default and a one-line doc.

A recipe is nested YAML with the sections below. Unknown keys are errors (a typo must never
be silently dropped), values are coerced to the field's type, and cross-field rules that
can be checked without loading anything live in the validators at the bottom of `Recipe`.

This module imports only pydantic so that validation stays fast (no torch on this path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from launcher.config.compat import BatchSplit


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------- model


class ModelConfig(Section):
    name: str = Field(
        description="Hub id, local model folder, a .gguf file, or pkg:PACKAGE/PATH inside an installed "
        "Python package (a .gguf or a zipped model folder)."
    )
    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm", description="causal_lm: instruction/LM tuning; classification: a sequence-classification head."
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) when name is a hub id.")
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model. Off unless you trust the model's authors."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the frozen weights are loaded in (trainable weights are kept float32). auto: the "
        "compute dtype of train.precision (bfloat16 under bf16, float16 under fp16, else float32), except "
        "peft.method=full, which loads float32 master weights (launcher/distributed/device_settings.py)."
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = Field(
        "auto", description="Attention kernel transformers uses. auto: flash_attention_2 where the flash-attn "
        "package, a GPU that runs it and a 16-bit precision are all there, else sdpa. The choice is recorded "
        "in RUN/distributed.json; data.packing lays micro batches out as the kernel needs."
    )


# ---------------------------------------------------------------------------- peft

TargetModules = Union[Literal["all-linear"], list[str]]


class LoraConfig(Section):
    method: Literal["lora"] = Field(description="Low-rank adapters on the target modules.")
    r: int = Field(8, ge=1, description="Adapter rank: higher is more capacity and more memory.")
    alpha: int = Field(16, ge=1, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: TargetModules = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names to adapt, or 'all-linear' for every linear layer but the output head.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter."
    )


class QLoraConfig(LoraConfig):
    method: Literal["qlora"] = Field(description="LoRA on a base model quantized to 4 bits by bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the matmuls on dequantized weights. auto: that of train.precision "
        "(bfloat16 under bf16, float16 under fp16, float32 under fp32)."
    )


class DoraConfig(LoraConfig):
    method: Literal["dora"] = Field(description="Weight-decomposed LoRA: adapts magnitude and direction separately.")


class PromptTuningConfig(Section):
    method: Literal["prompt_tuning"] = Field(description="Learn soft prompt embeddings; the model stays frozen.")
    num_virtual_tokens: int = Field(20, ge=1, description="Soft prompt length: longer is more capacity, shorter context.")
    init_text: Optional[str] = Field(
        None, description="Initialise the soft prompt from this text's embeddings (random when unset)."
    )


class PrefixTuningConfig(Section):
    method: Literal["prefix_tuning"] = Field(description="Learn key/value prefixes for every attention layer.")
    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length per layer.")
    prefix_projection: bool = Field(False, description="Reparametrise the prefix through an MLP (more stable, more memory).")


class Ia3Config(Section):
    method: Literal["ia3"] = Field(description="Learned rescaling vectors on keys, values and feed-forward activations.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"], description="Modules whose activations are rescaled."
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="Subset of target_modules that are feed-forward (scaled on their input).",
    )


class PartialFreezeConfig(Section):
    method: Literal["partial_freeze"] = Field(description="Train only some layers of the model in full precision.")
    train_last_n_layers: Optional[int] = Field(
        None, ge=1, description="Train the last N transformer blocks (plus the final norm and head)."
    )
    train_patterns: list[str] = Field(
        default_factory=list, description="Also train parameters whose name matches any of these regexes."
    )

    @model_validator(mode="after")
    def _something_to_train(self) -> "PartialFreezeConfig":
        if self.train_last_n_layers is None and not self.train_patterns:
            raise ValueError("set peft.train_last_n_layers or peft.train_patterns: otherwise nothing would train")
        return self


class FullConfig(Section):
    method: Literal["full"] = Field(description="Train every parameter.")


class HeadOnlyConfig(Section):
    method: Literal["head_only"] = Field(
        description="Feature extraction: freeze the pretrained backbone, train only the new task head."
    )


PeftConfig = Annotated[
    Union[
        LoraConfig,
        QLoraConfig,
        DoraConfig,
        PromptTuningConfig,
        PrefixTuningConfig,
        Ia3Config,
        PartialFreezeConfig,
        FullConfig,
        HeadOnlyConfig,
    ],
    Field(discriminator="method"),
]

PEFT_CLASSES: dict[str, type[Section]] = {
    cls.model_fields["method"].annotation.__args__[0]: cls
    for cls in (LoraConfig, QLoraConfig, DoraConfig, PromptTuningConfig, PrefixTuningConfig, Ia3Config,
                PartialFreezeConfig, FullConfig, HeadOnlyConfig)
}
METHOD_NAMES = tuple(PEFT_CLASSES)


# ---------------------------------------------------------------------------- distributed


class DistributedConfig(Section):
    backend: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: every rank holds the whole model; fsdp: FSDP2 shards parameters, gradients and "
        "optimizer state; deepspeed: ZeRO stage and offload from distributed.config."
    )
    config: Optional[str] = Field(
        None, description="DeepSpeed JSON: a name in ds_configs/ (zero1, zero2, zero3, zero2_offload, zero3_offload) "
        "or a path. Batch sizes, accumulation, clipping and precision must be \"auto\": the recipe sets them."
    )
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard", description="FSDP2: full_shard frees parameters after use (least memory); shard_grad_op keeps "
        "them gathered between forward and backward (less communication); hybrid_shard shards within a machine "
        "and replicates across machines."
    )
    fsdp_cpu_offload: bool = Field(False, description="FSDP2: keep sharded parameters and optimizer state in CPU memory.")
    fsdp_defer_gradient_sync: bool = Field(
        False, description="FSDP2 with accumulation: reduce-scatter gradients once per optimizer step instead of after "
        "every micro batch. Less communication, but every rank then holds the unsharded float32 gradients of every "
        "trainable parameter until the step ends (`tunefleet plan` counts them). Off: gradients stay sharded."
    )
    num_processes: int = Field(1, ge=1, description="Processes (GPUs, or CPU workers) per machine.")
    num_machines: int = Field(1, ge=1, description="Machines taking part in the run.")
    machine_rank: int = Field(0, ge=0, description="This machine's index, 0 .. num_machines-1.")
    main_process_ip: str = Field("127.0.0.1", description="Address of machine 0, where the rendezvous runs.")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port on machine 0.")
    timeout_minutes: int = Field(
        30, ge=1, description="Collective-operation timeout. Data preparation never counts against it."
    )

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


# ---------------------------------------------------------------------------- data

DataFormat = Literal["alpaca", "chat", "text", "classification"]


class DataSource(Section):
    path: str = Field(description="A .jsonl/.json/.csv/.parquet file, or a hub data set name.")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight when several sources are mixed.")
    format: Optional[DataFormat] = Field(None, description="Row format of this source (defaults to data.format).")
    split: str = Field("train", description="Split to read when path is a hub data set.")


class AugmentConfig(Section):
    """Token-level augmentation of training examples, drawn afresh every epoch (launcher/data/augment.py).

    Classification text and the prompts of instruction data change; trained response tokens and
    special tokens never do, and evaluation data is never augmented. All 0 (the default) is off.
    """

    mask: float = Field(0.0, ge=0.0, lt=1.0, description="Chance each token is replaced by the mask token "
                        "(the tokenizer's mask token, else its unk token, else its pad token).")
    delete: float = Field(0.0, ge=0.0, lt=1.0, description="Chance each token is dropped (one always survives).")
    swap: float = Field(0.0, ge=0.0, lt=1.0,
                        description="Chance each token trades places with the next changeable one.")
    insert: float = Field(0.0, ge=0.0, lt=1.0, description="Chance a copy of a token drawn from the same example is "
                          "inserted after each token, while the example is shorter than data.max_seq_len.")

    @property
    def active(self) -> bool:
        return any((self.mask, self.delete, self.swap, self.insert))


class DataConfig(Section):
    train: Union[str, list[DataSource]] = Field(
        description="Training data: one path, or a list of {path, weight, format} sources mixed by weight."
    )
    eval: Optional[str] = Field(None, description="Evaluation file; when unset, eval_fraction of train is held out.")
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of training rows held out for evaluation when data.eval is unset."
    )
    format: DataFormat = Field(
        "alpaca",
        description="alpaca: instruction/input/output; chat: messages; text: plain text; classification: text+label.",
    )
    max_seq_len: int = Field(512, ge=8, description="Tokens per example; longer rows are truncated (text is chunked).")
    prompt_template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="How alpaca rows become a prompt: the tokenizer's chat template (auto, if it has one) or the classic Alpaca text."
    )
    text_field: str = Field("text", description="Column holding the text (text and classification formats).")
    label_field: str = Field("label", description="Column holding the label (classification format).")
    labels: Optional[list[str]] = Field(
        None, description="Label names in id order; inferred (sorted) from the training data when unset."
    )
    max_samples: Optional[int] = Field(None, ge=1, description="Use at most this many training rows (for quick runs).")
    max_eval_samples: Optional[int] = Field(None, ge=1, description="Use at most this many evaluation rows.")
    packing: Literal["auto", "pack", "group_by_length", "none"] = Field(
        "auto", description="How a micro batch's examples are laid out. pack: concatenated into rows of up to "
        "max_seq_len tokens, attention kept within each example (causal LM); group_by_length: each rank's share "
        "of the global batch sorted by length before it is cut into micro batches, so little padding; none: "
        "padded to the longest. auto: pack where it is sound (causal LM without virtual tokens), else "
        "group_by_length. Never changes which examples make up a global batch.",
    )
    loader_workers: int = Field(
        1, ge=0, description="Processes that build the next steps' batches while the current one trains "
        "(0: on the training thread).",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Token-level augmentation of the training examples "
        "(masking, deletion, swaps, insertion), a fresh variant every epoch; off by default.",
    )

    @property
    def sources(self) -> list[DataSource]:
        if isinstance(self.train, str):
            return [DataSource(path=self.train, format=self.format)]
        return [s if s.format else s.model_copy(update={"format": self.format}) for s in self.train]


# ---------------------------------------------------------------------------- train


class TrainConfig(Section):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate, reached after warmup.")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to run; overrides epochs when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps is unset).")
    micro_batch_size: int = Field(
        4, ge=1, description="Examples per forward pass on one process, at most: the memory knob. Lowered (said "
        "once) where global_batch_size over the world size does not split into whole micro batches of this size."
    )
    global_batch_size: Optional[int] = Field(
        16, ge=1, description="Examples per optimizer step over all processes, kept whatever the world size "
        "(accumulation is derived; a world size that does not divide it is refused with the exact fix). "
        "null: micro_batch_size x world size, growing with the world size (accumulation 1)."
    )
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw: torch AdamW; adamw_8bit: bitsandbytes AdamW with 8-bit state (less memory)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (never on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Decay after warmup (transformers' schedulers)."
    )
    warmup_steps: Optional[int] = Field(None, ge=0, description="Linear warmup steps; overrides warmup_ratio.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Warmup as a share of the total steps.")
    layer_lr_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="Layer-wise LR decay: layer i of N gets lr * decay**(N-i); 1.0 turns it off."
    )
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm to this; null turns clipping off.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision; auto picks bf16 on GPUs that have it, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    chunked_loss: bool = Field(
        True, description="Causal LM: compute the head and cross-entropy a chunk of tokens at a time, so the "
        "float32 logits of the whole micro batch never exist at once (same loss and gradients, less memory).",
    )
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N optimizer steps.")
    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="Write a resumable checkpoint every N steps and at the end; null writes none "
        "(a preemption signal still writes one)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N complete checkpoints, deleting older ones.")
    resume: str = Field(
        "never", description="never: start fresh (a used output.dir is an error); auto: continue from the newest "
        "complete checkpoint in output.dir, if any; or the path of a checkpoint folder."
    )


# ---------------------------------------------------------------------------- eval


class EvalConfig(Section):
    every_steps: Optional[int] = Field(None, ge=1, description="Evaluate every N optimizer steps (and always at the end).")
    at_start: bool = Field(False, description="Also evaluate before the first step (a baseline for comparison).")
    batch_size: int = Field(8, ge=1, description="Examples per evaluation forward pass on one process.")
    metric: str = Field(
        "eval_loss",
        description="Metric that picks the best checkpoint and drives early stopping "
        "(eval_loss, perplexity, accuracy, precision, recall, f1).",
    )
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many evaluations without improvement; null never stops early."
    )
    sample_prompts: list[str] = Field(
        default_factory=list, description="Prompts answered greedily at the end of a causal-LM run (written to samples.jsonl)."
    )
    sample_max_new_tokens: int = Field(48, ge=1, description="Length limit of each sample answer.")
    gather_weights_gib: Optional[float] = Field(
        None, ge=0, description="ZeRO-3 and FSDP: evaluation and sample answers run on whole weights gathered once "
        "(instead of gathering every block in every forward, for every generated token) when they take at most "
        "this many GiB per device. null: half the memory still free on the device; 0: never gather.",
    )


# ---------------------------------------------------------------------------- output


class OutputConfig(Section):
    dir: str = Field(
        "runs/{recipe}-{time}", description="Run folder; {recipe} and {time} are filled in. Must not hold another run."
    )
    merge: bool = Field(False, description="Also write a merged model (adapter folded into the base) at the end.")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers the main process sends metrics, the resolved recipe and hyperparameters "
        "to (through accelerate); mlflow and wandb are extras: pip install 'tunefleet[mlflow]'. Their addresses "
        "and keys come from the environment only (MLFLOW_TRACKING_URI, WANDB_API_KEY, WANDB_MODE).",
    )
    project: str = Field("tunefleet", min_length=1,
                         description="MLflow experiment and W&B project the run is logged under.")
    run_name: Optional[str] = Field(None, description="The run's name in MLflow and W&B; null: the run folder's name.")
    verbosity: Literal["normal", "debug"] = Field(
        "normal", description="normal: tunefleet's lines and real problems, once (libraries' deprecation warnings "
        "and import-time notices hidden, other ranks' library warnings hidden); debug: every library line from "
        "every rank (launcher/outputs/console.py).",
    )


# ---------------------------------------------------------------------------- distill


class DistillConfig(Section):
    """Knowledge distillation (launcher/train/distill.py): the student (model.name, trained by peft.method)
    learns from a frozen teacher's soft targets as well as from the labels. The section's presence turns it on."""

    teacher: Optional[str] = Field(
        None, description="The teacher: any model.name source, or a finished tunefleet run folder (its adapter "
        "applied to its base). Null: model.name itself at full depth (use with student_layers).",
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the soft-target (KL) loss; the task loss gets "
                         "1 - alpha. 0 is plain training on the labels (no teacher is loaded).")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature of both models' logits in the KL term "
                               "(scaled by temperature^2, as Hinton et al.): higher passes on more of the teacher's "
                               "view of the wrong answers.")
    student_layers: Optional[Union[Literal["every_other"], list[int]]] = Field(
        None, description="Make the student from model.name by keeping only these transformer blocks (0-based "
        "indices, ascending), initialised from its weights, DistilBERT-style; every_other keeps 0, 2, 4, ... "
        "Null: the student is model.name as it is.",
    )

    @model_validator(mode="after")
    def _ascending_layers(self) -> "DistillConfig":
        layers = self.student_layers
        if isinstance(layers, list) and (not layers or layers != sorted(set(layers)) or layers[0] < 0):
            raise ValueError("distill.student_layers must be a non-empty list of distinct block indices in "
                             "ascending order (e.g. [0, 2, 4]), or every_other")
        return self


# ---------------------------------------------------------------------------- recipe

CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")
LM_METRICS = ("perplexity",)


class Recipe(Section):
    description: str = Field("", description="One line saying what this recipe is for (shown by `tunefleet recipes`).")
    model: ModelConfig
    peft: PeftConfig
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    distill: Optional[DistillConfig] = Field(
        None, description="Knowledge distillation from a teacher model; absent (null): plain training."
    )

    @property
    def batch(self) -> "BatchSplit":
        """How the global batch splits at this recipe's world size (launcher.config.compat.split_batch)."""
        from launcher.config.compat import split_batch

        return split_batch(self.train.global_batch_size, self.train.micro_batch_size, self.distributed.world_size)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch.accumulation

    @model_validator(mode="after")
    def _check_combinations(self) -> "Recipe":
        from launcher.config.compat import check_recipe  # local: keeps the rule table in its own module

        problems = check_recipe(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self
