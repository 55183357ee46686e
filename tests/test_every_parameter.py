"""Every parameter in the posterior: normalisation layers, tokens, layer scales, embeddings.

With nothing frozen, each structure fits models built as libraries build them
(``tests/whole_models.py``): BatchNorm in eval mode, GroupNorm, a ``LayerNorm2d`` with its
own ``forward``, ``RMSNorm``, a ``cls_token`` and a ``pos_embed`` on the model, a layer
scale, a word embedding. Ground truth from ``torch.func`` on a copy of the model, float64:

* a parameter with a dense block has the exact block, for every structure and curvature
  target (exact GGN, empirical and Monte-Carlo Fisher at the labels the fit drew);
* one above the size rule's limit has the optimal Kronecker factors of its per-sample
  gradient matrices (dense SVD of the rearranged block), K-FAC the trace-preserving
  product of its marginals, and the eigenvalue-corrected structures the block's trace;
* the GLM predictive equals the dense posterior's and laplace-torch's Jacobian route.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ground_truth import optimal_relative_error, relative_error
from laplace import Laplace
from laplace.curvature import CurvlinopsEF
from laplace_helpers import DTYPE, dense_blocks, fit_seed, mc_draws, single_thread  # noqa: F401
from torch import nn
from torch.func import functional_call, jacrev
from whole_models import TOKENS, VOCABULARY, WIDTH, LayerNorm2d, whole_data

import kfoc_backpack  # noqa: F401 (registers the structures)
from kfoc_backpack.blocks import DenseBlock, EigenCorrected, KroneckerBlock
from kfoc_backpack.collect import parameters
from kfoc_backpack.collect.hooks import TermCollector

STRUCTURES = ("kfoc", "kfac", "ekfoc", "ekfac")
BATCHES = [5, 7]


def batches(X, y, sizes=BATCHES):
    out, start = [], 0
    for size in sizes:
        out.append((X[start : start + size], y[start : start + size]))
        start += size
    return out


def fit(structure, model, likelihood, data, curvature="ggn", seed=3, **kwargs):
    options = dict(kwargs)
    if curvature == "ef":
        options["backend"] = CurvlinopsEF
    elif curvature == "mc":
        options["backend_kwargs"] = {"stochastic": True}
    la = Laplace(copy.deepcopy(model), likelihood, "all", structure, **options)
    torch.manual_seed(seed)
    la.fit(data)
    return la


def reference(model, X, y, likelihood, curvature, data, seed=3):
    """Dense blocks of the data, at the labels the fit drew for the Monte-Carlo Fisher."""
    draws = None
    if curvature == "mc":
        base = fit_seed(seed)
        with torch.no_grad():
            draws = torch.cat(
                [mc_draws(model(Xb), likelihood, base + i) for i, (Xb, _) in enumerate(data)]
            )
    return dense_blocks(model, X, y, likelihood, curvature, draws)


SHARED_BIASES = {"conv1.bias", "conv2.bias", "qkv.bias", "proj.bias"}
"""Biases of layers whose weight is shared over several positions."""


def named_blocks(la):
    names = [n for n, p in la.model.named_parameters() if p.requires_grad]
    return dict(zip(names, la.H_facs.blocks))


@pytest.mark.parametrize("curvature", ["ggn", "ef", "mc"])
@pytest.mark.parametrize("arch", ["norm_cnn", "tiny_vit"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_every_parameter_has_its_exact_block(structure, arch, curvature):
    model, X, y = whole_data(arch, "classification")
    data = batches(X, y)
    la = fit(structure, model, "classification", data, curvature)
    dense = reference(model, X, y, "classification", curvature, data)
    blocks = named_blocks(la)
    assert list(blocks) == [n for n, _ in model.named_parameters()]  # nothing left out
    for name, block in blocks.items():
        param = dict(model.named_parameters())[name]
        if name.endswith("weight") and param.dim() >= 2 and not name.startswith("embed"):
            assert not isinstance(block, DenseBlock), name  # a layer's weight: factors
            continue
        assert isinstance(block, DenseBlock), name
        if structure == "kfac" and name in SHARED_BIASES:
            continue  # K-FAC's bias of a weight shared over positions: KFC's (test_kfac.py)
        torch.testing.assert_close(block.dense(), dense[name], rtol=1e-9, atol=1e-12)
    assert math.isfinite(la.log_marginal_likelihood().item())


@pytest.fixture
def small_limit(monkeypatch):
    """Put ``pos_embed`` (6 × 8) and the embedding (11 × 8) above the size rule's limit."""
    monkeypatch.setattr(parameters, "DENSE_LIMIT", 16)


