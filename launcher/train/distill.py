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

Memory (causal LM): the soft term compares two distributions over the whole vocabulary at every
label token, so computed plainly it holds several (tokens x vocab) float32 tensors at once (both
models' logits, their log-softmaxes, the gradient). Here the loss and its gradient are computed a
chunk of tokens at a time (`kl_objective`, run by launcher.train.chunked_loss): the student's head
computes the whole loss inside its forward (when train.chunked_loss patched it), and the teacher
hands back its final hidden states, not its logits, when its head is a plain Linear whose output
is its loss's input (the probe of launcher.train.loss_check); then no tensor of tokens x vocab exists,
and `kl_transient_bytes` is what one chunk holds. Otherwise the student's logits (and their
gradient, in their dtype) or the teacher's logits are the only full-vocabulary tensors.
"""

from __future__ import annotations

import contextlib
import types
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
    pad_token_id: int | None = None  # the (shared) tokenizer's, for a teacher whose config names none


@dataclass
class Teacher:
    model: torch.nn.Module
    alpha: float
    temperature: float
    hands_hidden: bool = False  # causal LM: its head can hand back its input (see teacher_targets)


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
    if recipe.model.task == "classification" and distill.alpha > 0 and not trained_classifier:
        raise _untrained_head(recipe, f"its config names the architectures {config.architectures}")
    labels = [config.id2label[i] for i in sorted(config.id2label)] if trained_classifier else None
    return DistillPlan(teacher_path=teacher_path, student_path=student_path, kept_layers=kept,
                       teacher_labels=labels, pad_token_id=tokenizer.pad_token_id)


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


def _untrained_head(recipe, evidence: str) -> UserError:
    teacher = f"distill.teacher={recipe.distill.teacher}" if recipe.distill.teacher else \
        f"distill.teacher (unset: model.name={recipe.model.name} teaches)"
    return UserError(f"{teacher} has no trained classification head ({evidence}): its class logits would come "
                     "from a randomly drawn head, and the student would learn noise. Use a teacher trained as a "
                     "classifier on these labels (a finished classify_lora or classify_head run folder, or a "
                     "*ForSequenceClassification checkpoint), or set distill.alpha=0")


def teacher_dtype(recipe, precision: str) -> torch.dtype:
    """The compute dtype: mixed bf16/fp16 runs keep the frozen teacher in that dtype outright; other runs
    use model.dtype, whose "auto" is float32 there (launcher.distributed.device_settings)."""
    if precision in ("bf16", "fp16"):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.float32 if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)


def load_teacher(plan: DistillPlan, recipe, label_names: list[str] | None, device: torch.device,
                 precision: str) -> Teacher:
    """The frozen teacher on `device`, built identically on every rank without touching the run's RNG."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    kwargs = {"dtype": teacher_dtype(recipe, precision), "trust_remote_code": recipe.model.trust_remote_code,
              "output_loading_info": True}
    classification = recipe.model.task == "classification"
    if classification:
        auto = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    else:
        auto = AutoModelForCausalLM
    devices = [device] if device.type == "cuda" else []
    # Forked and seeded: loading must not shift the student's dropout masks (alpha=0 stays plain
    # training), and whatever a load draws is the same on every rank.
    with torch.random.fork_rng(devices=devices):
        set_seed(recipe.train.seed)
        model, info = auto.from_pretrained(plan.teacher_path, **kwargs)
    if classification:
        # The config said a classifier (plan_distillation); the weights must say it too: a head
        # transformers had to draw is one nobody trained.
        prefix = f"{model.base_model_prefix}."
        drawn = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(prefix))
        if drawn:
            raise _untrained_head(recipe, f"its checkpoint lacks {', '.join(drawn)}")
    model.config.use_cache = False
    if model.config.pad_token_id is None:  # as for the student (launcher.train.build): a classifier finds
        model.config.pad_token_id = plan.pad_token_id  # each row's last token by it
    model.requires_grad_(False)
    model.eval()
    hands_hidden = not classification and hand_hidden_states(model)
    return Teacher(model=model.to(device), alpha=recipe.distill.alpha, temperature=recipe.distill.temperature,
                   hands_hidden=hands_hidden)


