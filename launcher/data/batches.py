"""Which examples each rank sees at each step, as pure arithmetic.

Every epoch is one seeded permutation of the training set. Optimizer step k consumes global batch
k: `global_batch_size` consecutive indices of that permutation. Rank r takes the r-th contiguous
slice and cuts it into `accumulation` micro batches. So the examples that make up a global batch
do not depend on how it is split into micro batches and ranks, and resuming at step k needs no
replay: the schedule is a function of (seed, step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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

    def global_batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size]

    def micro_batches(self, step: int) -> list[list[int]]:
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
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


def count_targets(labels: torch.Tensor) -> int:
    """Examples (classification) or predicted tokens (causal LM, after the one-position shift)."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())
