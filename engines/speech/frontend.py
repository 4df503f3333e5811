"""Text -> (phone, stress, word-final) ids through one long-lived Festival process.

The teacher voice (Festival's HTS `cmu_us_slt_arctic_hts`) and the served models share
this front end, so the phones a model was trained on are the phones it is served with.
Festival expands numbers, money, dates and abbreviations itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import subprocess
import threading
import time

import torch
from torch import Tensor

from engines.nets.tts import TTSConfig

VOICE = "cmu_us_slt_arctic_hts"
# Festival's radio phone set (the slt voice's), in its own order; id 0 pads.
PHONES = tuple(
    [
        "aa",
        "ae",
        "ah",
        "ao",
        "aw",
        "ax",
        "axr",
        "ay",
        "b",
        "ch",
        "d",
        "dh",
        "dx",
        "eh",
        "el",
        "em",
        "en",
        "er",
        "ey",
        "f",
        "g",
        "hh",
        "hv",
        "ih",
        "iy",
        "jh",
        "k",
        "l",
        "m",
        "n",
        "nx",
        "ng",
        "ow",
        "oy",
        "p",
        "r",
        "s",
        "sh",
        "t",
        "th",
        "uh",
        "uw",
        "v",
        "w",
        "y",
        "z",
        "zh",
        "pau",
        "h#",
        "brth",
    ]
)
PHONE_IDS = {p: i + 1 for i, p in enumerate(PHONES)}
N_PHONES = len(PHONES) + 1
if TTSConfig.phones != N_PHONES:  # the network's phone embedding is sized by its config
    raise RuntimeError(
        f"the front end has {N_PHONES} phone ids but TTSConfig.phones is {TTSConfig.phones}"
    )

# Dumps one line per segment: name, end time (s), stress, word id.
SCHEME = f"""
(voice_{VOICE})
(define (fs_segs utt fd)
  (mapcar (lambda (s)
    (format fd "%s %f %s %s\\n" (item.name s) (item.feat s 'end)
       (item.feat s 'R:SylStructure.parent.stress)
       (item.feat s 'R:SylStructure.parent.parent.id)))
    (utt.relation.items utt 'Segment)))
(define (fs_front text)
  (let ((utt (eval (list 'Utterance 'Text text))))
    (Initialize utt) (Text utt) (Token_POS utt) (Token utt) (POS utt) (Phrasify utt)
    (Word utt) (Pauses utt) (Intonation utt) (PostLex utt)
    (fs_segs utt t)
    (format t "#END\\n") t))
(define (fs_synth text wavfile labfile rate)
  (let ((utt (eval (list 'Utterance 'Text text))) (fd (fopen labfile "w")))
    (utt.synth utt)
    (utt.wave.resample utt rate)
    (utt.save.wave utt wavfile 'riff)
    (fs_segs utt fd) (fclose fd) t))
"""


log = logging.getLogger("fewstep.speech")


class FrontendError(RuntimeError):
    """Festival is missing or failed."""


class FrontendUnavailable(FrontendError):
    """Festival hung (no answer within the timeout) or died mid-request; it was killed and
    the next call starts a fresh one, so the same request can be retried (a 503, not 400)."""


@dataclasses.dataclass
class Segment:
    phone: str
    end: float  # seconds; only meaningful after synthesis
    stress: int
    word: str  # Festival's word id ("0" for pauses)


@dataclasses.dataclass
class Phones:
    """One utterance's front-end output as model inputs (each a (L,) long tensor)."""

    phone: Tensor
    stress: Tensor
    final: Tensor

    def __len__(self) -> int:
        return len(self.phone)


def quote(text: str) -> str:
    """A Scheme string literal of text."""
    clean = " ".join(text.replace("\\", " ").split())
    return '"' + clean.replace('"', '\\"') + '"'


def parse_segments(lines: list[str]) -> list[Segment]:
    segs = []
    for line in lines:
        name, end, stress, word = line.split()
        segs.append(Segment(name, float(end), int(float(stress)), word))
    return segs


def to_ids(segs: list[Segment]) -> Phones:
    """Phone ids, stress (0/1) and word-final flags (1 on the last phone of each word)."""
    phone = [PHONE_IDS[s.phone] for s in segs]
    stress = [min(s.stress, 1) for s in segs]
    final = []
    for i, s in enumerate(segs):
        nxt = segs[i + 1].word if i + 1 < len(segs) else None
        final.append(int(s.word != "0" and nxt != s.word))
    return Phones(torch.tensor(phone), torch.tensor(stress), torch.tensor(final))


def festival_command() -> list[str]:
    exe = shutil.which("festival")
    if exe is None:
        raise FrontendError(
            "festival is not installed (apt-get install festival festvox-us-slt-hts)"
        )
    # Festival buffers stdout on a pipe; stdbuf makes it line-buffered.
    return ["stdbuf", "-oL", exe, "--pipe"]


class Festival:
    """A long-lived `festival --pipe` process answering front-end queries, one at a time.

    Thread-safe (one query at a time, so callers may use worker threads). Every read waits
    at most `timeout` seconds (`start_timeout` for the first answer of a fresh process,
    which loads the voice); a Festival that stalls (SIGSTOP, a loop) or dies is killed and
    the call raises FrontendUnavailable; the next call starts a new process."""

    def __init__(self, timeout: float = 5.0, start_timeout: float = 30.0) -> None:
        self.timeout, self.start_timeout = timeout, start_timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._fresh = False  # the process has not answered yet
        self._buffer = b""

    @property
    def pid(self) -> int | None:
        """The running Festival's process id (None when none runs)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _start(self) -> subprocess.Popen:
        self._proc = proc = subprocess.Popen(
            festival_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        assert proc.stdin is not None
        proc.stdin.write((SCHEME + "\n").encode())
        self._fresh, self._buffer = True, b""
        return proc

    def _kill(self, why: str) -> FrontendUnavailable:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        log.warning("festival %s; killed it, the next request starts a new one", why)
        return FrontendUnavailable(
            f"the text front end (festival) {why}; it was restarted, retry the request"
        )

    def _readline(self, proc: subprocess.Popen, timeout: float) -> str:
        """One line of Festival's output within `timeout` seconds."""
        assert proc.stdout is not None
        fd, deadline = proc.stdout.fileno(), time.monotonic() + timeout
        poller = select.poll()  # not select(): a busy server's descriptors pass 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise self._kill(f"did not answer within {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise self._kill("exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    def segments(self, text: str) -> list[Segment]:
        """Festival's segments for text (end times are 0: nothing is synthesised)."""
        if not self._lock.acquire(timeout=self.start_timeout + self.timeout):
            raise FrontendUnavailable("the text front end (festival) is busy; retry the request")
        try:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                proc = self._proc
                assert proc.stdin is not None
                proc.stdin.write(f"(fs_front {quote(text)})\n".encode())
            except OSError:  # it exited before reading what we sent
                raise self._kill("exited") from None
            lines = []
            while True:
                line = self._readline(proc, self.start_timeout if self._fresh else self.timeout)
                self._fresh = False
                if line.strip() == "#END":
                    break
                lines.append(line)
        finally:
            self._lock.release()
        return parse_segments(lines)

    def phones(self, text: str) -> Phones:
        """Model inputs for one sentence; ValueError if it has nothing to say."""
        segs = self.segments(text)
        if not any(s.phone not in ("pau", "h#", "brth") for s in segs):
            raise ValueError(
                f"the sentence {text[:60]!r} has nothing to say (only punctuation or spaces); "
                "remove it or add words"
            )
        return to_ids(segs)

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()


_SHARED: Festival | None = None
_SHARED_LOCK = threading.Lock()


def shared() -> Festival:
    """The process's one Festival front end (started on first use, kept alive)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Festival()
        return _SHARED
