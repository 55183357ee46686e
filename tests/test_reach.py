"""K-FOC on the models people write: the hook route against dense ground truth.

Every model of ``reach_models`` fits with ``hessian_structure="kfoc"`` (all weights and
last layer, GGN / Monte-Carlo Fisher / empirical Fisher, every aggregation), and on a
residual CNN and a transformer block each weight's ``L ⊗ R`` is the Frobenius-optimal
Kronecker approximation of the dense block computed independently with ``torch.func``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import Laplace
from laplace.curvature import AsdlEF, BackPackEF, CurvlinopsEF
from laplace_helpers import (
    assert_optimal,
    dense_blocks,
    make_problem,
    mc_draws,
    optimal_error,
    rel_error,
    single_thread,  # noqa: F401 (autouse fixture)
)
from reach_models import MODELS, DictModel, TransformerClassifier, input_shape
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import (
    KFOCBackend,
    KFOCEFBackend,
    KFOCExact,
    freeze_unsupported,
    unsupported_parameters,
)
from kfoc_backpack.collect.batch_layout import BatchLayout
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.solver import FactoredTerms, SolverOptions

DTYPE = torch.float64
NUM = 13
BATCHES = [5, 1, 7]  # uneven, with a batch of one
TIGHT = {"tol": 1e-11, "max_iter": 5000}


def data(name: str, likelihood: str = "classification", outputs: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(NUM, *input_shape(name), generator=gen, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, outputs, (NUM,), generator=gen)
    else:
        y = torch.randn(NUM, outputs, generator=gen, dtype=DTYPE)
    return X, y


def model_for(name: str, outputs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](outputs=outputs).to(DTYPE).eval()


def loader(name: str, X, y, sizes=BATCHES):
    if name == "mlp_dict":
        batches, start = [], 0
        for size in sizes:
            batches.append(
                {"input_ids": X[start : start + size], "labels": y[start : start + size]}
            )
            start += size
        return batches
    index, start = [], 0
    for size in sizes:
        index.append(list(range(start, start + size)))
        start += size
    return DataLoader(TensorDataset(X, y), batch_sampler=index)


def finite(out) -> bool:
    return all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))


# --------------------------------------------------------------------------------------
# Every model kind fits, with the whole laplace-torch workflow after it
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_kind_fits_and_predicts(name, subset):
    model = model_for(name)
    X, y = data(name)
    la = Laplace(model, "classification", subset, "kfoc")
    la.fit(loader(name, X, y))
    assert la.n_data == NUM
    test_X = {"input_ids": X[:4]} if name == "mlp_dict" else X[:4]
    probs = la(test_X, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DTYPE))
    if not (name == "mlp_dict" and subset == "last_layer"):
        # laplace-torch's last-layer nn predictive calls X.to() (no dicts), for kron too
        probs = la(test_X, pred_type="nn", link_approx="mc", n_samples=5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DTYPE))
    assert torch.isfinite(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=20)
    assert torch.isfinite(la.prior_precision).all()
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize("name", ["mlp", "residual", "transformer"])
def test_regression_with_several_outputs(name):
    model = model_for(name, outputs=2)
    X, y = data(name, "regression", outputs=2)
    la = Laplace(model, "regression", "all", "kfoc")
    la.fit(loader(name, X, y))
    mean, var = la(X[:4], pred_type="glm")
    assert mean.shape == (4, 2) and var.shape == (4, 2, 2)
    assert finite((mean, var))
    la.optimize_prior_precision(method="marglik", n_steps=20)
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize("backend", [CurvlinopsEF, AsdlEF, BackPackEF])
def test_empirical_fisher_backends(backend):
    model = model_for("residual")
    X, y = data("residual")
    with pytest.warns(UserWarning, match="KFOCEFBackend"):
        la = Laplace(model, "classification", "all", "kfoc", backend=backend)
    la.fit(loader("residual", X, y))
    blocks = dense_blocks(model, X, y, "classification", "ef")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # running aggregation: at most the data-set optimum's error plus what aggregation costs
    for (pname, param), factors in zip(params, la.H_facs.kfacs):
        if param.dim() > 1:
            assert rel_error(blocks[pname], *factors) < 1.0
    assert finite(la(X[:3], pred_type="glm"))
    assert torch.isfinite(la.log_marginal_likelihood())


# --------------------------------------------------------------------------------------
# Optimality against the dense blocks
# --------------------------------------------------------------------------------------

OPTIMALITY_MODELS = ["residual", "transformer", "transformer_seq_first", "frozen_bn"]


@pytest.mark.parametrize("curvature", ["ggn", "mc", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", OPTIMALITY_MODELS)
def test_one_batch_is_optimal(name, likelihood, curvature):
    model = model_for(name, outputs=3 if likelihood == "classification" else 2)
    X, y = data(name, likelihood, outputs=3 if likelihood == "classification" else 2)
    if curvature == "ef":
        backend = KFOCEFBackend(model, likelihood, **TIGHT)
    else:
        backend = KFOCBackend(model, likelihood, stochastic=curvature == "mc", **TIGHT)
    torch.manual_seed(5)
    _, kron = backend.kron(X, y, N=NUM)
    draws = mc_draws(model(X).detach(), likelihood, 5) if curvature == "mc" else None
    blocks = dense_blocks(model, X, y, likelihood, curvature, draws)
    assert_optimal(blocks, list(backend.named_trainable.items()), kron.kfacs)


@pytest.mark.parametrize("curvature", ["ggn", "mc", "ef"])
@pytest.mark.parametrize("name", ["residual", "transformer"])
def test_dataset_optimum_over_uneven_batches(name, curvature):
    model = model_for(name)
    X, y = data(name)
    backend = KFOCEFBackend if curvature == "ef" else KFOCBackend
    kwargs = {"stochastic": True} if curvature == "mc" else {}
    la = Laplace(
        model,
        "classification",
        "all",
        "kfoc",
        backend=backend,
        backend_kwargs={**kwargs, **TIGHT},
        aggregation="optimal",
        tol=1e-11,
        max_passes=5000,
    )
    batches = list(loader(name, X, y))  # a DataLoader's iter() would draw a seed too
    torch.manual_seed(3)
    la.fit(batches)
    draws = None
    if curvature == "mc":  # the optimum's per-batch seeds: base + batch index
        torch.manual_seed(3)
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        f, start, parts = model(X).detach(), 0, []
        for index, size in enumerate(BATCHES):
            parts.append(mc_draws(f[start : start + size], "classification", base + index))
            start += size
        draws = torch.cat(parts)
    blocks = dense_blocks(model, X, y, "classification", curvature, draws)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert_optimal(blocks, params, la.H_facs.kfacs)


def test_tokens_are_kept_factored():
    """``Linear`` on tokens never forms the ``N·out·in`` per-sample matrices here."""
    model = model_for("transformer")
    X, y = data("transformer")
    batch = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))(X, y)
    terms = batch.weights["block.linear1.weight"].terms
    assert isinstance(terms, FactoredTerms)
    # exact GGN of 3 classes: C − 1 = 2 Hessian-root columns per input
    assert terms.grads.shape == (2, NUM, 5, 12) and terms.inputs.shape == (NUM, 5, 8)


# --------------------------------------------------------------------------------------
# The hook route equals BackPACK's route where both apply
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "cnn", "tokens"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_hook_route_equals_backpack_route(arch, likelihood):
    from backpack import backpack, extend

    if arch == "tokens":
        problem = make_problem("mlp", likelihood)
        torch.manual_seed(0)
        out = problem.y.shape[1] if likelihood == "regression" else 3
        model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Flatten(), nn.Linear(10, out)).to(
            DTYPE
        )
        X = problem.X.reshape(-1, 2, 2)
    else:
        problem = make_problem(arch, likelihood)
        model, X = problem.fresh_model(), problem.X
    y = problem.y
    ours = KFOCBackend(copy.deepcopy(model), likelihood, **TIGHT)
    _, kron = ours.kron(X, y, N=len(X))
    blocks = (kron * (1 / ours.factor)).kfacs  # laplace-torch's likelihood factor removed
    theirs = extend(copy.deepcopy(model))
    lossfunc = extend(copy.deepcopy(ours.lossfunc))
    with backpack(KFOCExact(**TIGHT)):
        lossfunc(theirs(X), y).backward()
    for mine, param in zip(blocks, (p for p in theirs.parameters() if p.requires_grad)):
        for a, b in zip(mine, param.kfoc_exact):
            assert ((a - b).norm() / b.norm()).item() < 1e-6


# --------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


class Gated(nn.Module):
    """A module of no kind whose own matrix is too large for per-sample gradients."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1100, 1000))

    def forward(self, x):
        return x * torch.sigmoid(self.gate.mean())


