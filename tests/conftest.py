"""Shared test fixtures."""

import pytest
import torch


def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core CPU: a thread pool only adds contention
    yield
    torch.set_num_threads(old)


one_thread = pytest.fixture(_single_thread, name="one_thread")
one_thread_module = pytest.fixture(_single_thread, name="one_thread_module", scope="module")
