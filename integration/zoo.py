"""Model zoo: ``kfoc`` against laplace-torch's ``kron`` on library models, as users build them.

Each model comes from its library's constructor (random initialisation: nothing is
downloaded) and is fitted with ``Laplace(model, "classification", "all", structure)`` for
``structure`` in ``kron`` (laplace-torch's default backend, curvlinops' K-FAC) and
``kfoc`` (``aggregation="running"``, exact GGN), after
``kfoc_backpack.freeze_unsupported(model, exact_type=True)`` froze what ``kron`` has no
factors for (normalisation layers, embeddings, ``cls_token``/``pos_embed``, layer
scales; both fit the same parameters in the curvature table; the whole-model table
below fits everything with ours):

=====================  ===============================================================
model                  built by
=====================  ===============================================================
``resnet18``           ``torchvision.models.resnet18(num_classes=10)``
``mobilenet_v3_small`` ``torchvision.models.mobilenet_v3_small(num_classes=10)``
                       (depthwise convolutions trainable)
``vit_tiny``           ``timm.create_model("vit_tiny_patch16_224", img_size=32,
                       patch_size=4, num_classes=10)``
``convnext_atto``      ``timm.create_model("convnext_atto", num_classes=10)``
``bert_tiny``          ``transformers.BertForSequenceClassification`` (2 layers, width 128,
                       4 heads, BERT's 30,522-id vocabulary, 32 tokens, dict batches)
``efficientnet_b0``    ``torchvision.models.efficientnet_b0(num_classes=10)``
``regnet_y_400mf``     ``torchvision.models.regnet_y_400mf(num_classes=10)`` (grouped
                       convolutions)
``shufflenet_v2_x0_5`` ``torchvision.models.shufflenet_v2_x0_5(num_classes=10)``
``deit_tiny``          ``timm.create_model("deit_tiny_patch16_224", img_size=32,
                       num_classes=10)`` (patch 16: 4 patches and the class token)
=====================  ===============================================================

The images are 32×32 RGB (two batches of 16, random; ``--image-size 224`` for the
resolution the ImageNet models are built for, ViT/DeiT then with their own 16-pixel
patches), the token sequences 32 long.

**Whole models** (the first table): each model with *nothing frozen* is fitted with
``kfoc``, ``ekfoc`` and ``ekfac`` — normalisation layers, embeddings, ``cls_token``,
``pos_embed`` and layer scales included — and laplace-torch's ``kron`` with what it
cannot fit frozen; then each predicts with ``la(X, pred_type="glm",
link_approx="probit")``, ours on ``--test-inputs`` inputs (32), ``kron`` (whose GLM
predictive forms the ``inputs × classes × parameters`` Jacobian) on
``--kron-test-inputs`` (8). Each fit runs in a process of its own, so that its peak
memory (``ru_maxrss``) is its own: the table gives the fit time, the peak after the
fit, the predictive's time per input and what it added to the peak, the log marginal
likelihood (finite) and whether every probit row sums to one. The fit-time *ratio* to
``kfoc`` comes from one more process that fits ``kfoc``, ``ekfoc`` and ``ekfac`` in
turns (one warm-up round, then ``--repeats`` rounds, or as many more as fit in
``--ab-seconds`` — a 2-second fit's median over two rounds moves by 0.05 with the
machine's jitter; medians): an A/B in one run, where the single fits above each pay their
own process's first-call costs.

**Curvature on the same parameters** (the second table): per model it prints the
*curvature time* — ``la.fit`` less the eigendecompositions of the
factors that both methods pay at its end (``Kron.decompose``, timed inside the same
fit) — and the full fit time, medians over ``--repeats`` fits with the methods
interleaved (after one warm-up fit each), their ratio, and for ``kfoc`` each weight's
solve route, Lanczos/power steps and solve time on the first batch, with the
multiply-adds of the route taken and of the cheapest route at those steps (the exact
floor) against K-FAC's factors of the same layer; the model's ``floor`` is the sum of
its layers' floors over the sum of their K-FAC flops. Needs the ``zoo``
extra (``pip install -e ".[zoo]"``: torchvision, timm, transformers). Usage::

    python integration/zoo.py                       # all models, 5 repeats, 1 thread
    python integration/zoo.py --models bert_tiny --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cli
import torch
from laplace import Laplace
from laplace.utils.matrix import Kron
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

import kfoc_backpack  # registers hessian_structure="kfoc"
from kfoc_backpack import Grouped, KFOCBackend
from kfoc_backpack.enums import Route
from kfoc_backpack.solver import LayerSizes, route_flops

METHODS = ("kron", "kfoc")
WHOLE_METHODS = ("kron", "kfoc", "ekfoc", "ekfac")
"""``kron`` fits what laplace-torch can (the rest frozen); the others fit every parameter."""
AB_METHODS = ("kfoc", "ekfoc", "ekfac")
"""The whole-model fits timed A/B in one process (their ratio to ``kfoc`` is the table's)."""
MAX_AB_ROUNDS = 15
"""Most timed A/B rounds ``--ab-seconds`` adds (the smallest models' fits take 1-2 s)."""
CLASSES = 10
IMAGE_SIZE = 32
"""Side of the random RGB images (``--image-size``; 224 is the resolution the
ImageNet models are built for)."""
TOKENS = 32


@dataclass
class Case:
    """A model, its loader and the ``Laplace`` keywords its batches need."""

    model: nn.Module
    loader: DataLoader
    frozen: list[str]
    laplace_kwargs: dict = field(default_factory=dict)


def _missing(package: str) -> ImportError:
    return ImportError(
        f"integration/zoo.py needs {package}: install the zoo extra, "
        'pip install -e ".[zoo]" (torchvision, timm, transformers).'
    )


def torchvision_model(name: str) -> Callable[..., nn.Module]:
    """Return a constructor of ``torchvision.models.<name>(num_classes=10)`` (any image size)."""

    def build(image_size: int = IMAGE_SIZE) -> nn.Module:
        try:
            import torchvision
        except (ImportError, RuntimeError) as error:  # RuntimeError: a CPU torch mismatch
            raise _missing("torchvision") from error
        return getattr(torchvision.models, name)(num_classes=CLASSES)

    return build


def timm_model(name: str, **small) -> Callable[..., nn.Module]:
    """Return a constructor of ``timm.create_model(name, pretrained=False, ...)``.

    ``small``: the keywords that adapt the model to 32-pixel images (``img_size``,
    ``patch_size``); at any other size the model is built for that ``img_size`` with its
    own patches (convolutional models take any size).
    """

    def build(image_size: int = IMAGE_SIZE) -> nn.Module:
        try:
            import timm
        except (ImportError, RuntimeError) as error:
            raise _missing("timm") from error
        kwargs = small if image_size == 32 else {"img_size": image_size} if small else {}
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)

    return build


