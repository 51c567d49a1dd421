"""Everything a run needs before its first step, built in an order that cannot deadlock.

`build_run` strings the stages together, each returning what the next needs:
1. `_prepare_inputs`: model conversion and tokenization run first, before any process group
   exists: the first process on each machine does them, the others wait on a file lock
   (launcher.cache).
2. `_resolve_setup`: device settings, micro batch layout and backend, decided alike on every rank.
3. `_start_processes`: the process group, with the recipe's timeout (gloo on CPU, nccl on GPU).
4. `_claim_run_dir`: the main process picks the run folder and shares its name; only then is
   anything written. A checkpoint to continue is checked here, before the model loads.
5. `_load_model_and_method`, `_plan_batches`, `_prepare_training`: the model loaded and the method
   applied; the batch plan and step count; the backend's wrapping, the optimizer and schedule.
6. `_load_teacher` when the recipe distills; RUN/distributed.json records what was set up.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.config.compat import split_batch, total_steps
from launcher.config.schema import Recipe
from launcher.data.batches import BatchPlan, example_lengths
from launcher.data.packing_check import packing_layout
from launcher.data.prepare import PreparedData, prepare_data
from launcher.distributed.backend import Backend, make_backend
from launcher.distributed.device_settings import apply_process_settings
from launcher.errors import UserError
from launcher.methods import METHODS
from launcher.methods.common import MethodContext, float32_trainable, parameter_counts
from launcher.model.attention import fit_to_model
from launcher.model.lean_load import build_on_meta
from launcher.model.sources import materialize
from launcher.outputs.run_dir import write_json, write_resolved_recipe
from launcher.train.optim import OptimizerMaker, build_scheduler
from launcher.train.resume import check_resumable, choose_run_dir
from launcher.train.state import CheckpointRecord

if TYPE_CHECKING:
    import accelerate


@dataclass
class Run:
    recipe: Recipe
    accelerator: accelerate.Accelerator
    model: torch.nn.Module  # prepared (possibly DDP-wrapped)
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: PreparedData
    plan: BatchPlan
    total_steps: int
    run_dir: Path
    trainable_params: int
    total_params: int
    backend: Backend | None = None  # how to synchronise, step, gather and checkpoint
    resume_from: Path | None = None  # the checkpoint train.resume resolved to
    resumed: CheckpointRecord | None = None  # its trainer_state.json, checked against this run
    teacher: object | None = None  # launcher.train.distill.Teacher when the recipe distills
    layout: str = "none"  # how micro batches are laid out (data.packing resolved for this model)
    inference_gather: object | None = None  # the last launcher.distributed.inference_weights.GatherDecision

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_labels(self) -> int | None:
        return len(self.data.label_names) if self.data.label_names else None


class RunAlreadyFinished(Exception):
    """train.resume=auto found the run complete: there is nothing left to train."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def mixed_precision(setting: str) -> str:
    from launcher.distributed.device_settings import resolve_precision, this_machine

    return resolve_precision(setting, this_machine())


def device_settings_of(recipe: Recipe):
    """The recipe's device-dependent settings on this machine (launcher.distributed.device_settings)."""
    from launcher.distributed import device_settings

    return device_settings.resolve(recipe, device_settings.this_machine())


