"""
A Hugging Face model, whole: every parameter in the posterior
=============================================================

A library model as users build it — here a BERT classifier from ``transformers`` with
BERT-tiny's sizes and BERT's 30,522-id vocabulary, random weights (no download) — fitted
with nothing frozen: embeddings, LayerNorms and every weight get a block. The GLM
predictive then runs without forming the ``inputs × classes × parameters`` Jacobian.
The same works for torchvision and timm models (``integration/zoo.py``; they need a
torch build that torchvision loads beside).
"""

# %%
# The model on dict batches
# -------------------------
import time
import warnings

import matplotlib.pyplot as plt
import torch
from laplace import Laplace
from transformers import BertConfig, BertForSequenceClassification
from transformers.utils import logging

import kfoc_backpack

warnings.filterwarnings("ignore")
logging.set_verbosity_error()
torch.manual_seed(0)


class Classifier(torch.nn.Module):
    """A Hugging Face model's logits on dict batches."""

    def __init__(self):
        super().__init__()
        config = BertConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return self.bert(input_ids=ids, attention_mask=mask).logits


def batch(n=16, tokens=12):
    ids = torch.randint(0, 30522, (n, tokens))
    labels = torch.randint(0, 2, (n,))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


model = Classifier().eval()
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"trainable parameters: {trainable:,}")
print("parameters kfoc cannot fit:", kfoc_backpack.unsupported_parameters(model) or "none")

# %%
# Fit and predict
# ---------------
# ``dict_key_x``/``dict_key_y`` name the batch's input and label keys, as for
# laplace-torch's ``kron``. ``la(..., pred_type="glm")`` sums ``J P⁻¹ Jᵀ`` a parameter
# at a time, in each block's eigenbasis.
data = [batch(), batch()]
test = batch(8)
results = {}
for structure in ("kfoc", "ekfoc", "ekfac"):
    la = Laplace(
        model, "classification", "all", structure, dict_key_x="input_ids", dict_key_y="labels"
    )
    start = time.perf_counter()
    la.fit(data)
    fitted = time.perf_counter()
    probs = la(test, pred_type="glm", link_approx="probit")
    results[structure] = probs.detach()
    print(
        f"{structure:6s} fit {fitted - start:5.1f} s,"
        f" predictive {time.perf_counter() - fitted:4.1f} s,"
        f" log marglik {float(la.log_marginal_likelihood()):9.1f},"
        f" rows sum to one: {bool(torch.allclose(probs.sum(-1), torch.ones(8)))}"
    )

# %%
# What each parameter got
# -----------------------
# Weights of ``Linear`` layers get K-FOC's ``L ⊗ R``, small parameters (biases,
# LayerNorm scales) their exact dense block, and the 30,522-row word embedding a
# Kronecker product with a diagonal vocabulary side (no ``V × V`` matrix).
sizes = [p.numel() for p in model.parameters() if p.requires_grad]
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(range(len(sizes)), sizes, color="C0")
ax.set_yscale("log")
ax.set_xlabel("parameter (in the model's order)")
ax.set_ylabel("entries")
ax.set_title(f"all {len(sizes)} parameters of the BERT classifier have a block")
fig.tight_layout()

fig, ax = plt.subplots(figsize=(8, 3))
width = 0.25
for i, (structure, probs) in enumerate(results.items()):
    ax.bar(torch.arange(8) + i * width, probs[:, 1], width, label=structure)
ax.set_xlabel("test input")
ax.set_ylabel("p(class 1)")
ax.legend()
fig.tight_layout()
