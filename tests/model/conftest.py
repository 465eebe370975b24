"""Shared fixtures for the model tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread, as the engine runs the model: on a loaded 2-core machine torch's
    spinning worker threads made tiny ops 20-50x slower (a 0.5 s test took 10 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
