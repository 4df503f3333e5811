"""Word error rate with an offline recogniser: PocketSphinx 5 and its bundled US-English
model (PyPI `pocketsphinx`, in fewstep's `test` extra; nothing is downloaded).

The audio is resampled to 16 kHz (the model's rate); references and hypotheses are
normalised the same way (lower case, hyphens as spaces, other punctuation dropped) and
compared by word-level Levenshtein distance: WER = (substitutions + deletions +
insertions) / reference words, summed over a set of utterances (corpus WER).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ASR_RATE = 16000
_DROP = re.compile(r"[^a-z' ]+")


def words(text: str) -> list[str]:
    """Normalised words: lower case, hyphens and other punctuation out, apostrophes kept."""
    text = _DROP.sub(" ", text.lower().replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions, deletions, insertions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate of hypotheses against reference texts."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = sum(edit_distance(words(r), words(h)) for r, h in zip(refs, hyps, strict=True))
    total = sum(len(words(r)) for r in refs)
    if not total:
        raise ValueError("the references have no words")
    return errors / total


class Recognizer:
    """PocketSphinx's default US-English decoder; one instance decodes many utterances."""

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as err:
            raise RuntimeError(
                f"word error rate needs pocketsphinx ({err}); install fewstep's `test` extra"
            ) from None
        self.decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")

    def __call__(self, wave: Tensor | np.ndarray, sample_rate: int) -> str:
        """The words heard in a mono wave in [-1, 1] ('' for none)."""
        import soxr

        samples = wave.numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
        samples = soxr.resample(samples.astype(np.float32), sample_rate, ASR_RATE)
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""
