"""Write a directory all at once, so readers never see a half-built model or dataset."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _apply_umask(root: Path) -> None:
    """Give the tree the permissions a plain mkdir/open would: mkdtemp makes 0700 directories and
    safetensors writes 0600 files, which other users of a shared checkout could not read."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(out_dir: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir next to out_dir; on success it becomes out_dir, on error it goes.

    The temp dir sits in out_dir's parent so the final rename stays on one filesystem. An existing
    out_dir is moved aside first and deleted only after the new one is in place, unless
    keep_existing: then a (non-empty) out_dir that appeared meanwhile, e.g. built by a concurrent
    process, wins and our copy is dropped.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        _apply_umask(tmp)
        if _is_empty_dir(out_dir):
            out_dir.rmdir()
        if keep_existing and out_dir.exists():
            return
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