def test_too_large_parameter_named_before_any_work():
    """A parameter of no kind beyond 2^20 entries: too large for per-sample gradients."""
    model = Counting(nn.Sequential(nn.Linear(4, 6), Gated(), nn.Linear(6, 3)))
    with pytest.raises(NotImplementedError) as info:
        Laplace(model, "classification", "all", "kfoc")
    message = str(info.value)
    for part in ("inner.1.gate", "'inner.1' (Gated)", "(1100, 1000)", "requires_grad=False"):
        assert part in message
    assert "last_layer" in message and "freeze_unsupported" in message
    assert model.calls == 0
    assert freeze_unsupported(model) == ["inner.1.gate"]
    Laplace(model, "classification", "all", "kfoc")  # the rest is covered


def test_trainable_attention_fits_but_for_out_proj():
    """``MultiheadAttention``'s ``in_proj`` gets per-sample gradients; ``out_proj`` is named."""
    model = model_for("transformer")
    for p in model.block.self_attn.parameters():
        p.requires_grad_(True)
    X, y = data("transformer")
    la = Laplace(model, "classification", "all", "kfoc")
    with pytest.raises(NotImplementedError, match=r"'block.self_attn.out_proj'.*forward"):
        la.fit(loader("transformer", X, y))
    for p in model.block.self_attn.out_proj.parameters():
        p.requires_grad_(False)
    la = Laplace(model, "classification", "all", "kfoc")
    la.fit(loader("transformer", X, y))
    assert finite(la(X[:2], pred_type="glm"))


