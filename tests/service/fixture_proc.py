"""Real fewstep processes over the tiny fixture models, configured like production through
FEWSTEP_* variables (FEWSTEP_QUEUE, FEWSTEP_REDIS_PREFIX, FEWSTEP_CLAIM_TIMEOUT_S, ...):

    python -m tests.service.fixture_proc worker   # service.worker.process.run_worker
    python -m tests.service.fixture_proc api PORT # create_app, uvicorn, no worker
    python -m tests.service.fixture_proc serve PORT GRPC_PORT  # embedded worker, + speech

With FEWSTEP_TEST_SPEECH=1 both also serve a tiny speech model. The worker also serves
'poison-model', whose forward pass kills its own process (SIGKILL,
as a segfaulting kernel would) whenever a 'light' row is in the batch.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace

import uvicorn
import uvloop

from service.app import create_app
from service.config import Settings
from service.httpserver import server_config
from service.worker.process import run_worker
from tests.engines.speech_fixture import tiny_speech_model
from tests.service.conftest import fixture_models, toy_model, toy_stats


def kills_for_light(stats):
    def denoiser(x, sigma, cond):
        if (cond["label"] == 1).any():
            os.kill(os.getpid(), signal.SIGKILL)
        return stats.denoise(x, sigma, cond["label"])

    return denoiser


def long_speech_model():
    """The tiny speech model with the shipped models' text limits (2000 characters, 16
    sentences) and their default cost bounds (40 s per sentence, 320 s per request)."""
    model = tiny_speech_model()
    spec = replace(model.spec, speech=replace(model.spec.speech, max_chars=2000, max_sentences=16))
    model.speech.spec = spec
    return replace(model, spec=spec)


def models() -> dict:
    """The fixtures, the poison model, and with FEWSTEP_TEST_SPEECH=1 the speech model."""
    loaded = fixture_models()
    poison = toy_model("poison-model", kills_for_light(toy_stats()))
    loaded[poison.spec.name, poison.spec.version] = poison
    if os.environ.get("FEWSTEP_TEST_SPEECH") == "1":
        loaded["speech-tiny", 1] = long_speech_model()
    return loaded


def main(argv: list[str]) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(message)s")
    if argv[0] == "worker":
        settings = Settings(warmup=False)
        loaded = {k: m for k, m in models().items() if k[0] in (settings.models or [k[0]])}
        return uvloop.run(run_worker(settings, loaded=loaded))
    port = int(argv[1])
    if argv[0] == "serve":  # what `fewstep serve` runs, on the fixtures and a speech model
        settings = Settings(warmup=False, host="127.0.0.1", port=port, grpc_port=int(argv[2]))
        loaded = {**models(), ("speech-tiny", 1): long_speech_model()}  # always here
        app = create_app(settings, loaded=loaded)
        uvicorn.Server(server_config(app, settings, log_level="warning")).run()
        return 0
    app = create_app(Settings(warmup=False, worker=False, grpc=False), loaded=models())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
