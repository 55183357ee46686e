"""
Influence scores with K-FOC, EK-FOC, K-FAC and EK-FAC
=====================================================

``kfoc_backpack.Influence`` scores every training input's effect on a test
measurement, ``g_testᵀ (B + λI)⁻¹ g_train``, with the curvature ``B`` of any fitted
Laplace approximation of this package (or BackPACK's factors, the identity, the exact
dense GGN of a small model). Here: the paper's MLP on Boston Housing, the four
Kronecker curvatures against the exact GGN, and the committed linear datamodeling study
(``integration/influence.py``) redrawn.
"""

# %%
# Train, fit, score
# -----------------
import json
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import Influence

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "integration").is_dir())
sys.path.insert(0, str(ROOT / "integration"))
from data import Dataset, load_dataset  # noqa: E402
from influence_study import report  # noqa: E402
from models import TrainConfig, mlp, train  # noqa: E402

torch.manual_seed(0)
data = load_dataset("boston")
order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))  # file: by town
X, y = data.inputs[order], data.targets[order]
train_set = TensorDataset(X[50:], y[50:])
test_set = TensorDataset(X[:50], y[:50])
model = mlp(X.shape[1])
train(model, Dataset("boston", X[50:], y[50:], "regression"), TrainConfig(40, 32), seed=0)
model.eval()

train_loader = DataLoader(train_set, batch_size=64)
test_loader = DataLoader(test_set, batch_size=64)
scores = {}
for structure in ("kfac", "kfoc", "ekfac", "ekfoc"):
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure=structure)
    la.fit(train_loader)
    influence = Influence.from_laplace(la)  # damping: 0.1 × each block's mean eigenvalue
    scores[structure] = influence.pairwise(train_loader, test_loader)  # [50, 456]
exact = Influence.exact(model, torch.nn.MSELoss(reduction="sum"), train_loader)
scores["exact GGN"] = exact.pairwise(train_loader, test_loader)

# %%
# How close each curvature's scores come to the exact GGN's
# ---------------------------------------------------------
# Spearman correlation between each structure's scores and the exact dense GGN's, per
# test input (its ranking of the training inputs). Agreement with the exact GGN is not
# the goal in itself: at this damping the exact GGN attributes worse than every
# Kronecker curvature in the study below; it needs more damping to lead.


def spearman_rows(a, b):
    ra = a.argsort(1).argsort(1).double()
    rb = b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


fig, ax = plt.subplots(figsize=(7, 3.5))
names = ["kfac", "kfoc", "ekfac", "ekfoc"]
values = [spearman_rows(scores[n], scores["exact GGN"]).numpy() for n in names]
ax.boxplot(values, tick_labels=["K-FAC", "K-FOC", "EK-FAC", "EK-FOC"])
ax.set_ylabel("Spearman with the exact GGN's scores")
ax.set_title("Boston, 50 test inputs: agreement with the exact GGN")
fig.tight_layout()

for name, value in zip(names, values):
    print(
        f"{name:6s} median Spearman with the exact GGN: {float(torch.tensor(value).median()):.3f}"
    )

# %%
# Does the optimal basis attribute better? The committed study
# ------------------------------------------------------------
# The linear datamodeling score (LDS) of every method on the UCI sets, MNIST with
# LeNet-5 and a token transformer: ``python integration/influence.py`` (its full run
# is ``integration/reference/influence_cpu.json``; the table is on :doc:`/influence`).
study = json.loads((ROOT / "integration" / "reference" / "influence_cpu.json").read_text())
path = report.plot(report.summarize(study["records"]), Path(tempfile.mkdtemp()))
fig, ax = plt.subplots(figsize=(13, 4.5))
ax.imshow(plt.imread(path))
ax.set_axis_off()
fig.tight_layout()
