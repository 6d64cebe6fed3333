"""Output directories shared by every command that writes a run: never mix two runs,
never delete what posttrain did not write."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path


def check_output_dir(
    out: str | Path,
    artifacts: Sequence[str],
    *,
    overwrite: bool,
    resume: bool | None = False,
    exclusive: bool = False,
) -> list[str]:
    """The `artifacts` present in `out`, after the checks of `prepare_output_dir`
    (which see); changes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in entries if name not in artifacts]
    if exclusive and foreign:
        raise ValueError(
            f"{str(out)!r} is not empty and does not look like a run of this command "
            f"(it holds {', '.join(foreign[:3])}); not deleting or mixing into it. Choose "
            "another --output-dir"
        )
    existing = [name for name in artifacts if name in entries]
    if existing and not (resume or overwrite):
        choices = (
            "--overwrite to start again"
            if resume is None
            else ("--resume to continue it or --overwrite to start again")
        )
        raise ValueError(
            f"output_dir {out} already holds a run ({', '.join(existing)}): pass {choices}"
        )
    return existing


def prepare_output_dir(
    out: str | Path,
    artifacts: Sequence[str],
    *,
    overwrite: bool,
    resume: bool | None = False,
    exclusive: bool = False,
) -> Path:
    """Create `out`, or make it ready for a new run (overwrite) or a continued one (resume).

    `artifacts` are the names a run writes into `out`. If any exists and neither
    `resume` nor `overwrite` is set, ValueError: the user chooses (`resume=None`: the
    command cannot resume, so only --overwrite is offered). `overwrite` deletes those
    names only. With `exclusive`, a directory holding anything else is refused (nothing
    is deleted), for commands that own their whole directory.
    """
    out = Path(out)
    existing = check_output_dir(
        out, artifacts, overwrite=overwrite, resume=resume, exclusive=exclusive
    )
    if overwrite:
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
