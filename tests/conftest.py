"""Session-wide test setup: engine artifacts go to a temporary build cache, never ~/.cache."""

import os
import shutil
import tempfile

_made: list[str] = []


def pytest_configure(config):
    # set before any model loads; subprocesses (fixture servers) inherit it
    if "FEWSTEP_ENGINE_CACHE" not in os.environ:
        _made.append(tempfile.mkdtemp(prefix="fewstep-engines-"))
        os.environ["FEWSTEP_ENGINE_CACHE"] = _made[0]


def pytest_unconfigure(config):
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)
