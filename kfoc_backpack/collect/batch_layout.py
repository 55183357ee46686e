r"""Where a layer's activations keep the inputs of the batch (the hook route).

A layer inside a model need not see the batch as the model does. Three layouts occur:

* the inputs in dimension 0 (the common case) or 1 (``batch_first=False`` attention);
* dimension 0 folded, ``N·k`` rows with ``k`` rows per input: a reward model scores
  each preference pair by flattening ``[N, 2, D]`` to ``[2N, D]`` (sample-major,
  rows ``n·k … n·k + k − 1`` belong to input ``n``), or a model stacks ``k`` views
  of the batch by ``torch.cat`` (group-major, rows ``j·N + n``).

For a weight, an input's ``k`` rows are ``k`` more positions sharing it: the per-sample
matrix is ``X_n = Σ_{j,t} g_{n,j,t} a_{n,j,t}ᵀ``, the same object as a ``Linear`` on
tokens. :class:`BatchLayout` records the layout and puts the inputs first (and the
``k`` rows beside the positions); :func:`detect_layout` finds it from the gradient of
input 0's output alone, which must stay in input 0's rows.

Index conventions: ``N`` inputs of the batch, ``k`` rows per input, ``M`` leading
output-side vectors, ``T`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class BatchLayout:
    """Where a layer's output (and input) keeps the batch's ``N`` inputs.

    Attributes:
        dim: Dimension that indexes the inputs (0 or 1) when ``fold == 1``.
        fold: ``k`` rows per input in dimension 0, or 1 (no fold).
        sample_major: With ``fold > 1``: rows ``n·k + j`` (``True``) or ``j·N + n``.
    """

    dim: int = 0
    fold: int = 1
    sample_major: bool = True

    def split(self, tensor: Tensor, lead: int = 0) -> Tensor:
        """Put the inputs in dimension ``lead`` (and a fold's ``k`` rows in ``lead + 1``).

        Args:
            tensor: ``[*lead, …]`` activations in this layout (``lead`` leading
                dimensions, e.g. the ``M`` output-side vectors, come first).
            lead: Number of leading dimensions before the layer's own.

        Returns:
            ``[*lead, N, …]`` without a fold, ``[*lead, N, k, …]`` with one (views
            where possible).
        """
        if self.fold == 1:
            return tensor.movedim(lead + self.dim, lead)
        if self.sample_major:
            return tensor.unflatten(lead, (-1, self.fold))
        return tensor.unflatten(lead, (self.fold, -1)).transpose(lead, lead + 1)

    def positions(self, tensor: Tensor, lead: int = 0) -> Tensor:
        """``[*lead, N·k (folded), C, T]`` as ``[*lead, N, C, k·T]``: rows become positions.

        For convolutions' unfolded inputs ``[N, I, T]`` and output-side vectors
        ``[M, N, O, T]``; without a fold the tensor is returned with its inputs in
        dimension ``lead``.
        """
        split = self.split(tensor, lead)
        if self.fold == 1:
            return split
        return split.movedim(lead + 1, -2).flatten(start_dim=-2)


PLAIN = BatchLayout()
"""The inputs in dimension 0, no fold."""


def detect_layout(
    shape: tuple[int, ...], num: int, grad: Tensor | None, any_dim: bool, default: BatchLayout
) -> BatchLayout | None:
    """Find the layout of a layer output of ``shape`` for a batch of ``num`` inputs.

    Candidates, in order: dimension 0, dimension 1 (only where ``any_dim``: layers
    whose last dimension carries the features, i.e. ``Linear``), then dimension 0
    folded sample-major and group-major (where ``shape[0]`` is a multiple ``k > 1``
    of ``num``). The first candidate in which ``grad`` — the gradient, at this
    output, of a function of input 0's model output alone — vanishes outside input
    0's rows is taken.

    Args:
        shape: The layer output's shape.
        num: Inputs of the batch.
        grad: That gradient, or ``None``/all zeros when it does not reach the layer.
        any_dim: Whether dimension 1 may index the inputs.
        default: Layout to keep when ``grad`` cannot tell (an earlier batch's), if it
            is a candidate.

    Returns:
        The layout, or ``None`` when no dimension has the batch size.

    Raises:
        ValueError: When candidates exist but input 0's gradient leaks into other
            inputs' rows in all of them (coupled inputs).
    """
    candidates = [
        BatchLayout(dim=d)
        for d in ((0, 1) if any_dim else (0,))
        if d < len(shape) - (1 if any_dim else 0) and shape[d] == num
    ]
    if num > 0 and shape and shape[0] % num == 0 and shape[0] > num:
        fold = shape[0] // num
        candidates += [BatchLayout(fold=fold), BatchLayout(fold=fold, sample_major=False)]
    if not candidates:
        return None
    if grad is None or not bool(grad.ne(0).any()):
        return default if default in candidates else candidates[0]
    for layout in candidates:
        others = layout.split(grad)[1:]
        if not bool(others.ne(0).any()):
            return layout
    raise ValueError("input 0's output depends on other inputs' activations")
