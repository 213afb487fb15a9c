"""The registry of network names (MLP-S/B, DiT-{XS,T,S,B,L,XL}/{2,4,8}) and their sizes, without torch.

The config validates `model.arch` against it and `mgbench.trainer.models.build_model` builds from it; it sits
below both so that checking a config never imports the networks (or torch).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: the network family and its size."""

    kind: str                # "dit" | "mlp"
    depth: int               # transformer blocks / residual blocks
    width: int               # hidden size
    heads: int = 0           # attention heads (DiT only)
    patch: int = 0           # patch size (DiT only)
    label: str = ""          # human-readable description


def _registry() -> dict[str, ModelSpec]:
    """All model names: MLP-S/B, DiT-{XS,T,S,B,L,XL}/{2,4,8}."""
    models = {
        "MLP-S": ModelSpec("mlp", 3, 128, label="MLP, 3 residual blocks of width 128 (2D toy)"),
        "MLP-B": ModelSpec("mlp", 4, 256, label="MLP, 4 residual blocks of width 256 (2D toy)"),
    }
    sizes = {  # name: (depth, width, heads, patches)
        "XS": (2, 64, 2, (2, 4)),        # CPU tests
        "T": (4, 128, 4, (2, 4)),        # CPU studies (~1.2M parameters at patch 2)
        "S": (12, 384, 6, (2, 4, 8)),    # official DiT sizes from here on
        "B": (12, 768, 12, (2, 4, 8)),
        "L": (24, 1024, 16, (2, 4, 8)),
        "XL": (28, 1152, 16, (2, 4, 8)),
    }
    for size, (depth, width, heads, patches) in sizes.items():
        for p in patches:
            label = f"DiT-{size}/{p}: depth {depth}, width {width}, {heads} heads, patch {p}"
            models[f"DiT-{size}/{p}"] = ModelSpec("dit", depth, width, heads, p, label)
    return models


MODELS: dict[str, ModelSpec] = _registry()
