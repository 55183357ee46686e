"""Layer kinds: the one description each kind hands the solver, on both collection routes.

Each kind's inputs and vectors at its positions against an independent construction
(``torch.nn.functional.unfold``, plain reshapes), for plain, folded and sequence-first
layouts; the registry's list follows the kinds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kfoc_backpack.collect.batch_layout import BatchLayout
from kfoc_backpack.collect.kinds import kind_of
from kfoc_backpack.collect.kinds.conv import ConvKind
from kfoc_backpack.collect.kinds.embedding import EmbeddingKind
from kfoc_backpack.collect.kinds.linear import LinearKind
from kfoc_backpack.collect.kinds.norm import BatchNormKind, LayerNormKind
from kfoc_backpack.collect.registry import NORM_LAYERS, SUPPORTED_LAYERS, unsupported_reason


class MyLinear(nn.Linear):
    """A subclass with the layer's own ``forward`` (the hook route accepts it)."""


def test_kind_of_matches_types_and_subclasses():
    assert isinstance(kind_of(nn.Linear(2, 3)), LinearKind)
    assert isinstance(kind_of(nn.Conv1d(2, 3, 1)), ConvKind)
    assert isinstance(kind_of(nn.LayerNorm(3)), LayerNormKind)
    assert isinstance(kind_of(nn.BatchNorm2d(3)), BatchNormKind)
    assert kind_of(nn.BatchNorm2d(3), exact_type=True) is None  # no BackPACK extension
    assert isinstance(kind_of(nn.Embedding(4, 3)), EmbeddingKind)
    assert kind_of(nn.Embedding(4, 3), exact_type=True) is None
    assert isinstance(kind_of(MyLinear(2, 3)), LinearKind)
    assert kind_of(MyLinear(2, 3), exact_type=True) is None  # BackPACK dispatches on type
    assert set(SUPPORTED_LAYERS) == {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d}
    norms = {nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d}
    assert norms | {nn.SyncBatchNorm, nn.RMSNorm} == set(NORM_LAYERS)


def test_registry_reasons_come_from_the_kind():
    assert unsupported_reason(nn.Conv2d(2, 3, 3, padding="same")) is not None
    assert unsupported_reason(nn.Conv2d(2, 3, 3, padding_mode="reflect")) is not None
    assert unsupported_reason(nn.Conv2d(4, 4, 3, groups=4)) is None


@pytest.mark.parametrize(
    "layout", [BatchLayout(), BatchLayout(fold=2), BatchLayout(fold=2, sample_major=False)]
)
def test_linear_positions(layout):
    num, tokens, fold = 3, 4, layout.fold
    x = torch.randn(num * fold, tokens, 5)
    g = torch.randn(2, num * fold, tokens, 6)
    kind = LinearKind()
    inputs, vectors = kind.inputs(nn.Linear(5, 6), x, layout), kind.vectors(None, g, layout)
    assert inputs.shape == (num, fold * tokens, 5) and vectors.shape == (2, num, fold * tokens, 6)
    for n in range(num):  # input n's rows, in either fold order, as positions
        rows = [n * fold + j if layout.sample_major else j * num + n for j in range(fold)]
        torch.testing.assert_close(inputs[n], x[rows].flatten(end_dim=1))
        torch.testing.assert_close(vectors[:, n], g[:, rows].flatten(1, 2))


def test_linear_sequence_first_and_one_position():
    kind, x = LinearKind(), torch.randn(7, 3, 5)  # [T, N, I]
    inputs = kind.inputs(None, x, BatchLayout(dim=1))
    torch.testing.assert_close(inputs, x.transpose(0, 1))
    assert kind.inputs(None, torch.randn(3, 5)).shape == (3, 1, 5)  # 2-d: one position
    assert kind.vectors(None, torch.randn(2, 3, 6)).shape == (2, 3, 1, 6)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_positions_are_the_unfolded_patches(groups):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=groups)
    x = torch.randn(3, 4, 7, 7)
    out = conv(x)
    g = torch.randn(2, *out.shape)
    kind = ConvKind()
    unfolded = F.unfold(x, 3, padding=1, stride=2)  # [N, C_in·9, T]
    torch.testing.assert_close(kind.inputs(conv, x), unfolded.transpose(1, 2))
    torch.testing.assert_close(kind.vectors(conv, g), g.flatten(3).transpose(2, 3))
    assert kind.groups(conv) == groups
