"""Lean loading under FSDP2: only rank 0 reads the weights, the other ranks build on the meta device and
are filled from rank 0 after sharding. The runs must train exactly like runs where every rank loads
(TUNEFLEET_FSDP_FULL_LOAD=1) and like DDP; rank 1 must really have held no weights before sharding."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from launcher.model import lean_load
from tests.helpers import read_jsonl
from tests.helpers import BACKENDS, artifact_tensors, assert_same_adapter, crash_after, launch, losses, on_two_ranks

pytestmark = pytest.mark.slow

FULL_LOAD = "TUNEFLEET_FSDP_FULL_LOAD"
# Dropout on, as real runs have it: the ranks' dropout masks must not depend on who loaded.
WORDS = ["peft.dropout=0.1", "train.max_steps=4", "eval.every_steps=4", "eval.at_start=false",
         "train.global_batch_size=4", "train.micro_batch_size=1", "eval.sample_prompts=[Define river.]",
         "eval.sample_max_new_tokens=6", "train.checkpoint_every=2", "train.keep_checkpoints=5"]


def loading(run_dir: Path) -> dict:
    return json.loads((run_dir / "distributed.json").read_text())["fsdp"]["model_loading"]


def samples(run_dir: Path) -> list:
    return read_jsonl(run_dir / "samples.jsonl")


def assert_lean(run_dir: Path) -> None:
    record = loading(run_dir)
    assert record["how"] == lean_load.LEAN and record["why"] is None
    # Measured on each rank just before fully_shard: rank 1 held no weights at all.
    assert record["params_on_meta_before_sharding"] == [False, True]
    assert any(name.endswith("rotary_emb.inv_freq") for name in record["broadcast_buffers"])
    assert any(group[0].endswith("embed_tokens.weight") and group[1].endswith("lm_head.weight")
               for group in record["tied"]), record["tied"]


def launch_full_load(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as env:
        env.setenv(FULL_LOAD, "1")
        return launch(*args, **kwargs)


@pytest.fixture(scope="module")
def lean_lora(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lean") / "run"
    launch(run_dir, "lora", tiny_llama, *WORDS, *BACKENDS["fsdp"])
    return run_dir


def test_lean_lora_trains_like_loading_on_every_rank_and_like_ddp(lean_lora, tiny_llama, tmp_path, monkeypatch):
    assert_lean(lean_lora)
    launch_full_load(monkeypatch, tmp_path / "full", "lora", tiny_llama, *WORDS, *BACKENDS["fsdp"])
    record = loading(tmp_path / "full")
    assert record["how"] == lean_load.EVERY_RANK and FULL_LOAD in record["why"]
    assert record["params_on_meta_before_sharding"] == [False, False]
    launch(tmp_path / "ddp", "lora", tiny_llama, *WORDS, *BACKENDS["ddp"])
    for other in (tmp_path / "full", tmp_path / "ddp"):
        assert losses(lean_lora) == pytest.approx(losses(other), rel=1e-5)
        assert_same_adapter(other, lean_lora)
        assert samples(lean_lora) == samples(other)


def test_resuming_a_lean_run_is_exact(lean_lora, tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(lean_lora, run_dir)
    crash_after(run_dir, 2)
    launch(run_dir, "lora", tiny_llama, *WORDS, *BACKENDS["fsdp"], "train.resume=auto")
    assert_lean(run_dir)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert losses(run_dir) == pytest.approx(losses(lean_lora), rel=1e-5)
    assert_same_adapter(lean_lora, run_dir)


@pytest.mark.parametrize("words", [["train.precision=fp32"], ["train.precision=bf16"]], ids=["fp32", "bf16"])
def test_lean_full_finetuning_keeps_tied_weights_and_matches(words, tiny_llama, tmp_path, monkeypatch):
    common = ["train.max_steps=3", "eval.every_steps=null", "eval.at_start=false", "eval.sample_prompts=[]",
              "train.global_batch_size=4", "train.micro_batch_size=1", *words, *BACKENDS["fsdp"]]
    launch(tmp_path / "lean", "full", tiny_llama, *common)
    launch_full_load(monkeypatch, tmp_path / "full", "full", tiny_llama, *common)
    assert_lean(tmp_path / "lean")
    written = json.loads((tmp_path / "lean" / "distributed.json").read_text())
    assert written["fsdp"]["param_dtype"] == ("bfloat16" if "bf16" in words[0] else "float32")
    assert losses(tmp_path / "lean") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    lean, full = artifact_tensors(tmp_path / "lean"), artifact_tensors(tmp_path / "full")
    assert lean.keys() == full.keys() and "lm_head.weight" not in lean  # saved once: still tied
    for key in full:
        torch.testing.assert_close(lean[key], full[key], atol=1e-5, rtol=1e-4)


# In-process checks of the pieces, on two gloo ranks started with torch.multiprocessing.

def _builder(model_dir: str, *words: str):
    from launcher.config.load import load_recipe
    from launcher.train.build import build_model

    _, recipe = load_recipe([f"model.name={model_dir}", *words])
    return lambda on_meta: build_model(model_dir, recipe, None, 0, torch.device("cpu"), on_meta)


def _fill_and_compare(rank, model_dir):
    for dtype in ("float32", "bfloat16"):  # bfloat16: the adapters still train in float32
        _fill_and_compare_one(rank, model_dir, f"model.dtype={dtype}")


def _fill_and_compare_one(rank, model_dir, dtype_word):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from launcher.methods.common import transformer_layers

    build = _builder(model_dir, "recipe=lora", dtype_word)
    model, record = lean_load.build_everywhere(build)
    assert record.lean and all(p.is_meta for p in model.parameters()) == (rank == 1)
    source = lean_load.source_state(model) if rank == 0 else None
    for block in transformer_layers(model):
        fully_shard(block)
    fully_shard(model)
    sent = lean_load.fill_from_rank0(model, source, torch.device("cpu"), torch.device("cpu"), record.tied)
    assert sent == ["base_model.model.model.rotary_emb.inv_freq", "base_model.model.model.rotary_emb.original_inv_freq"]

    # What every rank would have had loading for real (seeded: the same adapter initialisation).
    expected = build(False)
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    want = expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    buffers, expected_buffers = dict(model.named_buffers()), dict(expected.named_buffers())
    for name in sent:
        torch.testing.assert_close(buffers[name], expected_buffers[name], rtol=0, atol=0)
    flags = {n: (p.requires_grad, p.dtype) for n, p in model.named_parameters()}
    assert flags == {n: (p.requires_grad, p.dtype) for n, p in expected.named_parameters()}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    inner = model.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight


def test_meta_ranks_get_rank0_weights_buffers_adapters_ties_and_flags(tiny_llama):
    on_two_ranks(_fill_and_compare, str(tiny_llama))


def _falls_back(rank, model_dir):
    build = _builder(model_dir, "recipe=lora")

    def fails_on_meta(on_meta):
        if on_meta:
            raise NotImplementedError("no meta today")
        return build(False)

    model, record = lean_load.build_everywhere(fails_on_meta)
    assert record.how == lean_load.EVERY_RANK
    assert record.why == "rank 1 could not build on the meta device: NotImplementedError: no meta today"
    assert not any(p.is_meta for p in model.parameters())

    other = _builder(model_dir, "recipe=full")  # every parameter trainable: not rank 0's model
    model, record = lean_load.build_everywhere(lambda on_meta: (other if on_meta else build)(on_meta))
    assert record.how == lean_load.EVERY_RANK and record.why.startswith("rank 1 built a model with other params")
    assert sum(p.requires_grad for p in model.parameters()) == 16  # rank 1 rebuilt rank 0's LoRA model


def _continues_from_rank0_generators(rank, model_dir):
    """A new classification head is drawn at random on rank 0 only: afterwards every rank's generators
    must be where they would be had it drawn the head itself (dropout masks depend on them)."""
    import types

    import torch.distributed as dist

    from launcher.config.load import load_recipe
    from launcher.distributed.fsdp_backend import FsdpBackend
    from launcher.train.build import build_model

    _, recipe = load_recipe(["recipe=classify_lora", f"model.name={model_dir}", "distributed.backend=fsdp"])
    build = lambda on_meta: build_model(model_dir, recipe, ["a", "b"], 0, torch.device("cpu"), on_meta)  # noqa: E731
    build(False)
    loaded = torch.get_rng_state()
    backend = FsdpBackend(recipe, 1, "no")
    backend.build_model(types.SimpleNamespace(num_processes=2), build)
    assert backend.loading.lean
    assert torch.equal(torch.get_rng_state(), loaded)
    states = [None, None]
    dist.all_gather_object(states, torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def _fallback_and_generators(rank, llama_dir, bert_dir):
    _falls_back(rank, llama_dir)
    _continues_from_rank0_generators(rank, bert_dir)


def test_meta_failures_make_every_rank_load_and_generators_follow_rank0(tiny_llama, tiny_bert):
    on_two_ranks(_fallback_and_generators, str(tiny_llama), str(tiny_bert))