LARGE = {"pos_embed": (TOKENS + 1, WIDTH), "embed.weight": (11, WIDTH)}


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("aggregation", ["approx", "optimal"])
def test_large_parameters_get_the_optimal_kronecker_factors(small_limit, aggregation, curvature):
    model, X, y = whole_data("tiny_vit", "regression")
    data = [(X, y)] if aggregation == "approx" else batches(X, y)
    la = fit("kfoc", model, "regression", data, curvature, aggregation=aggregation, tol=1e-12)
    dense = reference(model, X, y, "regression", curvature, data)
    blocks = named_blocks(la)
    for name, (rows, cols) in LARGE.items():
        block = blocks[name]
        assert isinstance(block, KroneckerBlock) and block.shape == (rows, cols)
        best = optimal_relative_error(dense[name], rows, cols)
        found = relative_error(dense[name], block.left, block.right)
        assert found == pytest.approx(best, abs=1e-7), name
    assert isinstance(blocks["norm1.weight"], DenseBlock)  # a vector stays dense


def test_the_size_rule():
    assert parameters.block_shape((4096,)) is None  # vectors: dense, whatever their size
    assert parameters.block_shape((1, 1, 768)) is None  # a cls_token
    assert parameters.block_shape((768, 1, 1)) is None  # a layer scale
    assert parameters.block_shape((32, 32)) is None  # at most DENSE_LIMIT entries
    assert parameters.block_shape((32, 128)) == (32, 128)
    assert parameters.block_shape((1, 197, 768)) == (197, 768)  # a pos_embed
    assert parameters.block_shape((65, 8, 8)) == (65, 64)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 3, 1, 65, 64, generator=gen, dtype=DTYPE)
    terms = parameters.row_terms(rows, (1, 65, 64), with_kfac=True)
    assert terms.input_trace.item() == 64  # the scale split: tr R = I
    block = terms.kfoc_block()
    assert block.shape == (65, 64) and block.right.trace().item() == pytest.approx(64)
    flat = rows.reshape(6, -1)
    torch.testing.assert_close(terms.kfac_block().trace(), flat.square().sum())
    dense = parameters.row_terms(rows[..., :2, :3], (2, 3))
    torch.testing.assert_close(
        dense.exact.dense(), rows[..., :2, :3].reshape(6, 6).T @ rows[..., :2, :3].reshape(6, 6)
    )
    zero = parameters.zero_block(torch.zeros(1, 65, 64))
    assert isinstance(zero, KroneckerBlock) and zero.shape == (65, 64)


def partial_traces(dense, rows, cols):
    """``(Σ_i F[(o,i),(p,i)], Σ_o F[(o,i),(o,j)])``: the block's marginals."""
    four = dense.reshape(rows, cols, rows, cols)
    return torch.einsum("oipi->op", four), torch.einsum("oioj->ij", four)


def test_kfac_of_a_large_parameter_is_the_product_of_its_marginals(small_limit):
    model, X, y = whole_data("tiny_vit", "classification")
    data = batches(X, y, [X.shape[0]])
    la = fit("kfac", model, "classification", data)
    dense = reference(model, X, y, "classification", "ggn", data)
    blocks = named_blocks(la)
    rows, cols = LARGE["pos_embed"]
    left, right = partial_traces(dense["pos_embed"], rows, cols)
    total = dense["pos_embed"].trace()
    torch.testing.assert_close(blocks["pos_embed"].left, left / cols)
    torch.testing.assert_close(blocks["pos_embed"].right, right * cols / total)
    torch.testing.assert_close(blocks["pos_embed"].trace(), total)


