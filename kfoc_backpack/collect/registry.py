"""The one list of layers with K-FOC factors, and the checks that name the others.

Adding a layer type means: its maths in :mod:`kfoc_backpack.collect.layers`, its
entry in :data:`SUPPORTED_LAYERS` here, its hook-route branch in
:mod:`kfoc_backpack.collect.route` and (for ``with backpack(...)`` users) a BackPACK
module extension in :mod:`kfoc_backpack.extensions`.
"""

from __future__ import annotations

from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

SUPPORTED_LAYERS: tuple[type[Module], ...] = (Linear, Conv1d, Conv2d, Conv3d)
"""Layer types whose weight gets K-FOC factors and whose bias gets its exact block."""

SUPPORTED_NAMES = ", ".join(layer.__name__ for layer in SUPPORTED_LAYERS)

CONV_SUPPORT = "convolutions with groups=1, integer padding and padding_mode='zeros'"


def conv_problem(module: Module) -> str | None:
    """Name the setting of a convolution K-FOC's unfolding does not represent, if any."""
    if module.groups != 1:
        return f"groups={module.groups}"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def describe(name: str, module: Module) -> str:
    """``"layer 'name' (Type)"``, or the type alone for the root module."""
    return f"layer '{name}' ({type(module).__name__})" if name else type(module).__name__


def unsupported_reason(module: Module, exact_type: bool = False) -> str | None:
    """Why ``module``'s trainable parameters get no K-FOC factors (``None``: they do).

    Args:
        module: A module with trainable parameters of its own.
        exact_type: Match the layer types exactly, as BackPACK does (the hook
            route accepts subclasses whose ``forward`` is the layer's).

    Returns:
        A sentence fragment, or ``None`` for a supported layer.
    """
    if exact_type:
        supported = type(module) in SUPPORTED_LAYERS
    else:
        supported = isinstance(module, SUPPORTED_LAYERS)
    if not supported:
        return f"has trainable parameters but no K-FOC factors (supported: {SUPPORTED_NAMES})"
    if not isinstance(module, Linear):
        problem = conv_problem(module)
        if problem is not None:
            return f"with {problem} is not supported; K-FOC supports {CONV_SUPPORT}"
    return None


def trainable_layers(
    model: Module, owner: str, exact_type: bool = False, last_layer_hint: bool = True
) -> dict[str, Module]:
    """Supported layers of ``model`` with trainable parameters, by module path.

    Raises, before any computation, for the first module with trainable parameters
    K-FOC has no factors for.

    Args:
        model: The module whose trainable parameters get curvature.
        owner: Name used in the error message (e.g. ``"KFOCLaplace"``).
        exact_type: Match layer types exactly (BackPACK's route).
        last_layer_hint: Mention ``subset_of_weights='last_layer'`` as a way out.

    Returns:
        ``{module path: module}`` in ``named_modules`` order.

    Raises:
        NotImplementedError: Naming the module path and type, what is supported and
            the ways out.
    """
    layers = {}
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        reason = unsupported_reason(module, exact_type)
        if reason is not None:
            way_out = "Freeze its parameters (requires_grad=False)"
            if last_layer_hint:
                way_out += " or use subset_of_weights='last_layer'"
            raise NotImplementedError(f"{owner}: {describe(name, module)} {reason}. {way_out}.")
        layers[name] = module
    return layers
