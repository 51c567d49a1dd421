"""Micro batch layouts (pack, pack_flat, group_by_length, none) change padding, never the math; the check that
a model keeps packed examples apart (launcher/data/packing_check.py); the feed; throughput."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.config.load import load_recipe
from launcher.data import packing_check
from launcher.data.batches import BatchPlan, collate, count_targets, flatten, lay_out, pack
from launcher.data.formats import IGNORE
from launcher.errors import UserError
from launcher.data.loader import StepDataset, step_feed
from launcher.train.throughput import PEAK_FLOPS, FlopsModel, device_peak_flops
from tests.helpers import read_jsonl, run_in_process

EXACT = ["peft.dropout=0", "eval.every_steps=null", "eval.at_start=false", "train.max_steps=3"]


def examples(lengths, prompt=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 100, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


def test_pack_fills_rows_and_restarts_positions():
    rows = examples([7, 5, 12, 3, 9])
    packed = pack(rows, capacity=16, pad_token_id=0)
    ids, positions, labels = packed["input_ids"], packed["position_ids"], packed["labels"]
    assert "attention_mask" not in packed  # transformers derives the packed mask from the position ids
    assert ids.shape[1] <= 16 and ids.shape[0] == 3  # 36 tokens, rows of 16: first fit, longest first
    # Every example appears once, contiguous, with positions 0..n-1 and its first label ignored.
    found = []
    for r in range(ids.shape[0]):
        starts = [i for i in range(ids.shape[1]) if positions[r, i] == 0] + [ids.shape[1]]
        for a, b in zip(starts, starts[1:]):
            segment = ids[r, a:b].tolist()
            if segment in [e["input_ids"] for e in rows]:
                found.append(segment)
                assert positions[r, a:b].tolist() == list(range(b - a))
                assert labels[r, a] == IGNORE
            else:  # the padded tail: a block of its own, nothing to predict
                assert set(segment) == {0} and (labels[r, a:b] == IGNORE).all()
    assert sorted(found) == sorted(e["input_ids"] for e in rows)
    assert count_targets(labels) == count_targets(collate(rows, 0)["labels"])


def test_flattened_micro_batch_is_one_unpadded_row_with_restarting_positions():
    """What flash attention needs: transformers derives cu_seqlens from the position ids of a batch of one row."""
    rows = examples([7, 5, 12, 3])
    flat = flatten(rows)
    ids, positions, labels = flat["input_ids"], flat["position_ids"], flat["labels"]
    assert "attention_mask" not in flat and ids.shape == positions.shape == labels.shape == (1, 27)
    assert ids[0].tolist() == [t for e in rows for t in e["input_ids"]]  # in order, no padding
    at = 0
    for example in rows:
        n = len(example["input_ids"])
        assert positions[0, at : at + n].tolist() == list(range(n))
        # Not predicted from the previous example's last token; the rest aligned with the example's labels.
        assert labels[0, at] == IGNORE and labels[0, at + 1 : at + n].tolist() == example["labels"][1:]
        at += n
    assert count_targets(labels) == count_targets(collate(rows, 0)["labels"])
    assert torch.equal(lay_out(rows, "pack_flat", 16, 0)["input_ids"], ids)
    assert torch.equal(lay_out(rows, "pack", 16, 0)["position_ids"], pack(rows, 16, 0)["position_ids"])
    assert "attention_mask" in lay_out(rows, "group_by_length", 16, 0)
    with pytest.raises(ValueError, match="unknown micro batch layout"):
        lay_out(rows, "packed", 16, 0)


def test_packed_loss_and_gradients_equal_the_padded_ones(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows = examples([30, 11, 45, 6, 22, 17], seed=1)
    grads = {}
    for layout in ("padded", "packed", "flat"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                 init_lora_weights=False))
        batch = {"padded": collate(rows, 0), "packed": pack(rows, 64, 0), "flat": flatten(rows)}[layout]
        normalizer = torch.tensor(float(count_targets(batch["labels"])))
        loss = model(**batch, num_items_in_batch=normalizer).loss
        loss.backward()
        grads[layout] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert pack(rows, 64, 0)["input_ids"].numel() < collate(rows, 0)["input_ids"].numel()
    for layout in ("packed", "flat"):
        torch.testing.assert_close(grads[layout][0], grads["padded"][0], rtol=1e-5, atol=1e-6)
        for name, grad in grads["padded"][1].items():
            torch.testing.assert_close(grads[layout][1][name], grad, rtol=1e-4, atol=1e-6)


def _recipe(*words):
    return load_recipe(["recipe=lora", *words])[1]


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory):
    """Only a config: the check builds its twin from the config, with random weights."""
    from transformers import BloomConfig

    path = tmp_path_factory.mktemp("tiny-bloom")
    BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=4, architectures=["BloomForCausalLM"]
                ).save_pretrained(path)
    return str(path)


def test_a_model_that_builds_its_mask_from_position_ids_keeps_packing(tiny_llama):
    rng = torch.get_rng_state()
    assert packing_check.packing_layout(_recipe(), str(tiny_llama), "sdpa") == ("pack", None)
    assert packing_check.packing_layout(_recipe("data.packing=pack"), str(tiny_llama), "eager") == ("pack", None)
    # Flash attention keeps examples apart only in one flattened row per micro batch.
    assert packing_check.packing_layout(_recipe(), str(tiny_llama), "flash_attention_2") == ("pack_flat", None)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random draws are untouched
    # Nothing to check where the recipe alone rules packing out.
    assert packing_check.packing_layout(_recipe("peft.method=prompt_tuning"), "no/such/model",
                                        "sdpa") == ("group_by_length", None)


def test_flash_attention_over_several_packed_rows_lets_examples_attend_to_each_other(tiny_llama):
    """Why pack_flat exists: transformers' flash path reads cu_seqlens from position ids only for one
    row; with several it attends over each whole row (the CPU stand-in runs transformers' own decision)."""
    several_rows = packing_check.check_packing(str(tiny_llama), "flash_attention_2", "pack")
    assert several_rows.sound is False and "attend to each other" in several_rows.problem()
    assert packing_check.check_packing(str(tiny_llama), "flash_attention_2", "pack_flat").sound is True


def test_a_model_whose_mask_ignores_position_ids_is_not_packed(tiny_llama, tiny_bloom):
    """Bloom builds its causal mask and ALiBi bias from the row alone (transformers 5.23): packed
    examples would attend to each other with no error."""
    layout, why = packing_check.packing_layout(_recipe(), tiny_bloom, "eager")
    assert layout == "group_by_length"
    assert why == ("data.packing: BloomForCausalLM lets packed examples attend to each other (checked on a tiny "
                   "twin, eager attention); grouping by length instead")
    with pytest.raises(UserError) as err:
        packing_check.packing_layout(_recipe("data.packing=pack"), tiny_bloom, "eager")
    assert "data.packing=pack: BloomForCausalLM lets packed" in str(err.value)
    assert "data.packing=group_by_length" in str(err.value)
    # A twin that cannot be built (Bloom has no sdpa attention in transformers) is not trusted either.
    layout, why = packing_check.packing_layout(_recipe(), tiny_bloom, "sdpa")
    assert layout == "group_by_length" and why.startswith("data.packing: could not build a tiny twin of Bloom")
    # The distillation teacher reads the same packed batches.
    layout, why = packing_check.packing_layout(_recipe(), str(tiny_llama), "sdpa", teacher_path=tiny_bloom)
    assert layout == "group_by_length" and "distill.teacher BloomForCausalLM" in why


def test_the_twin_keeps_the_layers_and_narrows_the_widths():
    import time

    from transformers import LlamaConfig, MixtralConfig, Qwen2Config

    from launcher.model.twin import twin_config

    wide = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=32000)
    twin = twin_config(wide)
    assert (twin.hidden_size, twin.intermediate_size, twin.num_attention_heads, twin.num_key_value_heads,
            twin.head_dim, twin.vocab_size, twin.num_hidden_layers) == (64, 128, 4, 2, 16, 512, 32)
    assert wide.hidden_size == 4096  # a copy
    # Per-layer types stay; a vocabulary whose special ids lie beyond the narrow one stays whole.
    sliding = Qwen2Config(num_hidden_layers=6, use_sliding_window=True, max_window_layers=3, vocab_size=152064,
                          bos_token_id=151643)
    assert twin_config(sliding).layer_types == sliding.layer_types
    assert twin_config(sliding).vocab_size == 152064
    moe = twin_config(MixtralConfig(num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=4))
    assert (moe.num_local_experts, moe.num_experts_per_tok, moe.num_hidden_layers) == (4, 2, 4)
    started = time.perf_counter()
    verdict = packing_check._check(wide, "LlamaForCausalLM", "sdpa", "sdpa attention", "pack", False)
    assert verdict.sound and time.perf_counter() - started < 5  # a 32-layer twin is still cheap


