import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed every test, and run it on one thread: test shapes are tiny, and on a shared 2-core machine extra
    threads only add contention."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; the CPU twin of this test runs instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
