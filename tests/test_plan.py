"""`tunefleet plan`: counts checked against real models and peft, the memory estimate against
DeepSpeed's estimators, real state sizes after a step, activations measured on CPU (dropout on, float32
and bf16 autocast), and plans for a named device. benchmarks/plan_memory.py measures every shipped
recipe's real peak with the same probes (tests/memory_probe.py)."""

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
from launcher.planning.activations import Run, activation_bytes
from launcher.planning.memory import Precision, Setup, model_state_bytes
from launcher.planning.params import parameters, trainable
from launcher.planning.shapes import read_shape, shape_from_config
from tests.helpers import SMOLLM
from tests.memory_probe import build_for_fit, kept_for_backward

ROOT = Path(__file__).resolve().parents[1]
MINILM = "pkg:all_minilm_l6_v2/model.zip"
LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True}


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

    shape = read_shape(model) if model.startswith("pkg:") else shape_from_config(LLAMA_1B, "llama-1b")
    total = sum(p.numel for p in parameters(shape, None))
    full = trainable(shape, FullConfig(method="full"), "causal_lm", None)
    ours = {}
    for stage in (2, 3):
        states = model_state_bytes(shape, total, full, Setup(f"zero{stage}", world), Precision("bf16", "bfloat16"),
                                   "adamw", None, None)
        ours[stage] = states.weights + states.adapter + states.gradients + states.optimizer
    # DeepSpeed returns (host bytes, GPU bytes[, largest layer bytes]).
    _, theirs2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world, num_nodes=1,
                                                       cpu_offload=False)
    block = max(sum(p.numel for p in parameters(shape, None) if p.layer == b and "proj" in p.name)
                for b in range(shape.layers))
    _, theirs3, _ = estimate_zero3_model_states_mem_needs(total, block, num_gpus_per_node=world, num_nodes=1,
                                                          cpu_offload=False, cpu_offload_params=False,
                                                          zero_init=True)
    assert ours[2] == pytest.approx(theirs2, rel=0.01)
    # DeepSpeed's ZeRO-3 figure adds its largest layer, gathered (4 bytes per parameter); the plan counts what
    # really stays gathered (`gathered`, checked in test_zero3_keeps_what_it_will_reuse_gathered) apart.
    assert ours[3] == pytest.approx(theirs3 - 4 * block, rel=0.01)


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
    est = model_state_bytes(shape, total, train, Setup("ddp", 1), Precision("fp32", "float32"), "adamw",
                            {"double_quant": True} if method == "qlora" else None, None)
    # 4-bit: per-module constants (code book, nested absmax) weigh ~3% on this 64-wide toy, nothing on real widths.
    assert est.weights + est.adapter == pytest.approx(real["weights"], rel=0.05 if method == "qlora" else 0.001)
    assert est.gradients == pytest.approx(real["gradients"], rel=0.001)
    assert est.optimizer == pytest.approx(real["optimizer"], rel=0.001)


def _tiny_run(autocast: bool, weights: torch.dtype, loss: str, rows: int, length: int) -> Run:
    return Run(rows=rows, seq_len=length, compute_bytes=2 if autocast else 4,
               stream_bytes=4 if weights == torch.float32 else 2, float32_weights=weights == torch.float32,
               quantized=False, gpu=False, checkpointing=False, loss=loss)


@pytest.mark.parametrize("method, autocast, weights", [
    ("lora", False, torch.float32), ("lora", True, torch.bfloat16),  # model.dtype=auto on CPU, and under bf16
    ("lora", True, torch.float32),  # float32 frozen weights under autocast: a 16-bit copy of each kept
    ("full", False, torch.float32), ("full", True, torch.float32)])
def test_what_a_decoder_keeps_for_backward_with_dropout_on(method, autocast, weights):
    """A Qwen3-shaped toy (4 heads of 32 on a 64-wide model: queries wider than the hidden states), LoRA
    with dropout 0.05 as the recipes train, the chunked loss; CPU autocast for bf16."""
    from types import SimpleNamespace

    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.methods.common import float32_trainable
    from launcher.train.chunked_loss import prepare_chunked_loss

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(weights)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = FullConfig(method="full") if method == "full" else LoraConfig(method="lora", r=4, dropout=0.05,
                                                                         target_modules=targets)
    if method == "lora":
        model = get_peft_model(model, PeftLora(r=4, target_modules=targets, lora_dropout=0.05))
    float32_trainable(model)
    recipe = SimpleNamespace(train=SimpleNamespace(chunked_loss=True), model=SimpleNamespace(task="causal_lm"))
    assert prepare_chunked_loss(model, recipe) is None
    measured = kept_for_backward(model.train(), recipe, 2, 32, True, autocast)
    shape = shape_from_config({**config.to_dict(), "model_type": "llama"}, "toy")
    assert shape.q_dim == 128 != shape.hidden
    planned = activation_bytes(shape, trainable(shape, cfg, "causal_lm", None),
                               _tiny_run(autocast, weights, "chunked", 2, 32))
    assert planned.kept == pytest.approx(measured, rel=0.03)
    assert (planned.weight_copies > 0) == (autocast and weights == torch.float32)


