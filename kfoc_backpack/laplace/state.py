"""What a Laplace class of this package saves and loads: the raw blocks and the aggregation.

A mixin of :class:`~kfoc_backpack.laplace.base.BlockLaplace` in front of laplace-torch's
``KronLaplace``: ``state_dict`` adds to laplace-torch's the raw blocks (their states,
:meth:`~kfoc_backpack.blocks.Block.state`) and the aggregation; ``load_state_dict``
restores them (also from a state saved before the blocks were typed).
"""

from __future__ import annotations

import warnings
from typing import Any

from laplace.baselaplace import KronLaplace

from kfoc_backpack.blocks import Block, EigenCorrected


class BlockState:
    """State dicts of a :class:`~kfoc_backpack.laplace.base.BlockLaplace`."""

    def state_dict(self) -> dict[str, Any]:
        """``KronLaplace``'s state dict plus the aggregation and the raw blocks.

        ``"blocks"``: per trainable parameter, its raw block (without the likelihood
        factor) as :meth:`~kfoc_backpack.blocks.Block.state` gives it.
        """
        state = super().state_dict()
        state["aggregation"] = self.aggregation
        state["blocks"] = [block.state() for block in self._raw.values()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same class (warns on another aggregation).

        Raises:
            ValueError: For a state of another Laplace class (laplace-torch's check), or
                blocks of another structure than the class fits.
        """
        super(KronLaplace, self).load_state_dict(state_dict)  # not KronLaplace's decomposition
        saved = state_dict.get("aggregation", self.aggregation)
        if saved != self.aggregation:
            warnings.warn(
                f"Loading factors aggregated with {saved!r} into a {type(self).__name__} "
                f"with aggregation={self.aggregation!r}; online fits continue with "
                f"{self.aggregation!r}.",
                UserWarning,
                stacklevel=2,
            )
        blocks = self._saved_blocks(state_dict)
        self._check_kinds(blocks)
        self._set_fitted(dict(zip(self.backend.named_trainable, blocks)))

    def _saved_blocks(self, state: dict[str, Any]) -> list[Block]:
        """Return the raw blocks of a state (also of one saved before the blocks were typed).

        A state without ``"blocks"`` holds laplace-torch's ``kfacs`` times the likelihood
        factor under ``"H"`` and, per parameter, an eigenvalue-corrected weight's
        ``(U_L, U_R, S)`` or ``None`` under ``"corrected"``.
        """
        if "blocks" in state:
            return [Block.from_state(entry) for entry in state["blocks"]]
        factor = float(self.backend.factor)
        zeros = list(self.backend.collector.zero_blocks().values())
        corrected = state.get("corrected") or [None] * len(zeros)
        blocks: list[Block] = []
        for zero, kfacs, saved in zip(zeros, state["H"], corrected):
            block = zero.from_kfacs(list(kfacs)).scaled(1.0 / factor, even=True)
            blocks.append(block if saved is None else EigenCorrected(*saved, factors=block))
        return blocks

    def _check_kinds(self, blocks: list[Block]) -> None:
        """Refuse blocks of another structure than the approximation fits.

        Raises:
            ValueError: Naming the kinds found and the class's structure.
        """
        expected = set(self.approximation.block_kinds)
        found = {block.kind for block in blocks}
        if not found <= expected:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state has blocks of kinds "
                f"{sorted(found)}; hessian_structure={self.approximation.structure.value!r} "
                f"fits {sorted(expected)}."
            )
