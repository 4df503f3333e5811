"""Session-wide test setup: engine artifacts go to a temporary build cache, never ~/.cache."""

import os
import shutil
import tempfile

import pytest
import torch

_made: list[str] = []


def pytest_configure(config):
    # set before any model loads; subprocesses (fixture servers) inherit it
    if "FEWSTEP_ENGINE_CACHE" not in os.environ:
        _made.append(tempfile.mkdtemp(prefix="fewstep-engines-"))
        os.environ["FEWSTEP_ENGINE_CACHE"] = _made[0]


def pytest_unconfigure(config):
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for the test: on a loaded 2-core machine two OpenMP threads
    contend so badly that one small forward pass went from 5 ms to 800 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def prefix():
    """A fresh Redis key prefix for one test, its keys deleted afterwards (skips without
    the Redis on 127.0.0.1:6379)."""
    from tests.service.redisutil import delete_prefix, new_prefix, require_redis

    require_redis()
    value = new_prefix()
    yield value
    delete_prefix(value)