@pytest.mark.parametrize("autocast", [False, True])
def test_what_an_encoder_keeps_for_backward_with_its_dropout_on(autocast):
    """BERT with hidden and attention dropout 0.1 (SDPA's math kernel on a CPU keeps the scores and the
    mask) and LoRA dropout 0.1 on query and value, as classify_lora trains."""
    from types import SimpleNamespace

    from peft import LoraConfig as PeftLora
    from peft import TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from launcher.methods.common import float32_trainable

    config = BertConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=4)
    torch.manual_seed(0)
    weights = torch.bfloat16 if autocast else torch.float32
    model = BertForSequenceClassification(config).to(weights)
    model = get_peft_model(model, PeftLora(r=4, target_modules=["query", "value"], lora_dropout=0.1,
                                           task_type=TaskType.SEQ_CLS))
    float32_trainable(model)
    recipe = SimpleNamespace(model=SimpleNamespace(task="classification"))
    measured = kept_for_backward(model.train(), recipe, 4, 32, False, autocast)
    shape = shape_from_config(config.to_dict(), "toy")
    cfg = LoraConfig(method="lora", r=4, dropout=0.1, target_modules=["query", "value"])
    planned = activation_bytes(shape, trainable(shape, cfg, "classification", 4),
                               _tiny_run(autocast, weights, "classification", 4, 32))
    assert planned.kept == pytest.approx(measured, rel=0.05)


@pytest.mark.slow
def test_activation_estimate_matches_what_a_real_forward_keeps():
    """SmolLM2-135M on CPU, as the recipes train it (LoRA dropout 0.05): bytes kept for backward."""
    from launcher.config.load import load_recipe

    results = {}
    for words in (["recipe=full"], ["recipe=lora"], ["recipe=lora", "train.gradient_checkpointing=true"]):
        _, recipe = load_recipe([*words, "data.max_seq_len=128", "train.micro_batch_size=2"])
        model, _, chunked = build_for_fit(recipe)
        measured = kept_for_backward(model, recipe, 2, 128, chunked, False)
        shape = read_shape(SMOLLM)
        run = Run(rows=2, seq_len=128, compute_bytes=4, stream_bytes=4, float32_weights=True, quantized=False,
                  gpu=False, checkpointing=recipe.train.gradient_checkpointing, loss="chunked")
        planned = activation_bytes(shape, trainable(shape, recipe.peft, "causal_lm", None), run).kept
        results[" ".join(words)] = planned / measured
    assert all(0.97 <= ratio <= 1.03 for ratio in results.values()), results


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
    assert report["sharding"] == ["DeepSpeed ZeRO-3: optimizer states, gradients and weights sharded over 2 ranks",
                                  "parameters gathered in forward stay gathered until backward, up to 1e+09 of them "
                                  "(stage3_max_live_parameters, stage3_max_reuse_distance)"]
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
    assert done.returncode == 2 and "tunefleet plan takes --device NAME" in done.stderr
    assert "submit" not in done.stderr
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
    from launcher.planning.activations import chunk_tokens as planned
    from launcher.planning.activations import kl_transient_bytes as planned_kl
    from launcher.train.chunked_loss import chunk_tokens as trained
    from launcher.train.distill import kl_transient_bytes as trained_kl

    for tokens in (1, 100, 512, 4096, 65536):
        for vocab, hidden in ((49152, 576), (151936, 896), (32000, 4096), (512, 64)):
            assert planned(tokens, vocab, hidden) == trained(tokens, vocab, hidden)
            assert planned_kl(tokens, vocab, hidden) == trained_kl(tokens, vocab, hidden)


