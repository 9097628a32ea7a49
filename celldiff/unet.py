"""Old path of ``celldiff.nets.unet``."""

# TRANSITIONAL: removed by D
from celldiff.nets.unet import (
    AttentionBlock,
    Downsample,
    EmbedSequential,
    ResBlock,
    UNet,
    UNetConfig,
    Upsample,
    count_parameters,
    group_norm,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "AttentionBlock",
    "Downsample",
    "EmbedSequential",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "count_parameters",
    "group_norm",
    "timestep_embedding",
    "zero_module",
]