def load_tokenizer(model_path: str, recipe: Recipe):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
    )
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(model_path: str, recipe: Recipe, label_names: list[str] | None, device: torch.device,
               on_meta: bool = False, settings=None):
    """The pretrained model; with `on_meta`, the same model built from its config on the meta device
    (no weights read: a rank that lean loading fills from rank 0, launcher.model.lean_load).
    `settings` (launcher.distributed.device_settings) give the weight dtype, attention kernel and
    QLoRA compute dtype; by default those of this machine."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    settings = settings or device_settings_of(recipe)
    method = METHODS[recipe.peft.method]
    kwargs = {
        "trust_remote_code": recipe.model.trust_remote_code,
        "revision": recipe.model.revision,
        "dtype": getattr(torch, settings.weight_dtype),
        "attn_implementation": settings.attn_implementation,
    }
    if hasattr(method, "load_kwargs"):
        if on_meta:
            raise NotImplementedError(f"peft.method={recipe.peft.method} changes how the weights load")
        kwargs.update(method.load_kwargs(recipe.peft, device, recipe.model.task, settings))
    if label_names:
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    auto_class = AutoModelForSequenceClassification if recipe.model.task == "classification" else AutoModelForCausalLM
    try:
        if on_meta:
            return build_on_meta(auto_class, model_path, kwargs)
        return auto_class.from_pretrained(model_path, **kwargs)
    except OSError as err:
        raise UserError(f"could not load model.name={recipe.model.name}: {str(err).splitlines()[0]}") from None


def build_model(model_path: str, recipe: Recipe, label_names: list[str] | None, pad_token_id: int | None,
                device: torch.device, on_meta: bool, settings=None) -> torch.nn.Module:
    """The model as training starts: loaded (or built on meta), checkpointing set, the method applied."""
    # Seeded here, not once per run: a rank that tries the meta device and falls back rebuilds with
    # the same draws (adapter initialisation) as rank 0.
    _seed_everything(recipe.train.seed)
    model = load_model(model_path, recipe, label_names, device, on_meta=on_meta, settings=settings)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)
    # Training and evaluation never reuse keys and values; and with a cache transformers ignores the
    # packed-sequence position ids (data.packing=pack). generate() turns it back on for samples.
    model.config.use_cache = False
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    ctx = MethodContext(task=recipe.model.task, model_path=model_path,
                        gradient_checkpointing=recipe.train.gradient_checkpointing,
                        gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)
    model = METHODS[recipe.peft.method].apply(model, recipe.peft, ctx)
    float32_trainable(model)
    return model


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def quiet_library_progress_bars() -> None:
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def announce(message: str, is_main: bool) -> None:
    if is_main:
        print(f"[tunefleet] {message}", flush=True)


def build_run(recipe: Recipe, recipe_name: str, command: list[str]) -> Run:
    inputs = _prepare_inputs(recipe)
    setup = _resolve_setup(recipe, inputs)
    accelerator = _start_processes(recipe, setup)
    # Before the model loads: a requeued job whose run already finished costs seconds, not a model load.
    folder = _claim_run_dir(accelerator, recipe, recipe_name, command, setup.backend, inputs.data)
    model, trainable, total = _load_model_and_method(recipe, inputs, setup, accelerator)
    plan, steps = _plan_batches(recipe, inputs.data, setup, accelerator)
    prepared = _prepare_training(recipe, setup, accelerator, model, steps)
    teacher = _load_teacher(recipe, inputs, setup, accelerator)
    if accelerator.is_main_process:
        _write_distributed_json(folder.run_dir, recipe, setup, accelerator, plan, prepared.optimizer_description)
    return Run(recipe=recipe, accelerator=accelerator, model=prepared.model, tokenizer=inputs.tokenizer,
               optimizer=prepared.optimizer, scheduler=prepared.scheduler, data=inputs.data, plan=plan,
               total_steps=steps, run_dir=folder.run_dir, trainable_params=trainable, total_params=total,
               backend=setup.backend, resume_from=folder.resume_from, resumed=folder.resumed,
               teacher=teacher, layout=setup.layout)


@dataclass
class Inputs:
    """What the run trains: the model's files, tokenizer and tokenized data, and the distillation plan."""

    model_path: str  # the student's, when the recipe distills
    tokenizer: object
    data: PreparedData
    distill_plan: object | None = None  # launcher.train.distill's plan when the recipe distills


def _prepare_inputs(recipe: Recipe) -> Inputs:
    """Model conversion and tokenization, before any process group exists (launcher.cache serialises them)."""
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not sys.stderr.isatty():
        quiet_library_progress_bars()  # their carriage-return frames turn log files into walls of fragments
    model_path = materialize(recipe.model.name)
    tokenizer = load_tokenizer(model_path, recipe)
    distill_plan = None
    if recipe.distill:  # teacher and student resolved and checked before any model loads
        from launcher.train import distill

        distill_plan = distill.plan_distillation(recipe, model_path, tokenizer)
        model_path = distill_plan.student_path
    data = prepare_data(recipe, tokenizer, quiet=not local_main)
    if distill_plan:
        distill.check_teacher_labels(distill_plan, data.label_names)
    return Inputs(model_path, tokenizer, data, distill_plan)


@dataclass
class Setup:
    """How this machine runs the recipe: device settings, micro batch layout and distributed backend."""

    settings: object  # launcher.distributed.device_settings, fitted to the model
    layout: str  # data.packing resolved for this model
    packing_why: str | None  # why the layout fell back, said once the model is announced
    backend: Backend
    teaching: bool  # a teacher's logits join the loss (distill.alpha > 0)