def test_plan_of_a_distilling_recipe_sizes_the_cut_student_and_the_frozen_teacher(tiny_bert, tiny_bert_classifier,
                                                                                    tmp_path):
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
                            f"distill.teacher={tiny_bert_classifier}", "distill.student_layers=[0]", teardown=False)
    done = plan("recipe=classify_lora", f"model.name={tiny_bert}", "peft.method=full",
                f"distill.teacher={tiny_bert_classifier}", "distill.student_layers=[0]", "--json")
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
                              f"distill.teacher={tiny_bert_classifier}", "distill.student_layers=[0]", "distill.alpha=0",
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


# ---------------------------------------------------------------------------- a plan for a named device


def _planned(*words: str, device: str = "cpu"):
    """The planner's estimate and facts, in this process (it imports nothing heavy)."""
    from launcher.config.load import load_recipe
    from launcher.planning.estimate import device_profile, estimate

    _, recipe = load_recipe(list(words))
    return estimate(recipe, device_profile(device))


def test_plan_for_a_device_renders_what_the_run_would_resolve_there(capsys):
    """--device plans for that device, not this machine: on an H100 a LoRA run is bf16, its frozen weights
    load in bfloat16 (half the bytes: model.dtype=auto), AdamW is fused, and the verdict uses its 80 GiB."""
    from launcher.planning.plan import plan_command

    def planned(*argv: str) -> str:
        assert plan_command(["recipe=lora", *argv]) == 0
        return capsys.readouterr().out

    cpu, h100 = (json.loads(planned("--device", d, "--json")) for d in ("cpu", "h100"))
    assert (cpu["device"], cpu["precision"], cpu["device_settings"]["weight_dtype"]) == ("cpu", "fp32", "float32")
    assert (h100["device"], h100["precision"], h100["device_settings"]["weight_dtype"]) == ("h100", "bf16", "bfloat16")
    assert h100["device_settings"]["fused_adamw"] and not cpu["device_settings"]["fused_adamw"]
    frozen = cpu["model"]["parameters"]  # LoRA: the whole base is frozen
    assert cpu["memory_per_device_gib"]["weights"] == pytest.approx(frozen * 4 / 2**30, abs=0.002)
    assert h100["memory_per_device_gib"]["weights"] == pytest.approx(frozen * 2 / 2**30, abs=0.002)
    # bf16 activations take about half the bytes (norm inputs and dropout noise stay float32).
    assert 0.4 < h100["memory_per_device_gib"]["activations"] / cpu["memory_per_device_gib"]["activations"] < 0.7
    assert h100["device_memory_gib"] == 80 and h100["fits"] is True and "fits" not in cpu
    assert cpu["memory_per_device_gib"]["overhead"] < h100["memory_per_device_gib"]["overhead"]  # CUDA context
    assert "device cpu: precision fp32, weights load in float32, attention sdpa" in planned("--device", "cpu")
    text = planned("--device=h100")
    assert "device h100: precision bf16, weights load in bfloat16" in text and "fits 80.0 GiB: yes" in text
    assert "fits 24.0 GiB" in planned("--device", "L4")  # names are not case-sensitive


def test_an_unknown_device_is_one_clear_error_naming_the_choices():
    from launcher.distributed.device_settings import PROFILES

    done = plan("recipe=lora", "--device", "h1000")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--device h1000" in done.stderr and all(name in done.stderr for name in PROFILES)


def test_autocast_weight_copies_count_only_where_weights_are_not_in_the_compute_dtype():
    auto, _ = _planned("recipe=lora", device="h100")  # bfloat16 frozen weights: nothing to copy
    _, facts32 = _planned("recipe=lora", "model.dtype=float32", device="h100")
    _, facts_auto = _planned("recipe=lora", device="h100")
    assert facts_auto["autocast_weight_copies_gib"] == 0
    from launcher.planning.params import linears

    shape = read_shape(SMOLLM)
    lowest_qkv = sum(lin.inp * lin.out for lin in linears(shape, None) if lin.layer == 0 and lin.role == "attn_in")
    block_maps = sum(lin.inp * lin.out for lin in linears(shape, None) if lin.layer is not None) - lowest_qkv
    # Every block's maps but the lowest block's query, key and value (their input needs no gradient).
    assert facts32["autocast_weight_copies_gib"] * 2**30 == pytest.approx(2 * block_maps, rel=0.01)
    _, on_cpu = _planned("recipe=lora", "model.dtype=float32", device="cpu")  # no autocast on a CPU
    assert on_cpu["autocast_weight_copies_gib"] == 0 and auto.total > 0


