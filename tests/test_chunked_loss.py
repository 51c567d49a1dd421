"""The chunked (fused linear) cross-entropy gives transformers' loss and gradients, in one process
and under every backend at world size 2, without the full logits."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launcher.data.formats import IGNORE
from launcher.train import chunked_loss, loss_check
from launcher.train.chunked_loss import (
    causal_lm_loss, chunk_tokens, chunked_loss_prepared, linear_cross_entropy, prepare_chunked_loss,
)
from launcher.train.step import micro_batch_loss
from tests.helpers import LossRecipe, assert_close, loss_batch


SHAPES = {  # (vocab, hidden, layers, heads, kv heads, intermediate)
    "tiny": (512, 64, 2, 4, 2, 128),
    "smollm2": (49152, 576, 1, 9, 3, 1536),  # SmolLM2-135M's head shape, one block
}


def build(shape: str, method: str, tied: bool = True):
    """A random Llama of this shape with the method applied (full_untied: its own output head)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, layers, heads, kv, inter = SHAPES[shape]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
        tie_word_embeddings=tied, use_cache=False))
    if method in ("full", "full_untied"):
        return model
    model.requires_grad_(False)
    config = {
        # B random, not zero: otherwise the first gradient of every A is zero and proves nothing.
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                   lora_dropout=0.0, init_lora_weights=False),
        "lora_saved_head": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                              modules_to_save=["lm_head"], init_lora_weights=False),
        "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }[method]()
    return get_peft_model(model, config)


def loss_and_grads(model, inputs: dict, chunked: bool, precision: str):
    """The loss, the gradient of the head's input, and those of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    seen = {}

    def keep_input(module, args):
        args[0].retain_grad()
        seen["hidden"] = args[0]

    hook = model.get_output_embeddings().register_forward_pre_hook(keep_input)
    normalizer = torch.tensor(7.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        if chunked:
            loss = causal_lm_loss(model, inputs, normalizer)
        else:
            loss = model(**inputs, num_items_in_batch=normalizer).loss
    loss.backward()
    hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), seen["hidden"].grad.clone(), grads


@pytest.fixture
def small_chunks(monkeypatch):
    """The formula's own chunk sizes (no 256-token floor), so that these small batches use many chunks."""
    monkeypatch.setattr(chunked_loss, "MIN_CHUNK_TOKENS", 16)


CASES = [
    # (shape, method, layout, precision)
    *[("tiny", m, "padded", "fp32")
      for m in ("full", "full_untied", "lora", "lora_saved_head", "prompt_tuning", "prefix_tuning")],
    ("tiny", "full", "packed", "fp32"),
    ("tiny", "lora", "packed", "fp32"),
    ("tiny", "full_untied", "padded", "autocast"),
    ("tiny", "prompt_tuning", "padded", "autocast"),
    ("tiny", "lora", "padded", "bf16_weights"),
    ("smollm2", "full", "padded", "fp32"),
    ("smollm2", "lora", "packed", "fp32"),
    ("smollm2", "lora", "padded", "autocast"),
    ("smollm2", "lora", "padded", "bf16_weights"),
]


@pytest.mark.parametrize("shape,method,layout,precision", CASES, ids=["-".join(c) for c in CASES])
def test_loss_and_gradients_match_transformers(shape, method, layout, precision, small_chunks):
    model = build(shape, method, tied=method not in ("full_untied", "lora_saved_head"))
    if precision == "bf16_weights":  # a half-precision base with float32 adapters, as float32_trainable leaves it
        model.to(torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    inputs = loss_batch(layout, SHAPES[shape][0])
    vocab, hidden = SHAPES[shape][:2]
    assert chunk_tokens(inputs["input_ids"].numel(), vocab, hidden) < int((inputs["labels"] != IGNORE).sum()) / 2
    expected = loss_and_grads(model, inputs, chunked=False, precision=precision)
    assert prepare_chunked_loss(model, LossRecipe()) is None
    actual = loss_and_grads(model, inputs, chunked=True, precision=precision)
    tight = "fp32" if precision == "fp32" else "bf16"
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5 if tight == "fp32" else 2e-3, atol=0)
    assert actual[1].dtype == expected[1].dtype
    assert_close(actual[1], expected[1], tight, "hidden states")
    assert actual[2].keys() == expected[2].keys() and actual[2]
    for name in expected[2]:
        assert actual[2][name].dtype == expected[2][name].dtype, name
        assert_close(actual[2][name], expected[2][name], tight, name)
    if method == "full_untied":
        assert "lm_head.weight" in expected[2]  # its gradient comes from the chunked loss alone