def _resolve_setup(recipe: Recipe, inputs: Inputs) -> Setup:
    settings = fit_to_model(device_settings_of(recipe), recipe, inputs.model_path)
    apply_process_settings(settings)
    teaching = bool(recipe.distill and recipe.distill.alpha > 0)  # alpha=0: labels alone, no teacher
    # Before the process group and the model: a refusal costs seconds. Every rank decides alike (seeded, CPU).
    teacher_path = inputs.distill_plan.teacher_path if teaching else None
    layout, packing_why = packing_layout(recipe, inputs.model_path, settings.attn_implementation, teacher_path)
    backend = make_backend(recipe, recipe.gradient_accumulation_steps, settings.precision, settings)
    backend.prepare_environment()
    return Setup(settings, layout, packing_why, backend, teaching)


def _start_processes(recipe: Recipe, setup: Setup) -> accelerate.Accelerator:
    """The process group (with the recipe's timeout) and accelerate's view of it, checked against the recipe."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_cpu = not torch.cuda.is_available()
    handlers = []
    if "WORLD_SIZE" in os.environ:
        # gloo must be named on CPU: without it accelerate picks a backend DeepSpeed and FSDP reject.
        handlers.append(InitProcessGroupKwargs(
            backend="gloo" if use_cpu else "nccl", timeout=timedelta(minutes=recipe.distributed.timeout_minutes)
        ))
    # No gradient_accumulation_steps for accelerate: the loop decides when gradients synchronise.
    accelerator = Accelerator(**{"cpu": use_cpu, "mixed_precision": setup.settings.precision,
                                 "kwargs_handlers": handlers, **setup.backend.accelerator_kwargs()})
    setup.backend.check_accelerator(accelerator)
    if accelerator.num_processes != recipe.distributed.world_size:
        raise UserError(
            f"this run has {accelerator.num_processes} processes but the recipe says "
            f"distributed.num_processes x num_machines = {recipe.distributed.world_size}; "
            "launch with `tunefleet run`, or pass matching distributed.* keys"
        )
    return accelerator


@dataclass
class RunFolder:
    run_dir: Path
    resume_from: Path | None  # the checkpoint train.resume resolved to
    resumed: CheckpointRecord | None  # its trainer_state.json, checked against this run


def _claim_run_dir(accelerator, recipe: Recipe, recipe_name: str, command: list[str], backend: Backend,
                   data: PreparedData) -> RunFolder:
    """The run folder and the checkpoint to continue, refused if it may not be; RunAlreadyFinished if done."""
    run_dir, resume_from, finished = _make_run_dir(accelerator, recipe, recipe_name, command)
    if finished:
        raise RunAlreadyFinished(run_dir)
    resumed = None
    if resume_from is not None:  # refused here, before the model loads, if it may not be continued
        resumed = check_resumable(resume_from, recipe, accelerator.num_processes, backend, data.cache_key)
    return RunFolder(run_dir, resume_from, resumed)


def _load_model_and_method(recipe: Recipe, inputs: Inputs, setup: Setup,
                           accelerator) -> tuple[torch.nn.Module, int, int]:
    """The model with the method applied (not yet wrapped by the backend); its trainable and total parameters."""
    from launcher.train.chunked_loss import prepare_chunked_loss

    is_main = accelerator.is_main_process
    # The backend decides which ranks read the weights; the others build on the meta device.
    model = setup.backend.build_model(accelerator, partial(
        build_model, inputs.model_path, recipe, inputs.data.label_names, inputs.tokenizer.pad_token_id,
        accelerator.device, settings=setup.settings))
    unchunked = prepare_chunked_loss(model, recipe)  # before the backend wraps the model
    if recipe.model.task == "causal_lm":
        what = "distillation loss (cross-entropy and KL)" if setup.teaching else "cross-entropy"
        announce(f"loss: {what} in chunks of tokens (no full logits)" if unchunked is None
                 else f"loss: {what} over full logits ({unchunked})", is_main)
    trainable, total = parameter_counts(model)
    announce(f"method {recipe.peft.method}: {trainable:,} trainable of {total:,} parameters "
             f"({100 * trainable / total:.4f}%)", is_main)
    return model, trainable, total


def _plan_batches(recipe: Recipe, data: PreparedData, setup: Setup, accelerator) -> tuple[BatchPlan, int]:
    """Which examples each rank takes at each step, and how many steps the run takes."""
    is_main, world_size = accelerator.is_main_process, accelerator.num_processes
    if setup.packing_why:
        announce(setup.packing_why, is_main)
    split = split_batch(recipe.train.global_batch_size, recipe.train.micro_batch_size, world_size)
    if split.note:
        announce(split.note, is_main)
    plan = BatchPlan(
        num_examples=len(data.train), global_batch_size=split.global_batch, micro_batch_size=split.micro,
        world_size=world_size, rank=accelerator.process_index, seed=recipe.train.seed,
        lengths=example_lengths(data.train) if setup.layout == "group_by_length" else None,
    )
    steps = total_steps(recipe.train, plan.num_examples, plan.global_batch_size)
    announce(f"global batch {split.global_batch} = micro batch {split.micro} x "
             f"accumulation {plan.accumulation} x world size {world_size}; "
             f"{len(data.train)} training examples, {steps} steps; micro batches "
             f"{LAYOUT_WORDS[setup.layout].format(max_seq_len=recipe.data.max_seq_len)}", is_main)
    return plan, steps


@dataclass
class Prepared:
    """The model and optimizer as the backend wrapped them, and the schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    optimizer_description: dict  # of the raw optimizer, for distributed.json


