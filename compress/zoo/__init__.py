"""The model zoo: the architectures (blocks, configs, official checkpoint layouts), never downloaded.

Each module builds its models from their configs (random init, or ``device="meta"`` for
counting) and reads and writes their official checkpoint layouts. Which models exist by name is
the family registry's business (:mod:`compress.families`): ``compress.families.build(name,
size, device)`` builds a family's teacher or one of its compressed models; ``build`` here is
the same call.
"""

from __future__ import annotations

import torch
from torch import nn


def build(name: str, size: str = "full", device: str | torch.device = "cpu") -> nn.Module:
    """A model by name with random weights: see :func:`compress.families.build`."""
    from ..families import build as build_model

    return build_model(name, size, device)


def available() -> list[str]:
    """Every buildable model name (families' teachers and their named models)."""
    from ..families import models

    return sorted(models())
