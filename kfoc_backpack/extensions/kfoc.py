"""The BackPACK extensions: K-FOC's factors, their eigenvalue correction, the raw terms.

``KFOC`` (Monte-Carlo Fisher) and ``KFOCExact`` (GGN), their eigenvalue-corrected
siblings ``EKFOC`` and ``EKFOCExact``, and ``KFOCTerms``.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple
from weakref import WeakKeyDictionary

from backpack.extensions.backprop_extension import FAIL_ERROR, FAIL_SILENT, FAIL_WARN
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.base import SecondOrderBackpropExtension
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

from kfoc_backpack.collect.layer_terms import LayerTerms, WeightSteps, warn_unconverged
from kfoc_backpack.collect.registry import layer_problem
from kfoc_backpack.enums import Grouped, Stop
from kfoc_backpack.extensions.convnd import KFOCConv1d, KFOCConv2d, KFOCConv3d
from kfoc_backpack.extensions.linear import KFOCLinear
from kfoc_backpack.extensions.module_map import (
    sqrt_ggn_conv_extensions,
    sqrt_ggn_module_extensions,
    unsupported_param_module_extensions,
)
from kfoc_backpack.extensions.unsupported import (
    SkippedConvModule,
    UnsupportedParamsModule,
    handle_unsupported,
    module_path,
)
from kfoc_backpack.solver import (
    DEFAULT_EXACT_MAX_TERMS,
    DEFAULT_MAX_ITER,
    DEFAULT_STOP,
    DEFAULT_TOL,
    KroneckerFactors,
    SolverOptions,
)


class SolveRecord(NamedTuple):
    """One weight solve, as logged in :attr:`KFOCBase.solve_log`.

    Attributes:
        module: Class name of the layer.
        weight_shape: Shape of the layer's weight.
        iterations: Power steps the solver took (Lanczos steps on the convolution
            routes: applications of the left power map).
        converged: Whether the tolerance was reached.
        route: How the solve ran: ``rank-one`` (``Linear`` on 2-d inputs, any layer
            on a single position) or, for weights shared over positions, the route of
            :mod:`~kfoc_backpack.solver.shared` (``formed``, ``factored``,
            ``gram``, ``operator``).
    """

    module: str
    weight_shape: tuple[int, ...]
    iterations: int
    converged: bool
    route: str = ""


_LAYER_STEPS: WeakKeyDictionary[Module, dict[tuple[str, str, int], WeightSteps]] = (
    WeakKeyDictionary()
)
"""Lanczos steps of each layer's last weight solve, per extension kind
(:meth:`KFOCBase.weight_steps`)."""


class KFOCBase(SqrtGGN):
    """Common base of :class:`KFOC` and :class:`KFOCExact`.

    Backpropagates BackPACK's GGN/Fisher matrix square root (``SqrtGGN``) and, at
    every ``Linear``/``Conv1d``/``Conv2d``/``Conv3d`` layer, stores the
    Frobenius-optimal Kronecker factors of the weight block and the exact bias
    block, in BackPACK's ``KFAC`` layout: ``weight.<savefield> = [L_out, R_in]``,
    ``bias.<savefield> = [B]``.

    Args:
        loss_hessian_strategy: ``'exact'`` or ``'sampling'``.
        savefield: Attribute the factors are stored under.
        tol: Solver stopping precision (paper default ``1e-5``).
        max_iter: Solver iteration cap (paper default ``100``).
        exact_max_terms: Layers whose coefficient problem has at most this many
            terms (``Linear`` on 2-d input: the batch size; convolutions on
            accelerators: ``C_out²``; see :class:`~kfoc_backpack.solver.SolverOptions`)
            and that the power method has not settled after 33 steps are solved
            exactly by two small eigendecompositions; ``0`` keeps the paper's plain
            power method.
        fail_mode: BackPACK's convention for a parameterised layer that K-FOC does
            not support (``BatchNorm``, ``Embedding``, transposed convolutions, or a
            layer BackPACK does not know): ``'ERROR'`` (default) raises naming the
            layer, ``'WARNING'`` warns and writes nothing for it, ``'SILENT'`` skips
            it.
        stop: What ``tol`` bounds: the left factor's change (``"factors"``) or the
            captured norm's (``"objective"``), see :class:`~kfoc_backpack.enums.Stop`.
    """

    def __init__(
        self,
        loss_hessian_strategy: str,
        savefield: str,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        fail_mode: str = FAIL_ERROR,
        mc_samples: int = 1,
        exact_max_terms: int = DEFAULT_EXACT_MAX_TERMS,
        stop: Stop | str = DEFAULT_STOP,
    ):
        if int(mc_samples) != mc_samples or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
        self._mc_samples = int(mc_samples)
        if fail_mode not in (FAIL_ERROR, FAIL_WARN, FAIL_SILENT):
            raise ValueError(
                f"fail_mode must be one of {FAIL_ERROR!r}, {FAIL_WARN!r}, "
                f"{FAIL_SILENT!r}, got {fail_mode!r}."
            )
        self.loss_hessian_strategy = loss_hessian_strategy
        self.solver_options = SolverOptions(
            tol=tol, max_iter=max_iter, exact_max_terms=exact_max_terms, stop=stop
        )
        self.fail_mode = fail_mode
        module_exts: dict[type[Module], ModuleExtension] = {
            **sqrt_ggn_module_extensions(),
            **{
                layer: UnsupportedParamsModule(inner)
                for layer, inner in unsupported_param_module_extensions().items()
            },
            Linear: KFOCLinear(),
            Conv1d: KFOCConv1d(),
            Conv2d: KFOCConv2d(),
            Conv3d: KFOCConv3d(),
        }
        self._known_layers = frozenset(module_exts)
        self._skipped_convs = {
            layer: SkippedConvModule(inner) for layer, inner in sqrt_ggn_conv_extensions().items()
        }
        SecondOrderBackpropExtension.__init__(
            self, savefield=savefield, module_exts=module_exts, fail_mode=fail_mode
        )
        self.solve_log: deque[SolveRecord] = deque(maxlen=4096)
        self._routes: dict[int, str] = {}

    def get_num_mc_samples(self) -> int:
        """Return the number of Monte-Carlo samples per input."""
        return self._mc_samples

    def __call__(self, module: Module, g_inp, g_out) -> None:
        """Run the module extension; apply ``fail_mode`` to unsupported layers.

        A convolution in a setting K-FOC does not support (string
        padding, a padding mode other than ``'zeros'``) gets no quantities: it raises
        (``'ERROR'``), or is skipped with a warning (``'WARNING'``) or silently, and
        backpropagated through by autograd (:class:`SkippedConvModule`).
        """
        if type(module) not in self._known_layers:
            handle_unsupported(self, module)
        elif type(module) in self._skipped_convs and layer_problem(module) is not None:
            self._skipped_convs[type(module)](self, module, g_inp, g_out)
            return
        super().__call__(module, g_inp, g_out)

    def weight_steps(self, module: Module) -> WeightSteps:
        """Return the record of ``module``'s Lanczos steps under this kind of extension.

        Kept per layer (weakly) and per extension kind (class, loss-Hessian strategy,
        Monte-Carlo samples), not per extension object: BackPACK's idiom builds a new
        extension for every batch (``with backpack(KFOC()):``), and each batch's route
        choice counts the steps the layer's previous solve took
        (:class:`~kfoc_backpack.collect.layer_terms.WeightSteps`). Only the route depends
        on it, never the factors.
        """
        kinds = _LAYER_STEPS.get(module)
        if kinds is None:
            kinds = _LAYER_STEPS[module] = {}
        key = (type(self).__name__, self.loss_hessian_strategy, self._mc_samples)
        steps = kinds.get(key)
        if steps is None:
            steps = kinds[key] = WeightSteps()
        return steps

    with_kfac = False
    """Whether the weights' terms carry K-FAC's factors of the samples (``KFOCTerms``)."""

    def weight_result(self, module: Module, terms: LayerTerms) -> list[Tensor] | object:
        """Return what the weight's savefield holds: ``[L_out, R_in]`` in K-FAC's split.

        A grouped convolution's factors are coupled over all its rows (BackPACK's and
        laplace-torch's layout of a weight's factors, ``[C_out, C_out]`` and
        ``[C_in/groups·Πkernel, …]``).
        """
        factors = self.solve(module, terms)
        return [factors.left, factors.right]

    def solve(self, module: Module, terms: LayerTerms) -> KroneckerFactors:
        """K-FOC's factors of the weight's terms (coupled): logged, warned about unconverged."""
        terms = terms.with_structure(Grouped.COUPLED)
        self.note_route(module, terms.terms.route)

        def what() -> str:
            return (
                f"{type(self).__name__}: the K-FOC solve of the weight "
                f"{tuple(module.weight.shape)} of {module_path(module)}"
            )

        factors = terms.solve(self.solver_options, what=what)
        self.log_solve(module, factors)
        if not factors.converged:
            warn_unconverged(what, self.solver_options)
        return factors

    def note_route(self, module: Module, route: str) -> None:
        """Remember the solve route of ``module``'s weight for its :class:`SolveRecord`."""
        self._routes[id(module)] = route

    def log_solve(self, module: Module, factors: KroneckerFactors) -> None:
        """Record one weight solve in ``solve_log`` (with the noted route, if any)."""
        self.solve_log.append(
            SolveRecord(
                module.__class__.__name__,
                tuple(module.weight.shape),
                factors.iterations,
                factors.converged,
                self._routes.pop(id(module), ""),
            )
        )