@pytest.mark.parametrize("layout", ["pack", "pack_flat", "group_by_length", "none"])
def test_feed_from_worker_processes_equals_the_inline_feed(layout):
    import datasets

    rows = examples([(i * 13) % 40 + 3 for i in range(48)])
    train = datasets.Dataset.from_list(rows)
    lengths = tuple(len(r["input_ids"]) for r in rows) if layout == "group_by_length" else None
    plan = BatchPlan(48, 8, 2, 1, 0, seed=1, lengths=lengths)
    dataset = StepDataset(train, plan, layout, max_seq_len=48, pad_token_id=0, total_steps=10, causal=True)
    inline = list(step_feed(dataset, 4, workers=0, pin_memory=False))
    ahead = list(step_feed(dataset, 4, workers=2, pin_memory=False))
    assert len(inline) == len(ahead) == 6  # a resumed run at step 4 starts its feed there
    for a, b in zip(inline, ahead):
        assert (a.targets, a.tokens, a.slots, a.attention_pairs) == (b.targets, b.tokens, b.slots, b.attention_pairs)
        for x, y in zip(a.batches, b.batches):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    first = inline[0]
    indices = [i for mb in plan.micro_batches(4) for i in mb]
    assert first.tokens == sum(len(rows[i]["input_ids"]) for i in indices)
    assert first.attention_pairs == sum(len(rows[i]["input_ids"]) * (len(rows[i]["input_ids"]) + 1) // 2
                                        for i in indices)
    assert first.slots >= first.tokens
    if layout == "pack_flat":  # flash attention's layout: one row, no padding, no mask
        assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in first.batches)
        assert first.slots == first.tokens


