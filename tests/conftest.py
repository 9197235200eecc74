"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite runs tiny models, which gain nothing from a second thread; on a busy 2-core machine OpenMP's spinning
    threads make their forward passes many times slower.  Results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