class ViTLike(TransformerClassifier):
    """As constructed by a library: everything trainable, a class token on the model."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, x):
        h = self.embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(self.block(h)[:, 0])


def test_backpacks_route_lists_every_parameter_without_factors_at_once():
    torch.manual_seed(0)
    model = ViTLike().to(DTYPE)
    expected = [  # named_parameters order: the model's own parameter first
        "cls_token",
        "block.self_attn.in_proj_weight",
        "block.self_attn.in_proj_bias",
        "block.self_attn.out_proj.weight",  # a Linear subclass: BackPACK matches types exactly
        "block.self_attn.out_proj.bias",
        "block.norm1.weight",
        "block.norm1.bias",
        "block.norm2.weight",
        "block.norm2.bias",
    ]
    assert unsupported_parameters(model) == {}  # the hook route covers them all
    problems = unsupported_parameters(model, exact_type=True)
    assert list(problems) == expected
    assert "'block.norm1' (LayerNorm)" in problems["block.norm1.weight"]
    assert freeze_unsupported(model, exact_type=True) == expected
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in expected)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in expected)
    assert freeze_unsupported(model, exact_type=True) == []  # nothing left to freeze


def test_extra_parameter_of_a_supported_layer():
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].scale = nn.Parameter(torch.ones(2))  # registered on the layer by a library
    problems = unsupported_parameters(model, exact_type=True)
    assert list(problems) == ["0.scale"] and "besides its weight and bias" in problems["0.scale"]
    assert unsupported_parameters(model) == {}  # per-sample gradients by torch.func


def test_subclass_whose_forward_is_not_the_layers_is_named():
    class ScaledLinear(nn.Linear):
        def __init__(self):
            super().__init__(4, 3)
            self.scale = nn.Parameter(torch.full((3,), 2.0))

        def forward(self, x):
            return super().forward(x) * self.scale

    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)
    X = torch.randn(6, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (6,))
    la = Laplace(model, "classification", "all", "kfoc")
    with pytest.raises(NotImplementedError, match=r"'0' \(ScaledLinear\).*forward"):
        la.fit(DataLoader(TensorDataset(X, y), batch_size=3))


def test_weight_used_outside_forward_named():
    """``MultiheadAttention`` multiplies by ``out_proj.weight`` without calling it."""
    model = model_for("transformer")
    for p in model.block.self_attn.out_proj.parameters():
        p.requires_grad_(True)
    X, y = data("transformer")
    la = Laplace(model, "classification", "all", "kfoc")
    with pytest.raises(NotImplementedError, match=r"'block.self_attn.out_proj'.*forward"):
        la.fit(loader("transformer", X, y))


def test_non_finite_input_and_layer_named():
    model = model_for("mlp")
    X, y = data("mlp")
    X[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="model input"):
        Laplace(model, "classification", "all", "kfoc").fit(loader("mlp", X, y))
    X, y = data("mlp")
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="'fc1'"):
        Laplace(model, "classification", "all", "kfoc").fit(loader("mlp", X, y))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_raises(dtype):
    model = model_for("mlp").to(dtype)
    X, y = data("mlp")
    la = Laplace(model, "classification", "all", "kfoc")
    with pytest.raises(TypeError, match="float32 or float64"):
        la.fit(loader("mlp", X.to(dtype), y))


def test_single_output_classifier_raises():
    model = model_for("mlp", outputs=1)
    X, _ = data("mlp")
    with pytest.raises(ValueError, match="single output"):
        Laplace(model, "classification", "all", "kfoc").fit(
            loader("mlp", X, torch.zeros(NUM).long())
        )


def test_coupled_samples_rejected():
    """BatchNorm in training mode couples the inputs of a batch."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(DTYPE)
    for p in model[1].parameters():
        p.requires_grad_(False)
    X, y = data("mlp")
    collect = TermCollector(model.train(), nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(NotImplementedError, match="independent inputs"):
        collect(X, y)


def test_dict_model_last_layer_and_batch_dim():
    """Dict inputs with a last-layer Laplace; sequence-first layers found by the probe."""
    model = DictModel(model_for("mlp"))
    X, y = data("mlp")
    la = Laplace(model, "classification", "last_layer", "kfoc")
    la.fit(loader("mlp_dict", X, y))
    assert finite(la({"input_ids": X[:2]}, pred_type="glm"))
    seq_first = TransformerClassifier(batch_first=False).to(DTYPE).eval()
    collect = TermCollector(seq_first, nn.CrossEntropyLoss(reduction="sum"))
    Xs, ys = data("transformer")
    collect(Xs[:5], ys[:5])  # T = N = 5: only the probe can tell the batch dimension
    assert collect._layouts["block.linear1"] == BatchLayout(dim=1)
    assert collect._layouts["embed"] == BatchLayout(dim=0)


# --------------------------------------------------------------------------------------
# FactoredTerms against the dense SVD
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 4, 3, 5), (3, 6, 2, 4, 4), (2, 5, 7, 3, 2)])
def test_factored_terms_optimal(shape, dtype):
    cols, num, pos, m, n = shape
    gen = torch.Generator().manual_seed(sum(shape))
    grads = torch.randn(cols, num, pos, m, generator=gen, dtype=torch.float64)
    inputs = torch.randn(num, pos, n, generator=gen, dtype=torch.float64)
    dense = FactoredTerms(grads, inputs).dense()
    terms = FactoredTerms(
        grads.to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2),
        inputs.to(dtype)[:, :, :].contiguous(),
    )
    factors = terms.solve(
        SolverOptions(tol=1e-7 if dtype == torch.float32 else 1e-12, max_iter=5000)
    )
    assert factors.left.dtype == dtype
    best = optimal_error(dense, m, n)
    err = rel_error(dense, factors.left.double(), factors.right.double())
    assert err == pytest.approx(best, abs=1e-4 if dtype == torch.float32 else 1e-9)
    assert terms.error(factors.left, factors.right).item() == pytest.approx(err, abs=1e-3)
    assert torch.linalg.eigvalsh(factors.left.double()).min() > -1e-6
    torch.testing.assert_close(
        terms.diagonal().double().flatten(), torch.diagonal(dense), rtol=1e-4, atol=1e-5
    )


