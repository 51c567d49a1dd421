"""Which examples each rank sees at each step, as pure arithmetic.

Every epoch is one seeded permutation of the training set. Optimizer step k consumes global batch
k: `global_batch_size` consecutive indices of that permutation. Rank r takes the r-th contiguous
slice and cuts it into `accumulation` micro batches. So the examples that make up a global batch
do not depend on how it is split into micro batches and ranks, and resuming at step k needs no
replay: the schedule is a function of (seed, step).

How a micro batch's examples are laid out never changes which examples it holds. The layouts
(data.packing, resolved for the model and attention kernel by launcher.data.packing_check):
- group_by_length sorts each rank's share of the global batch by length before cutting it into
  micro batches, so examples of similar length share a micro batch and little is padded;
- pack concatenates a micro batch's examples into rows of at most max_seq_len tokens (first fit,
  longest first). Position ids restart at 0 for every example and no attention mask is passed:
  transformers then derives a block-diagonal causal mask from the position ids (SDPA, eager,
  flex), so attention stays within each example, in models whose mask code reads position ids
  (packing_check verifies that on a tiny twin of the model);
- pack_flat lays the whole micro batch out as ONE row, no padding, position ids restarting per
  example (transformers' DataCollatorWithFlattening). It is what flash attention needs: transformers
  derives the variable-length kernel's cu_seqlens from the position ids only for a batch of one
  row; with several rows it runs plain causal attention over each row and packed examples would
  attend to each other.
In both packed layouts the label of each example's first token is ignored: in a packed row it
would be "predicted" by the previous example's last token, unpacked it is never predicted.
All keep the loss of a step equal to the padded layout's (tests/test_packing.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from launcher.data.formats import IGNORE
from launcher.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int
    # Example lengths, for group_by_length: each rank's share is sorted by them (longest first).
    lengths: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.num_examples < self.global_batch_size:
            raise UserError(
                f"the training data has {self.num_examples} examples, fewer than one global batch "
                f"(train.global_batch_size={self.global_batch_size}); add data or lower the batch size"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size  # the ragged tail is dropped each epoch

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def _permutation(self, epoch: int) -> list[int]:
        return _permutation(self.num_examples, self.seed + epoch)

    def epoch(self, step: int) -> int:
        """The 0-based epoch that optimizer step `step` (0-based) belongs to."""
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size]

    def micro_batches(self, step: int) -> list[list[int]]:
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        if self.lengths is not None:
            mine = sorted(mine, key=lambda i: -self.lengths[i])  # stable: ties keep the schedule's order
        size = self.micro_batch_size
        return [mine[i : i + size] for i in range(0, per_rank, size)]


@functools.lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_examples, generator=generator).tolist()


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded label positions are ignored by the loss."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example["labels"])] = torch.tensor(example["labels"])
        batch["labels"] = labels
    return batch


def pack(examples: list[dict], capacity: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate examples into rows of at most `capacity` tokens; attention stays per example."""
    rows = _balanced_rows([len(e["input_ids"]) for e in examples], capacity)
    fill = [sum(len(examples[i]["input_ids"]) for i in row) for row in rows]
    width = max(fill)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            example = examples[i]
            n = len(example["input_ids"])
            input_ids[r, at : at + n] = torch.tensor(example["input_ids"])
            position_ids[r, at : at + n] = torch.arange(n)
            labels[r, at : at + len(example["labels"])] = torch.tensor(example["labels"])
            labels[r, at] = IGNORE
            at += n
        # The padded tail restarts at position 0 too: a block of its own that no example attends to.
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def flatten(examples: list[dict]) -> dict[str, torch.Tensor]:
    """All examples in one row of shape (1, total tokens): no padding, positions restart per example."""
    input_ids = torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(len(e["input_ids"])) for e in examples])[None]
    labels = torch.full_like(input_ids, IGNORE)
    at = 0
    for example in examples:
        labels[0, at : at + len(example["labels"])] = torch.tensor(example["labels"])
        labels[0, at] = IGNORE
        at += len(example["input_ids"])
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


LAYOUTS = ("pack", "pack_flat", "group_by_length", "none")


def lay_out(examples: list[dict], layout: str, max_seq_len: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One micro batch as `layout` (one of LAYOUTS) arranges it; group_by_length and none both pad
    (they differ in which examples share a micro batch, BatchPlan.lengths)."""
    if layout == "pack":
        return pack(examples, max_seq_len, pad_token_id)
    if layout == "pack_flat":
        return flatten(examples)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown micro batch layout {layout!r}; one of {', '.join(LAYOUTS)}")
    return collate(examples, pad_token_id)


def _balanced_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens, padding the fewest positions.

    A micro batch is padded to its fullest row, so the aim is rows of even fill, not merely few
    rows: for each row count from the least that could hold everything, place examples longest
    first into the emptiest row with room, and keep the count whose rows x widest row is smallest.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    least = max(1, -(-sum(lengths) // capacity))
    best, best_slots = [[i] for i in order], len(lengths) * max(lengths)  # one example per row always fits
    for count in range(least, len(lengths)):
        rows, fill = [[] for _ in range(count)], [0] * count
        for i in order:
            row = min((r for r in range(count) if fill[r] + lengths[i] <= capacity), key=fill.__getitem__,
                      default=None)
            if row is None:
                break
            rows[row].append(i)
            fill[row] += lengths[i]
        else:
            slots = count * max(fill)
            if slots < best_slots:
                best, best_slots = rows, slots
    return [row for row in best if row]


def count_tokens(examples: list[dict]) -> int:
    return sum(len(e["input_ids"]) for e in examples)


def example_lengths(dataset) -> tuple[int, ...]:
    """Token count of every example, read from the Arrow column (no Python list of token ids)."""
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[:].column("input_ids")
    return tuple(pc.list_value_length(column).to_pylist())


def count_targets(labels: torch.Tensor) -> int:
    """Examples (classification) or predicted tokens (causal LM, after the one-position shift)."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())
