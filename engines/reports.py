"""Where an evaluation's report goes (`--out` of `fewstep eval` and `fewstep eval-speech`)."""

from __future__ import annotations

from pathlib import Path


def out_file(path: str | None) -> Path | None:
    """An evaluation's --out file, its folder made now: a bad path is a one-line error
    before minutes of evaluation, not a traceback after them."""
    if not path:
        return None
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {path}: its folder {out.parent} cannot be made ({err})") from err
    return out
