"""A grouped convolution per group (``grouped="per-group"``): one Kronecker product per group.

Ground truth, in float64: the dense GGN block of the weight from ``torch.func``
(``dense_ggn_blocks``), each group's own block ``F_gg`` cut from it and its
Frobenius-optimal product from the dense SVD of the rearranged matrix
(``optimal_error``); the block's algebra against its dense matrix; the sums against
the ungrouped block's sums group by group; the GLM predictive against the dense
posterior with ``torch.func`` Jacobians and laplace-torch's Jacobian route.
"""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import Laplace
from laplace_helpers import (
    DTYPE,
    dense_ggn_blocks,
    optimal_error,
    rel_error,
    single_thread,  # noqa: F401 (autouse fixture)
)
from torch import nn
from torch.func import functional_call, jacrev

from kfoc_backpack.blocks import (
    Block,
    GroupedCorrected,
    GroupedKroneckerBlock,
    KroneckerBlock,
    KroneckerSum,
)
from kfoc_backpack.collect.grouped import GroupedLayerTerms
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.collect.jacobians import PositionJacobian
from kfoc_backpack.enums import Aggregation, Grouped
from kfoc_backpack.solver import SolverOptions, nearest_kronecker_sum

TIGHT = SolverOptions(tol=1e-12, max_iter=5000)

# (C_in, C_out, groups, keyword arguments): rows per group 3, 2 and 1 (depthwise)
CONVS = {
    "groups2-strided": (4, 6, 2, {"stride": 2, "padding": 1}),
    "multiplier2": (3, 6, 3, {"padding": 1}),
    "depthwise-dilated": (4, 4, 4, {"dilation": 2, "padding": 2}),
}


def conv_model(case: str, dtype=DTYPE) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    c_in, c_out, groups, kwargs = CONVS[case]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, groups=groups, **kwargs)
    X = torch.randn(7, c_in, 6, 6)
    features = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    model = nn.Sequential(*features, nn.Linear(features(X).shape[1], 3))
    return model.to(dtype), X.to(dtype), torch.randint(0, 3, (7,))


def weight_terms(model, X, y) -> GroupedLayerTerms:
    batch = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))(X, y)
    terms = batch.weights["0.weight"]
    assert isinstance(terms, GroupedLayerTerms)
    return terms


