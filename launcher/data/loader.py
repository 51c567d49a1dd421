"""The training loop's feed: each step's micro batches, built ahead of time off the training thread.

A torch DataLoader iterates over step numbers (not examples): item k is optimizer step k's
micro batches for this rank, laid out as data.packing says, with the counts the step needs
(targets for the loss normalisation, real tokens and padded slots for throughput). With
data.loader_workers > 0 worker processes build the next steps while the current one trains
(prefetch 2 per worker; pinned memory on GPU), so the accelerator never waits for collation.
Nothing here is random: a step's batches are a function of (seed, step), so resuming at step k
starts the feed at k and every worker count gives the same batches. data.augment keeps that: an
example's variant is a function of (seed, epoch, example index), made here with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launcher.data.augment import Augmenter
from launcher.data.batches import BatchPlan, count_targets, count_tokens, lay_out

PREFETCH_PER_WORKER = 2


@dataclass
class StepBatches:
    batches: list[dict[str, torch.Tensor]]
    targets: int  # loss targets (tokens, or examples for classification) on this rank
    tokens: int  # real tokens on this rank
    slots: int  # positions fed to the model on this rank (real tokens + padding)
    attention_pairs: int  # query-key pairs attention computes within examples (for model FLOPs)


class StepDataset(torch.utils.data.Dataset):
    """Maps a 0-based step index to that step's micro batches on this rank."""

    def __init__(self, train, plan: BatchPlan, layout: str, max_seq_len: int, pad_token_id: int, total_steps: int,
                 causal: bool, augment: Augmenter | None = None):
        self.train, self.plan, self.layout, self.causal, self.augment = train, plan, layout, causal, augment
        self.max_seq_len, self.pad_token_id, self.total_steps = max_seq_len, pad_token_id, total_steps

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step_index: int) -> dict:
        batches, tokens, pairs = [], 0, 0
        epoch = self.plan.epoch(step_index)
        for indices in self.plan.micro_batches(step_index):
            examples = list(self.train.select(indices))
            if self.augment is not None:
                examples = [self.augment(example, epoch, index) for example, index in zip(examples, indices)]
            tokens += count_tokens(examples)
            for example in examples:
                n = len(example["input_ids"])
                pairs += n * (n + 1) // 2 if self.causal else n * n
            batches.append(lay_out(examples, self.layout, self.max_seq_len, self.pad_token_id))
        return {"batches": batches, "targets": sum(count_targets(b["labels"]) for b in batches),
                "tokens": tokens, "slots": sum(b["input_ids"].numel() for b in batches), "attention_pairs": pairs}


def _worker_init(_worker_id: int) -> None:
    """A batch builder ignores stop signals and dies with its trainer.

    Slurm and `tunefleet run` send SIGTERM/SIGUSR1 to every process of the job; a worker killed by
    it would fail the trainer's next fetch before the trainer could checkpoint. The trainer handles
    the stop and shuts its workers down; if the trainer itself dies, the kernel ends its workers.
    """
    import signal

    from launcher.distributed.lifetime import die_with_parent

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def step_feed(dataset: StepDataset, first_step_index: int, workers: int, pin_memory: bool):
    """An iterator over StepBatches from `first_step_index` to the end of training."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(first_step_index, len(dataset)), num_workers=workers,
        prefetch_factor=PREFETCH_PER_WORKER if workers else None, pin_memory=pin_memory,
        # Its own generator: starting a loader draws a seed, which from the global generator would
        # shift every later dropout mask, so a resumed run would no longer match the uninterrupted one.
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_worker_init if workers else None,
    )
    for item in loader:
        yield StepBatches(**item)
