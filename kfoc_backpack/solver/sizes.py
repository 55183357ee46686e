"""The sizes of a weight's per-sample terms, as the solver's cost models read them.

Index conventions (those of the solver package): ``J`` columns per sample, ``K``
samples, ``T`` positions sharing the weight, ``M`` output features (left factor
``[M, M]``), ``N`` input features (right factor ``[N, N]``).
"""

from __future__ import annotations

from typing import NamedTuple


class LayerSizes(NamedTuple):
    """What the solver is handed, in numbers: ``X_{j,k} = G_{j,k}ᵀ A_k``.

    Attributes:
        columns: ``J``, output-side vectors per input (MC samples, Hessian-root columns).
        samples: ``K``, inputs of the batch.
        positions: ``T``, positions sharing the weight (1 for a rank-one layer).
        out_features: ``M``, rows of the weight matrix (left factor ``[M, M]``).
        in_features: ``N``, columns of the weight matrix (right factor ``[N, N]``).
        groups: The convolution's ``groups`` (1 otherwise).
    """

    columns: int
    samples: int
    positions: int
    out_features: int
    in_features: int
    groups: int = 1
