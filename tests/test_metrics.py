"""Classification metrics from a confusion matrix agree with scikit-learn's definitions; model FLOPs and the
peak they are divided by (launcher/train/throughput.py)."""

import pytest
import torch

from launcher.train.evaluate import classification_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def confusion_of(y_true: torch.Tensor, y_pred: torch.Tensor, num_labels: int) -> torch.Tensor:
    """confusion[true, predicted], built the way evaluate() builds it."""
    pairs = y_true * num_labels + y_pred
    return torch.bincount(pairs, minlength=num_labels * num_labels).view(num_labels, num_labels)


def sklearn_reference(y_true: torch.Tensor, y_pred: torch.Tensor) -> dict[str, float]:
    precision, recall, f1, _ = sklearn_metrics.precision_recall_fscore_support(
        y_true.numpy(), y_pred.numpy(), average="macro", zero_division=0
    )
    return {"accuracy": sklearn_metrics.accuracy_score(y_true.numpy(), y_pred.numpy()),
            "precision": precision, "recall": recall, "f1": f1}


@pytest.mark.parametrize("seed", range(8))
def test_macro_metrics_match_sklearn_with_absent_and_never_true_classes(seed):
    # Six labels: 0-2 occur in truth and predictions, 3 is in neither, 4 is predicted but never
    # true, 5 is true but never predicted.
    generator = torch.Generator().manual_seed(seed)
    n = 60
    y_true = torch.randint(0, 3, (n,), generator=generator)
    y_pred = torch.where(torch.rand(n, generator=generator) < 0.6, y_true,
                         torch.randint(0, 3, (n,), generator=generator))
    y_pred[:4] = 4
    y_true[-3:] = 5
    y_pred[-3:] = torch.tensor([0, 1, 2])
    assert not ((y_true == 3) | (y_pred == 3)).any()

    got = classification_metrics(confusion_of(y_true, y_pred, num_labels=6))
    expected = sklearn_reference(y_true, y_pred)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_a_perfect_model_scores_one_when_a_class_is_missing_from_the_eval_set():
    y = torch.tensor([0, 0, 1, 2, 2, 2])  # class 3 exists in the label set but not in this eval set
    got = classification_metrics(confusion_of(y, y, num_labels=4))
    assert got == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_a_class_predicted_but_never_true_counts_with_zero_precision():
    y_true = torch.tensor([0, 0, 1, 1])
    y_pred = torch.tensor([0, 2, 1, 1])  # one wrong guess of class 2, which never occurs
    got = classification_metrics(confusion_of(y_true, y_pred, num_labels=3))
    assert got["precision"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert got == pytest.approx(sklearn_reference(y_true, y_pred))


# ---------------------------------------------------------------------------- model FLOPs and their utilisation


def _fake_cuda(monkeypatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_float32_counts_the_tf32_peak_only_while_tf32_is_on(monkeypatch):
    from launcher.train.throughput import device_peak_flops

    _fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB")
    matmul = torch.backends.cuda.matmul  # a module-like object monkeypatch cannot restore: by hand
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert device_peak_flops(torch.device("cuda"), "fp32") == 19.5e12  # CUDA cores
        matmul.allow_tf32 = True
        assert device_peak_flops(torch.device("cuda"), "fp32") == 156e12  # TF32 tensor cores
        assert device_peak_flops(torch.device("cuda"), "bf16") == 312e12  # whatever TF32 says
    finally:
        matmul.allow_tf32 = before


@pytest.mark.parametrize("name, bf16", [("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_devices_are_matched_by_their_whole_model_name(monkeypatch, name, bf16):
    """An L40 or L40S is not an L4 (a substring match read both as one)."""
    from launcher.train.throughput import device_peak_flops

    _fake_cuda(monkeypatch, name)
    assert device_peak_flops(torch.device("cuda"), "bf16") == bf16


class _Fake(torch.nn.Module):
    """Linear maps named as transformers names them, and a config: no model is built."""

    def __init__(self, config, maps: dict[str, tuple[int, int]], frozen: tuple[str, ...] = ()):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(**config)
        self.maps = torch.nn.ModuleDict({name.replace(".", "_"): torch.nn.Linear(i, o, bias=False, device="meta")
                                         for name, (i, o) in maps.items()})
        self._names = {name.replace(".", "_"): name for name in maps}
        for key in frozen:
            self.maps[key.replace(".", "_")].weight.requires_grad_(False)

    def named_modules(self, *args, **kwargs):
        yield "", self
        for key, module in self.maps.items():
            yield self._names[key], module


def test_attention_flops_use_heads_times_head_dim_not_hidden():
    """Qwen3- or Gemma-like: 4 heads of 32 on a 64-wide model attend over 128 dimensions."""
    from launcher.train.throughput import FlopsModel

    model = _Fake({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32, "num_hidden_layers": 2},
                  {"model.layers.0.self_attn.q_proj": (64, 128)})
    assert FlopsModel.of(model).step_flops(0, 10) == 3 * 4 * 2 * 128 * 10
    no_head_dim = _Fake({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}, {})
    assert FlopsModel.of(no_head_dim).step_flops(0, 10) == 3 * 4 * 2 * 64 * 10  # head_dim = hidden / heads


def test_the_head_runs_only_on_the_positions_that_need_logits():
    from launcher.train.throughput import FlopsModel

    config = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}
    causal = FlopsModel.of(_Fake(config, {"model.layers.0.mlp.up_proj": (8, 16), "lm_head": (8, 100)},
                                 frozen=("model.layers.0.mlp.up_proj", "lm_head")))
    assert (causal.head_params, causal.matmul_params) == (800, 928)
    # 50 positions, 10 of them labels (the chunked loss computes logits there only).
    assert causal.step_flops(50, 0, logit_positions=10) == 50 * 4 * 128 + 10 * 4 * 800
    assert causal.step_flops(50, 0) == 50 * 4 * 928  # logits everywhere
    # A classifier: the pooler and the head run on one pooled position per example (4 here).
    encoder = FlopsModel.of(_Fake(config, {"bert.encoder.layer.0.intermediate.dense": (8, 16),
                                           "bert.pooler.dense": (8, 8), "classifier": (8, 3)},
                                  frozen=("bert.encoder.layer.0.intermediate.dense", "bert.pooler.dense")))
    assert (encoder.head_params, encoder.trained_head_params) == (88, 24)
    assert encoder.step_flops(64, 0, logit_positions=4) == 64 * 4 * 128 + 4 * (4 * 88 + 2 * 24)
