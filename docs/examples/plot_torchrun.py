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
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
import os

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
print(f"rank {rank} of {world}: n_data {la.n_data}, log det posterior precision {logdet:.4f}")
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
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = subprocess.run(
        [*env_cmd, "--nproc_per_node=2", str(script)], capture_output=True, text=True, timeout=600
    )
    one = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    for result in (two, one):
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
print("torchrun --standalone --nproc_per_node=2 fit.py")
print("".join(sorted(line + "\n" for line in two.stdout.splitlines() if line.startswith("rank"))))
print("python fit.py")
print(one.stdout)

# %%
# The aggregations combine differently (K-FOC's factors are not sums): ``"optimal"``
# runs the power method on the sum of the ranks' terms, ``"approx"`` all-reduces
# sample-weighted factor sums, ``"running"`` takes the optimal product of the ranks'
# running estimates. :doc:`/user_guide/distributed` has the algorithms, what crosses
# ranks, and the measured agreement and communication.