def test_factored_terms_zero_and_noncontiguous():
    grads = torch.zeros(2, 3, 4, 5, dtype=DTYPE)
    inputs = torch.randn(3, 4, 6, dtype=DTYPE)
    factors = FactoredTerms(grads, inputs).solve()
    assert factors.left.abs().max() == 0 and factors.right.abs().max() == 0
    base = torch.randn(2, 3, 5, 4, dtype=DTYPE)
    grads = base.transpose(-1, -2)  # non-contiguous
    dense = FactoredTerms(grads.contiguous(), inputs).dense()
    factors = FactoredTerms(grads, inputs[:, :, :]).solve(SolverOptions(tol=1e-12, max_iter=5000))
    assert rel_error(dense, factors.left, factors.right) == pytest.approx(
        optimal_error(dense, 5, 6), abs=1e-9
    )
    with pytest.raises(ValueError, match="FactoredTerms"):
        FactoredTerms(torch.zeros(2, 3, 4, 5), torch.zeros(3, 5, 6))


def test_wide_conv_on_few_positions_is_factored_and_optimal():
    """A convolution with many channels on few output positions takes the factored route."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    model = model.to(DTYPE).eval()
    X = torch.randn(NUM, 8, 4, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (NUM,))
    batch = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))(X, y)
    assert isinstance(batch.weights["0.weight"].terms, FactoredTerms)
    backend = KFOCBackend(model, "classification", **TIGHT)
    _, kron = backend.kron(X, y, N=NUM)
    blocks = dense_blocks(model, X, y, "classification", "ggn")
    assert_optimal(blocks, list(backend.named_trainable.items()), kron.kfacs)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_output_vectors_give_the_loss_hessian(loss, reduction):
    """``Σ_m v_m v_mᵀ`` per input is the loss Hessian w.r.t. the output (``torch.func``)."""
    from kfoc_backpack.collect.loss import loss_value, output_vectors

    gen = torch.Generator().manual_seed(1)
    f = torch.randn(6, 4, 5, generator=gen, dtype=DTYPE)  # 6 inputs, 4 rows, 5 outputs
    f[0, 0] = torch.tensor([40.0, 0, 0, 0, 0])  # a saturated softmax row (p ≈ e_0)
    lossfunc, y = {
        "ce": (
            nn.CrossEntropyLoss(reduction=reduction),
            torch.randint(0, 5, (6, 4), generator=gen),
        ),
        "mse": (nn.MSELoss(reduction=reduction), torch.randn(6, 4, 5, generator=gen, dtype=DTYPE)),
        "bce": (
            nn.BCEWithLogitsLoss(reduction=reduction),
            torch.rand(6, 4, 5, generator=gen, dtype=DTYPE),
        ),
    }[loss]
    vectors = output_vectors(lossfunc, f, y, "ggn")
    for n in range(f.shape[0]):

        def loss_of_input(fn, n=n):
            return loss_value(lossfunc, torch.cat([f[:n], fn[None], f[n + 1 :]]), y)

        hess = torch.func.hessian(loss_of_input)(f[n])
        flat = vectors[:, n].reshape(vectors.shape[0], -1)
        torch.testing.assert_close(flat.T @ flat, hess.reshape(20, 20), rtol=1e-9, atol=1e-12)
    if loss == "ce":
        assert vectors.shape[0] == 4 * 4  # R rows × (C − 1) columns
    ef = output_vectors(lossfunc, f, y, "ef")
    grad = torch.func.grad(lambda out: loss_value(lossfunc, out, y))(f)
    # the mean reduction scales every vector by 1/√R, R the averaged terms (the GGN's 1/R)
    averaged = 6 * 4 if loss == "ce" else f.numel()
    scale = 1.0 if reduction == "sum" else averaged**0.5
    torch.testing.assert_close(ef[0], grad * scale)


class SharedLinear(nn.Module):
    """One ``Linear`` applied twice (weight sharing), a ``Conv1d`` and a 4-d ``Linear`` input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.shared = nn.Linear(3, 4)
        self.grid = nn.Linear(4, 2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):  # x: [N, 2, 5]
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # [N, 5, 3]
        a = self.shared(h[:, :2])  # [N, 2, 4]
        b = self.shared(h[:, 2].tanh())  # [N, 4], the same weight again
        grid = torch.tanh(a[:, :, None, :] + b[:, None, None, :]).expand(-1, -1, 3, -1)
        return self.head(torch.tanh(self.grid(grid)).mean((1, 2)))  # 4-d input to grid


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_shared_weights_conv1d_and_4d_inputs_are_optimal(curvature):
    torch.manual_seed(0)
    model = SharedLinear().to(DTYPE).eval()
    X = torch.randn(NUM, 2, 5, dtype=DTYPE)
    y = torch.randint(0, 3, (NUM,))
    backend = (KFOCEFBackend if curvature == "ef" else KFOCBackend)(
        model, "classification", **TIGHT
    )
    _, kron = backend.kron(X, y, N=NUM)
    blocks = dense_blocks(model, X, y, "classification", curvature)
    assert_optimal(blocks, list(backend.named_trainable.items()), kron.kfacs)


