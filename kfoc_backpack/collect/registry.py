"""The one list of layers with K-FOC factors, and the checks that name the others.

Adding a layer type means one :class:`~kfoc_backpack.collect.kinds.base.LayerKind` file
in :mod:`kfoc_backpack.collect.kinds` and its entry in ``KINDS`` (both collection routes
take it from there) and, for ``with backpack(...)`` users, a BackPACK module extension in
:mod:`kfoc_backpack.extensions` that names BackPACK's derivatives of the layer.
"""

from __future__ import annotations

from torch.nn import Module

from kfoc_backpack.collect.kinds import KINDS, kind_of

SUPPORTED_LAYERS: tuple[type[Module], ...] = tuple(t for kind in KINDS for t in kind.types)
"""Layer types whose weight gets K-FOC factors and whose bias gets its exact block."""

SUPPORTED_NAMES = ", ".join(layer.__name__ for layer in SUPPORTED_LAYERS)

CONV_SUPPORT = (
    f"{SUPPORTED_NAMES} layers; convolutions (any groups) with integer padding and "
    "padding_mode='zeros'"
)


def layer_problem(module: Module) -> str | None:
    """Name the setting of a supported layer its kind does not represent, if any."""
    kind = kind_of(module)
    return None if kind is None else kind.problem(module)


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
    kind = kind_of(module, exact_type)
    if kind is None:
        return f"has trainable parameters but no K-FOC factors (supported: {SUPPORTED_NAMES})"
    problem = kind.problem(module)
    if problem is not None:
        return f"with {problem} is not supported; K-FOC supports {CONV_SUPPORT}"
    return None


WEIGHT_NAMES = ("weight", "bias")
"""The parameters of a supported layer that get factors (weight) or an exact block (bias)."""


def unsupported_parameters(model: Module, exact_type: bool = False) -> dict[str, str]:
    """Every trainable parameter of ``model`` that gets no K-FOC factors, and why.

    Args:
        model: Any module.
        exact_type: Match layer types exactly (BackPACK's route).

    Returns:
        ``{full parameter name: "layer 'path' (Type) <reason>"}`` in
        ``named_parameters`` order (``cls_token``, ``blocks.0.norm1.weight``, …); empty
        when every trainable parameter has factors.
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        own = [(key, p) for key, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        reason = unsupported_reason(module, exact_type)
        for key, _ in own:
            why = reason
            if why is None and key not in WEIGHT_NAMES:
                why = f"has a parameter '{key}' besides its weight and bias"
            if why is not None:
                found[f"{name}.{key}" if name else key] = f"{describe(name, module)} {why}"
    order = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    return {name: found[name] for name in order if name in found}


def freeze_unsupported(model: Module, exact_type: bool = False) -> list[str]:
    """Freeze exactly the trainable parameters K-FOC has no factors for.

    Sets ``requires_grad=False`` on each parameter :func:`unsupported_parameters`
    lists (normalisation layers, embeddings, attention modules, parameters registered
    on a model itself such as ``cls_token``), so that ``hessian_structure="kfoc"``
    covers the rest of the model, as one freezes them for laplace-torch's ``kron``. A
    ``Linear`` whose weight the model uses outside the layer's ``forward``
    (``nn.MultiheadAttention``'s ``out_proj``) is only seen at the first batch, which
    names it::

        frozen = kfoc_backpack.freeze_unsupported(model)  # ['cls_token', 'norm.weight', …]
        la = Laplace(model, "classification", "all", "kfoc")

    Args:
        model: The model (changed in place).
        exact_type: Match layer types exactly (BackPACK's route).

    Returns:
        The full names of the parameters it froze, in ``named_parameters`` order.
    """
    names = list(unsupported_parameters(model, exact_type))
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def trainable_layers(
    model: Module, owner: str, exact_type: bool = False, last_layer_hint: bool = True
) -> dict[str, Module]:
    """Supported layers of ``model`` with trainable parameters, by module path.

    Raises, before any computation, listing at once every trainable parameter K-FOC
    has no factors for.

    Args:
        model: The module whose trainable parameters get curvature.
        owner: Name used in the error message (e.g. ``"KFOCLaplace"``).
        exact_type: Match layer types exactly (BackPACK's route).
        last_layer_hint: Mention ``subset_of_weights='last_layer'`` as a way out.

    Returns:
        ``{module path: module}`` in ``named_modules`` order.

    Raises:
        NotImplementedError: Naming every such parameter by its full name, its
            layer's path and type, what is supported and the ways out.
    """
    problems = unsupported_parameters(model, exact_type)
    if problems:
        by_layer: dict[str, list[str]] = {}
        for param, why in problems.items():
            by_layer.setdefault(why, []).append(param)
        lines = "\n".join(f"  {why}: {', '.join(params)}" for why, params in by_layer.items())
        way_out = (
            "Freeze them with kfoc_backpack.freeze_unsupported(model), which returns their "
            "names, or set requires_grad=False yourself"
        )
        if last_layer_hint:
            way_out += ", or use subset_of_weights='last_layer'"
        raise NotImplementedError(
            f"{owner}: {len(problems)} trainable parameter(s) have no K-FOC factors:\n"
            f"{lines}\n{way_out}."
        )
    return {
        name: module
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
