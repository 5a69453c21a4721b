import os

import pytest
import torch
from hypothesis import settings as _hypothesis_settings


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine idle-spinning threads cost seconds.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# CI runs the property suites on a fixed seed (the same examples every run, so a red CI always
# reproduces); locally each run draws new examples (`pytest --hypothesis-seed=N` replays one).
_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