def test_kfac_of_an_embedding_is_kfcs_with_the_ids_frequencies(small_limit):
    """``diag(count)/T ⊗ (1/N) Σ_{n,t} J_{n,t}ᵀ H_n J_{n,t}``, ``J`` at the table's output."""
    model, X, y = whole_data("tiny_vit", "classification")
    la = fit("kfac", model, "classification", batches(X, y, [X.shape[0]]))
    block = named_blocks(la)["embed.weight"]
    counts = torch.bincount(X[X != 0].flatten(), minlength=11).to(DTYPE)  # 0: padding
    torch.testing.assert_close(block.left, torch.diag(counts / TOKENS))

    def from_table(h):  # TinyViT.forward after its embedding
        h = torch.cat([model.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + model.pos_embed
        q, k, v = model.qkv(model.norm1(h)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / WIDTH**0.5, dim=-1)
        h = h + model.gamma * model.proj(attention @ v)
        return model.head(model.norm2(h)[:, 0])

    with torch.no_grad():
        table = model.embed(X)
        p = from_table(table).softmax(-1)
    J = torch.func.jacrev(from_table)(table.detach()).detach()  # [N, C, N, T, D]
    J = torch.einsum("ncntd->nctd", J)  # each input's own positions
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    keep = (X != 0).to(DTYPE)
    expected = torch.einsum("nctd,ncb,nbte,nt->de", J, H, J, keep) / X.shape[0]
    torch.testing.assert_close(block.right, expected)


@pytest.mark.parametrize("structure", ["ekfoc", "ekfac"])
def test_corrected_large_parameters_keep_the_blocks_trace(small_limit, structure):
    model, X, y = whole_data("tiny_vit", "classification")
    data = batches(X, y)
    la = fit(structure, model, "classification", data)
    dense = reference(model, X, y, "classification", "ggn", data)
    blocks = named_blocks(la)
    for name in LARGE:
        block = blocks[name]
        assert isinstance(block, EigenCorrected)
        torch.testing.assert_close(block.diagonal.sum(), dense[name].trace())
        basis = block.decompose().basis()  # S is the dense block's diagonal in the basis
        torch.testing.assert_close(
            block.diagonal.flatten(), torch.diagonal(basis.T @ dense[name] @ basis)
        )


def dense_covariance(la, model, X):
    """``J P⁻¹ Jᵀ`` with the dense posterior and ``torch.func`` Jacobians."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def output(theta):
        return functional_call(model, {**theta, **buffers}, (X,))

    jac = jacrev(output)(params)
    J = torch.cat([jac[n].flatten(start_dim=2) for n in params], dim=2)
    covariance = la.posterior_precision.to_matrix(exponent=-1)
    return torch.einsum("ncp,pq,ndq->ncd", J, covariance, J)


@pytest.mark.parametrize("limit", ["default", "small", "diagonal"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("arch", ["norm_cnn", "tiny_vit"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictive_of_the_whole_model(monkeypatch, structure, arch, likelihood, limit):
    """``small``: the embedding and ``pos_embed`` get factors; ``diagonal``: ``diag(l) ⊗ R``."""
    if limit == "small":
        monkeypatch.setattr(parameters, "DENSE_LIMIT", 16)
    elif limit == "diagonal":
        if arch != "tiny_vit":
            pytest.skip("no embedding table")
        monkeypatch.setattr(parameters, "VOCABULARY_LIMIT", VOCABULARY - 1)
    model, X, y = whole_data(arch, likelihood)
    la = fit(structure, model, likelihood, batches(X, y), prior_precision=0.7)
    f_mu, f_var = la._glm_predictive_distribution(X[:4])
    torch.testing.assert_close(f_var, dense_covariance(la, model, X[:4]), rtol=1e-9, atol=1e-12)
    Js, f_theirs = la.backend.jacobians(X[:4])  # laplace-torch's Jacobian route
    torch.testing.assert_close(f_var, la.functional_variance(Js), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f_mu, f_theirs)
    if likelihood == "classification":
        probs = la(X[:4], pred_type="glm", link_approx="probit")
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DTYPE))
    else:  # the covariance between the inputs too
        mean, joint = la(X[:4], pred_type="glm", joint=True)
        torch.testing.assert_close(mean, f_theirs.flatten())
        torch.testing.assert_close(joint, la.functional_covariance(Js), rtol=1e-9, atol=1e-12)


class SameLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm``: its own ``forward``, the same function."""

    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def test_a_norm_subclass_is_described_only_where_it_computes_the_norm():
    model, X, y = whole_data("norm_cnn", "classification")
    collector = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))
    assert "ln" in collector.layers  # before the first batch: a LayerNorm
    batch = collector(X, y)
    assert "ln" not in collector.layers and collector.loose.names == ["ln.weight", "ln.bias"]
    vit = TermCollector(whole_data("tiny_vit", "classification")[0], nn.CrossEntropyLoss())
    assert vit.standins.names == ["cls_token", "pos_embed"] and vit.loose.names == ["gamma"]
    assert isinstance(model.ln, LayerNorm2d) and "ln.weight" in batch.dense

    same = nn.Sequential(nn.Linear(3, 4), SameLayerNorm(4), nn.Linear(4, 2)).to(DTYPE).eval()
    collector = TermCollector(same, nn.MSELoss(reduction="sum"))
    collector(torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE))
    assert "1" in collector.layers and not collector.loose.names


