"""Collection layer: per-sample quantities of ``Linear``/``Conv`` layers during backward.

* :mod:`~kfoc_backpack.collect.kinds` — one file per layer kind: the layer's inputs and
  output-side vectors at its positions (both routes use them);
* :mod:`~kfoc_backpack.collect.handover` — the one hand-over to the solver
  (``weight_terms``: rank one, route choice, grouped form, K-FAC's factors, bias block);
* :mod:`~kfoc_backpack.collect.registry` — which layers have K-FOC factors (the one
  list), the checks that name every unsupported trainable parameter at once, and
  ``freeze_unsupported``;
* :mod:`~kfoc_backpack.collect.batch_layout` — where a layer keeps the batch's inputs
  (dimension 0 or 1, or folded into dimension 0, e.g. a reward model's pairs);
* :mod:`~kfoc_backpack.collect.loss` — output-side vectors of the three curvature
  targets (exact GGN, Monte-Carlo Fisher, empirical Fisher);
* :mod:`~kfoc_backpack.collect.hooks` — the hook route: module hooks plus autograd, on
  any ``nn.Module`` (custom ``forward``, residual sums, attention, dict inputs);
* :mod:`~kfoc_backpack.collect.batch` — what a route hands over per batch
  (``BatchQuantities``), and what a collector is (``Collector``);
* :mod:`~kfoc_backpack.collect.layer_terms` — one weight's per-sample quantities
  (``LayerTerms``) and the record of its solves;
* :mod:`~kfoc_backpack.collect.grouped` — a grouped convolution's
  (``GroupedLayerTerms``), solved per group or coupled over all rows.

BackPACK's extensions (:mod:`kfoc_backpack.extensions`) are the other route, for
``with backpack(KFOC()):`` blocks on models BackPACK can backpropagate through.
"""

from kfoc_backpack.collect.batch import BatchQuantities, Collector
from kfoc_backpack.collect.grouped import GroupedLayerTerms
from kfoc_backpack.collect.handover import weight_terms
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.collect.kinds import KINDS, LayerKind, kind_of
from kfoc_backpack.collect.layer_terms import LayerTerms, WeightSteps, kfac_scale_split
from kfoc_backpack.collect.registry import (
    SUPPORTED_LAYERS,
    freeze_unsupported,
    unsupported_parameters,
)

__all__ = [
    "KINDS",
    "SUPPORTED_LAYERS",
    "BatchQuantities",
    "Collector",
    "GroupedLayerTerms",
    "LayerKind",
    "LayerTerms",
    "TermCollector",
    "WeightSteps",
    "freeze_unsupported",
    "kfac_scale_split",
    "kind_of",
    "unsupported_parameters",
    "weight_terms",
]