def test_model_returning_a_tuple_is_named():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x

    X, y = data("mlp")
    with pytest.raises(TypeError, match="must return a tensor"):
        TermCollector(Pair().to(DTYPE), nn.CrossEntropyLoss())(X, y)


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_null_direction_is_dropped_whatever_the_probabilities(classes):
    """``C − 1`` mixed vectors keep ``Σ s sᵀ = diag(p) − ppᵀ``: uniform, one-hot, random."""
    from kfoc_backpack.collect.loss import drop_null_direction

    gen = torch.Generator().manual_seed(classes)
    eye = torch.eye(classes, dtype=DTYPE)
    probs = torch.stack(
        [
            torch.full((classes,), 1.0 / classes, dtype=DTYPE),
            eye[0],  # the pivot class certain
            eye[-1],
            (torch.randn(classes, generator=gen, dtype=DTYPE) * 30).softmax(-1),  # saturated
            torch.rand(classes, generator=gen, dtype=DTYPE).softmax(-1),
        ]
    )
    root = probs.sqrt()
    cols = root.unsqueeze(-1) * (eye - probs.unsqueeze(-2))  # rows s_v = √p_v (e_v − p)
    mixed = drop_null_direction(cols.movedim(-2, 0), root).movedim(0, -2)
    assert mixed.shape == (5, classes - 1, classes)
    hessian = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    torch.testing.assert_close(mixed.mT @ mixed, hessian, rtol=0, atol=1e-14)
    assert torch.isfinite(mixed).all()