def describe_student(plan: DistillPlan) -> str:
    return (f"student model.name cut to blocks {plan.kept_layers}" if plan.kept_layers is not None
            else "student model.name as it is")


def describe(plan: DistillPlan, teacher: Teacher, recipe) -> str:
    distill = recipe.distill
    params = sum(p.numel() for p in teacher.model.parameters())
    return (f"distillation: teacher {distill.teacher or recipe.model.name} ({params:,} parameters, "
            f"{str(next(teacher.model.parameters()).dtype).removeprefix('torch.')}, replicated on every rank); "
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
    """(1 - alpha) * task loss + alpha * soft-target loss, summed over the targets / normalizer (plus a
    mixture of experts' router term while training, as launcher.train.router_loss weighs it)."""
    from launcher.train.chunked_loss import causal_lm_loss, chunked_loss_prepared, logits_loss
    from launcher.train.router_loss import config_of, router_aux_coef, router_loss

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if classification:  # a few logits per example: plainly
        student_logits = model(**inputs).logits.float()
        with torch.no_grad():
            teacher_logits = teacher.model(**inputs).logits
        task = F.cross_entropy(student_logits, batch["labels"], reduction="sum")
        soft = soft_target_loss(student_logits, teacher_logits, teacher.temperature)
        return ((1 - teacher.alpha) * task + teacher.alpha * soft) / normalizer
    objective = kl_objective(teacher_targets(teacher, inputs), teacher.alpha, teacher.temperature)
    if chunked_loss_prepared(model):  # the student's head computes it all, a chunk at a time
        return causal_lm_loss(model, batch, normalizer, objective)
    output = model(**inputs)
    labels = batch["labels"].to(output.logits.device)
    # Position t predicts token t + 1; only label tokens are targets, as in the task loss.
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    loss = logits_loss(output.logits, shifted, objective) / normalizer
    router = router_loss(output, router_aux_coef(config_of(model)), labels, normalizer) if model.training else None
    return loss if router is None else loss + router


# ---------------------------------------------------------------------------- the soft targets, a chunk at a time


_hidden_wanted = False  # set around one teacher call by teacher_targets


def _hidden_or_logits(self, hidden: torch.Tensor) -> torch.Tensor:
    """The teacher head's forward: its input while teacher_targets asks for it, else its logits."""
    return hidden if _hidden_wanted else type(self).forward(self, hidden)


def hand_hidden_states(model: torch.nn.Module) -> bool:
    """Let a causal-LM teacher hand back its final hidden states instead of its logits (teacher_targets),
    if its head is a plain Linear whose output its own loss reads as it is (launcher.train.loss_check's
    probe); else (False) it keeps handing back its logits."""
    from launcher.train.loss_check import refusal

    if refusal(model, "causal_lm") is not None:
        return False
    head = model.get_output_embeddings()
    head.forward = types.MethodType(_hidden_or_logits, head)  # bound: follows a deepcopy
    return True


@contextlib.contextmanager
def _hidden_states_out():
    global _hidden_wanted
    _hidden_wanted = True
    try:
        yield
    finally:
        _hidden_wanted = False


@dataclass
class TeacherTargets:
    """What one teacher forward leaves for the loss: its logits, or its final hidden states and its head."""

    rows: torch.Tensor  # (positions, vocab) logits or (positions, hidden) hidden states, flattened
    weight: torch.Tensor | None = None  # the head's, when rows are hidden states
    bias: torch.Tensor | None = None

    @property
    def vocab(self) -> int:
        return self.rows.shape[-1] if self.weight is None else self.weight.shape[0]

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        """float32 logits (len(index), vocab) of these flattened positions, computed in the teacher's dtype."""
        rows = self.rows.index_select(0, index)
        if self.weight is not None:
            rows = F.linear(rows, self.weight, self.bias)
        return rows.float()


def teacher_targets(teacher: Teacher, inputs: dict) -> TeacherTargets:
    with torch.no_grad():
        if not teacher.hands_hidden:
            logits = teacher.model(**inputs).logits
            return TeacherTargets(logits.reshape(-1, logits.shape[-1]))
        with _hidden_states_out():
            hidden = teacher.model(**inputs).logits
    head = teacher.model.get_output_embeddings()
    return TeacherTargets(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, dim=1) without a product of their size."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def kl_objective(teacher: TeacherTargets, alpha: float, temperature: float):
    """The loss of one chunk of student logits (a launcher.train.chunked_loss.ChunkObjective):
    (1 - alpha) * cross-entropy + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)), the
    KL over the vocabulary both models share, and its gradient in place of the logits.

    With s the student's logits, t the teacher's, p = softmax(t / T), q = softmax(s / T):
    KL = sum p (t - s) / T - lse(t / T) + lse(s / T), and its gradient with respect to s is
    (q - p) / T, so the soft term's is alpha * T * (q - p). Three float32 chunks exist at once at
    most (s, then p with t or with q): kl_transient_bytes counts them.
    """
    t_sq = temperature**2

    # `index` counts the student's positions, which are the teacher's: methods that add virtual tokens
    # are refused with distill (launcher.config.compat).
    def objective(logits, index, target, want_grad):
        shared = min(logits.shape[1], teacher.vocab)  # a model may pad its head beyond the tokenizer
        picked = logits.gather(1, target[:, None]).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        # The teacher: p, and sum p * (t / T - its max) for the KL's first term.
        t = teacher.logits(index)
        if t.shape[1] > shared:
            t = t[:, :shared].contiguous()
        t.div_(temperature)
        t_top = t.amax(dim=1, keepdim=True)
        p = t.sub_(t_top).exp()
        t_total = p.sum(dim=1, keepdim=True)
        p_dot_t = _rowdot(p, t) / t_total.squeeze(1)
        t = None  # noqa: F841 (its chunk goes before q's is allocated)
        p.div_(t_total)
        # The student at T over the shared vocabulary, read before the cross-entropy overwrites s.
        student = logits[:, :shared]
        p_dot_s = _rowdot(p, student) / temperature
        q = student.sub(top).div_(temperature).exp_()
        q_total = q.sum(dim=1, keepdim=True)
        kl = p_dot_t - t_total.log().squeeze(1) - p_dot_s + (top / temperature + q_total.log()).squeeze(1)
        # The task's cross-entropy over the student's whole vocabulary, in place of s.
        exps = logits.sub_(top).exp_()
        total = exps.sum(dim=1, keepdim=True)
        task = (top + total.log()).squeeze(1).sub_(picked)
        loss = (1 - alpha) * task.sum() + alpha * t_sq * kl.sum()
        if not want_grad:
            return loss, None
        grad = exps.div_(total)
        grad[torch.arange(target.numel(), device=grad.device), target] -= 1.0
        grad.mul_(1 - alpha)
        grad[:, :shared].add_(q.div_(q_total).sub_(p), alpha=alpha * temperature)
        return loss, grad

    return objective


def kl_transient_bytes(tokens: int, vocab: int, hidden: int) -> int:
    """Bytes the chunked distillation loss of a micro batch of `tokens` tokens holds at its peak, on top of
    what stays for backward, when the student's head was patched by train.chunked_loss and the teacher
    hands back its hidden states: three float32 chunks of logits (kl_objective) and one 16-bit chunk
    (the matmul's output before its float32 copy), each chunk_tokens(tokens, vocab, hidden) x vocab.
    What stays for backward is the chunked cross-entropy's: the hidden states' gradient (tokens x
    hidden in their dtype) and, when the head trains, its weight's. The planner needs a torch-free
    twin of this (as launcher.planning.memory.chunk_tokens is of chunk_tokens)."""
    from launcher.train.chunked_loss import chunk_tokens

    return chunk_tokens(tokens, vocab, hidden) * vocab * (3 * 4 + 2)