class SequenceClassifier(nn.Module):
    """A Hugging Face classifier on dict batches that returns its logits.

    laplace-torch's recipe for transformers: ``Laplace`` needs a tensor output.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, batch: dict) -> torch.Tensor:  # noqa: D102
        return self.hf_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


VOCABULARY = 30522
"""BERT's WordPiece vocabulary: the word embeddings get ``diag(l) ⊗ R`` when trainable."""


def bert_tiny(image_size: int = IMAGE_SIZE) -> nn.Module:
    """``BertForSequenceClassification`` of BERT-tiny's sizes (2 layers, width 128)."""
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError as error:
        raise _missing("transformers") from error
    config = BertConfig(
        vocab_size=VOCABULARY,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=TOKENS,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return SequenceClassifier(BertForSequenceClassification(config))


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet18": (torchvision_model("resnet18"), "image"),
    "mobilenet_v3_small": (torchvision_model("mobilenet_v3_small"), "image"),
    "vit_tiny": (timm_model("vit_tiny_patch16_224", img_size=32, patch_size=4), "image"),
    "convnext_atto": (timm_model("convnext_atto"), "image"),
    "bert_tiny": (bert_tiny, "tokens"),
    "efficientnet_b0": (torchvision_model("efficientnet_b0"), "image"),
    "regnet_y_400mf": (torchvision_model("regnet_y_400mf"), "image"),
    "shufflenet_v2_x0_5": (torchvision_model("shufflenet_v2_x0_5"), "image"),
    "deit_tiny": (timm_model("deit_tiny_patch16_224", img_size=32), "image"),
}
"""Name → (constructor, input kind)."""