def group_blocks(dense: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """Each group's own block ``F_gg`` of a weight's dense block (row-major ``vec``)."""
    size = len(dense) // groups
    return [dense[g * size : (g + 1) * size, g * size : (g + 1) * size] for g in range(groups)]


def random_block(groups=3, rows=2, columns=3, seed=0) -> GroupedKroneckerBlock:
    gen = torch.Generator().manual_seed(seed)

    def spd(size):
        a = torch.randn(groups, size, size + 1, generator=gen, dtype=DTYPE)
        return a @ a.mT

    return GroupedKroneckerBlock(spd(rows), spd(columns))


# -- the block of each group ---------------------------------------------------------------


@pytest.mark.parametrize("case", list(CONVS))
def test_each_groups_product_is_its_optimum(case):
    model, X, y = conv_model(case)
    terms = weight_terms(model, X, y)
    block = terms.kfoc_block(TIGHT)
    groups = model[0].groups
    rows, columns = model[0].out_channels // groups, model[0].weight[0].numel()
    assert block.left.shape == (groups, rows, rows)
    assert block.right.shape == (groups, columns, columns)
    dense = dense_ggn_blocks(model, X, "classification")["0.weight"]
    unfolded = nn.functional.unfold(X, 3, **{k: v for k, v in CONVS[case][3].items()})
    per_group = unfolded.unflatten(1, (groups, -1))  # [N, G, I/G, T]
    for g, exact in enumerate(group_blocks(dense, groups)):
        left, right = block.left[g], block.right[g]
        if rows == 1:  # depthwise: each channel's exact block
            torch.testing.assert_close(torch.kron(left, right), exact, rtol=1e-10, atol=1e-12)
        else:
            assert rel_error(exact, left, right) == pytest.approx(
                optimal_error(exact, rows, columns), abs=1e-7
            )
        # K-FAC's split per group: tr R_g = the group's mean squared unfolded input
        trace = per_group[:, g].square().sum() / len(X)
        torch.testing.assert_close(right.trace(), trace)
    torch.testing.assert_close(block.dense(), torch.block_diag(*(
        torch.kron(lf, rf) for lf, rf in zip(block.left, block.right)
    )))  # fmt: skip
    torch.testing.assert_close(block.trace(), block.dense().trace())


def test_float32_solves_close_to_float64():
    products = []
    for dtype in (torch.float64, torch.float32):
        model, X, y = conv_model("groups2-strided", dtype)
        block = weight_terms(model, X, y).kfoc_block(SolverOptions(tol=1e-7))
        assert block.left.dtype == dtype
        products.append(block.to(torch.float64).dense())
    assert (products[0] - products[1]).norm() / products[0].norm() < 1e-4


def test_zero_gradients_give_zero_factors_without_nan():
    model, X, y = conv_model("depthwise-dilated")
    with torch.no_grad():
        model[-1].weight.zero_()  # nothing reaches the convolution
    for case_terms in (weight_terms(model, X, y),):
        block = case_terms.kfoc_block(TIGHT)
        assert torch.isfinite(block.left).all() and (block.dense() == 0).all()


def test_coupled_structure_is_the_ungrouped_terms_of_all_rows():
    model, X, y = conv_model("multiplier2")
    coupled = weight_terms(model, X, y).with_structure(Grouped.COUPLED)
    factors = coupled.kfoc(coupled.solve(TIGHT))
    dense = dense_ggn_blocks(model, X, "classification")["0.weight"]
    assert rel_error(dense, *factors) == pytest.approx(optimal_error(dense, 6, 9), abs=1e-7)
    with pytest.raises(TypeError, match="per group"):
        weight_terms(model, X, y).solve()


# -- the block's algebra ----------------------------------------------------------------


@pytest.mark.parametrize("damping", [False, True])
def test_eigenform_answers_as_the_dense_block(damping):
    block = random_block()
    dense = block.dense()
    delta = torch.tensor(0.3, dtype=DTYPE)
    decomposed = block.decompose()
    if damping:
        root = delta.sqrt()
        eye_l, eye_r = torch.eye(2, dtype=DTYPE), torch.eye(3, dtype=DTYPE)
        shifted = torch.block_diag(*(
            torch.kron(lf + root * eye_l, rf + root * eye_r)
            for lf, rf in zip(block.left, block.right)
        ))  # fmt: skip
    else:
        shifted = dense + delta * torch.eye(len(dense), dtype=DTYPE)
    torch.testing.assert_close(decomposed.logdet(delta, damping), torch.logdet(shifted))
    rows = torch.randn(4, block.size, dtype=DTYPE)
    inverse = torch.linalg.inv(shifted)
    torch.testing.assert_close(decomposed.bmm(rows, delta, -1, damping), rows @ inverse)
    values, vectors = torch.linalg.eigh(shifted)
    root = (vectors * values.sqrt()) @ vectors.T
    torch.testing.assert_close(decomposed.bmm(rows, delta, 0.5, damping), rows @ root)
    torch.testing.assert_close(decomposed.diag(delta, -1, damping), inverse.diagonal())
    torch.testing.assert_close(decomposed.to_matrix(delta, -1, damping), inverse)
    scaled = decomposed.scaled(2.0)
    torch.testing.assert_close(scaled.to_matrix(delta * 0), 2.0 * dense)


def test_output_covariance_rotates_each_groups_factors():
    """The Jacobian's factors rotated per group = the formed rows through the dense inverse."""
    gen = torch.Generator().manual_seed(2)
    groups, rows, features, positions = 3, 2, 4, 5
    vectors = torch.randn(2, 3, positions, groups * rows, generator=gen, dtype=DTYPE)
    inputs = torch.randn(3, positions, groups * features, generator=gen, dtype=DTYPE)
    jacobian = PositionJacobian(vectors, inputs, groups)
    block = random_block(groups, rows, features, seed=3)
    delta = torch.tensor(0.7, dtype=DTYPE)
    covariance = block.decompose().output_covariance(jacobian, delta)
    J = jacobian.rows()  # [C, N, P]
    inverse = torch.linalg.inv(block.dense() + delta * torch.eye(block.size, dtype=DTYPE))
    torch.testing.assert_close(covariance, torch.einsum("cnp,pq,dnq->ncd", J, inverse, J))


def test_state_scaling_and_layouts():
    block = random_block()
    again = Block.from_state(block.state())
    assert isinstance(again, GroupedKroneckerBlock)
    torch.testing.assert_close(again.dense(), block.dense())
    torch.testing.assert_close(block.scaled(3.0).dense(), 3.0 * block.dense())
    torch.testing.assert_close(block.scaled(3.0, even=True).dense(), 3.0 * block.dense())
    torch.testing.assert_close(block.input_scaled(0.5).dense(), 0.5 * block.dense())
    assert block.from_kfacs(block.kfacs).kind == "grouped_kronecker"
    coupled = block.from_kfacs([torch.eye(6, dtype=DTYPE), torch.eye(3, dtype=DTYPE)])
    assert isinstance(coupled, KroneckerBlock)  # laplace-torch's and BackPACK's layout
    with pytest.raises(ValueError, match=r"\(3, 2, 2\)"):
        block.from_kfacs([torch.eye(5), torch.eye(3)], "'conv.weight'")
    assert block.with_structure(Grouped.PER_GROUP) is block
    assert block.with_structure(Grouped.COUPLED).left.shape == (6, 6)


# -- sums over batches and ranks --------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["approx", "running"])
@pytest.mark.parametrize("rows", [1, 2])
def test_sums_are_each_groups_sums(aggregation, rows):
    blocks = [random_block(rows=rows, seed=s) for s in range(3)]
    counts, scales = [5, 3, 4], [1.0, 2.0, 0.5]
    total = blocks[0].new_sum(aggregation)
    for block, count, scale in zip(blocks, counts, scales):
        total.add(block, count, scale)
    result = total.result()
    for g in range(3):
        zero = KroneckerBlock(blocks[0].left[g] * 0, blocks[0].right[g] * 0)
        reference = KroneckerSum(zero, Aggregation.parse(aggregation))
        for block, count, scale in zip(blocks, counts, scales):
            reference.add(KroneckerBlock(block.left[g], block.right[g]), count, scale)
        expected = reference.result()
        torch.testing.assert_close(torch.kron(result.left[g], result.right[g]), expected.dense())
        torch.testing.assert_close(result.right[g].trace(), expected.right.trace())
    if rows == 1 and aggregation == "running":  # one row per group: the sum is exact
        exact = sum(s * b.dense() for b, s in zip(blocks, scales))
        torch.testing.assert_close(result.dense(), exact)


@pytest.mark.parametrize("aggregation", ["approx", "running"])
def test_ranks_combine_like_one_process(aggregation):
    blocks = [random_block(seed=s) for s in range(2)]
    ranks = [blocks[0].new_sum(aggregation) for _ in blocks]
    for rank, block in zip(ranks, blocks):
        rank.add(block, 4, 1.0)
    counts = torch.tensor([4, 4])
    summed = [sum(parts) for parts in zip(*(rank.summed() for rank in ranks))]
    combined = ranks[0].combine(summed, [rank.gathered() for rank in ranks], counts)
    if aggregation == "approx":
        expected = blocks[0].new_sum(aggregation)
        for block in blocks:
            expected.add(block, 4, 1.0)
        torch.testing.assert_close(combined.dense(), expected.result().dense())
        return
    for g in range(3):
        lefts = torch.stack([b.left[g] for b in blocks])
        rights = torch.stack([b.right[g] for b in blocks])
        best = nearest_kronecker_sum(lefts, rights)
        product = torch.kron(combined.left[g], combined.right[g])
        torch.testing.assert_close(product, torch.kron(best.left, best.right))


# -- the eigenvalue correction -------------------------------------------------------------


@pytest.mark.parametrize("case", ["groups2-strided", "depthwise-dilated"])
def test_corrected_diagonal_is_each_groups_diagonal_in_its_basis(case):
    model, X, y = conv_model(case)
    terms = weight_terms(model, X, y)
    basis = terms.kfoc_block(TIGHT).corrected_basis("'0.weight'")
    assert isinstance(basis, GroupedCorrected)
    corrected = basis.with_diagonal(basis.diagonal_of(terms.terms))
    groups = model[0].groups
    exact = group_blocks(dense_ggn_blocks(model, X, "classification")["0.weight"], groups)
    for g, block in enumerate(exact):
        rotation = torch.kron(corrected.left_basis[g], corrected.right_basis[g])
        expected = (rotation.T @ block @ rotation).diagonal()
        torch.testing.assert_close(corrected.diagonal[g].flatten(), expected)
    torch.testing.assert_close(corrected.trace(), sum(b.trace() for b in exact))
    again = Block.from_state(corrected.state())
    assert isinstance(again, GroupedCorrected) and isinstance(again.factors, GroupedKroneckerBlock)
    torch.testing.assert_close(again.dense(), corrected.dense())
    # the projection onto another basis keeps the trace
    other = random_block(groups, *corrected.diagonal.shape[1:], seed=5).corrected_basis()
    torch.testing.assert_close(corrected.projected(other).sum(), corrected.diagonal.sum())


# -- end to end: Laplace with grouped="per-group" ------------------------------------------


class GroupedNet(nn.Module):
    """A grouped 3×3, a depthwise 3×3 and a head."""

    def __init__(self, outputs: int):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6, stride=2)
        self.head = nn.Linear(6 * 2 * 2, outputs)

    def forward(self, x):
        h = self.depthwise(torch.tanh(self.grouped(x)))
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["kfoc", "ekfoc"])
def test_laplace_predicts_with_the_dense_posterior(structure, likelihood):
    torch.manual_seed(0)
    outputs = 3 if likelihood == "classification" else 2
    model = GroupedNet(outputs).to(DTYPE)
    X = torch.randn(11, 4, 5, 5, dtype=DTYPE)
    y = torch.randint(0, 3, (11,)) if outputs == 3 else torch.randn(11, 2, dtype=DTYPE)
    la = Laplace(copy.deepcopy(model), likelihood, "all", structure, grouped="per-group")
    la.prior_precision = 0.6
    la.fit([(X[:6], y[:6]), (X[6:], y[6:])])  # an uneven last batch
    kinds = [block.kind for block in la.H_facs.blocks]
    per_group = "grouped_kronecker" if structure == "kfoc" else "grouped_corrected"
    assert kinds[0] == kinds[2] == per_group
    assert torch.isfinite(la.log_marginal_likelihood())
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda theta: functional_call(model, theta, (X[:4],)))(params)
    J = torch.cat([jac[n].flatten(start_dim=2) for n in params], dim=2)
    covariance = la.posterior_precision.to_matrix(exponent=-1)
    dense = torch.einsum("ncp,pq,ndq->ncd", J, covariance, J)
    f_mu, f_var = la._glm_predictive_distribution(X[:4])
    torch.testing.assert_close(f_var, dense, rtol=1e-9, atol=1e-12)
    Js, _ = la.backend.jacobians(X[:4])
    torch.testing.assert_close(la.functional_variance(Js), dense, rtol=1e-9, atol=1e-12)
    if likelihood == "classification":
        probs = la(X[:4], pred_type="glm", link_approx="probit")
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DTYPE))
    again = Laplace(copy.deepcopy(model), likelihood, "all", structure, grouped="per-group")
    again.load_state_dict(la.state_dict())
    torch.testing.assert_close(again._glm_predictive_distribution(X[:4])[1], f_var)


