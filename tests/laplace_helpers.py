"""Shared problems and ground truth for the laplace-torch integration tests.

Ground truth is computed with ``torch.func`` on a separate, never-extended copy of the
model (BackPACK's ``extend`` breaks ``torch.func``, docs/conventions.md §6), in laplace-torch's
scaling: the GGN of the *summed* loss with laplace's likelihood factor, i.e.
``Σ_n J_nᵀ J_n`` for regression (``½·MSE``) and ``Σ_n J_nᵀ (diag p − p pᵀ) J_n`` for
classification.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

DTYPE = torch.float64


def neighbour(module: str, *names: str):
    """Import a neighbour library for a comparison, or skip naming what it lacks.

    The tox matrix installs older releases (laplace-torch 0.2.2.x needs curvlinops 2,
    which has no ``EKFACLinearOperator``): there the comparison skips with its reason
    instead of failing with an ``AttributeError``.
    """
    from importlib.metadata import PackageNotFoundError, version

    library = pytest.importorskip(module)
    missing = [name for name in names if not hasattr(library, name)]
    if missing:
        try:
            found = version(f"{module}-for-pytorch")
        except PackageNotFoundError:
            found = getattr(library, "__version__", "?")
        pytest.skip(f"{module} {found} has no {', '.join(missing)}; the comparison needs it.")
    return library


NUM_DATA = 23
UNEVEN_BATCHES = [7, 3, 9, 4]  # sums to NUM_DATA
IN_FEATURES = 4
NUM_OUTPUTS = {"classification": 3, "regression": 2}


@dataclass
class Problem:
    """A model, its data and an uneven loader."""

    name: str
    likelihood: str
    model: nn.Module
    X: Tensor
    y: Tensor

    def loader(self, sizes: list[int] | None = None) -> DataLoader:
        """Loader over the data with the given batch sizes (default: uneven)."""
        sizes = UNEVEN_BATCHES if sizes is None else sizes
        batches, start = [], 0
        for size in sizes:
            batches.append(list(range(start, start + size)))
            start += size
        assert start == len(self.X)
        return DataLoader(TensorDataset(self.X, self.y), batch_sampler=batches)

    def fresh_model(self) -> nn.Module:
        """A deep copy of the model (never extended)."""
        return copy.deepcopy(self.model)


def make_model(arch: str, likelihood: str) -> nn.Module:
    """Small float64 MLP or CNN with ``Tanh`` activations."""
    out = NUM_OUTPUTS[likelihood]
    if arch == "mlp":
        model = nn.Sequential(
            nn.Linear(IN_FEATURES, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, out)
        )
    elif arch == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 5 * 5, out),
        )
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.to(DTYPE)


def make_problem(arch: str, likelihood: str, seed: int = 0, num_data: int = NUM_DATA) -> Problem:
    """Model and data for ``arch`` in ``{"mlp", "cnn"}``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_model(arch, likelihood)
    shape = (num_data, IN_FEATURES) if arch == "mlp" else (num_data, 1, 6, 6)
    X = torch.randn(*shape, generator=gen, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, NUM_OUTPUTS[likelihood], (num_data,), generator=gen)
    else:
        y = torch.randn(num_data, NUM_OUTPUTS[likelihood], generator=gen, dtype=DTYPE)
    return Problem(f"{arch}-{likelihood}", likelihood, model, X, y)


