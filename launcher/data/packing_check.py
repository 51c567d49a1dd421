"""Whether packed examples stay apart in this model, checked on a tiny twin of it, not looked up by name.

data.packing=pack puts several examples in one row with restarting position ids and no attention
mask, and trusts transformers to build a block-diagonal causal mask from those position ids (or,
under flash attention, variable-length kernels). Models whose mask code ignores position ids do not
(ALiBi models such as Bloom and MPT build their mask and bias from the row alone; remote code and
state-space layers may do anything), and then packed examples attend to each other with no error:
the loss is just wrong. A list of model names would go stale with every release, so the model
itself is asked: a twin with the architecture of model.name (launcher.model.twin: its config with
narrow widths, the same layers and layer types, random weights, float32, on the CPU) runs a micro
batch laid out exactly as the collator lays it out, and each example's logits must equal those of
the example run alone. Tens of milliseconds for a tiny twin (tenths of a second where a large
vocabulary stays whole because a special token id lies beyond a narrow one), cached per (config,
kernel) in-process, and the same answer on every rank (seeded, on the CPU, with a tolerance far
above float32 noise and far below any leak: seen 1e-7 sound, 1e-2 and more leaking).

The kernel the twin runs is the run's where it runs on a CPU (sdpa, eager). flex_attention compiles
for tens of seconds on a CPU, so sdpa stands in (transformers builds both masks from the same
mask functions). flash_attention_2 needs a GPU, so a CPU stand-in runs what transformers' flash
path runs: cu_seqlens derived from the position ids with transformers' own helpers, and only when
it would (a batch of one row), else causal attention over the whole row. So the check also fails
a model whose attention never receives the position ids. (Model code that branches on the kernel's
name containing "flash" takes its other branch here; the GPU check covers the real kernel.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launcher.config.compat import resolved_packing
from launcher.data.batches import collate, lay_out
from launcher.errors import UserError
from launcher.model.attention import FLASH
from launcher.model.twin import VOCAB, build_twin, twin_config

# Two short examples in one row and one alone with a padded tail (rows of at most 9 tokens:
# [7] and [5, 4]): the rows, the restart and the tail are all as in training. Flattened: one row.
PROBE_LENGTHS = (7, 5, 4)
PROBE_ROW = 9
PAD = 0
# Relative to the largest logit: float32 noise between the layouts is ~1e-7, a leak 1e-2 or more.
TOLERANCE = 1e-4
# No "flash" in the name: transformers would look for a flash kernel to load for it.
STAND_IN = "tunefleet_varlen_stand_in"


@dataclass(frozen=True)
class PackingVerdict:
    architecture: str  # e.g. BloomForCausalLM
    kernel: str  # what the twin ran, in words
    sound: bool | None  # None: the twin could not be built or run
    detail: str  # the largest difference seen, or why the twin could not be checked

    def problem(self) -> str | None:
        """The one-line problem a user reads, or None when packing is sound."""
        if self.sound:
            return None
        if self.sound is None:
            return (f"could not build a tiny twin of {self.architecture} to check that packed examples stay apart "
                    f"({self.detail})")
        return f"{self.architecture} lets packed examples attend to each other (checked on a tiny twin, {self.kernel})"


def packing_layout(recipe, model_path: str, attn_implementation: str,
                   teacher_path: str | None = None) -> tuple[str, str | None]:
    """The micro batch layout this run uses, and one line saying why packing was given up (else None).

    Starts from the recipe's answer (launcher.config.compat.resolved_packing). Packing is kept only
    if the model (and the distillation teacher, which reads the same batches) keeps packed examples
    apart; under flash_attention_2 it is "pack_flat" (one flattened row per micro batch). An
    explicit data.packing=pack that fails is refused; auto falls back to group_by_length.
    """
    layout = resolved_packing(recipe)
    if layout != "pack":
        return layout, None
    layout = "pack_flat" if attn_implementation == FLASH else "pack"
    # The teacher loads with transformers' default kernel (launcher.train.distill.load_teacher).
    checks = [("model.name", model_path, attn_implementation)]
    if teacher_path is not None and teacher_path != model_path:
        checks.append(("distill.teacher", teacher_path, None))
    for key, path, kernel in checks:
        verdict = check_packing(path, kernel, layout, recipe.model.trust_remote_code, recipe.model.revision)
        problem = verdict.problem()
        if problem is None:
            continue
        if key != "model.name":
            problem = f"{key} {problem}"
        if recipe.data.packing == "pack":
            raise UserError(f"data.packing=pack: {problem}, so the loss would mix examples; use "
                            "data.packing=group_by_length (or auto, which falls back to it by itself)")
        return "group_by_length", f"data.packing: {problem}; grouping by length instead"
    return layout, None


_VERDICTS: dict[tuple, PackingVerdict] = {}


def check_packing(model_path: str, attn_implementation: str | None, layout: str, trust_remote_code: bool = False,
                  revision: str | None = None) -> PackingVerdict:
    """Whether `layout` ("pack" or "pack_flat") keeps examples apart in a tiny twin of `model_path`
    running `attn_implementation` (None: transformers' default). Cached in-process."""
    from transformers import AutoConfig

    kernel, kernel_words = _probe_kernel(attn_implementation)
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001 - the model load reports it properly; here it means "unchecked"
        return PackingVerdict(model_path, kernel_words, None, f"its config did not load: {_first_line(err)}")
    architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
    # Remote code lives next to the config: the same config text in two folders may be two models.
    key = (config.to_json_string(), attn_implementation, layout, model_path if trust_remote_code else None)
    if key not in _VERDICTS:
        _VERDICTS[key] = _check(config, architecture, kernel, kernel_words, layout, trust_remote_code)
    return _VERDICTS[key]


def _probe_kernel(attn_implementation: str | None) -> tuple[str | None, str]:
    if attn_implementation == FLASH:
        return STAND_IN, "a CPU stand-in for flash-attn's variable-length path"
    if attn_implementation == "flex_attention":
        return "sdpa", "sdpa standing in for flex_attention"
    if attn_implementation is None:
        return None, "transformers' default attention"
    return attn_implementation, f"{attn_implementation} attention"


def _check(config, architecture: str, kernel: str | None, kernel_words: str, layout: str,
           trust_remote_code: bool) -> PackingVerdict:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a twin's config warnings are not the user's concern
    try:
        # Forked and seeded around the forward too (build_twin forks its own draws): whatever the twin
        # draws is the same on every rank, and the run's random state is untouched.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            try:
                model = _build_twin(config, kernel, trust_remote_code)
            except Exception as err:  # noqa: BLE001 - any failure means "could not check"
                return PackingVerdict(architecture, kernel_words, None, _first_line(err))
            try:
                leak = _largest_leak(model, layout, min(VOCAB, model.config.get_text_config().vocab_size))
            except Exception as err:  # noqa: BLE001
                detail = f"the twin's forward failed: {_first_line(err)}"
                return PackingVerdict(architecture, kernel_words, None, detail)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return PackingVerdict(architecture, kernel_words, leak <= TOLERANCE, f"largest relative difference {leak:.1e}")


def _build_twin(config, kernel: str | None, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if kernel == STAND_IN:
        _register_flash_stand_in()
    twin = twin_config(config)
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": torch.float32, "attn_implementation": kernel}
    return build_twin(lambda: AutoModelForCausalLM.from_config(twin, **kwargs)).eval()


def _largest_leak(model, layout: str, vocab: int) -> float:
    """The largest difference, relative to the largest logit, between an example's logits in the
    packed batch and alone."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in PROBE_LENGTHS:
        ids = torch.randint(PAD + 1, vocab, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    packed = lay_out(examples, layout, PROBE_ROW, PAD)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    worst, found = 0.0, 0
    for row in range(packed["input_ids"].shape[0]):
        positions = packed["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            segment = packed["input_ids"][row, start:end].tolist()
            example = next((e for e in examples if e["input_ids"] == segment), None)
            if example is None:  # the padded tail
                continue
            found += 1
            alone = model(**{k: v for k, v in collate([example], PAD).items() if k != "labels"},
                          use_cache=False).logits[0]
            difference = (logits[row, start:end] - alone).abs().max() / alone.abs().max().clamp(min=1.0)
            worst = max(worst, float(difference))
    if found != len(examples):
        raise RuntimeError(f"found {found} of {len(examples)} probe examples in the {layout} batch")
    return worst


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _register_flash_stand_in() -> None:
    """Register STAND_IN with transformers: flash's mask function (no mask without padding) and an
    attention function that computes what flash_attention_2 would, in torch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(STAND_IN, _flash_varlen_stand_in)
    AttentionMaskInterface.register(STAND_IN, flash_attention_mask)


def _flash_varlen_stand_in(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, position_ids=None, **kwargs):
    """transformers' flash path (modeling_flash_attention_utils._flash_attention_forward) in torch:
    variable-length attention where it would derive cu_seqlens from the position ids (a batch of one
    row with restarting positions), else one causal attention over each whole row. Shapes in as
    transformers' attention functions take them, (batch, heads, seq, head_dim); out (batch, seq, heads,
    head_dim)."""
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    if attention_mask is not None:
        raise NotImplementedError("the stand-in covers padding-free layouts only (no attention mask)")
    causal = module.is_causal if is_causal is None else is_causal
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the shared heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    attend = torch.nn.functional.scaled_dot_product_attention
    if _is_packed_sequence(position_ids, query.shape[0]):
        (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        bounds = cu_seqlens.tolist()
        out = torch.cat([attend(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=causal, scale=scaling)
                         for a, b in zip(bounds, bounds[1:])], dim=2)
    else:
        out = attend(query, key, value, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None