class KFOC(KFOCBase):
    """K-FOC of the Monte-Carlo Fisher (the paper's FIM), savefield ``kfoc``.

    The K-FOC counterpart of BackPACK's ``KFAC``: for each input, ``mc_samples``
    labels are drawn from the model's predictive distribution (BackPACK's sampled
    loss-Hessian square root; reproducible with ``torch.manual_seed``), and the
    Frobenius-optimal ``L_out ⊗ R_in`` of the resulting Fisher block is stored in
    ``weight.kfoc``; ``bias.kfoc`` is ``[B]``, the exact block of the same Fisher.

    Example::

        model, lossfunc = extend(model), extend(torch.nn.CrossEntropyLoss())
        with backpack(KFOC()):
            lossfunc(model(X), y).backward()
        L_out, R_in = model[0].weight.kfoc

    Args:
        mc_samples: Number of sampled labels per input.
        tol: Solver stopping precision (paper default ``1e-5``).
        max_iter: Solver iteration cap (paper default ``100``).
        fail_mode: ``'ERROR'``, ``'WARNING'`` or ``'SILENT'`` for parameterised layers
            K-FOC does not support (see :class:`KFOCBase`).
        exact_max_terms: Largest coefficient problem finished exactly when the power
            method is slow (see :class:`KFOCBase`); ``0`` for the plain power method.
        stop: What ``tol`` bounds: the left factor's change (``"factors"``) or the
            captured norm's (``"objective"``), see :class:`~kfoc_backpack.enums.Stop`.
    """

    SAVEFIELD = "kfoc"

    def __init__(
        self,
        mc_samples: int = 1,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        fail_mode: str = FAIL_ERROR,
        exact_max_terms: int = DEFAULT_EXACT_MAX_TERMS,
        stop: Stop | str = DEFAULT_STOP,
    ):
        super().__init__(
            LossHessianStrategy.SAMPLING,
            self.SAVEFIELD,
            tol,
            max_iter,
            fail_mode,
            mc_samples=mc_samples,
            exact_max_terms=exact_max_terms,
            stop=stop,
        )