def test_deferred_fsdp_gradients_are_whole_on_every_rank_until_the_step_ends():
    shape = shape_from_config(LLAMA_1B, "llama-1b")
    total = sum(p.numel for p in parameters(shape, None))
    full = trainable(shape, FullConfig(method="full"), "causal_lm", None)
    prec = Precision("bf16", "float32")
    sharded = model_state_bytes(shape, total, full, Setup("fsdp", 8), prec, "adamw", None, None, accumulation=4)
    deferred = model_state_bytes(shape, total, full, Setup("fsdp", 8, defer_grad_sync=True), prec, "adamw", None,
                                 None, accumulation=4)
    assert sharded.gradients_held == sharded.gradients == 4 * total / 8
    assert deferred.gradients_held == 4 * total  # unsharded float32, every trainable parameter, every rank
    one_micro_batch = model_state_bytes(shape, total, full, Setup("fsdp", 8, defer_grad_sync=True), prec, "adamw",
                                        None, None, accumulation=1)
    assert one_micro_batch.gradients_held == 0  # nothing to defer: reduce-scattered as produced
    _, facts = _planned("recipe=full_fsdp", "train.global_batch_size=16", "distributed.fsdp_defer_gradient_sync=true")
    assert any("fsdp_defer_gradient_sync" in words for words in facts["sharding"])


def test_the_plan_reports_the_peak_of_loading_when_it_exceeds_training(tmp_path, capsys):
    """FSDP2's rank 0 loads the whole model before sharding (launcher.model.lean_load): LoRA on a 1B model
    over 8 H100s peaks while loading, not while training."""
    from launcher.planning.plan import plan_command

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_1B, "torch_dtype": "bfloat16"}))
    words = ["recipe=lora", f"model.name={tmp_path}", "distributed.backend=fsdp", "distributed.num_processes=8",
             "train.global_batch_size=32"]
    est, _ = _planned(*words, device="h100")
    whole = est.loading["weights (whole, before sharding)"]
    assert whole > 7 * est.device["weights"] and est.loading["weights (shard)"] == pytest.approx(whole / 8)
    assert est.total == est.loading_total > est.training
    assert plan_command([*words, "--device", "h100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["memory_total_gib"] == report["loading_peak_gib"] > report["training_peak_gib"]


def test_zero3_keeps_what_it_will_reuse_gathered():
    """DeepSpeed releases a parameter after forward only if backward needs it more than
    stage3_max_reuse_distance elements later: a model smaller than that stays gathered whole."""
    shape = read_shape(SMOLLM)
    total = sum(p.numel for p in parameters(shape, None))
    lora = trainable(shape, LoraConfig(method="lora", target_modules=["q_proj"]), "causal_lm", None)
    prec = Precision("fp32", "float32")
    default = model_state_bytes(shape, total, lora, Setup("zero3", 2), prec, "adamw", None, None)
    assert default.gathered == 4 * total
    tight = model_state_bytes(shape, total, lora, Setup("zero3", 2, zero3_live=10**6), prec, "adamw", None, None)
    assert tight.gathered < default.gathered / 10


def test_distillation_counts_the_teachers_hidden_states_and_one_chunk_of_the_kl():
    from launcher.planning.activations import kl_transient_bytes

    est, facts = _planned("recipe=distill_lm")
    without, _ = _planned("recipe=distill_lm", "distill.alpha=0")
    tokens = facts["tokens_per_micro_batch"]
    shape = read_shape(SMOLLM)
    assert est.device["activation peak"] >= kl_transient_bytes(tokens, shape.vocab, shape.hidden) + \
        tokens * shape.hidden * 4
    assert "teacher" in est.device and "teacher" not in without.device


def test_the_estimate_stays_within_ten_percent_of_every_shipped_recipes_measured_cpu_peak():
    """The peaks recorded by `benchmarks/plan_memory.py measure` (3 real steps of each shipped recipe on this
    CPU, live tensors counted by a dispatch probe) against the current planner: a change to the planner that
    moves any recipe's estimate more than 10% from what was measured fails here."""
    from benchmarks import plan_memory

    data = plan_memory.recorded()
    assert set(data) == set(plan_memory.SHIPPED), f"not measured: {set(plan_memory.SHIPPED) - set(data)}"
    off = {}
    for name, entry in data.items():
        _, _, errors = plan_memory.compared(entry)
        off.update({f"{name} rank {r}": round(100 * e, 1) for r, e in enumerate(errors) if abs(e) > 0.10})
    assert not off, f"estimate vs measured peak, % off: {off}"