def losses_and_adapter(run_dir: Path):
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    return losses, load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_every_layout_trains_the_same_adapter(tiny_llama, tmp_path):
    results = {}
    for layout, workers in (("none", 0), ("pack", 1), ("group_by_length", 2)):
        _, metrics = run_in_process("lora", tiny_llama, tmp_path / layout, *EXACT, f"data.packing={layout}",
                                    f"data.loader_workers={workers}", "train.micro_batch_size=4",
                                    "train.global_batch_size=8")
        results[layout] = (losses_and_adapter(tmp_path / layout), metrics)
    (reference_losses, reference_weights), padded = results["none"]
    for layout in ("pack", "group_by_length"):
        (losses, weights), metrics = results[layout]
        assert losses == pytest.approx(reference_losses, rel=1e-5)
        for key, tensor in reference_weights.items():
            torch.testing.assert_close(weights[key], tensor, atol=1e-6, rtol=1e-5)
        assert metrics["padding"] < padded["padding"], (layout, metrics["padding"], padded["padding"])
    rows = [r for r in read_jsonl(tmp_path / "pack" / "metrics.jsonl") if "loss" in r]
    assert all(0 <= r["padding"] < 1 and r["tokens_per_s"] > 0 and r["data_wait_s"] >= 0 for r in rows)
    assert padded["mfu"] is None  # no GPU: no peak to divide by, so no made-up figure


def test_model_flops_count_the_linear_maps_and_what_trains(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    c = model.config
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    full = FlopsModel.of(model)
    assert full.matmul_params == c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    assert full.trained_matmul_params == full.matmul_params
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    lora = FlopsModel.of(adapted)
    lora_size = c.num_hidden_layers * 4 * 2 * c.hidden_size
    assert lora.matmul_params == full.matmul_params + lora_size and lora.trained_matmul_params == lora_size
    assert lora.step_flops(100, 0) == 100 * (4 * lora.matmul_params + 2 * lora_size)
    assert lora.step_flops(0, 10) == 3 * 4 * c.num_hidden_layers * c.hidden_size * 10


def test_peak_flops_are_looked_up_by_device_name(monkeypatch):
    assert device_peak_flops(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peak_flops(torch.device("cuda"), "bf16") == PEAK_FLOPS["H100 PCIe"]["bf16"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops(torch.device("cuda"), "bf16") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert device_peak_flops(torch.device("cuda"), "bf16") is None