class KFOCExact(KFOCBase):
    """K-FOC of the exact GGN, savefield ``kfoc_exact`` (counterpart of ``KFLR``).

    Uses the exact loss-Hessian square root (``C`` columns per input for ``C``
    outputs; ``C − 1`` for ``C``-class cross-entropy on ``[N, C]`` outputs, whose
    Hessian has rank ``C − 1``: :mod:`~kfoc_backpack.extensions.crossentropy`) and
    stores the Frobenius-optimal ``L_out ⊗ R_in`` of the GGN block in
    ``weight.kfoc_exact`` and the exact bias block ``[B]`` in ``bias.kfoc_exact``.

    Args:
        tol: Solver stopping precision (paper default ``1e-5``).
        max_iter: Solver iteration cap (paper default ``100``).
        fail_mode: ``'ERROR'``, ``'WARNING'`` or ``'SILENT'`` for parameterised layers
            K-FOC does not support (see :class:`KFOCBase`).
        exact_max_terms: Largest coefficient problem finished exactly when the power
            method is slow (see :class:`KFOCBase`); ``0`` for the plain power method.
        stop: What ``tol`` bounds: the left factor's change (``"factors"``) or the
            captured norm's (``"objective"``), see :class:`~kfoc_backpack.enums.Stop`.
    """

    SAVEFIELD = "kfoc_exact"

    def __init__(
        self,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        fail_mode: str = FAIL_ERROR,
        exact_max_terms: int = DEFAULT_EXACT_MAX_TERMS,
        stop: Stop | str = DEFAULT_STOP,
    ):
        super().__init__(
            LossHessianStrategy.EXACT,
            self.SAVEFIELD,
            tol,
            max_iter,
            fail_mode,
            exact_max_terms=exact_max_terms,
            stop=stop,
        )