def dense_ggn_blocks(model: nn.Module, X: Tensor, likelihood: str) -> dict[str, Tensor]:
    """Dense GGN block of every trainable parameter, ``torch.func`` on a model copy.

    Returns:
        Parameter name → ``[P, P]`` block (row-major ``vec`` of the parameter).
    """
    ref = copy.deepcopy(model)
    params = {k: v.detach() for k, v in ref.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in ref.named_buffers()}

    def forward(p: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(ref, (p, buffers), (X,))

    jac = torch.func.jacrev(forward)(params)
    out = forward(params).detach()
    if likelihood == "regression":
        hess = torch.eye(out.shape[1], dtype=out.dtype).expand(out.shape[0], -1, -1)
    else:
        prob = out.softmax(-1)
        hess = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    blocks = {}
    for name, J in jac.items():
        flat = J.flatten(2)
        blocks[name] = torch.einsum("ncp,ncd,ndq->pq", flat, hess, flat)
    return blocks


def dense_blocks(model, X, y, likelihood, curvature, draws=None) -> dict[str, torch.Tensor]:
    """Dense curvature blocks in laplace-torch's scaling (``factor`` included).

    ``draws``: the Monte-Carlo draws (sampled labels, or standard normal noise for
    regression) for ``curvature="mc"``.
    """
    ref = copy.deepcopy(model).eval()
    params = {k: v.detach() for k, v in ref.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in ref.named_buffers()}

    def forward(p):
        return torch.func.functional_call(ref, (p, buffers), (X,))

    jac = torch.func.jacrev(forward)(params)
    f = forward(params).detach()
    if curvature == "ggn":
        if likelihood == "regression":
            hess = torch.eye(f.shape[1], dtype=f.dtype).expand(f.shape[0], -1, -1)
        else:
            p = f.softmax(-1)
            hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        if curvature == "ef":  # gradient of the per-sample loss at the true label
            if likelihood == "regression":
                vec = 2 * (f - y)
            else:
                vec = f.softmax(-1) - nn.functional.one_hot(y, f.shape[1]).to(f.dtype)
        elif likelihood == "regression":  # ŷ ~ N(f, 1/2): ∇ = −√2 ε
            vec = -(2**0.5) * draws
        else:
            vec = f.softmax(-1) - nn.functional.one_hot(draws, f.shape[1]).to(f.dtype)
        factor = 0.5 if likelihood == "regression" else 1.0
        hess = factor * vec[:, :, None] * vec[:, None, :]
    return {
        name: torch.einsum("ncp,ncd,ndq->pq", J.flatten(2), hess, J.flatten(2))
        for name, J in jac.items()
    }


def assert_optimal(blocks, params, kfacs, tol=1e-6):
    for (name, param), factors in zip(params, kfacs):
        block = blocks[name]
        if param.dim() == 1:
            torch.testing.assert_close(factors[0], block, rtol=1e-8, atol=1e-11)
            continue
        best = optimal_error(block, param.shape[0], param[0].numel())
        assert rel_error(block, *factors) == pytest.approx(best, abs=tol), name


def fit_seed(seed: int, index: int = 0) -> int:
    """The seed a fit started after ``torch.manual_seed(seed)`` draws batch ``index`` under.

    The package's Monte-Carlo seed policy: one base seed drawn from torch's global
    generator when the fit starts, batch ``i`` drawn under ``base + i``.
    """
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**31 - 1, ()).item()) + index


def mc_draws(f, likelihood, seed):
    """Re-draw the route's Monte-Carlo labels/noise (torch's global generator)."""
    torch.manual_seed(seed)
    if likelihood == "regression":
        return torch.randn(1, *f.shape, dtype=f.dtype)[0]
    return torch.multinomial(f.softmax(-1), 1, replacement=True).T[0]


def rel_error(block: Tensor, left: Tensor, right: Tensor) -> float:
    """``‖F − L ⊗ R‖_F / ‖F‖_F``."""
    return ((block - torch.kron(left, right)).norm() / block.norm()).item()


def optimal_error(block: Tensor, m: int, n: int) -> float:
    """Smallest relative error of any ``L ⊗ R`` (``m × m``, ``n × n``), via an SVD.

    Van Loan–Pitsianis: ``min ‖F − L ⊗ R‖² = ‖F‖² − σ₁(ℛ(F))²``.
    """
    rearranged = block.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    sigma = torch.linalg.svdvals(rearranged)[0]
    return ((block.square().sum() - sigma**2).clamp_min(0).sqrt() / block.norm()).item()


def weight_errors(kron, params: list[tuple[str, Tensor]], blocks: dict[str, Tensor]) -> dict:
    """Relative error of each weight's factors in a laplace ``Kron`` against ``blocks``."""
    errors = {}
    for (name, param), factors in zip(params, kron.kfacs):
        if param.dim() > 1:
            errors[name] = rel_error(blocks[name], *factors)
    return errors


def trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Named trainable parameters in laplace-torch's order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def is_extended(model: nn.Module) -> bool:
    """Whether any submodule carries BackPACK hooks."""
    return any(
        getattr(m, "_backpack_extend", False) or m._forward_hooks or m._backward_hooks
        for m in model.modules()
    )


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run a module's tiny problems on one thread (intra-op threads only add overhead).

    Import it into a test module (``from laplace_helpers import single_thread``) to
    make it apply there; the previous thread count is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