def _prepare_training(recipe: Recipe, setup: Setup, accelerator, model: torch.nn.Module, steps: int) -> Prepared:
    """The backend wraps or shards the model and builds the optimizer; the schedule drives the raw one."""
    make_optimizer = OptimizerMaker(recipe.train, fused=setup.settings.fused_adamw)
    model, optimizer = setup.backend.prepare(accelerator, model, make_optimizer)
    scheduler = build_scheduler(make_optimizer.raw, recipe.train, steps)
    accelerator.register_for_checkpointing(scheduler)
    announce(f"backend: {setup.backend.name}", accelerator.is_main_process)
    return Prepared(model, optimizer, scheduler, make_optimizer.description)


def _load_teacher(recipe: Recipe, inputs: Inputs, setup: Setup, accelerator):
    """The teacher (launcher.train.distill.Teacher) when the recipe distills with distill.alpha > 0, else None."""
    if not inputs.distill_plan:
        return None
    from launcher.train import distill

    if not setup.teaching:  # the student is still cut as asked: the baseline a distilled run is compared with
        announce(f"distillation off (distill.alpha=0): {distill.describe_student(inputs.distill_plan)} trains on the "
                 "labels alone; no teacher is loaded", accelerator.is_main_process)
        return None
    teacher = distill.load_teacher(inputs.distill_plan, recipe, inputs.data.label_names, accelerator.device,
                                   setup.settings.precision)
    announce(distill.describe(inputs.distill_plan, teacher, recipe), accelerator.is_main_process)
    return teacher


def _write_distributed_json(run_dir: Path, recipe: Recipe, setup: Setup, accelerator, plan: BatchPlan,
                            optimizer_description: dict) -> None:
    """Main process: RUN/distributed.json, how this run is really spread and set up."""
    write_json(run_dir / "distributed.json", {
        "world_size": accelerator.num_processes, "num_machines": recipe.distributed.num_machines,
        "gradient_accumulation_steps": plan.accumulation, "mixed_precision": setup.settings.precision,
        "accelerate": {"distributed_type": accelerator.distributed_type.value, "device": str(accelerator.device),
                       "collective_timeout_minutes": recipe.distributed.timeout_minutes},
        "optimizer": optimizer_description,
        "device_settings": setup.settings.as_json(),
        "packing": {"layout": setup.layout, "fallback": setup.packing_why},
        **setup.backend.resolved_config(accelerator),
    })


LAYOUT_WORDS = {
    "pack": "packed into rows of up to {max_seq_len} tokens (attention within each example)",
    "pack_flat": "flattened into one row per micro batch, no padding (flash attention's variable-length kernel "
                 "keeps each example apart)",
    "group_by_length": "grouped by length within each rank's share of the global batch",
    "none": "padded to their longest example",
}

# Non-reentrant checkpointing works with frozen inputs (adapters) and with DDP, where the reentrant
# variant raises "parameter marked ready twice". QLoRA passes it on to peft, whose default is reentrant.
GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}


def _make_run_dir(accelerator, recipe: Recipe, recipe_name: str,
                  command: list[str]) -> tuple[Path, Path | None, bool]:
    """The main process decides the folder (rendering {time} once) and the resume point; all ranks follow.

    Returns (run folder, checkpoint to resume from or None, whether that run is already finished).
    """
    from accelerate.utils import broadcast_object_list

    answer = [None, None, False, None]
    if accelerator.is_main_process:
        try:
            choice = choose_run_dir(recipe, recipe_name)
            announce(choice.reason, True)
            answer = [str(choice.run_dir), str(choice.checkpoint) if choice.checkpoint else None, choice.finished,
                      None]
        except UserError as err:
            answer = [None, None, False, str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if answer[3]:
        raise UserError(answer[3])
    run_dir, finished = Path(answer[0]), bool(answer[2])
    recipe.output.dir = str(run_dir)
    if accelerator.is_main_process and not finished:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_recipe(run_dir, recipe, command or sys.argv)
    return run_dir, Path(answer[1]) if answer[1] else None, finished
