"""Many small models trained at once: the linear datamodeling score's subset models.

The LDS protocol trains one model per (random half of the training set, seed): hundreds
of trainings of a small network. :func:`train_ensemble` trains ``K`` of them in one
vectorised loop (``torch.func.stack_module_state`` + ``vmap``): each model has its own
initialisation (its seed) and its own subset (a 0/1 mask over the training inputs);
one shared shuffle feeds every model the shared batch's inputs of its own subset, so a
model on half the data sees about ``batch_size`` of its inputs per step and about
``|S| / batch_size`` steps per epoch — the full model's recipe (Adam, epochs, batch
size, learning rate) on its subset. Adam is element-wise, so one Adam over the stacked
parameters is ``K`` independent Adams.

Index conventions: ``K`` models, ``N`` training inputs, ``C`` outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state


@dataclass(frozen=True)
class Recipe:
    """How the full model is trained (Adam).

    Attributes:
        epochs: Passes over the training data.
        batch_size: Inputs per step.
        lr: Adam's learning rate.
    """

    epochs: int
    batch_size: int
    lr: float = 1e-3


def per_example_loss(task: str, output: Tensor, target: Tensor) -> Tensor:
    """``[..., N]``: squared error (regression) or cross-entropy per input."""
    if task == "regression":
        return (output - target).square().sum(-1)
    logp = torch.log_softmax(output, dim=-1)
    index = target.expand(*output.shape[:-1]).unsqueeze(-1)
    return -logp.gather(-1, index).squeeze(-1)


def measurement(task: str, output: Tensor, target: Tensor) -> Tensor:
    """``[..., N]``: squared error (regression) or the margin ``f_y − log Σ_{c≠y} e^{f_c}``."""
    if task == "regression":
        return (output - target).square().sum(-1)
    index = target.expand(*output.shape[:-1]).unsqueeze(-1)
    true = output.gather(-1, index).squeeze(-1)
    others = output.scatter(-1, index, float("-inf"))
    return true - torch.logsumexp(others, dim=-1)


@dataclass
class Ensemble:
    """``K`` models of one architecture, their parameters stacked."""

    base: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]

    def __call__(self, X: Tensor) -> Tensor:
        """``[K, N, C]``: every model's output on the same inputs."""

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.base, (p, b), (x,))

        return torch.vmap(one, in_dims=(0, 0, None))(self.params, self.buffers, X)

    def model(self, k: int, make: Callable[[], nn.Module]) -> nn.Module:
        """Return model ``k`` as a module of its own."""
        module = make()
        state = {name: value[k].detach().clone() for name, value in self.params.items()}
        state.update({name: value[k].clone() for name, value in self.buffers.items()})
        module.load_state_dict(state)
        return module


def train_ensemble(
    make: Callable[[], nn.Module],
    X: Tensor,
    y: Tensor,
    task: str,
    recipe: Recipe,
    masks: Tensor,
    seeds: list[int],
    shuffle_seed: int,
) -> Ensemble:
    """Train ``K`` models, model ``k`` from seed ``seeds[k]`` on the inputs ``masks[k]`` holds.

    Args:
        make: Builds one (untrained) model under the current seed.
        X: ``[N, *]`` training inputs.
        y: Targets (``[N, C]`` regression, ``[N]`` classes).
        task: ``"regression"`` or ``"classification"``.
        recipe: The full model's recipe.
        masks: ``[K, N]`` 0/1 subsets.
        seeds: ``K`` initialisation seeds.
        shuffle_seed: Seed of the shared shuffle.
    """
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(make())
    params, buffers = stack_module_state(models)
    ensemble = Ensemble(make().to("meta"), params, buffers)
    optimizer = torch.optim.Adam(list(params.values()), lr=recipe.lr)
    generator = torch.Generator().manual_seed(shuffle_seed)
    share = float(masks.float().mean())
    step = max(1, round(recipe.batch_size / max(share, 1e-12)))
    masks = masks.to(X.dtype)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(X), generator=generator)
        for start in range(0, len(X), step):
            index = order[start : start + step]
            weights = masks[:, index]
            losses = per_example_loss(task, ensemble(X[index]), y[index])
            loss = ((losses * weights).sum(1) / weights.sum(1).clamp(min=1)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return ensemble
