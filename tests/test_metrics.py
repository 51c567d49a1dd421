"""Classification metrics from a confusion matrix agree with scikit-learn's definitions."""

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
