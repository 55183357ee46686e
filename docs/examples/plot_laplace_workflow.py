"""
K-FOC, EK-FOC and EK-FAC in a laplace-torch workflow
====================================================

``import kfoc_backpack`` registers ``hessian_structure="kfoc"``, ``"ekfoc"``, ``"ekfac"``
and ``"kfac"`` with laplace-torch: the usual ``Laplace(...)`` → ``fit`` →
``optimize_prior_precision`` → predictive workflow runs unchanged with each of them.
We swap them in for laplace-torch's ``kron`` on a regression and a classification
problem and draw the predictive uncertainty.
"""

# %%
# Regression: a noisy sine with a gap
# -----------------------------------
import warnings

import matplotlib.pyplot as plt
import torch
from laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset

import kfoc_backpack  # noqa: F401  (registers the structures)

warnings.filterwarnings("ignore")
torch.manual_seed(0)
x = torch.cat([torch.rand(60, 1) * 2 - 3, torch.rand(60, 1) * 2 + 1])
y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
loader = DataLoader(TensorDataset(x, y), batch_size=30)


def train(model, loader, loss, epochs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss(model(xb), yb).backward()
            optimizer.step()
    return model


net = torch.nn.Sequential(
    torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 50), torch.nn.Tanh(),
    torch.nn.Linear(50, 1),
)  # fmt: skip
train(net, loader, torch.nn.MSELoss(), epochs=300)

structures = ["kron", "kfoc", "ekfoc", "ekfac"]
grid = torch.linspace(-5, 5, 200)[:, None]
fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharey=True)
for ax, structure in zip(axes, structures):
    la = Laplace(
        net, "regression", subset_of_weights="all", hessian_structure=structure, sigma_noise=0.1
    )
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    mean, var = la(grid, pred_type="glm")
    std = (var.squeeze() + la.sigma_noise.square()).sqrt().detach()
    mean = mean.squeeze().detach()
    ax.fill_between(grid[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3, label="± 2 std")
    ax.plot(grid[:, 0], mean, label="predictive mean")
    ax.scatter(x[:, 0], y[:, 0], s=6, color="k", label="training data")
    ax.set_title(f'hessian_structure="{structure}"')
    ax.set_ylim(-3, 3)
    print(f"{structure:6s} log marginal likelihood {float(la.log_marginal_likelihood()):9.2f}")
axes[0].legend(loc="lower left", fontsize=7)
fig.tight_layout()

# %%
# All four posteriors widen in the gap and away from the data (the noise is fixed at
# its true value, ``sigma_noise=0.1``). The marginal likelihood is computed from each
# structure's own eigendecomposition (``la.H``).

# %%
# Classification: two moons
# -------------------------
torch.manual_seed(0)
t = torch.rand(200) * torch.pi
upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
X = torch.cat([upper, lower]) + 0.1 * torch.randn(400, 2)
Y = torch.cat([torch.zeros(200), torch.ones(200)]).long()
loader = DataLoader(TensorDataset(X, Y), batch_size=100, shuffle=True)
clf = torch.nn.Sequential(
    torch.nn.Linear(2, 30), torch.nn.ReLU(), torch.nn.Linear(30, 30), torch.nn.ReLU(),
    torch.nn.Linear(30, 2),
)  # fmt: skip
train(clf, loader, torch.nn.CrossEntropyLoss(), epochs=100)

xx, yy = torch.meshgrid(torch.linspace(-2, 3, 50), torch.linspace(-1.5, 2, 50), indexing="xy")
points = torch.stack([xx.flatten(), yy.flatten()], 1)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharey=True)
for ax, structure in zip(axes, structures):
    la = Laplace(clf, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    probs = torch.cat(
        [la(chunk, pred_type="glm", link_approx="probit").detach() for chunk in points.split(250)]
    )
    confidence = probs.max(-1).values.reshape(xx.shape)
    image = ax.contourf(xx, yy, confidence, levels=torch.linspace(0.5, 1, 11), cmap="viridis")
    ax.scatter(X[:, 0], X[:, 1], c=Y, s=4, cmap="coolwarm")
    ax.set_title(f'"{structure}": confidence')
fig.colorbar(image, ax=axes, shrink=0.8)

# %%
# Every structure takes laplace-torch's own keywords; K-FOC's add ``aggregation``
# (``"running"``, ``"approx"``, ``"optimal"``) and the solver's options, see
# :doc:`/user_guide/laplace`. The choice between them is discussed in
# :doc:`/which_curvature`.
