"""Knowledge distillation: a frozen teacher's soft targets added to the student's task loss.

    loss = (1 - alpha) * task loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

summed over the targets of the micro batch (examples for classification, label tokens for a causal
LM) and divided by the step's normaliser, exactly like the task loss (launcher.train.step); the T^2
keeps the soft term's gradients on the scale of the hard one's as T changes (Hinton et al., 2015).

What is checked before any model loads (`plan_distillation`): the teacher's tokenizer must be the
student's (the teacher reads the student's token ids, and a causal LM's token logits must share a
vocabulary); the classes of a trained classifier teacher must be the data's; the block indices of
`distill.student_layers` must exist; ZeRO-3 is refused (launcher.config.compat says why).

The teacher runs without gradients, in eval mode, in the training precision (bf16/fp16 weights
when the run mixes precision), one forward per micro batch. It is replicated whole on every rank
under every backend (DDP, FSDP2, ZeRO-1/2): a teacher holds no optimizer state or gradients, so
its copy costs only its weights, and a replicated forward is no collective, so ranks can never
wait on each other inside it. A teacher too large to replicate is not supported yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from launcher.config.compat import DISTILL_ZERO3_REASON
from launcher.data.batches import IGNORE
from launcher.errors import UserError
from launcher.model.sources import materialize


@dataclass
class DistillPlan:
    teacher_path: str  # what from_pretrained reads for the teacher
    student_path: str  # what from_pretrained reads for the student (a cut copy with student_layers)
    kept_layers: list[int] | None  # blocks of model.name the student keeps, when cut
    teacher_labels: list[str] | None  # the classes of a teacher trained as a classifier


@dataclass
class Teacher:
    model: torch.nn.Module
    alpha: float
    temperature: float


def plan_distillation(recipe, model_path: str, tokenizer) -> DistillPlan:
    """Resolve teacher and student and refuse what cannot work, before any model loads."""
    from transformers import AutoConfig, AutoTokenizer

    from launcher.model.student_layers import student_folder

    distill = recipe.distill
    _refuse_zero3(recipe)
    hub = {"trust_remote_code": recipe.model.trust_remote_code}
    teacher_path = materialize(distill.teacher) if distill.teacher else model_path
    if distill.teacher:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path, **hub)
        if not same_tokenizer(teacher_tokenizer, tokenizer):
            raise UserError(
                f"distill.teacher={distill.teacher} tokenizes text differently from model.name={recipe.model.name} "
                f"(vocabularies of {len(teacher_tokenizer)} and {len(tokenizer)} tokens, or the same size with "
                "different ids): the teacher reads the student's token ids and its token logits must share the "
                "student's vocabulary. Use a teacher and student of one model family (one tokenizer)")
    kept = None
    student_path = model_path
    if distill.student_layers is not None:
        student_path, kept = student_folder(model_path, distill.student_layers, recipe.model.trust_remote_code)
    config = AutoConfig.from_pretrained(teacher_path, **hub)
    trained_classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    labels = [config.id2label[i] for i in sorted(config.id2label)] if trained_classifier else None
    return DistillPlan(teacher_path=teacher_path, student_path=student_path, kept_layers=kept,
                       teacher_labels=labels)


def same_tokenizer(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def _refuse_zero3(recipe) -> None:
    """compat refuses zero3 by name; a DeepSpeed JSON given as a path is read for its stage here."""
    dist = recipe.distributed
    if dist.backend != "deepspeed" or not dist.config:
        return
    from launcher.distributed.deepspeed_config import read_ds_config, zero_stage

    if zero_stage(read_ds_config(dist.config)) == 3:
        raise UserError(f"distill does not run under distributed.config={dist.config} (ZeRO-3): {DISTILL_ZERO3_REASON}")


def check_teacher_labels(plan: DistillPlan, label_names: list[str] | None) -> None:
    """A trained classifier teacher must score the data's classes, in the data's order."""
    if label_names and plan.teacher_labels and plan.teacher_labels != list(label_names):
        raise UserError(f"the teacher classifies into {plan.teacher_labels} but the data's labels are "
                        f"{list(label_names)}: set data.labels to the teacher's classes in its order, "
                        "or use a teacher trained on these labels")


def teacher_dtype(recipe, precision: str) -> torch.dtype:
    """The training precision: mixed bf16/fp16 runs keep the frozen teacher in that dtype outright."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, getattr(torch, recipe.model.dtype))


def load_teacher(plan: DistillPlan, recipe, label_names: list[str] | None, device: torch.device,
                 precision: str) -> Teacher:
    """The frozen teacher on `device`, built identically on every rank without touching the run's RNG."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    kwargs = {"dtype": teacher_dtype(recipe, precision), "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.task == "classification":
        auto = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    else:
        auto = AutoModelForCausalLM
    devices = [device] if device.type == "cuda" else []
    # Forked: a teacher without a trained head draws one; that must not shift the student's dropout
    # masks (alpha=0 stays plain training), and seeded so that every rank draws the same head.
    with torch.random.fork_rng(devices=devices):
        set_seed(recipe.train.seed)
        model = auto.from_pretrained(plan.teacher_path, **kwargs)
    model.config.use_cache = False
    model.requires_grad_(False)
    model.eval()
    return Teacher(model=model.to(device), alpha=recipe.distill.alpha, temperature=recipe.distill.temperature)


def describe_student(plan: DistillPlan) -> str:
    return (f"student model.name cut to blocks {plan.kept_layers}" if plan.kept_layers is not None
            else "student model.name as it is")


def describe(plan: DistillPlan, teacher: Teacher, recipe) -> str:
    distill = recipe.distill
    params = sum(p.numel() for p in teacher.model.parameters())
    head = "" if recipe.model.task != "classification" or plan.teacher_labels else \
        " (WARNING: the teacher has no trained classification head; its class logits come from a new one)"
    return (f"distillation: teacher {distill.teacher or recipe.model.name} ({params:,} parameters, "
            f"{str(next(teacher.model.parameters()).dtype).removeprefix('torch.')}, replicated on every rank){head}; "
            f"{describe_student(plan)}; loss = {1 - distill.alpha:g} x task + {distill.alpha:g} x "
            f"T^2 KL at T={distill.temperature:g}")


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * sum over rows of KL(softmax(teacher/T) || softmax(student/T)); rows are targets, the last dim classes."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
    return kl * temperature**2


def distillation_loss(model, teacher: Teacher, batch: dict, normalizer: torch.Tensor,
                      classification: bool) -> torch.Tensor:
    """(1 - alpha) * task loss + alpha * soft-target loss, summed over the targets / normalizer."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student_logits = model(**inputs).logits.float()
    with torch.no_grad():
        teacher_logits = teacher.model(**inputs).logits
    labels = batch["labels"]
    if not classification:
        # Position t predicts token t + 1; only label tokens are targets, as in the task loss.
        keep = labels[:, 1:] != IGNORE
        labels = labels[:, 1:][keep]
        student_logits, teacher_logits = student_logits[:, :-1][keep], teacher_logits[:, :-1][keep]
    task = F.cross_entropy(student_logits, labels, reduction="sum")
    # A model may pad its embedding rows beyond the tokenizer: compare the shared vocabulary only.
    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
    soft = soft_target_loss(student_logits[..., :shared], teacher_logits[..., :shared], teacher.temperature)
    return ((1 - teacher.alpha) * task + teacher.alpha * soft) / normalizer