def test_batchnorm_in_training_mode_is_refused_naming_it():
    model, X, y = whole_data("norm_cnn", "classification")
    collector = TermCollector(model.train(), nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(NotImplementedError, match=r"'bn' \(BatchNorm2d\).*batch's own statistics"):
        collector(X, y)


class PositionIds(nn.Module):
    """Hugging Face's embeddings: positions from a ``[1, T]`` buffer, broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(11, 6)
        self.positions = nn.Embedding(TOKENS, 6)
        self.register_buffer("position_ids", torch.arange(TOKENS).unsqueeze(0))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.words(ids) + self.positions(self.position_ids)  # [N, T, 6] + [1, T, 6]
        return self.head(self.norm(h).mean(1))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_an_output_broadcast_over_the_inputs_keeps_each_inputs_gradient(structure):
    torch.manual_seed(0)
    model = PositionIds().to(DTYPE).eval()
    X = torch.randint(0, 11, (9, TOKENS), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2))
    la = fit(structure, model, "classification", batches(X, y, [4, 5]))
    dense = reference(model, X, y, "classification", "ggn", None)
    block = named_blocks(la)["positions.weight"]
    assert isinstance(block, DenseBlock)
    torch.testing.assert_close(block.dense(), dense["positions.weight"], rtol=1e-9, atol=1e-12)
    f_var = la._glm_predictive_distribution(X[:3])[1]
    torch.testing.assert_close(f_var, dense_covariance(la, model, X[:3]), rtol=1e-9, atol=1e-12)


class Tokens(nn.Module):
    """Parameters with a leading size one, used in the ways models use them."""

    def __init__(self, use: str):
        super().__init__()
        self.use = use
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.inp = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x)  # [N, T, 4]
        if self.use == "expand":  # a cls_token: one copy per input
            h = torch.cat([self.token.expand(h.shape[0], -1, -1), h], 1)
        elif self.use == "repeat":  # the copies cannot stand in: repeat multiplies them
            h = torch.cat([self.token.repeat(h.shape[0], 1, 1), h], 1)
        else:  # "mean": the output would not change, but every input reaches every copy
            h = h + self.token.mean(0, keepdim=True)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("use", ["expand", "repeat", "mean"])
def test_leading_size_one_parameters_get_copies_per_input_where_they_may(use):
    torch.manual_seed(0)
    model = Tokens(use).to(DTYPE).eval()
    X = torch.randn(6, 3, 3, dtype=DTYPE)
    y = torch.randn(6, 2, dtype=DTYPE)
    collector = TermCollector(model, nn.MSELoss(reduction="sum"))
    batch = collector(X, y)
    assert collector.standins.names == (["token"] if use == "expand" else [])
    assert collector.loose.names == ([] if use == "expand" else ["token"])
    dense = dense_blocks(model, X, y, "regression", "ggn")
    torch.testing.assert_close(batch.dense["token"].exact.dense(), 2 * dense["token"])  # MSE
    la = fit("kfoc", model, "regression", batches(X, y, [2, 4]))
    f_var = la._glm_predictive_distribution(X[:3])[1]
    torch.testing.assert_close(f_var, dense_covariance(la, model, X[:3]), rtol=1e-9, atol=1e-12)


def test_embedding_with_frequency_scaled_gradients_is_refused_naming_it():
    model, X, y = whole_data("tiny_vit", "classification")
    model.embed.scale_grad_by_freq = True
    collector = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(NotImplementedError, match=r"'embed' \(Embedding\).*scale_grad_by_freq"):
        collector(X, y)


def test_state_dict_and_online_fit_keep_every_block():
    model, X, y = whole_data("tiny_vit", "classification")
    la = fit("ekfoc", model, "classification", batches(X, y))
    other = Laplace(copy.deepcopy(model), "classification", "all", "ekfoc")
    other.load_state_dict(la.state_dict())
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())
    online = fit("kfoc", model, "classification", batches(X, y)[:1])
    online.fit(batches(X, y)[1:], override=False)
    whole = fit("kfoc", model, "classification", batches(X, y), aggregation="approx")
    dense = named_blocks(whole)
    for name, block in named_blocks(online).items():
        if isinstance(block, DenseBlock):  # exact blocks add up over the fits
            torch.testing.assert_close(block.dense(), dense[name].dense())


def test_float32_whole_model_fits():
    for arch in ("norm_cnn", "tiny_vit"):
        model, X, y = whole_data(arch, "classification", dtype=torch.float32)
        for structure in STRUCTURES:
            la = fit(structure, model, "classification", batches(X, y))
            assert math.isfinite(la.log_marginal_likelihood().item())
            probs = la(X[:3], pred_type="glm", link_approx="probit")
            torch.testing.assert_close(probs.sum(-1), torch.ones(3))
