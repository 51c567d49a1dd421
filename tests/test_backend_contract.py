"""The backend contract: every backend implements all of it, the loop uses nothing else, and the
choices it rests on (which modules are the blocks, what weight decay sees) hold on real models."""

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.distributed.backend import Backend

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {name for name in vars(Backend) if not name.startswith("_")} | set(Backend.__annotations__)


def backend_classes():
    from launcher.distributed.ddp_backend import DdpBackend
    from launcher.distributed.deepspeed_backend import DeepSpeedBackend
    from launcher.distributed.fsdp_backend import FsdpBackend

    return [DdpBackend, DeepSpeedBackend, FsdpBackend]


@pytest.mark.parametrize("cls", backend_classes(), ids=lambda c: c.__name__)
def test_every_backend_implements_the_whole_contract(cls):
    missing = sorted(name for name in CONTRACT if not hasattr(cls, name))
    assert not missing, f"{cls.__name__} lacks {missing}"
    for name, member in vars(Backend).items():
        if callable(member) and not name.startswith("_"):
            expected = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == expected, f"{cls.__name__}.{name}"


def test_the_loop_names_no_backend_library():
    """Backend specifics stay in launcher/distributed: the loop and the build talk to the contract."""
    for path in ["launcher/train/loop.py", "launcher/train/step.py", "launcher/train/build.py",
                 "launcher/train/selection.py", "launcher/train/finish.py", "launcher/train/checkpoint.py"]:
        code = "\n".join(line.split("#")[0] for line in (ROOT / path).read_text().splitlines())
        for pattern in (r"import deepspeed", r"ds_config", r"fully_shard", r"zero_stage", r"DistributedDataParallel",
                        r"recipe\.distributed\.backend", r"deepspeed_engine"):
            assert not re.search(pattern, code), f"{path} uses {pattern}"


def test_blocks_are_the_declared_layers_not_the_longest_list(tiny_llama):
    """A mixture-of-experts layout: each block holds a list of 8 experts, longer than the 2 blocks."""
    from transformers import AutoModelForCausalLM

    from launcher.methods.common import layer_index_by_param, transformer_layers
    from launcher.train.optim import layer_scales

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for layer in model.model.layers:
        layer.mlp.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))
    assert transformer_layers(model) is model.model.layers
    assert layer_index_by_param(model)["model.layers.1.mlp.experts.7.weight"] == 1
    scales = layer_scales(model, 0.5)
    assert scales["model.layers.0.mlp.experts.0.weight"] == pytest.approx(0.25)
    # Without the model's declaration: the outermost list of identical modules, still the layers.
    model._no_split_modules = None
    model.model._no_split_modules = None
    assert transformer_layers(model) is model.model.layers


def test_partial_freeze_counts_blocks_not_experts(tiny_llama):
    from transformers import AutoModelForCausalLM

    from launcher.config.schema import PartialFreezeConfig
    from launcher.methods import partial_freeze
    from launcher.methods.common import MethodContext

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for layer in model.model.layers:
        layer.mlp.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))
    cfg = PartialFreezeConfig(method="partial_freeze", train_last_n_layers=1)
    partial_freeze.apply(model, cfg, MethodContext(task="causal_lm", model_path=str(tiny_llama)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.1.mlp.experts.3.weight" in trainable
    assert not any(n.startswith("model.layers.0.") for n in trainable)


def test_weight_decay_groups_use_the_real_shape_of_partitioned_parameters():
    """Under ZeRO-3 a parameter's local tensor is an empty 1-D placeholder; its shape is in ds_shape."""
    from launcher.train.optim import parameter_groups

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    decay_of = {name: g["weight_decay"] for g in parameter_groups(model, 1.0, 0.1, 1.0) for name in g["names"]}
    assert decay_of == {"0.weight": 0.1, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0}