def test_linear_cross_entropy_with_bias_ignored_rows_and_a_ragged_last_chunk(small_chunks):
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)
    bias = torch.randn(100, requires_grad=True)
    labels = torch.randint(0, 100, (2, 37))
    labels[0, :10] = IGNORE
    expected = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 100), labels.reshape(-1), reduction="sum")
    grads = torch.autograd.grad(expected * 0.5, (hidden, weight, bias))
    actual = linear_cross_entropy(hidden, weight, bias, labels)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual * 0.5, (hidden, weight, bias)), grads):
        torch.testing.assert_close(a, e)

    nothing = linear_cross_entropy(hidden, weight, bias, torch.full((2, 37), IGNORE))
    assert float(nothing.detach()) == 0.0
    assert all(float(g.abs().sum()) == 0 for g in torch.autograd.grad(nothing, (hidden, weight, bias)))


def test_frozen_head_gets_no_gradient_computed():
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(50, 16)  # frozen, as under LoRA
    loss = linear_cross_entropy(hidden, weight, None, torch.randint(0, 50, (8,)))
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.shape == hidden.shape and weight.grad is None


def test_chunk_size_keeps_one_chunk_of_logits_near_the_hidden_states(monkeypatch):
    assert chunk_tokens(8 * 512, 49152, 576) == 256  # the formula's 64, raised to the floor
    assert chunk_tokens(16 * 2048, 49152, 576) == 512  # ceil(32768 / 86) = 382 -> 512
    assert chunk_tokens(1, 49152, 576) == 256
    monkeypatch.setattr(chunked_loss, "MIN_CHUNK_TOKENS", 1)
    assert chunk_tokens(8 * 512, 49152, 576) == 64  # SmolLM2: 86 chunks -> ceil(4096/86) = 48 -> 64
    assert chunk_tokens(1, 49152, 576) == 1
    assert chunk_tokens(100, 512, 64) == 16  # 8 chunks -> 13 -> 16
    for n, v, h in ((4096, 49152, 576), (2048, 151936, 896), (777, 32000, 4096)):
        size = chunk_tokens(n, v, h)
        assert size & (size - 1) == 0
        assert size * v <= 2 * n * h + 2 * v  # at most twice the hidden states (power-of-two rounding)


def test_patched_head_is_a_plain_head_outside_the_loss():
    model = build("tiny", "lora")
    inputs = {k: v for k, v in loss_batch("padded", 512).items() if k != "labels"}
    before = model(**inputs).logits
    names = [n for n, _ in model.named_parameters()]
    prepare_chunked_loss(model, LossRecipe())
    torch.testing.assert_close(model(**inputs).logits, before)  # evaluation and generate() see logits
    assert [n for n, _ in model.named_parameters()] == names  # no wrapper module: same parameter names
    twin = copy.deepcopy(model)  # the patched forward is a bound method: it follows the copy
    head = twin.get_output_embeddings()
    assert head.forward.__self__ is head


def test_labels_are_cleared_when_the_forward_fails():
    model = build("tiny", "full")
    prepare_chunked_loss(model, LossRecipe())
    bad = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
           "position_ids": torch.zeros(2, 9, dtype=torch.long), "labels": torch.tensor([[1, 2, 3]])}
    with pytest.raises(Exception):
        causal_lm_loss(model, bad, torch.tensor(1.0))
    assert chunked_loss._pending.labels is None
    assert model(input_ids=bad["input_ids"]).logits.shape == (1, 3, 512)


