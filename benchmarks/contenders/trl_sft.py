"""TRL's SFTTrainer with a peft_config, default settings except two that would change the job.

TRL defaults to bf16 autocast (even on a CPU) and to gradient checkpointing; both are set to what
the recipe says (fp32 on CPU, no checkpointing), or the comparison would time a different job.
Everything else is TRL's: its collator (padding to the longest row of the micro batch), its
chunked log-prob loss head, its entropy and token-accuracy metrics, fused AdamW. The rows reach
it already tokenized (input_ids and labels from tunefleet), which TRL uses as they are.

    python benchmarks/contenders/trl_sft.py JOB.json RESULT.json
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
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    t = recipe.train
    set_seed(t.seed)
    args = SFTConfig(
        output_dir=str(Path(job["work_dir"]) / "trl_sft"),
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
        bf16=job["precision"] == "bf16",  # TRL's default is True
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU without it
        gradient_checkpointing=t.gradient_checkpointing,  # TRL's default is True
        max_length=recipe.data.max_seq_len,  # the rows are already cut to it
        seed=t.seed,
        report_to="none",
    )
    trainer = SFTTrainer(model=common.load_model(model_path, recipe), args=args, train_dataset=data.train,
                         processing_class=tokenizer, peft_config=common.lora_config(recipe))
    trainer.train()
    loss = common.eval_loss(trainer.model, data.eval, tokenizer.pad_token_id, recipe.eval.batch_size, job["precision"])
    print(f"eval_loss {loss:.4f}")
    common.write_result(result_path, eval_loss=loss, optimizer=common.optimizer_name(trainer.optimizer),
                        **common.parameter_counts(trainer.model))


if __name__ == "__main__":
    main(*sys.argv[1:3])
