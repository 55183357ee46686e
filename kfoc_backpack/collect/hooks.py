r"""The hook route: per-sample quantities of every trainable parameter of any ``nn.Module``.

A weight's per-sample matrix ``X_{m,n} = Σ_t g_{m,n,t} a_{n,t}ᵀ`` needs, at the layer,
only its input ``a`` and the gradient ``g`` of ``⟨f, v_m⟩`` with respect to its output,
for the output-side vectors ``v_m`` of :mod:`kfoc_backpack.collect.loss`; a
normalisation layer's scale and shift need the same two tensors. Forward hooks record
both at every module of a kind (:mod:`kfoc_backpack.collect.kinds`), whatever surrounds
it (custom ``forward``, residual sums, GELU, attention, dict inputs); one vectorised
``autograd.grad`` call over the ``M`` vectors (``C − 1`` for the exact GGN of a
``C``-class classifier, ``mc_samples`` for the Monte-Carlo Fisher, one for the
empirical Fisher; one call per vector where a backward formula cannot be vectorised)
delivers ``g`` at every module at once. Nothing of size ``N·out·in`` is formed for
``Linear`` layers (see :mod:`kfoc_backpack.collect.handover`). Every other trainable
parameter (a ``cls_token``, a layer scale) gets its per-sample gradients by
``torch.func`` (:mod:`kfoc_backpack.collect.loose`), from the same vectors.

Requirements, each checked with an error that names the layer: inputs are
independent samples (BatchNorm in eval mode, as laplace-torch's ``fit`` sets), every
layer sees the batch in dimension 0 (or 1, e.g. ``TransformerEncoderLayer`` with
``batch_first=False``), or folded into dimension 0 with ``k`` rows per input (a reward
model's preference pairs, :mod:`kfoc_backpack.collect.batch_layout`), and a supported
layer's parameters are used through its own
``forward`` (``nn.MultiheadAttention`` uses its ``out_proj`` weight directly: freeze
it).

Index conventions: ``M`` vectors per input, ``N`` inputs, ``T`` positions sharing a
weight, ``O``/``I`` output/input features.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils._pytree import tree_leaves

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.batch import BatchQuantities, layer_zero_blocks
from kfoc_backpack.collect.batch_layout import PLAIN, BatchLayout
from kfoc_backpack.collect.checks import check_used_through_forward, probe_layouts
from kfoc_backpack.collect.jacobians import Jacobian, OutputJacobians, RowJacobian
from kfoc_backpack.collect.kinds import kind_of
from kfoc_backpack.collect.layer_terms import LayerTerms, WeightSteps
from kfoc_backpack.collect.loose import LooseParameters, StandIns, broadcastable
from kfoc_backpack.collect.loss import check_loss, loss_value, output_vectors
from kfoc_backpack.collect.parameters import row_terms
from kfoc_backpack.collect.registry import covered, describe
from kfoc_backpack.enums import Curvature


@dataclass
class _Calls:
    """Inputs (detached) and outputs (in the graph) of one layer's calls in a forward."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def _finite(x: object) -> bool:
    if isinstance(x, Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, Mapping):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return all(_finite(v) for v in x)
    return True