def test_micro_batch_loss_takes_the_chunked_path_through_ddp(tmp_path):
    """DDP hides the model's attributes behind .module: the mark must still be found, and the
    gradients must come through DDP's reducer the same (a real one, on a one-rank gloo group).

    The process group lives in a child process with a time limit: a collective stuck inside gloo's
    C++ never returns to Python, so neither pytest-timeout's signal nor anything else could stop it
    in the test process, and the group would otherwise outlive the test in pytest's process."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import faulthandler, sys; faulthandler.dump_traceback_later(240, exit=True); "  # a stack, not a hang
            "from tests.test_chunked_loss import _chunked_path_through_ddp; _chunked_path_through_ddp(sys.argv[1])")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # one rank on this machine: loopback whatever the hostname
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "chunked path through DDP: ok" in done.stdout


def _chunked_path_through_ddp(store_file: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    inputs = loss_batch("padded", 512)
    plain = build("tiny", "lora")
    expected = micro_batch_loss(plain, inputs, torch.tensor(5.0), classification=False)
    expected.backward()
    model = build("tiny", "lora")
    assert prepare_chunked_loss(model, LossRecipe()) is None
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert chunked_loss_prepared(wrapped) and not chunked_loss_prepared(plain)
        pending = chunked_loss._pending
        calls = []
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda m, args, out: calls.append((out.ndim, pending.labels is not None)))
        got = micro_batch_loss(wrapped, inputs, torch.tensor(5.0), classification=False)
        got.backward()
        hook.remove()
    finally:
        dist.destroy_process_group()
    assert calls == [(0, True)]  # the head returned the loss: the chunked path ran
    torch.testing.assert_close(got, expected)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)
    print("chunked path through DDP: ok")


def _tiny(config_class, model_class, **extra):
    """A random 2-block model of another architecture, on the tiny vocabulary."""
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, use_cache=False, **extra))


def test_refusals_name_their_reason():
    assert prepare_chunked_loss(build("tiny", "full"), LossRecipe(chunked=False)) == "train.chunked_loss=false"
    assert "classification" in prepare_chunked_loss(build("tiny", "full"), LossRecipe(task="classification"))
    from peft import LoraConfig, get_peft_model

    plain = build("tiny", "full", tied=False)
    adapted_head = get_peft_model(plain, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["lm_head"]))
    assert "not a plain Linear" in prepare_chunked_loss(adapted_head, LossRecipe())
    assert not chunked_loss_prepared(adapted_head)


def test_the_model_s_own_loss_decides_not_a_list_of_config_keys():
    """What the forward does decides: Gemma 2 soft-caps and Cohere scales its logits after the head
    (refused, the reason names the key that explains it); a Llama ignores a stray soft-cap key
    (accepted: its loss is plain cross-entropy over the head)."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    capped = _tiny(Gemma2Config, Gemma2ForCausalLM, head_dim=16, final_logit_softcapping=30.0)
    reason = prepare_chunked_loss(capped, LossRecipe())
    assert "not cross-entropy over its output head" in reason and "final_logit_softcapping" in reason
    scaled = _tiny(CohereConfig, CohereForCausalLM, logit_scale=0.0625)
    assert "logit_scale" in prepare_chunked_loss(scaled, LossRecipe())
    assert not chunked_loss_prepared(capped) and not chunked_loss_prepared(scaled)
    stray = build("tiny", "full")
    stray.config.final_logit_softcapping = 30.0  # LlamaForCausalLM never reads it
    assert prepare_chunked_loss(stray, LossRecipe()) is None


