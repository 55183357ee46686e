"""Which BackPACK ``SqrtGGN`` module extensions K-FOC backpropagates through.

The one place that names BackPACK's module-extension classes (besides
:mod:`~kfoc_backpack.extensions.crossentropy`, which subclasses the cross-entropy one),
so a BackPACK release that renames one breaks here, loudly, and nowhere else.
"""

from __future__ import annotations

from backpack.custom_module.branching import SumModule
from backpack.custom_module.pad import Pad
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.slicing import Slicing
from backpack.extensions.mat_to_mat_jac_base import MatToJacMat
from backpack.extensions.secondorder.sqrt_ggn import (
    activations,
    batchnorm_nd,
    convnd,
    convtransposend,
    custom_module,
    dropout,
    embedding,
    flatten,
    losses,
    pad,
    padding,
    pooling,
    slicing,
)
from torch import nn

from kfoc_backpack.extensions.crossentropy import KFOCCrossEntropyLoss


def sqrt_ggn_module_extensions() -> dict[type[nn.Module], MatToJacMat]:
    """Parameter-free layers and losses: BackPACK's ``SqrtGGN`` extensions as they are.

    Except cross-entropy: :class:`~kfoc_backpack.extensions.crossentropy.KFOCCrossEntropyLoss`
    starts the exact GGN with ``C − 1`` columns instead of ``C``.

    Returns:
        Map from layer class to a fresh module extension instance.
    """
    return {
        nn.MSELoss: losses.SqrtGGNMSELoss(),
        nn.CrossEntropyLoss: KFOCCrossEntropyLoss(),
        nn.BCEWithLogitsLoss: losses.SqrtGGNBCEWithLogithsLoss(),
        nn.MaxPool1d: pooling.SqrtGGNMaxPool1d(),
        nn.MaxPool2d: pooling.SqrtGGNMaxPool2d(),
        nn.MaxPool3d: pooling.SqrtGGNMaxPool3d(),
        nn.AvgPool1d: pooling.SqrtGGNAvgPool1d(),
        nn.AvgPool2d: pooling.SqrtGGNAvgPool2d(),
        nn.AvgPool3d: pooling.SqrtGGNAvgPool3d(),
        nn.ZeroPad2d: padding.SqrtGGNZeroPad2d(),
        nn.Dropout: dropout.SqrtGGNDropout(),
        nn.Flatten: flatten.SqrtGGNFlatten(),
        nn.ReLU: activations.SqrtGGNReLU(),
        nn.Sigmoid: activations.SqrtGGNSigmoid(),
        nn.Tanh: activations.SqrtGGNTanh(),
        nn.LeakyReLU: activations.SqrtGGNLeakyReLU(),
        nn.LogSigmoid: activations.SqrtGGNLogSigmoid(),
        nn.ELU: activations.SqrtGGNELU(),
        nn.SELU: activations.SqrtGGNSELU(),
        nn.Identity: custom_module.SqrtGGNScaleModule(),
        ScaleModule: custom_module.SqrtGGNScaleModule(),
        SumModule: custom_module.SqrtGGNSumModule(),
        Pad: pad.SqrtGGNPad(),
        Slicing: slicing.SqrtGGNSlicing(),
    }


def unsupported_param_module_extensions() -> dict[type[nn.Module], MatToJacMat]:
    """Parameterised layers BackPACK backpropagates through but K-FOC has no factors for.

    Returns:
        Map from layer class to BackPACK's ``SqrtGGN`` module extension, which K-FOC
        still uses to backpropagate through the layer when its ``fail_mode`` allows.
    """
    return {
        nn.BatchNorm1d: batchnorm_nd.SqrtGGNBatchNormNd(),
        nn.BatchNorm2d: batchnorm_nd.SqrtGGNBatchNormNd(),
        nn.BatchNorm3d: batchnorm_nd.SqrtGGNBatchNormNd(),
        nn.Embedding: embedding.SqrtGGNEmbedding(),
        nn.ConvTranspose1d: convtransposend.SqrtGGNConvTranspose1d(),
        nn.ConvTranspose2d: convtransposend.SqrtGGNConvTranspose2d(),
        nn.ConvTranspose3d: convtransposend.SqrtGGNConvTranspose3d(),
    }


def sqrt_ggn_conv_extensions() -> dict[type[nn.Module], MatToJacMat]:
    """BackPACK's ``SqrtGGN`` module extensions of the convolutions.

    Wrapped by ``SkippedConvModule`` for a convolution whose setting K-FOC does not
    support (string padding, non-zero padding mode) when ``fail_mode``
    skips it.
    """
    return {
        nn.Conv1d: convnd.SqrtGGNConv1d(),
        nn.Conv2d: convnd.SqrtGGNConv2d(),
        nn.Conv3d: convnd.SqrtGGNConv3d(),
    }
