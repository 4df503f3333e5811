"""Text -> (phone, stress, word-final) ids through one long-lived Festival process.

The teacher voice (Festival's HTS `cmu_us_slt_arctic_hts`) and the served models share
this front end, so the phones a model was trained on are the phones it is served with.
Festival expands numbers, money, dates and abbreviations itself.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import threading

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


class FrontendError(RuntimeError):
    """Festival is missing or failed."""


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
    """A long-lived `festival --pipe` process answering front-end queries, one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            festival_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        assert proc.stdin is not None
        proc.stdin.write(SCHEME + "\n")
        proc.stdin.flush()
        return proc

    def segments(self, text: str) -> list[Segment]:
        """Festival's segments for text (end times are 0: nothing is synthesised)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"(fs_front {quote(text)})\n")
            proc.stdin.flush()
            lines = []
            while True:
                line = proc.stdout.readline()
                if not line:
                    self._proc = None
                    raise FrontendError(f"festival exited while reading {text[:60]!r}")
                if line.strip() == "#END":
                    break
                lines.append(line)
        return parse_segments(lines)

    def phones(self, text: str) -> Phones:
        return to_ids(self.segments(text))

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(timeout=5)
            self._proc = None


_SHARED: Festival | None = None
_SHARED_LOCK = threading.Lock()


def shared() -> Festival:
    """The process's one Festival front end (started on first use, kept alive)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Festival()
        return _SHARED
