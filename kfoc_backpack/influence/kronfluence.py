r"""kronfluence's pipeline on K-FOC's factors: its eigendecomposition and correction give EK-FOC.

kronfluence (``Analyzer.fit_all_factors`` then ``compute_pairwise_scores``) fits per
tracked module an activation covariance ``A`` (input side) and a pseudo-gradient
covariance ``G`` (output side), eigendecomposes them, and with strategy ``"ekfac"``
replaces ``λ_G ⊗ λ_A`` by the per-sample gradients' diagonal in that basis. Its steps
are separate, each reading the previous step's saved factors, so K-FOC's factors can
stand in for ``A`` and ``G`` between the first two steps::

    analyzer.fit_covariance_matrices("kfoc", train_set, factor_args=args)
    use_kfoc_covariances(analyzer, "kfoc", blocks)        # K-FOC's (L, R) in place of (G, A)
    analyzer.perform_eigendecomposition("kfoc", factor_args=args)
    analyzer.fit_lambda_matrices("kfoc", train_set, factor_args=args)   # EK-FOC
    analyzer.compute_pairwise_scores("scores", "kfoc", test_set, train_set)

Only the basis of each factor matters to the correction (``λ`` is refitted), so K-FOC's
scale split is immaterial. kronfluence folds a module's bias into its weight's block (an
input entry of one); this package's blocks keep a bias apart, so modules with a bias are
refused, naming them (give the model ``bias=False`` layers, or use this package's own
:class:`~kfoc_backpack.influence.Influence`, which covers biases with their exact block).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kfoc_backpack.blocks import Block, KroneckerBlock


def use_kfoc_covariances(analyzer: Any, factors_name: str, blocks: Mapping[str, Block]) -> None:
    """Replace the saved covariance factors of ``factors_name`` by K-FOC's factors.

    Args:
        analyzer: A kronfluence ``Analyzer`` whose ``fit_covariance_matrices`` ran for
            ``factors_name``.
        factors_name: The factors to change, in place on disk.
        blocks: Per weight name (``"<module>.weight"`` as ``named_parameters`` of the
            model before ``prepare_model``), its :class:`~kfoc_backpack.blocks.KroneckerBlock`
            (e.g. a fitted ``KFOCLaplace``'s ``H_facs.blocks``).

    Raises:
        ValueError: For a tracked module with a bias, without a Kronecker block, or whose
            block does not have the covariances' shapes.
    """
    from kronfluence.factor.covariance import load_covariance_matrices, save_covariance_matrices
    from kronfluence.utils.constants import (
        ACTIVATION_COVARIANCE_MATRIX_NAME,
        GRADIENT_COVARIANCE_MATRIX_NAME,
        NUM_ACTIVATION_COVARIANCE_PROCESSED,
        NUM_GRADIENT_COVARIANCE_PROCESSED,
    )

    directory = analyzer.factors_output_dir(factors_name)
    factors = load_covariance_matrices(directory)
    activations = factors[ACTIVATION_COVARIANCE_MATRIX_NAME]
    gradients = factors[GRADIENT_COVARIANCE_MATRIX_NAME]
    for module in list(activations):
        name = f"{module}.weight"
        block = blocks.get(name)
        old_a, old_g = activations[module], gradients[module]
        if not isinstance(block, KroneckerBlock):
            raise ValueError(
                f"use_kfoc_covariances: no Kronecker block for '{name}' (tracked module "
                f"'{module}'); blocks has {sorted(blocks)}."
            )
        if block.right.shape != old_a.shape or block.left.shape != old_g.shape:
            bias = block.right.shape[0] + 1 == old_a.shape[0]
            raise ValueError(
                f"use_kfoc_covariances: module '{module}': kronfluence's factors are "
                f"{tuple(old_g.shape)} ⊗ {tuple(old_a.shape)}, the K-FOC block "
                f"{tuple(block.left.shape)} ⊗ {tuple(block.right.shape)}"
                + (
                    " (kronfluence folds the bias into the weight's block; use layers "
                    "without bias)."
                    if bias
                    else "."
                )
            )
        # kronfluence divides each covariance by its count before the eigendecomposition
        count_a = factors[NUM_ACTIVATION_COVARIANCE_PROCESSED][module].to(old_a.dtype)
        count_g = factors[NUM_GRADIENT_COVARIANCE_PROCESSED][module].to(old_g.dtype)
        activations[module] = block.right.to(old_a) * count_a
        gradients[module] = block.left.to(old_g) * count_g
    save_covariance_matrices(directory, factors)