def test_optimal_aggregation_takes_the_coupled_structure_only():
    model = GroupedNet(3).to(DTYPE)
    X, y = torch.randn(6, 4, 5, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    la = Laplace(model, "classification", "all", "kfoc", aggregation="optimal",
                 grouped="per-group")  # fmt: skip
    with pytest.raises(ValueError, match=r"'grouped.weight'.*grouped='coupled'"):
        la.fit([(X, y)])
    la = Laplace(model, "classification", "all", "kfoc", aggregation="optimal", max_passes=500)
    la.fit([(X, y)])
    assert la.H_facs.blocks[0].kind == "kronecker"


def test_unknown_grouped_structure_is_named():
    with pytest.raises(ValueError, match="grouped.*'coupled', 'per-group'"):
        Laplace(GroupedNet(3), "classification", "all", "kfoc", grouped="blocks")


@pytest.mark.parametrize("structure", ["kfoc", "ekfoc"])
def test_influence_scores_use_each_groups_basis(structure):
    """Pairwise scores ``g_testᵀ (B + λ)⁻¹ g_train`` with ``B`` the per-group blocks, densely."""
    from torch.func import grad, vmap
    from torch.utils.data import DataLoader, TensorDataset

    from kfoc_backpack.influence import Influence

    torch.manual_seed(1)
    model = GroupedNet(3).to(DTYPE)
    X, y = torch.randn(14, 4, 5, 5, dtype=DTYPE), torch.randint(0, 3, (14,))
    train = DataLoader(TensorDataset(X[:10], y[:10]), batch_size=4)
    la = Laplace(model, "classification", "all", structure, grouped="per-group")
    la.fit(train)
    scores = Influence.from_laplace(la).pairwise(train, [(X[10:], y[10:])])
    loss = nn.CrossEntropyLoss(reduction="sum")
    params = {n: p.detach() for n, p in model.named_parameters()}

    def gradients(inputs, targets):
        def value(p, x, t):
            return loss(functional_call(model, p, (x[None],)), t[None])

        per_sample = vmap(grad(value), in_dims=(None, 0, 0))(params, inputs, targets)
        return torch.cat([g.flatten(1) for g in per_sample.values()], dim=1)

    inverses = []
    for block in la.H_facs.blocks:
        dense = block.dense() / la.n_data
        damping = 0.1 * torch.linalg.eigvalsh(dense).clamp(min=0).mean()
        inverses.append(torch.linalg.inv(dense + damping * torch.eye(len(dense), dtype=DTYPE)))
    expected = gradients(X[10:], y[10:]) @ torch.block_diag(*inverses) @ gradients(X[:10], y[:10]).T
    assert float((scores - expected).norm() / expected.norm()) < 1e-6


def test_backpack_savefields_of_grouped_layers_accumulate_coupled():
    """BackPACK's savefields hold a grouped weight's factors over all rows (its layout)."""
    from backpack import backpack, extend

    from kfoc_backpack import KFOCAccumulator, KFOCExact

    model, X, y = conv_model("multiplier2")
    model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss())
    accumulator = KFOCAccumulator(model, savefield="kfoc_exact")
    for rows in (slice(0, 4), slice(4, 7)):
        with backpack(KFOCExact()):
            lossfunc(model(X[rows]), y[rows]).backward()
        assert model[0].weight.kfoc_exact[0].shape == (6, 6)
        accumulator.update(len(X[rows]))
    left, right = accumulator.factors()["0.weight"]
    assert left.shape == (6, 6) and right.shape == (9, 9)
