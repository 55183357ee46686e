"""
One fit across processes with ``torchrun``
==========================================

A data set too large for one process is fitted the way PyTorch trains on it:
``torchrun`` starts one process per GPU (or CPU socket), each iterates over its shard
(``DistributedSampler``), and K-FOC combines the shards. Nothing changes in the code
but the sampler. This example writes the script below and runs it with two processes
on the CPU (gloo); on GPUs use ``"nccl"``.
"""

# %%
# The script
# ----------
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

SCRIPT = """
import os
import sys

import torch
import torch.distributed as dist
from laplace import Laplace
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import kfoc_backpack  # noqa: F401  (registers hessian_structure="kfoc")

if "RANK" in os.environ:  # started by torchrun
    dist.init_process_group("gloo")  # "nccl" with one GPU per process

torch.manual_seed(0)
train_set = TensorDataset(torch.randn(1000, 20), torch.randint(0, 3, (1000,)))
model = torch.nn.Sequential(torch.nn.Linear(20, 50), torch.nn.GELU(), torch.nn.Linear(50, 3))
sampler = DistributedSampler(train_set, shuffle=False) if dist.is_initialized() else None
loader = DataLoader(train_set, batch_size=128, sampler=sampler)
la = Laplace(model, "classification", "all", "kfoc", aggregation="optimal")
la.fit(loader)  # on every rank: the fit of all shards
rank = dist.get_rank() if dist.is_initialized() else 0
world = dist.get_world_size() if dist.is_initialized() else 1
logdet = float(la.log_det_posterior_precision)
line = f"rank {rank} of {world}: n_data {la.n_data}, log det posterior precision {logdet:.4f}"
sys.stdout.write(line + "\\n")  # one write: the ranks share the pipe
sys.stdout.flush()
if rank == 0:  # the fitted Kronecker factors, for the comparison below
    factors = [[f.detach() for f in block] for block in la.H_facs.kfacs]
    torch.save(factors, os.environ["FACTORS_OUT"])
if dist.is_initialized():
    dist.destroy_process_group()
"""

# %%
# Two processes, then one
# -----------------------
# Every rank ends with the same factors, loss and ``n_data`` (the inputs of all shards);
# ``"optimal"`` agrees with one process over all the data within the solver tolerance.
with tempfile.TemporaryDirectory() as directory:
    script = Path(directory) / "fit.py"
    script.write_text(SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = {}
    for name, command in {
        "2 processes": [*torchrun, "--nproc_per_node=2", str(script)],
        "1 process": [sys.executable, str(script)],
    }.items():
        out = Path(directory) / f"{len(runs)}.pt"
        env = {**os.environ, "FACTORS_OUT": str(out)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        print(name)
        print(
            "".join(sorted(f"  {line}\n" for line in result.stdout.splitlines() if "rank" in line))
        )
        runs[name] = torch.load(out)

# %%
# The factors of both fits
# ------------------------
# The first layer's weight block is ``L ⊗ R`` (``50 × 50`` and ``20 × 20``); the
# relative difference of each block between the two fits is at the level of the
# solver's tolerance (float32).
two, one = runs["2 processes"], runs["1 process"]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, (name, factors) in zip(axes, runs.items()):
    ax.imshow(factors[0][0], cmap="viridis")
    ax.set_title(f"first layer's L, {name}")
    ax.set_axis_off()
labels, differences = [], []
for i, (a, b) in enumerate(zip(two, one)):
    product_a = a[0] if len(a) == 1 else torch.kron(a[0], a[1])
    product_b = b[0] if len(b) == 1 else torch.kron(b[0], b[1])
    labels.append(f"block {i}")
    differences.append(float((product_a - product_b).norm() / product_b.norm()))
axes[2].bar(labels, differences)
axes[2].set_yscale("log")
axes[2].set_title("relative difference, 2 processes vs 1")
fig.tight_layout()
print("relative differences per block:", ", ".join(f"{d:.1e}" for d in differences))

# %%
# The aggregations combine differently (K-FOC's factors are not sums): ``"optimal"``
# runs the power method on the sum of the ranks' terms, ``"approx"`` all-reduces
# sample-weighted factor sums, ``"running"`` takes the optimal product of the ranks'
# running estimates. :doc:`/user_guide/distributed` has the algorithms, what crosses
# ranks, and the measured agreement and communication.