def test_without_a_twin_the_config_decides(monkeypatch):
    """An architecture the probe cannot shrink falls back to the known config keys, and says so."""
    def no_twin(model):
        raise ValueError("cannot shrink")

    monkeypatch.setattr(loss_check, "_twin", no_twin)
    capped = build("tiny", "full")
    capped.config.final_logit_softcapping = 30.0
    reason = prepare_chunked_loss(capped, LossRecipe())
    assert "config.final_logit_softcapping" in reason and "no probe (ValueError: cannot shrink)" in reason
    assert prepare_chunked_loss(build("tiny", "full"), LossRecipe()) is None


def test_the_probe_leaves_the_run_s_random_stream_alone():
    model = build("tiny", "full")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert prepare_chunked_loss(model, LossRecipe()) is None
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------- mixture of experts


def _moe(tiny_moe):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_moe).train()  # from_pretrained leaves it in eval mode


def test_moe_router_loss_is_in_the_chunked_loss_as_in_the_model_s_own(tiny_moe, small_chunks):
    """Mixtral adds router_aux_loss_coef x aux_loss (output_router_logits): the chunked loss does too.
    With one micro batch holding every target (normalizer = targets), it equals the model's own loss,
    and so do the gradients, the router's gate weights' included."""
    model = _moe(tiny_moe)
    inputs = loss_batch("padded", model.config.vocab_size)
    targets = torch.tensor(float((inputs["labels"][:, 1:] != IGNORE).sum()))
    model.zero_grad()
    own = model(**inputs, num_items_in_batch=targets)
    assert own.aux_loss is not None and float(own.aux_loss.detach()) > 0
    own.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert prepare_chunked_loss(model, LossRecipe()) is None
    assert chunked_loss.chunked_loss_state(model).router_aux_loss_coef == 0.02
    model.zero_grad()
    loss = causal_lm_loss(model, inputs, targets)
    loss.backward()
    torch.testing.assert_close(loss, own.loss, rtol=1e-5, atol=0)
    gates = [n for n in expected if "gate" in n and "experts" not in n]
    assert gates and all(float(expected[n].abs().max()) > 0 for n in gates)
    for name, grad in expected.items():
        assert_close(dict(model.named_parameters())[name].grad, grad, "fp32", name)


