import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests are many small ops: one thread is much faster on a loaded 2-core machine."""
    torch.set_num_threads(1)
    yield
