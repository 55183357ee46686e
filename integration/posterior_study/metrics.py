"""Test metrics of a predictive distribution, as ``integration/posterior.py`` reports them.

Classification (``N`` inputs, ``C`` classes): ``[N, C]`` class probabilities or
log-probabilities and ``[N]`` integer labels; negative log-likelihood, accuracy, expected
calibration error (:data:`ECE_BINS` equal-width confidence bins) and the multi-class
Brier score. Regression: ``[N]`` predictive means, variances and targets; Gaussian
negative log-likelihood and RMSE. Every metric is computed in float64 and returned as a
Python float, a mean over the ``N`` inputs. :func:`metrics` picks the task's metrics of a
``(mean or log-probabilities, variance or None)`` pair, the return value of
:func:`integration.posterior_study.predictive.predictive`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error."""


def classification_nll(log_probs: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood ``-mean_n log p_n[y_n]`` of ``[N, C]`` log-probabilities."""
    return float(-log_probs.double().gather(1, targets.view(-1, 1)).mean())


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of inputs whose most probable class is the label (ties: lowest index)."""
    return float((probs.argmax(1) == targets).double().mean())


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Multi-class Brier score ``mean_n Σ_c (p_nc − 1[y_n = c])²`` (0 best, 2 worst)."""
    onehot = F.one_hot(targets, probs.shape[1]).double()
    return float((probs.double() - onehot).square().sum(1).mean())


def expected_calibration_error(probs: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """Return the expected calibration error with ``bins`` equal-width confidence bins.

    The confidence of an input is its largest class probability; bin ``b`` holds the
    confidences in ``(b/bins, (b+1)/bins]`` (a confidence of 0 goes to the first bin).
    ``ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|`` over non-empty bins.
    """
    confidence, predicted = probs.double().max(1)
    correct = (predicted == targets).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((acc_sum - conf_sum).abs().sum() / len(targets))


def classification_metrics(log_probs: Tensor, targets: Tensor) -> dict[str, float]:
    """NLL, accuracy, ECE and Brier score of ``[N, C]`` predictive log-probabilities."""
    probs = log_probs.double().exp()
    return {
        "nll": classification_nll(log_probs, targets),
        "accuracy": accuracy(probs, targets),
        "ece": expected_calibration_error(probs, targets),
        "brier": brier_score(probs, targets),
    }


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> float:
    """Mean Gaussian NLL ``½ log(2π v) + (y − μ)² / (2 v)`` (all tensors ``[N]``)."""
    mean, var, targets = mean.double(), var.double(), targets.double()
    return float(
        (0.5 * torch.log(2 * math.pi * var) + (targets - mean).square() / (2 * var)).mean()
    )


def rmse(mean: Tensor, targets: Tensor) -> float:
    """Root mean squared error."""
    return float((mean.double() - targets.double()).square().mean().sqrt())


def regression_metrics(mean: Tensor, var: Tensor, targets: Tensor) -> dict[str, float]:
    """Gaussian NLL and RMSE of a predictive ``N(mean, var)`` (``[N]`` each)."""
    return {"nll": gaussian_nll(mean, var, targets), "rmse": rmse(mean, targets)}


def metrics(task: str, prediction: tuple[Tensor, Tensor | None], targets: Tensor) -> dict:
    """Metrics of a :func:`predictive` on the targets."""
    if task == "classification":
        return classification_metrics(prediction[0], targets)
    return regression_metrics(prediction[0], prediction[1], targets.view(-1))
