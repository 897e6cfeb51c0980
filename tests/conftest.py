"""Shared fixtures: tiny random checkpoints made on the fly (nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from afdserve.config import get_preset
    from afdserve.model.checkpoint import init_checkpoint

    return init_checkpoint(get_preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=0)
