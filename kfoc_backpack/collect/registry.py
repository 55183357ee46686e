"""Which trainable parameter gets its block how, and the checks that name the others.

On the hook route (laplace-torch's classes, :class:`~kfoc_backpack.collect.hooks.TermCollector`)
every trainable parameter gets a block: a module of a kind
(:mod:`kfoc_backpack.collect.kinds`: layers with a weight shared over positions,
normalisation layers) hands its parameters' terms over; any other parameter gets
per-sample gradients by ``torch.func`` (:mod:`kfoc_backpack.collect.loose`), unless it
is too large for them (:data:`~kfoc_backpack.collect.loose.MAX_ENTRIES`). BackPACK's
route covers the layers with K-FOC factors only (:data:`SUPPORTED_LAYERS`).

Adding a kind means one file in :mod:`kfoc_backpack.collect.kinds` and its entry in
``KINDS`` and, for ``with backpack(...)`` users of a layer kind, a BackPACK module
extension in :mod:`kfoc_backpack.extensions` that names BackPACK's derivatives of the
layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.nn import Module

from kfoc_backpack.collect.kinds import KINDS, LayerKind, NormKind, kind_of
from kfoc_backpack.collect.loose import MAX_ENTRIES

SUPPORTED_LAYERS: tuple[type[Module], ...] = tuple(
    t for kind in KINDS if isinstance(kind, LayerKind) for t in kind.types
)
"""Layer types whose weight gets K-FOC factors and whose bias gets its exact block (both
routes)."""

NORM_LAYERS: tuple[type[Module], ...] = tuple(
    t for kind in KINDS if isinstance(kind, NormKind) for t in kind.types
)
"""Normalisation layers whose scale and shift get their exact per-sample-gradient blocks
from the layer's own input (the hook route)."""

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
    """Why ``module``'s own trainable parameters get no block from a kind (``None``: they do).

    Args:
        module: A module with trainable parameters of its own.
        exact_type: BackPACK's route (layer types matched exactly); else the hook
            route's kinds, subclasses included.

    Returns:
        A sentence fragment, or ``None`` for a module of a kind.
    """
    kind = kind_of(module, exact_type)
    if kind is None:
        return f"has trainable parameters but no K-FOC factors (supported: {SUPPORTED_NAMES})"
    problem = kind.problem(module)
    if problem is not None:
        return f"with {problem} is not supported; K-FOC supports {CONV_SUPPORT}"
    return None


@dataclass(frozen=True)
class Coverage:
    """How a model's trainable parameters get their blocks on one route.

    Attributes:
        layers: Modules of a kind with trainable parameters, by module path (their
            own parameters' terms come from the kind), in ``named_modules`` order.
        loose: Full names of the trainable parameters that get per-sample gradients by
            ``torch.func`` (hook route only), in ``named_modules`` order.
        problems: ``{full parameter name: "layer 'path' (Type) <reason>"}`` for the
            parameters that get no block, in ``named_parameters`` order.
    """

    layers: dict[str, Module]
    loose: list[str]
    problems: dict[str, str]


def coverage(model: Module, exact_type: bool = False) -> Coverage:
    """Sort ``model``'s trainable parameters by how they get their blocks.

    Args:
        model: Any module.
        exact_type: BackPACK's route (only its layer kinds, types matched exactly);
            default the hook route.
    """
    layers: dict[str, Module] = {}
    loose: list[str] = []
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        own = [(key, p) for key, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        reason = unsupported_reason(module, exact_type)
        described: set[str] = set()
        if reason is None:
            layers[name] = module
            described = set(kind_of(module, exact_type).zero_blocks(module))
        for key, param in own:
            full = f"{name}.{key}" if name else key
            if key in described:
                continue
            if exact_type:
                why = reason or f"has a parameter '{key}' besides its weight and bias"
                found[full] = f"{describe(name, module)} {why}"
            elif param.numel() > MAX_ENTRIES:
                found[full] = (
                    f"{describe(name, module)} has a {tuple(param.shape)} parameter '{key}' "
                    f"without K-FOC factors of its kind, too large for per-sample gradients "
                    f"(more than {MAX_ENTRIES} entries)"
                )
            else:
                loose.append(full)
    order = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    return Coverage(layers, loose, {name: found[name] for name in order if name in found})


def unsupported_parameters(model: Module, exact_type: bool = False) -> dict[str, str]:
    """Every trainable parameter of ``model`` that gets no block, and why.

    On the hook route (default) these are parameters of modules of no kind too large
    for per-sample gradients (more than 2^20 entries) and layers with a setting their
    kind cannot represent; on BackPACK's route
    (``exact_type=True``) every parameter outside :data:`SUPPORTED_LAYERS`.

    Args:
        model: Any module.
        exact_type: BackPACK's route.

    Returns:
        ``{full parameter name: "layer 'path' (Type) <reason>"}`` in
        ``named_parameters`` order; empty when every trainable parameter gets a block.
    """
    return coverage(model, exact_type).problems


def freeze_unsupported(model: Module, exact_type: bool = False) -> list[str]:
    """Freeze exactly the trainable parameters that get no block.

    Sets ``requires_grad=False`` on each parameter :func:`unsupported_parameters`
    lists, so that ``hessian_structure="kfoc"`` covers the rest of the model. On the
    hook route (laplace-torch's classes) that is only a parameter of a module of no kind
    too large for per-sample gradients, or of a layer with a setting its kind cannot
    represent; ``exact_type=True`` freezes what BackPACK's
    route has no factors for (normalisation layers, embeddings, parameters registered
    on a model itself such as ``cls_token``). A ``Linear`` whose weight the model uses
    outside the layer's ``forward`` (``nn.MultiheadAttention``'s ``out_proj``) is only
    seen at the first batch, which names it::

        frozen = kfoc_backpack.freeze_unsupported(model)  # e.g. [] for a BERT
        la = Laplace(model, "classification", "all", "kfoc")

    Args:
        model: The model (changed in place).
        exact_type: BackPACK's route.

    Returns:
        The full names of the parameters it froze, in ``named_parameters`` order.
    """
    names = list(unsupported_parameters(model, exact_type))
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def covered(
    model: Module, owner: str, exact_type: bool = False, last_layer_hint: bool = True
) -> Coverage:
    """Return how ``model``'s trainable parameters get their blocks, or refuse what gets none.

    Raises, before any computation, listing at once every trainable parameter that
    gets no block.

    Args:
        model: The module whose trainable parameters get curvature.
        owner: Name used in the error message (e.g. ``"KFOCLaplace"``).
        exact_type: BackPACK's route.
        last_layer_hint: Mention ``subset_of_weights='last_layer'`` as a way out.

    Raises:
        NotImplementedError: Naming every such parameter by its full name, its
            layer's path and type, the reason and the ways out.
    """
    found = coverage(model, exact_type)
    if found.problems:
        by_layer: dict[str, list[str]] = {}
        for param, why in found.problems.items():
            by_layer.setdefault(why, []).append(param)
        lines = "\n".join(f"  {why}: {', '.join(params)}" for why, params in by_layer.items())
        way_out = (
            "Freeze them with kfoc_backpack.freeze_unsupported(model), which returns their "
            "names, or set requires_grad=False yourself"
        )
        if last_layer_hint:
            way_out += ", or use subset_of_weights='last_layer'"
        raise NotImplementedError(
            f"{owner}: {len(found.problems)} trainable parameter(s) get no block:\n"
            f"{lines}\n{way_out}."
        )
    return found