def test_moe_router_loss_is_weighted_by_the_micro_batch_s_share_on_both_paths(tiny_moe):
    """Split over micro batches, each adds coef x aux_loss x (its targets / normalizer), chunked or not,
    so the router's weight in a step does not grow with accumulation; in evaluation there is none."""
    plain, chunked = _moe(tiny_moe), _moe(tiny_moe)
    assert prepare_chunked_loss(chunked, LossRecipe()) is None
    inputs = loss_batch("packed", plain.config.vocab_size)
    normalizer = torch.tensor(100.0)  # the step's targets: this micro batch holds some of them
    share = float((inputs["labels"][:, 1:] != IGNORE).sum()) / 100.0
    own = plain(**inputs, num_items_in_batch=normalizer)
    expected = own.loss - 0.02 * own.aux_loss * (1 - share)
    torch.testing.assert_close(micro_batch_loss(plain, inputs, normalizer, False), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(micro_batch_loss(chunked, inputs, normalizer, False), expected, rtol=1e-5, atol=0)
    plain.eval()
    chunked.eval()
    tokens_only = own.loss - 0.02 * own.aux_loss
    with torch.no_grad():
        for model in (plain, chunked):
            torch.testing.assert_close(micro_batch_loss(model, inputs, normalizer, False), tokens_only,
                                       rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------- fp16 with loss scaling


@pytest.mark.parametrize("method", ["full_untied", "lora"])
def test_fp16_autocast_with_a_grad_scaler_matches_the_standard_loss(method, small_chunks):
    """train.precision=fp16 scales the loss (accelerate's GradScaler on a GPU). The chunked loss
    computes its gradients in the forward pass, unscaled, and backward multiplies them by the scaled
    grad_output in float32: after unscaling they must be the standard loss's, with no inf found.
    (On a CPU accelerate gives fp16 no scaler: torch's autocast and GradScaler on the CPU stand in.)"""
    results = []
    for chunked in (False, True):
        model = build("tiny", method, tied=method != "full_untied")
        if chunked:
            assert prepare_chunked_loss(model, LossRecipe()) is None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        inputs = loss_batch("padded", 512)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = micro_batch_loss(model, inputs, torch.tensor(7.0), classification=False)
        assert loss.dtype == torch.float32
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        scaler.step(optimizer)  # lr 0: only the scaler's bookkeeping
        scaler.update()
        assert scaler.get_scale() == 2.0**16  # halved had it found an inf or a nan
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=0)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert actual_grads[name].dtype == grad.dtype == torch.float32
        assert_close(actual_grads[name], grad, "fp16", name)


# ---------------------------------------------------------------------------- world size 2, for real


SAME = ["eval.every_steps=3", "eval.at_start=false", "train.max_steps=3", "train.global_batch_size=4",
        "eval.sample_prompts=[]"]
LORA = [*SAME, "peft.dropout=0"]
CHUNKED = "[tunefleet] loss: cross-entropy in chunks of tokens"


@pytest.fixture(scope="module")
def unchunked_lora(tiny_llama, tmp_path_factory):
    """The standard loss, micro 4 x accumulation 1 x world 1, in this process."""
    from tests.helpers import run_in_process

    out = tmp_path_factory.mktemp("unchunked") / "run"
    run_in_process("lora", tiny_llama, out, *LORA, "train.micro_batch_size=4", "train.chunked_loss=false")
    return out


@pytest.fixture(scope="module")
def untied_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama with its own output head: its weight gets gradients only through the loss."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("untied")
    for file in tiny_llama.iterdir():
        if "token" in file.name or file.name.startswith("special"):
            shutil.copy(file, out / file.name)
    tied = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tied.config.tie_word_embeddings = False
    model = type(tied)(tied.config)
    state = tied.state_dict()
    torch.manual_seed(1)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.02 * torch.randn_like(state["lm_head.weight"])
    model.load_state_dict(state)
    model.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero3"])
def test_lora_chunked_at_world_size_2_matches_the_standard_loss(backend, unchunked_lora, tiny_llama, tmp_path):
    from tests.helpers import BACKENDS, assert_same_adapter, launch, losses

    done = launch(tmp_path / "run", "lora", tiny_llama, *LORA, "train.micro_batch_size=1", *BACKENDS[backend])
    assert CHUNKED in done.stdout  # the default: on, not quietly refused
    assert losses(tmp_path / "run") == pytest.approx(losses(unchunked_lora), rel=1e-5)
    assert_same_adapter(unchunked_lora, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_full_fine_tuning_trains_the_gathered_head_weight(backend, untied_llama, tmp_path):
    """The head's weight is gathered inside its own forward (ZeRO-3) or with the root (FSDP2); the
    gradient the loss returns for it must reach the optimizer's shard: the untied head must move
    exactly as under the standard loss."""
    from tests.helpers import run_in_process
    from tests.helpers import BACKENDS, assert_same_artifact, launch, losses

    words = ["eval.every_steps=null", "train.max_steps=2", "train.global_batch_size=4", "eval.sample_prompts=[]"]
    done = launch(tmp_path / "run", "full", untied_llama, *words, "train.micro_batch_size=1", *BACKENDS[backend])
    assert CHUNKED in done.stdout
    run_in_process("full", untied_llama, tmp_path / "one", *words, "train.micro_batch_size=4",
                   "train.chunked_loss=false")
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    from safetensors.torch import load_file

    start, sharded, one = (load_file(str(next(d.glob("*.safetensors"))))["lm_head.weight"]
                           for d in (untied_llama, tmp_path / "run" / "final", tmp_path / "one" / "final"))
    # The head moves ~1e-5 in two steps at lr 2e-5, about assert_same_artifact's atol: compare the moves.
    moved = (one - start).abs().max()
    assert moved > 0 and (sharded - one).abs().max() < 0.01 * moved
    assert_same_artifact(tmp_path / "run", tmp_path / "one")
