"""Models with every parameter trainable, as libraries build them: the end-to-end tests' cases.

* :class:`NormCNN` — a strided convolution, BatchNorm in eval mode (random running
  statistics and affine parameters), GroupNorm, a torchvision-style ``LayerNorm2d``
  (a ``LayerNorm`` subclass whose ``forward`` permutes the channels last), a linear head;
* :class:`TinyViT` — token ids through a word embedding (``padding_idx`` 0), a ``cls_token`` and a
  ``pos_embed`` registered on the model, LayerNorm, attention from ``Linear`` layers, a
  layer scale ``gamma``, ``RMSNorm`` and a linear head.

Inputs: :func:`whole_data`. Everything float64 unless asked otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VOCABULARY, TOKENS, WIDTH = 11, 5, 8


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ``LayerNorm2d``: ``LayerNorm`` over the channels of ``[N, C, H, W]``."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NormCNN(nn.Module):
    """Conv (stride 2) → BatchNorm → tanh → conv → GroupNorm → LayerNorm2d → tanh → head."""

    def __init__(self, outputs: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = LayerNorm2d(4)
        self.head = nn.Linear(4 * 3 * 3, outputs)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)
            for norm in (self.bn, self.gn, self.ln):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn(self.conv1(x)))
        h = torch.tanh(self.ln(self.gn(self.conv2(h))))
        return self.head(h.flatten(1))


class TinyViT(nn.Module):
    """Token ids → embedding + class token + positions → attention block → RMSNorm → head."""

    def __init__(self, outputs: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH, padding_idx=0)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, TOKENS + 1, WIDTH))
        self.norm1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.gamma = nn.Parameter(torch.full((WIDTH,), 0.5) + 0.1 * torch.randn(WIDTH))
        self.norm2 = nn.RMSNorm(WIDTH)
        self.head = nn.Linear(WIDTH, outputs)
        with torch.no_grad():
            self.norm1.weight.uniform_(0.5, 1.5)
            self.norm1.bias.uniform_(-0.5, 0.5)
            self.norm2.weight.uniform_(0.5, 1.5)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / WIDTH**0.5, dim=-1)
        h = h + self.gamma * self.proj(attention @ v)
        return self.head(self.norm2(h)[:, 0])


WHOLE = {"norm_cnn": NormCNN, "tiny_vit": TinyViT}


def whole_data(name: str, likelihood: str, num: int = 12, dtype=torch.float64, seed: int = 1):
    """``(model, X, y)``: the model (eval mode, ``dtype``) and data for ``likelihood``."""
    torch.manual_seed(0)
    outputs = 3 if likelihood == "classification" else 2
    model = WHOLE[name](outputs).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    if name == "tiny_vit":
        X = torch.randint(0, VOCABULARY, (num, TOKENS), generator=gen)
    else:
        X = torch.randn(num, 2, 6, 6, generator=gen, dtype=dtype)
    if likelihood == "classification":
        y = torch.randint(0, outputs, (num,), generator=gen)
    else:
        y = torch.randn(num, outputs, generator=gen, dtype=dtype)
    return model, X, y