class DictDataset(Dataset):
    """Token batches as dicts: ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[index],
            "attention_mask": self.mask[index],
            "labels": self.labels[index],
        }


def make(name: str, batch: int, batches: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> Case:
    """Build the model (eval mode, what ``kron`` cannot fit frozen) and its random data."""
    build, kind = MODELS[name]
    torch.manual_seed(seed)
    model = build(image_size).eval()
    frozen = kfoc_backpack.freeze_unsupported(model, exact_type=True)  # kron's layers
    return make_data(model, kind, batch, batches, frozen, image_size)


def make_data(
    model: nn.Module,
    kind: str,
    batch: int,
    batches: int,
    frozen: list[str],
    image_size: int = IMAGE_SIZE,
) -> Case:
    """Return the model with random data of input ``kind`` (the global generator's next draws)."""
    num = batch * batches
    labels = torch.randint(0, CLASSES, (num,))
    if kind == "image":
        data = TensorDataset(torch.randn(num, 3, image_size, image_size), labels)
        return Case(model, DataLoader(data, batch_size=batch), frozen)
    ids = torch.randint(0, VOCABULARY, (num, TOKENS))
    mask = torch.ones(num, TOKENS, dtype=torch.long)
    mask[num // 2 :, TOKENS * 3 // 4 :] = 0  # padded sequences in the second half
    loader = DataLoader(DictDataset(ids, mask, labels), batch_size=batch)
    return Case(model, loader, frozen, {"dict_key_x": "input_ids", "dict_key_y": "labels"})


def _kron_classes() -> list[type]:
    """``Kron`` and every subclass that defines its own ``decompose`` (this package's too)."""
    found, todo = [], [Kron]
    while todo:
        cls = todo.pop()
        if "decompose" in cls.__dict__:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@contextlib.contextmanager
def decompose_timer() -> Iterator[list[float]]:
    """Accumulate the seconds spent in any ``Kron`` class's ``decompose`` while active.

    laplace-torch's ``Kron.decompose`` and its subclasses' (this package's ``H_facs`` is
    one, with its own ``decompose``), the outermost call only.
    """
    spent: list[float] = []
    depth = [0]
    originals = {cls: cls.__dict__["decompose"] for cls in _kron_classes()}

    def wrap(original):
        def timed(self, *args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent.append(time.perf_counter() - start)

        return timed

    for cls, original in originals.items():
        cls.decompose = wrap(original)
    try:
        yield spent
    finally:
        for cls, original in originals.items():
            cls.decompose = original


PER_GROUP = "kfoc-per-group"
"""``kfoc`` with ``grouped="per-group"``: timed beside the default on models with grouped
convolutions (the cheaper point of their error-against-time frontier)."""


def fit_once(case: Case, method: str) -> tuple[float, float]:
    """``(curvature seconds, fit seconds)`` of one ``Laplace.fit``."""
    extra = {"aggregation": "running"} if method in ("kfoc", PER_GROUP) else {}
    if method == PER_GROUP:
        method, extra["grouped"] = "kfoc", "per-group"
    la = Laplace(case.model, "classification", "all", method, **case.laplace_kwargs, **extra)
    with decompose_timer() as spent:
        start = time.perf_counter()
        la.fit(case.loader)
        total = time.perf_counter() - start
    return total - sum(spent), total


def layer_flops(sizes: LayerSizes, route: str, steps: int) -> dict[str, float]:
    """Multiply-adds of the route taken, of the cheapest route, and of K-FAC's factors.

    At the ``steps`` the solve took (:func:`~kfoc_backpack.solver.shared.table.route_flops`,
    the ``rank-one`` route's for ``T = 1``); a grouped convolution's
    formed route and its K-FAC (the input factor over ``groups·T`` positions of
    ``C_in/groups·Πkernel`` features) likewise.
    """
    cols, num, pos, m, n, groups = sizes
    if pos == 1 and groups == 1:
        taken = floor = route_flops(sizes)[Route.RANK_ONE]
    else:
        flops = route_flops(sizes, steps=max(steps, 1))
        allowed = ("formed", "operator") if groups > 1 else list(flops)
        taken, floor = flops[route], min(flops[r] for r in allowed)
    kfac = num * pos * groups * n * n + cols * num * pos * m * m
    return {"route_flops": taken, "floor_flops": floor, "kfac_flops": kfac}


def layer_solves(case: Case) -> list[dict[str, object]]:
    """Each weight's sizes, route, steps, solve time and flops on the first batch (GGN).

    The flops of every route are counted at the steps this solve took (from the default
    start, K-FAC's output-side factor): ``floor_flops`` is the cheapest route's,
    the exact floor of this layer at that step count.
    """
    backend = KFOCBackend(case.model, "classification", **case.laplace_kwargs)
    batch = next(iter(case.loader))
    if isinstance(batch, dict):
        x, y = batch, batch["labels"]
    else:
        x, y = batch
    weights = backend.collector(x, y).weights
    params = dict(case.model.named_parameters())
    rows = []
    for name, terms in weights.items():
        value = terms.with_structure(Grouped.COUPLED)  # the default structure
        start = time.perf_counter()
        factors = value.solve(backend.solver_options)
        elapsed = time.perf_counter() - start
        route = value.terms.route
        row = {
            "weight": name,
            "shape": list(params[name].shape),
            "sizes": value.sizes._asdict(),
            "route": route,
            "steps": factors.iterations,
            "solve_ms": 1e3 * elapsed,
        }
        rows.append(row | layer_flops(value.sizes, route, factors.iterations))
    return rows


def time_model(
    name: str, batch: int, batches: int, repeats: int, image_size: int = IMAGE_SIZE
) -> dict[str, object]:
    """Medians of curvature and fit time per method, interleaved, or the error raised."""
    case = make(name, batch, batches, image_size=image_size)
    grouped = any(
        getattr(m, "groups", 1) > 1 and any(p.requires_grad for p in m.parameters())
        for m in case.model.modules()
    )
    methods = (*METHODS, PER_GROUP) if grouped else METHODS
    curvature: dict[str, list[float]] = defaultdict(list)
    fits: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, str] = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        order = methods if round_ % 2 == 0 else methods[::-1]
        for method in order:
            if method in errors:
                continue
            try:
                curv, fit = fit_once(case, method)
            except Exception as error:  # recorded in the table, the other method goes on
                errors[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                continue
            if round_ > 0:
                curvature[method].append(curv)
                fits[method].append(fit)
    record: dict[str, object] = {
        "model": name,
        "batch": batch,
        "batches": batches,
        "frozen": case.frozen,
        "trainable": sum(p.numel() for p in case.model.parameters() if p.requires_grad),
        "errors": errors,
    }
    for method in methods:
        if method not in errors:
            record[f"{method}_curvature_s"] = statistics.median(curvature[method])
            record[f"{method}_fit_s"] = statistics.median(fits[method])
    if not errors:
        record["curvature_ratio"] = record["kfoc_curvature_s"] / record["kron_curvature_s"]
        record["fit_ratio"] = record["kfoc_fit_s"] / record["kron_fit_s"]
        if grouped:
            per_group = record[f"{PER_GROUP}_curvature_s"] / record["kron_curvature_s"]
            record["per_group_curvature_ratio"] = per_group
    if "kfoc" not in errors:
        layers = layer_solves(case)
        record["layers"] = layers
        kfac = sum(row["kfac_flops"] for row in layers)
        record["route_flops_ratio"] = sum(row["route_flops"] for row in layers) / kfac
        record["floor_flops_ratio"] = sum(row["floor_flops"] for row in layers) / kfac
    return record


def table(records: list[dict]) -> str:
    """Markdown table of the medians and ratios."""
    lines = [
        "| model | trainable | kron curvature s | kfoc curvature s | kfoc/kron | kron fit s "
        "| kfoc fit s | kfoc/kron fit | flops/K-FAC: route taken | floor "
        "| per-group kfoc/kron |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in records:
        if rec["errors"]:
            errors = "; ".join(f"{m}: {e}" for m, e in rec["errors"].items())
            lines.append(f"| {rec['model']} | {rec['trainable']} | {errors} | | | | | | | | |")
            continue
        per_group = rec.get("per_group_curvature_ratio")
        lines.append(
            f"| {rec['model']} | {rec['trainable']} | {rec['kron_curvature_s']:.3f} "
            f"| {rec['kfoc_curvature_s']:.3f} | {rec['curvature_ratio']:.2f}× "
            f"| {rec['kron_fit_s']:.3f} | {rec['kfoc_fit_s']:.3f} | {rec['fit_ratio']:.2f}× "
            f"| {rec['route_flops_ratio']:.2f}× | {rec['floor_flops_ratio']:.2f}× "
            f"| {'–' if per_group is None else f'{per_group:.2f}×'} |"
        )
    return "\n".join(lines)


def layer_table(records: list[dict]) -> str:
    """Markdown table of each weight's route, steps and solve time (first batch)."""
    lines = [
        "| model | weight | J·K·T·M·N (groups) | route | steps | solve ms | route flops "
        "| floor flops | K-FAC flops |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for rec in records:
        for row in rec.get("layers", []):
            sizes = dict(row["sizes"])
            groups = sizes.pop("groups")
            dims = "·".join(str(v) for v in sizes.values()) + (f" ({groups})" if groups > 1 else "")
            lines.append(
                f"| {rec['model']} | {row['weight']} | {dims} | {row['route']} "
                f"| {row['steps']} | {row['solve_ms']:.1f} | {row['route_flops']:.3g} "
                f"| {row['floor_flops']:.3g} | {row['kfac_flops']:.3g} |"
            )
    return "\n".join(lines)


def whole_once(
    name: str, method: str, batch: int, batches: int, inputs: int, image_size: int = IMAGE_SIZE
) -> dict:
    """Fit ``method`` on the whole model and predict ``inputs`` inputs, in this process.

    ``kron`` gets the model with what laplace-torch's ``kron`` cannot fit frozen; the
    package's structures get every parameter.
    """
    build, kind = MODELS[name]
    torch.manual_seed(0)
    model = build(image_size).eval()
    frozen = kfoc_backpack.freeze_unsupported(model, exact_type=True) if method == "kron" else []
    case = make_data(model, kind, batch, batches, frozen, image_size)
    if kind == "image":
        test = next(iter(DataLoader(case.loader.dataset, batch_size=inputs)))[0]
    else:
        first = next(iter(DataLoader(case.loader.dataset, batch_size=inputs)))
        test = {key: first[key] for key in ("input_ids", "attention_mask")}
    la = Laplace(model, "classification", "all", method, **case.laplace_kwargs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    la.fit(case.loader)
    fit = time.perf_counter() - start
    marglik = float(la.log_marginal_likelihood())
    after_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    probs = la(test, pred_type="glm", link_approx="probit")
    predict = time.perf_counter() - start
    after_predict = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = probs.sum(-1)
    return {
        "method": method,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen": frozen,
        "fit_s": fit,
        "peak_before_fit_mb": before / 2**20,
        "peak_after_fit_mb": after_fit / 2**20,
        "log_marginal_likelihood": marglik,
        "finite": bool(torch.isfinite(torch.tensor(marglik))),
        "test_inputs": len(rows),
        "predict_s_per_input": predict / len(rows),
        "predict_added_peak_mb": (after_predict - after_fit) / 2**20,
        "rows_sum_to_one": bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-5)),
    }


def ab_rounds(repeats: int, round_seconds: float, budget_seconds: float) -> int:
    """Return the timed A/B rounds: ``repeats``, or more where they fit in the budget.

    As many rounds of ``round_seconds`` as ``budget_seconds`` holds, at most
    :data:`MAX_AB_ROUNDS`, never fewer than ``repeats``.
    """
    affordable = int(budget_seconds // max(round_seconds, 1e-9))
    return max(repeats, min(MAX_AB_ROUNDS, affordable))


def whole_fit_ab(
    name: str,
    batch: int,
    batches: int,
    repeats: int,
    image_size: int = IMAGE_SIZE,
    budget_seconds: float = 0.0,
) -> dict[str, object]:
    """Fit seconds of ``kfoc``, ``ekfoc`` and ``ekfac`` on the whole model, A/B in one process.

    One model and data set; after one warm-up fit of each method, rounds in which the
    methods take turns (so that load on the machine reaches each alike): ``repeats``, or
    more where the warm-up round says that more fit in ``budget_seconds``
    (:func:`ab_rounds`) — small models' fits are short, and their medians noisy.

    Returns:
        ``{"fit_s": {method: median seconds}, "fit_s_all": {method: [seconds per round]},
        "rounds": timed rounds}``.
    """
    build, kind = MODELS[name]
    torch.manual_seed(0)
    model = build(image_size).eval()
    case = make_data(model, kind, batch, batches, [], image_size)

    def fit_seconds(method: str) -> float:
        la = Laplace(model, "classification", "all", method, **case.laplace_kwargs)
        start = time.perf_counter()
        la.fit(case.loader)
        return time.perf_counter() - start

    warm_up = sum(fit_seconds(method) for method in AB_METHODS)
    rounds = ab_rounds(repeats, warm_up, budget_seconds)
    seconds: dict[str, list[float]] = {method: [] for method in AB_METHODS}
    for _ in range(rounds):
        for method in AB_METHODS:
            seconds[method].append(fit_seconds(method))
    return {
        "fit_s": {method: statistics.median(times) for method, times in seconds.items()},
        "fit_s_all": seconds,
        "rounds": rounds,
    }


def _run_self(options: list[str]) -> tuple[dict | None, str]:
    """Run this script with ``options`` in a new process: its JSON line, or the error."""
    done = subprocess.run(
        [sys.executable, __file__, *options], capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return None, (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return json.loads(lines[-1]), ""


def whole_model(name: str, args: argparse.Namespace) -> dict[str, object]:
    """Every method of :data:`WHOLE_METHODS` on the model, each in a process of its own.

    Then, in one more process, the A/B fit times of :data:`AB_METHODS`
    (:func:`whole_fit_ab`, ``args.repeats`` rounds).
    """
    record: dict[str, object] = {"model": name, "errors": {}}
    common = [
        "--batch", str(args.batch), "--batches", str(args.batches),
        "--threads", str(args.threads), "--image-size", str(args.image_size),
    ]  # fmt: skip
    for method in WHOLE_METHODS:
        inputs = args.kron_test_inputs if method == "kron" else args.test_inputs
        options = ["--whole-one", name, method, *common, "--test-inputs", str(inputs)]
        found, error = _run_self(options)
        if found is None:
            record["errors"][method] = error  # type: ignore[index]
            continue
        record[method] = found
    timing = ["--repeats", str(args.repeats), "--ab-seconds", str(args.ab_seconds)]
    found, error = _run_self(["--whole-ab", name, *common, *timing])
    if found is None:
        record["errors"]["ab"] = error  # type: ignore[index]
    else:
        record["ab"] = found
    return record


def whole_table(records: list[dict]) -> str:
    """Markdown table of the whole-model fits and predictives."""
    lines = [
        "| model | method | trainable | fit s | fit / kfoc fit (A/B) | peak after fit MB "
        "| predictive s/input | predictive added MB | inputs | log marglik "
        "| probit rows sum to 1 | A/B rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for rec in records:
        ab = rec.get("ab", {})
        medians = ab.get("fit_s", {})
        rounds = ab.get("rounds", len(ab.get("fit_s_all", {}).get("kfoc", []))) or "–"
        for method in WHOLE_METHODS:
            if method in rec["errors"]:
                lines.append(f"| {rec['model']} | {method} | {rec['errors'][method]} ||||||||")
                continue
            r = rec[method]
            base = medians.get("kfoc")
            ratio = f"{medians[method] / base:.2f}×" if base and method in medians else "–"
            lines.append(
                f"| {rec['model']} | {method} | {r['trainable']} | {r['fit_s']:.1f} | {ratio} "
                f"| {r['peak_after_fit_mb']:.0f} | {r['predict_s_per_input']:.3f} "
                f"| {r['predict_added_peak_mb']:.0f} | {r['test_inputs']} "
                f"| {r['log_marginal_likelihood']:.1f} "
                f"| {'yes' if r['rows_sum_to_one'] else 'NO'} | {rounds} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models"
    )
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed fits per method")
    parser.add_argument(
        "--ab-seconds",
        type=float,
        default=60.0,
        help="whole models: more A/B rounds than --repeats where they fit in this many seconds",
    )
    parser.add_argument("--batch", type=cli.positive_int, default=16, help="batch size")
    parser.add_argument("--batches", type=cli.positive_int, default=2, help="batches per fit")
    parser.add_argument(
        "--image-size",
        type=cli.positive_int,
        default=IMAGE_SIZE,
        help="side of the images (32: ViT-tiny with 4-pixel patches; 224: the models' own)",
    )
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("results/zoo"), help="output directory")
    parser.add_argument(
        "--test-inputs", type=cli.positive_int, default=32, help="inputs our predictives take"
    )
    parser.add_argument(
        "--kron-test-inputs",
        type=cli.positive_int,
        default=8,
        help="inputs kron's predictive takes",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=("whole", "curvature"),
        default=["whole", "curvature"],
        help="whole models (fit and predictive, nothing frozen) and/or the curvature timing",
    )
    parser.add_argument(
        "--whole-one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS
    )  # one whole-model fit in this process (what the whole section runs per method)
    parser.add_argument(
        "--whole-ab", metavar="MODEL", help=argparse.SUPPRESS
    )  # the whole section's A/B fit times of one model, in this process
    return parser


def main(argv: list[str] | None = None) -> dict:
    cli.quiet_library_warnings()
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.whole_one:
        name, method = args.whole_one
        record = whole_once(
            name, method, args.batch, args.batches, args.test_inputs, args.image_size
        )
        print(json.dumps(record))
        return record
    if args.whole_ab:
        record = whole_fit_ab(
            args.whole_ab,
            args.batch,
            args.batches,
            args.repeats,
            args.image_size,
            args.ab_seconds,
        )
        print(json.dumps(record))
        return record
    whole = []
    if "whole" in args.sections:
        whole = [whole_model(name, args) for name in tqdm(args.models, desc="whole models")]
    records = []
    if "curvature" in args.sections:
        records = [
            time_model(name, args.batch, args.batches, args.repeats, args.image_size)
            for name in tqdm(args.models, desc="models")
        ]
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "image_size": args.image_size,
        "command": "python integration/zoo.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "whole": whole,
        "models": records,
    }
    report = []
    if whole:
        report.append("## Whole models\n\n" + whole_table(whole))
    if records:
        report.append("## Curvature on the same parameters\n\n" + table(records))
        report.append(layer_table(records))
    cli.write_report(args.out, "zoo", result, "\n\n".join(report))
    return result


if __name__ == "__main__":
    main()