class TermCollector:
    """Collect every trainable parameter's terms per batch (:class:`LayerTerms` or dense).

    ::

        collect = TermCollector(model, torch.nn.CrossEntropyLoss(reduction="sum"))
        batch = collect(X, y)           # BatchQuantities
        L, R, *_ = batch.weights["fc1.weight"].solve()

    Args:
        model: The module whose trainable parameters get curvature (hooks go on its
            modules of a kind; the other parameters get per-sample gradients by
            ``torch.func``).
        lossfunc: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
            (``reduction`` ``"mean"`` or ``"sum"``).
        curvature: The target (:class:`~kfoc_backpack.enums.Curvature`): ``"ggn"`` (exact
            GGN), ``"mc"`` (Monte-Carlo Fisher) or ``"ef"`` (empirical Fisher).
        mc_samples: Labels drawn per input for ``"mc"``.
        forward: ``forward(X) -> output``; default ``model(X)`` (e.g. a
            last-layer Laplace runs the whole network while hooking the last layer).
        with_kfac: Also compute K-FAC's factors of the same samples.
        owner: Name used in error messages.
        last_layer_hint: Suggest ``subset_of_weights='last_layer'`` in errors.

    Raises:
        NotImplementedError: For a trainable parameter that gets no block (too large
            for per-sample gradients) or an unsupported loss, before any computation.
        ValueError: For an unknown ``curvature`` or a bad ``mc_samples``.
    """

    def __init__(
        self,
        model: Module,
        lossfunc: Module,
        curvature: Curvature | str = Curvature.GGN,
        mc_samples: int = 1,
        forward: Callable[[object], Tensor] | None = None,
        with_kfac: bool = False,
        owner: str = "K-FOC",
        last_layer_hint: bool = True,
    ):
        if int(mc_samples) != mc_samples or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
        check_loss(lossfunc, owner)
        self.model, self.lossfunc, self.owner = model, lossfunc, owner
        self.curvature = Curvature.parse(curvature, "curvature")
        self.mc_samples, self.with_kfac = int(mc_samples), with_kfac
        self.forward = model if forward is None else forward
        found = covered(model, owner, last_layer_hint=last_layer_hint)
        self.layers = found.layers
        self.param_names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        shapes = {name: p.shape for name, p in model.named_parameters()}
        self.standins = StandIns(
            model, [n for n in found.loose if broadcastable(shapes[n])], forward
        )
        """Parameters given one copy per input in the forward pass (``cls_token``, …)."""
        self.loose = LooseParameters(
            model, [n for n in found.loose if not broadcastable(shapes[n])], forward, owner
        )
        """The other parameters of no kind: per-sample gradients by ``torch.func.vmap``."""
        self._standins_checked = False
        self._values: dict[str, Tensor] = {}
        self._layouts: dict[str, BatchLayout] = {}
        self.weight_steps: defaultdict[str, WeightSteps] = defaultdict(WeightSteps)
        """Lanczos steps of each layer's last weight solve, by the names of
        ``layers``: each batch's route choice counts them
        (:class:`~kfoc_backpack.collect.layer_terms.WeightSteps`)."""
        self._clone: set[str] = set()
        self._broadcast: set[str] = set()
        self._checked = False
        self._batched_backward = True

    # ----------------------------------------------------------------------------------

    def __call__(self, X: object, y: Tensor, *, with_kfac: bool | None = None) -> BatchQuantities:
        """Forward, ``M`` backward passes and the per-layer quantities of one batch.

        Args:
            X: The batch's model input.
            y: Its targets.
            with_kfac: Also compute K-FAC's factors of the samples (default: the
                collector's ``with_kfac``).

        Raises:
            FloatingPointError: If the input, the output or a layer's input or output
                is not finite (naming the first such layer).
            NotImplementedError: For samples the model couples, or a supported
                layer whose parameters are used outside its ``forward``.
        """
        kfac = self.with_kfac if with_kfac is None else with_kfac
        with torch.enable_grad():
            calls, output = self._recorded(X)
            num = int(output.shape[0])  # inputs of the batch
            loss = loss_value(self.lossfunc, output, y).detach()
            vectors = output_vectors(self.lossfunc, output, y, self.curvature, self.mc_samples)
            grads, standin_grads = self._backward(calls, output, vectors)
        batch = BatchQuantities(loss, num, {}, {})
        for name, module in self.layers.items():
            if not calls[name].inputs:
                continue
            terms = kind_of(module).terms(
                module,
                calls[name].inputs,
                grads[name],
                self._layouts.get(name, PLAIN),
                self._wanted(module),
                kfac,
                self.weight_steps[name],
            )
            for pname, value in terms.items():
                self._file(batch, self.param_names[id(getattr(module, pname))], value)
        rows = self.loose.rows(X, vectors.detach()) | standin_grads
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, value in rows.items():
            self._file(batch, name, row_terms(value, params[name].shape, kfac))
        return batch

    @staticmethod
    def _file(batch: BatchQuantities, name: str, terms: object) -> None:
        if isinstance(terms, LayerTerms):
            batch.weights[name] = terms
        else:
            batch.dense[name] = terms  # type: ignore[assignment]

    @staticmethod
    def _wanted(module: Module) -> set[str]:
        return {pname for pname, p in module.named_parameters(recurse=False) if p.requires_grad}

    def output_jacobians(
        self, X: object, vectors: Callable[[Tensor], Tensor] | None = None
    ) -> OutputJacobians:
        """Return the model output on ``X`` and each trainable parameter's Jacobian of it.

        The forward of :meth:`__call__` and one backward pass per output unit (one
        vectorised pass where the model allows), whose vectors at each supported layer
        give its weight's :class:`~kfoc_backpack.collect.jacobians.PositionJacobian` and
        its bias's rows; nothing of size ``N × C × parameters`` is formed.

        Args:
            X: The batch's model input.
            vectors: ``vectors(output) -> [K, N, C]``: output-side vectors to pull back
                instead of the ``C`` unit vectors, e.g. each input's loss gradient
                ``∂ℓ(f_n, y_n)/∂f_n`` (``K = 1``), whose "Jacobian" is then the
                per-sample loss gradient (:mod:`kfoc_backpack.influence`). Rows are then
                indexed by ``K`` where they are by ``C`` otherwise.

        Raises:
            ValueError: For a model output that is not ``[N, C]``, or vectors of
                another shape than ``[K, N, C]``.
            FloatingPointError, NotImplementedError: As :meth:`__call__`.
        """
        with torch.enable_grad():
            calls, output = self._recorded(X)
            if output.dim() != 2:
                raise ValueError(
                    f"{self.owner}: the output Jacobians need a model output [N, C], got "
                    f"{tuple(output.shape)}."
                )
            num, outputs = output.shape
            # where each layer keeps the inputs may differ from the fit's batches (a reward
            # model predicts single inputs, fitted on pairs): probed for these inputs
            outs = {name: record.outputs for name, record in calls.items() if record.outputs}
            layouts = probe_layouts(self.layers, outs, output, num, self.owner)
            if vectors is None:
                eye = torch.eye(outputs, dtype=output.dtype, device=output.device)
                units = eye.unsqueeze(1).expand(-1, num, -1)
            else:
                units = vectors(output.detach())
                if units.dim() != 3 or tuple(units.shape[1:]) != (num, outputs):
                    raise ValueError(
                        f"{self.owner}: output-side vectors must be [K, {num}, {outputs}] "
                        f"for a model output {tuple(output.shape)}, got {tuple(units.shape)}."
                    )
                units = units.to(output.dtype)
            grads, standin_grads = self._backward(calls, output, units)
        parameters: dict[str, Jacobian] = {}
        for name, module in self.layers.items():
            if not calls[name].inputs:
                continue
            found = kind_of(module).jacobians(
                module, calls[name].inputs, grads[name], layouts[name], self._wanted(module)
            )
            for pname, jacobian in found.items():
                parameters[self.param_names[id(getattr(module, pname))]] = jacobian
        for name, rows in (self.loose.rows(X, units) | standin_grads).items():
            parameters[name] = RowJacobian(rows.flatten(start_dim=2))
        return OutputJacobians(output.detach(), parameters)

    def _recorded(self, X: object) -> tuple[dict[str, _Calls], Tensor]:
        """Forward with every layer's calls recorded (the first batch's checks done once)."""
        try:
            calls, output = self._forward(X)
        except (RuntimeError, ValueError, TypeError, IndexError):
            if self._standins_checked or not self.standins:
                raise
            self._drop_standins(list(self.standins.names))  # the model cannot take copies
            calls, output = self._forward(X)
        if not self._standins_checked and self.standins and int(output.shape[0]) > 1:
            self._standins_checked = True
            failed = self._failed_standins(X, output)
            if failed:
                self._drop_standins(failed)
                calls, output = self._forward(X)
        changed = {
            name
            for name, record in calls.items()
            if any(o._version != v for o, v in zip(record.outputs, record.versions))
        }
        if changed:
            # an in-place operation after a layer (``ReLU(inplace=True)``) changed its
            # output: from now on the model works on a copy of those layers' outputs
            self._clone.update(changed)
            calls, output = self._forward(X)
        if not self._checked:
            broadcast = self._broadcast_layers(calls, int(output.shape[0]))
            if broadcast:
                self._broadcast.update(broadcast)
                calls, output = self._forward(X)
        for name, module in self.layers.items():
            coupling = kind_of(module).coupling(module)
            if coupling is not None:
                raise NotImplementedError(f"{self.owner}: {describe(name, module)} {coupling}.")
        if not self._checked:
            self._first_batch_checks(calls, output, int(output.shape[0]))
        return calls, output

    def zero_blocks(self) -> dict[str, Block]:
        """Every trainable parameter's all-zero block, in ``named_parameters`` order."""
        loose = self.loose.names + self.standins.names
        return layer_zero_blocks(self.layers, self.param_names, loose, self.model)

    def _failed_standins(self, X: object, output: Tensor) -> list[str]:
        """Return the stand-ins that change the output or that other inputs' outputs reach.

        The model run with the parameters themselves must give the same output, and the
        gradient of input 0's output alone (a random probe) must stay in copy 0.
        """
        with torch.no_grad():
            plain = self.forward(X)
        scale = float(plain.abs().max()) if plain.numel() else 0.0
        if plain.shape != output.shape or not torch.allclose(
            plain, output.detach(), rtol=1e-4, atol=1e-4 * scale + 1e-12
        ):
            return list(self.standins.names)
        probe = torch.zeros_like(output)
        generator = torch.Generator().manual_seed(0)
        probe[0] = torch.randn(output[0].shape, generator=generator, dtype=output.dtype).to(
            output.device
        )
        values = list(self._values.values())
        grads = torch.autograd.grad(output, values, probe, retain_graph=True, allow_unused=True)
        return [
            name
            for name, grad in zip(self._values, grads)
            if grad is not None and bool(grad[1:].ne(0).any())
        ]

    def _drop_standins(self, names: list[str]) -> None:
        """Move stand-ins to the ``torch.func.vmap`` route."""
        self.standins.names = [n for n in self.standins.names if n not in names]
        self.loose.names += names

    def _broadcast_layers(self, calls: dict[str, _Calls], num: int) -> set[str]:
        """Layers whose output has one row where the batch has ``num > 1`` inputs.

        Such an output (a position embedding of ``position_ids`` ``[1, T]``) is broadcast
        over the inputs later; the gradient at it would be their sum. From then on the
        hook expands it (and its input) to the ``num`` inputs before the model uses it,
        so that each input's gradient stays in its own row. A layer that may keep the
        batch in dimension 1 with ``num`` there is taken as doing so.
        """
        if num <= 1:
            return set()
        found = set()
        for name, record in calls.items():
            kind = kind_of(self.layers[name])
            for out in record.outputs:
                sequence_first = kind.any_batch_dim and out.dim() >= 2 and out.shape[1] == num
                if out.dim() > 0 and out.shape[0] == 1 and not sequence_first:
                    found.add(name)
        return found

    # ----------------------------------------------------------------------------------

    def _forward(self, X: object) -> tuple[dict[str, _Calls], Tensor]:
        calls = {name: _Calls() for name in self.layers}
        handles = []
        leaves = [leaf for leaf in tree_leaves(X) if isinstance(leaf, Tensor) and leaf.dim()]
        num = int(leaves[0].shape[0]) if leaves else 1

        def hook_for(name: str):
            def hook(module: Module, args: tuple, kwargs: dict, out: Tensor):
                record = calls[name]
                layer_input = args[0] if args else kwargs["input"]
                if name in self._broadcast and out.shape[0] == 1 < num:
                    # a row shared by every input: one row per input from here on
                    out = out.expand(num, *out.shape[1:])
                    if layer_input.dim() and layer_input.shape[0] == 1:
                        layer_input = layer_input.expand(num, *layer_input.shape[1:])
                record.inputs.append(layer_input.detach())
                record.outputs.append(out)
                record.versions.append(out._version)
                # the rest of the model works on a copy, which in-place operations may change
                if name in self._clone:
                    return out.clone()
                return out if name in self._broadcast else None

            return hook

        try:
            for name, module in self.layers.items():
                handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True))
            self._values = self.standins.values(num) if self.standins else {}
            if self._values:
                output = self.standins.forward(X, self._values)
            else:
                output = self.forward(X)
        finally:
            for handle in handles:
                handle.remove()
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{self.owner}: the model must return a tensor, got {type(output).__name__}."
            )
        if not _finite(output):
            raise FloatingPointError(self._non_finite_message(X, calls))
        return calls, output

    def _non_finite_message(self, X: object, calls: dict[str, _Calls]) -> str:
        if not _finite(X):
            return f"{self.owner}: the model input contains NaN or infinite values."
        for name, record in calls.items():
            for inputs, outputs in zip(record.inputs, record.outputs):
                if not _finite(inputs):
                    return (
                        f"{self.owner}: the input of {describe(name, self.layers[name])} "
                        "contains NaN or infinite values."
                    )
                if not _finite(outputs):
                    return (
                        f"{self.owner}: the output of {describe(name, self.layers[name])} "
                        "contains NaN or infinite values (check its parameters)."
                    )
        return f"{self.owner}: the model output contains NaN or infinite values."

    def _backward(
        self, calls: dict[str, _Calls], output: Tensor, vectors: Tensor
    ) -> tuple[dict[str, list[Tensor]], dict[str, Tensor]]:
        """``[M, *out]`` gradients of ``⟨f, v_m⟩`` at every recorded layer output.

        One vectorised backward pass over the ``M`` vectors (``is_grads_batched``)
        where every backward formula of the model supports it, else one pass per
        vector (remembered for the following batches).

        Returns:
            The gradients at each layer's outputs, and at each stand-in
            (``[M, N, *shape]``: the parameter's per-sample gradients).
        """
        names = [name for name, record in calls.items() for _ in record.outputs]
        outs = [out for record in calls.values() for out in record.outputs]
        standins = list(self._values.values())
        outs = outs + standins
        stacked = None
        if self._batched_backward and vectors.shape[0] > 1:
            try:
                stacked = torch.autograd.grad(
                    output,
                    outs,
                    grad_outputs=vectors,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            except RuntimeError:  # a backward formula without a batching rule
                self._batched_backward = False
        if stacked is None:
            per_vector = [
                torch.autograd.grad(
                    output, outs, grad_outputs=vector, retain_graph=True, allow_unused=True
                )
                for vector in vectors
            ]
            stacked = (
                [None if grads[0] is None else torch.stack(grads) for grads in zip(*per_vector)]
                if per_vector
                else [None] * len(outs)
            )
        result: dict[str, list[Tensor]] = {name: [] for name in calls}
        for name, out, grads in zip(names, outs, stacked):
            if grads is None:  # the layer's output does not reach the model output
                grads = out.new_zeros(vectors.shape[0], *out.shape)
            result[name].append(grads.detach())
        per_sample = {}
        for name, value, grads in zip(self._values, standins, stacked[len(names) :]):
            if grads is None:  # not used by this batch
                grads = value.new_zeros(vectors.shape[0], *value.shape)
            per_sample[name] = grads.detach().unsqueeze(2)  # [M, N, 1, …]: the parameter's shape
        return result, per_sample

    def _first_batch_checks(self, calls: dict[str, _Calls], output: Tensor, num: int) -> None:
        """Check the described modules, unused forwards, batch dimensions and independence, once.

        A module whose kind does not reproduce its output (a subclass with its own
        ``forward``) leaves the hooked modules where its kind allows
        (:attr:`~kfoc_backpack.collect.kinds.ModuleKind.fallback_loose`): its parameters
        get per-sample gradients by ``torch.func`` from now on (the same blocks).

        Raises:
            NotImplementedError: Naming a layer its kind does not describe.
        """
        for name, record in list(calls.items()):
            module, kind = self.layers[name], kind_of(self.layers[name])
            if not record.inputs or kind.reproduces(module, record.inputs[0], record.outputs[0]):
                continue
            if not kind.fallback_loose:
                base = kind.base_type(module).__name__
                raise NotImplementedError(
                    f"{self.owner}: {describe(name, module)} subclasses {base} with a forward "
                    f"that does not compute {base}.forward, which K-FOC's factors describe. "
                    "Freeze its parameters (requires_grad=False)."
                )
            del self.layers[name], calls[name]
            self.loose.names += [
                self.param_names[id(p)] for p in module.parameters(recurse=False) if p.requires_grad
            ]
        silent = [name for name, record in calls.items() if not record.outputs]
        check_used_through_forward(
            {name: self.layers[name] for name in silent}, self.param_names, output, self.owner
        )
        outs = {name: record.outputs for name, record in calls.items() if record.outputs}
        self._layouts.update(probe_layouts(self.layers, outs, output, num, self.owner))
        self._checked = True
