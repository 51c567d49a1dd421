"""The least a user can write: accelerate + peft + AdamW + a plain loop.

Its start-to-first-step time is the floor the others are measured against: nothing runs before
the first step but imports, loading the model and data, and wrapping them. The loss of a step is
the mean over every target token of the global batch (summed per micro batch, divided by the
step's target count), as in tunefleet and in transformers' Trainer.

    python benchmarks/contenders/accelerate_loop.py JOB.json RESULT.json
"""

from __future__ import annotations

import sys

import common


def forever(loader):
    while True:
        yield from loader


def main(job_path: str, result_path: str) -> None:
    job = common.load_job(job_path)
    common.set_threads(job)
    recipe, model_path, tokenizer, data = common.prepare(job)
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, get_scheduler, set_seed

    t = recipe.train
    set_seed(t.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if job["precision"] == "bf16" else "no")
    model = get_peft_model(common.load_model(model_path, recipe), common.lora_config(recipe))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, betas=t.betas,
                                  weight_decay=t.weight_decay)
    scheduler = get_scheduler(common.SCHEDULERS[t.scheduler], optimizer,
                              num_warmup_steps=common.warmup_steps(recipe, t.max_steps), num_training_steps=t.max_steps)
    loader = DataLoader(data.train, batch_size=t.micro_batch_size, shuffle=True,
                        collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True),
                        generator=torch.Generator().manual_seed(t.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches = forever(loader)

    model.train()
    for step in range(t.max_steps):
        micro = [next(batches) for _ in range(common.accumulation(recipe))]
        targets = sum((b["labels"][:, 1:] != common.IGNORE).sum() for b in micro)
        for batch in micro:
            loss = model(**batch, num_items_in_batch=targets).loss  # sum over the micro batch / step's targets
            accelerator.backward(loss)
        if t.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    model = accelerator.unwrap_model(model)
    loss = common.eval_loss(model, data.eval, tokenizer.pad_token_id, recipe.eval.batch_size, job["precision"])
    print(f"eval_loss {loss:.4f}")
    common.write_result(result_path, eval_loss=loss, optimizer=common.optimizer_name(optimizer),
                        **common.parameter_counts(model))


if __name__ == "__main__":
    main(*sys.argv[1:3])
