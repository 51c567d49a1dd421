"""The plain Hugging Face way: transformers' Trainer + peft, default settings.

What a user writes after the peft quickstart: DataCollatorForSeq2Seq padding each micro batch to
its longest row, per_device_train_batch_size = the micro batch, gradient_accumulation_steps for
the rest, default data loader, default optimizer (transformers' choice, fused AdamW here).
Only what defines the job is set: steps, batch, learning rate and schedule, clipping, precision,
seed. Its data are tunefleet's tokens (benchmarks/contenders/common.py).

    python benchmarks/contenders/hf_trainer.py JOB.json RESULT.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import common


def main(job_path: str, result_path: str) -> None:
    job = common.load_job(job_path)
    common.set_threads(job)
    recipe, model_path, tokenizer, data = common.prepare(job)
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    t = recipe.train
    set_seed(t.seed)
    model = get_peft_model(common.load_model(model_path, recipe), common.lora_config(recipe))
    args = TrainingArguments(
        output_dir=str(Path(job["work_dir"]) / "hf_trainer"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=common.accumulation(recipe),
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=common.SCHEDULERS[t.scheduler],
        warmup_steps=common.warmup_steps(recipe, t.max_steps),
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        max_grad_norm=t.max_grad_norm or 0.0,
        bf16=job["precision"] == "bf16",
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU without it
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        report_to="none",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer.train()
    loss = common.eval_loss(trainer.model, data.eval, tokenizer.pad_token_id, recipe.eval.batch_size, job["precision"])
    print(f"eval_loss {loss:.4f}")
    common.write_result(result_path, eval_loss=loss, optimizer=common.optimizer_name(trainer.optimizer),
                        **common.parameter_counts(model))


if __name__ == "__main__":
    main(*sys.argv[1:3])
