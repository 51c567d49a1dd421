"""Training semantics: split-independent loss normalisation, schedules, early stopping, options, safety."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import run as run_script
from launcher.config.load import load_recipe
from launcher.errors import UserError
from tests.helpers import read_jsonl, run_in_process

EXACT = ["peft.dropout=0", "eval.every_steps=null", "eval.at_start=false", "train.max_steps=3"]


def losses_and_adapter(run_dir: Path):
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    return losses, load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def test_loss_and_weights_do_not_depend_on_the_micro_batch_split(tiny_llama, tmp_path):
    results = {}
    for micro in (8, 4, 2):
        run_in_process("lora", tiny_llama, tmp_path / f"m{micro}", *EXACT, f"train.micro_batch_size={micro}",
                       "train.global_batch_size=8")
        results[micro] = losses_and_adapter(tmp_path / f"m{micro}")
    reference_losses, reference_weights = results[8]
    for micro in (4, 2):
        losses, weights = results[micro]
        assert losses == pytest.approx(reference_losses, rel=1e-5)
        for key, tensor in reference_weights.items():
            torch.testing.assert_close(weights[key], tensor, atol=1e-6, rtol=1e-5)
    # And the weights really moved: the comparison above is not between untrained adapters.
    assert any(t.abs().sum() > 0 for k, t in reference_weights.items() if "lora_B" in k)


def test_early_stopping_keeps_the_best_checkpoint(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    _, result = run_in_process("lora", tiny_llama, run_dir, "train.lr=3e-2", "train.max_steps=30",
                               "eval.every_steps=1", "eval.early_stopping_patience=2", "train.scheduler=constant",
                               "train.warmup_steps=0", "train.checkpoint_every=1", "train.keep_checkpoints=40",
                               "data.max_eval_samples=8")
    evals = [(r["step"], r["eval_loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r]
    best_step, best = None, float("inf")
    for step, value in evals:
        if value < best:
            best_step, best = step, value
    assert result["stopped_early"] and result["steps"] == best_step + 2 < 30, evals
    assert result["best"] == {"metric": "eval_loss", "value": pytest.approx(best), "step": best_step}
    marker = json.loads((run_dir / "best" / "tunefleet_artifact.json").read_text())
    assert marker["step"] == best_step
    # best/ holds the weights of that step (its checkpoint has the same trainable tensors).
    saved = load_file(str(run_dir / "best" / "adapter_model.safetensors"))
    at_best = load_file(str(run_dir / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors"))
    at_best = {k.replace(".default", ""): v for k, v in at_best.items()}
    final = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert saved.keys() == at_best.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], at_best[key])
    assert any(not torch.equal(final[k], saved[k]) for k in saved), "best/ must not simply be the last step"


def test_gradient_checkpointing_is_on_and_non_reentrant(tiny_llama, tmp_path):
    run, result = run_in_process("lora", tiny_llama, tmp_path / "run", "train.gradient_checkpointing=true",
                                 "train.max_steps=1")
    layer = run.accelerator.unwrap_model(run.model).get_base_model().model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_qlora_keeps_non_reentrant_checkpointing(tiny_llama, tmp_path):
    run, _ = run_in_process("qlora", tiny_llama, tmp_path / "run", "train.gradient_checkpointing=true",
                            "train.max_steps=1")
    layer = run.accelerator.unwrap_model(run.model).get_base_model().model.layers[0]
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_8bit_adamw_is_the_optimizer_used(tiny_llama, tmp_path):
    run, result = run_in_process("full", tiny_llama, tmp_path / "run", "train.optimizer=adamw_8bit",
                                 "train.max_steps=2", teardown=False)
    inner = run.optimizer.optimizer
    from launcher.train.loop import release

    release(run)
    assert type(inner).__name__ == "AdamW8bit"
    # Large tensors keep their moments in 8 bits (bitsandbytes keeps small ones in 32).
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in inner.state.values())
    used = json.loads((tmp_path / "run" / "distributed.json").read_text())
    assert used["optimizer"]["class"].endswith("AdamW8bit")


def test_bf16_autocasts_the_forward(tiny_llama, tmp_path):
    run, _ = run_in_process("lora", tiny_llama, tmp_path / "run", "train.precision=bf16", "train.max_steps=1",
                            teardown=False)
    try:
        seen = []
        q_proj = run.accelerator.unwrap_model(run.model).get_base_model().model.layers[0].self_attn.q_proj
        handle = q_proj.base_layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        from tests.helpers import first_eval_batch

        run.model(**first_eval_batch(run))
        handle.remove()
        assert seen == [torch.bfloat16]
        assert json.loads((tmp_path / "run" / "distributed.json").read_text())["mixed_precision"] == "bf16"
    finally:
        from launcher.train.loop import release

        release(run)


@pytest.mark.parametrize("options", [
    ["train.layer_lr_decay=0.8", "train.weight_decay=0.1"],
    ["train.max_steps=null", "train.epochs=0.05", "data.max_samples=null"],
])
def test_training_options_run(options, tiny_llama, tmp_path):
    _, result = run_in_process("lora", tiny_llama, tmp_path / "run", *options)
    assert result["steps"] >= 1 and result["train_loss"] == result["train_loss"]  # not NaN


def test_epochs_set_the_step_count(tiny_llama, tmp_path):
    _, result = run_in_process("lora", tiny_llama, tmp_path / "run", "train.max_steps=null", "train.epochs=2",
                               "data.max_samples=24", "eval.every_steps=null")
    assert result["steps"] == 2 * (24 // 8)


def test_plan_and_run_agree_on_the_steps_of_an_epochs_recipe(tiny_llama, tmp_path, capsys):
    """Both ask launcher.config.compat.total_steps: 1.5 epochs of 40 examples in global batches of 8."""
    from launcher.planning.plan import plan_command

    words = ["train.max_steps=null", "train.epochs=1.5", "data.max_samples=40", "eval.every_steps=null"]
    assert plan_command(["recipe=lora", f"model.name={tiny_llama}", *words, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["batch"]
    run, result = run_in_process("lora", tiny_llama, tmp_path / "run", *words)
    assert result["dropped_examples"] == 0 and planned["training_examples"] == len(run.data.train) == 40
    assert planned["steps"] == run.total_steps == result["steps"] == int(1.5 * (40 // 8))


def test_layer_wise_lr_decay_and_weight_decay_groups(tiny_llama):
    from launcher.train.build import load_model
    from launcher.train.optim import parameter_groups

    _, recipe = load_recipe(["recipe=full", f"model.name={tiny_llama}"])
    model = load_model(str(tiny_llama), recipe, None, torch.device("cpu"))
    groups = parameter_groups(model, lr=1.0, weight_decay=0.1, layer_lr_decay=0.5)
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    decay_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert lr_of["model.embed_tokens.weight"] == pytest.approx(0.5 ** 3)
    assert lr_of["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.5 ** 2)
    assert lr_of["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert lr_of["model.norm.weight"] == 1.0
    assert decay_of["model.layers.0.self_attn.q_proj.weight"] == 0.1
    assert decay_of["model.layers.0.input_layernorm.weight"] == 0.0


def test_warmup_then_cosine_decay():
    from launcher.train.optim import build_scheduler

    _, recipe = load_recipe(["recipe=lora", "train.warmup_steps=4", "train.scheduler=cosine", "train.lr=1.0"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(1.0)
    assert lrs[1] < lrs[2] < lrs[3] < lrs[4] and all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_classification_metrics_by_hand():
    from launcher.train.evaluate import classification_metrics

    # true x predicted: class 0: 3 right, 1 called class 1; class 1: 2 right; class 2: never predicted right.
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [1, 1, 0]])
    m = classification_metrics(confusion)
    assert m["accuracy"] == pytest.approx(5 / 8)
    precision = [3 / 4, 2 / 4, 0.0]
    recall = [3 / 4, 1.0, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    assert m["precision"] == pytest.approx(sum(precision) / 3)
    assert m["recall"] == pytest.approx(sum(recall) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)


def test_existing_run_folder_is_refused_and_left_intact(tiny_llama, tmp_path):
    run_in_process("lora", tiny_llama, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    assert run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}"]) == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_malformed_data_stops_before_any_output(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": 3}\n')
    code = run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"data.train={bad}",
                            f"output.dir={tmp_path / 'run'}"])
    assert code == 2 and "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_merge_folds_the_adapter_into_a_plain_model(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from launcher.cli import main as cli
    from tests.helpers import first_eval_batch

    run, _ = run_in_process("lora", tiny_llama, tmp_path / "run")
    assert cli(["merge", str(tmp_path / "run")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    live = run.accelerator.unwrap_model(run.model).eval()
    batch = first_eval_batch(run)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, live(**batch).logits, atol=1e-4, rtol=1e-4)


def test_merge_refuses_a_prompt_tuning_run(tiny_llama, tmp_path):
    from launcher.outputs.artifacts import merge_run

    run_in_process("prompt_tuning", tiny_llama, tmp_path / "run")
    with pytest.raises(UserError, match="cannot be merged"):
        merge_run(tmp_path / "run")


def test_recipe_flag_writes_merged_model(tiny_llama, tmp_path):
    run_in_process("ia3", tiny_llama, tmp_path / "run", "output.merge=true")
    assert (tmp_path / "run" / "merged" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "merged" / "config.json").read_text())["model_type"] == "llama"
