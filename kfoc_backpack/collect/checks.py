"""The hook route's checks on the first batch: what it cannot see, where the batch is.

Run once per :class:`~kfoc_backpack.collect.hooks.TermCollector`, each naming the layer:
a supported layer whose trainable parameters the model uses without calling the layer
(``nn.MultiheadAttention``'s ``out_proj``), and, by a probe (the gradient of input 0's
output alone), where each layer keeps the batch's inputs — dimension 0, 1, or folded
into 0 — and whether they are independent (BatchNorm in training mode couples them).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.collect.batch_layout import PLAIN, BatchLayout, detect_layout
from kfoc_backpack.collect.kinds import kind_of
from kfoc_backpack.collect.registry import describe


def check_used_through_forward(
    silent: dict[str, Module], names: dict[int, str], output: Tensor, owner: str
) -> None:
    """Refuse trainable parameters of layers whose ``forward`` did not run but are used.

    Args:
        silent: The supported layers whose forward the batch did not call, by path.
        names: Full parameter names by ``id``.
        output: The model output (in the graph).
        owner: Name used in the message.

    Raises:
        NotImplementedError: Naming the first such layer.
    """
    params = [p for module in silent.values() for p in module.parameters() if p.requires_grad]
    if not params:
        return
    used = torch.autograd.grad(output.sum(), params, retain_graph=True, allow_unused=True)
    for param, grad in zip(params, used):
        if grad is not None:
            name = names[id(param)].rsplit(".", 1)[0]
            raise NotImplementedError(
                f"{owner}: {describe(name, silent[name])} has trainable parameters that "
                "the model uses without calling the layer's forward (as "
                "nn.MultiheadAttention does with its out_proj), so K-FOC cannot see "
                "its inputs. Freeze its parameters (requires_grad=False)."
            )


def probe_layouts(
    layers: dict[str, Module], outs: dict[str, list[Tensor]], output: Tensor, num: int, owner: str
) -> dict[str, BatchLayout]:
    """Where each layer's output keeps the ``num`` inputs (sample 0's gradient stays in its rows).

    Args:
        layers: The supported layers by path.
        outs: Each called layer's outputs (in the graph).
        output: The model output.
        num: Inputs of the batch.
        owner: Name used in the messages.

    Raises:
        NotImplementedError: For coupled inputs, or an output without the batch's
            dimension, naming the layer.
    """
    pairs = [(name, out) for name, calls in outs.items() for out in calls]
    if not pairs:
        return {}
    probe = torch.zeros_like(output)
    generator = torch.Generator().manual_seed(0)
    probe[0] = torch.randn(output[0].shape, generator=generator, dtype=output.dtype).to(
        output.device
    )
    grads = torch.autograd.grad(
        output, [o for _, o in pairs], probe, retain_graph=True, allow_unused=True
    )
    layouts: dict[str, BatchLayout] = {}
    for (name, out), grad in zip(pairs, grads):
        module = layers[name]
        where = describe(name, module)
        try:
            layout = detect_layout(
                tuple(out.shape),
                num,
                grad,
                any_dim=kind_of(module).any_batch_dim,
                default=layouts.get(name, PLAIN),
            )
        except ValueError:
            raise NotImplementedError(
                f"{owner}: the output of input 0 depends on other inputs' activations at "
                f"{where}; K-FOC needs independent inputs (put BatchNorm in eval mode)."
            ) from None
        if layout is None:
            raise NotImplementedError(
                f"{owner}: the output {tuple(out.shape)} of {where} has no dimension 0 or "
                f"1 of the batch size {num}, nor a dimension 0 that is a multiple of it: "
                "K-FOC needs each input's activations separate."
            )
        layouts[name] = layout
    return layouts
