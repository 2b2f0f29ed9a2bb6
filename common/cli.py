"""What every command line tool here shares: user errors as one line, quiet logs.

Kept free of heavy imports (no torch, diffusers or transformers at import time) so that
``train.py --help`` and flag mistakes are answered before the libraries load.

- ``UsageError``: a flag or path the user can fix. With ``DataError`` (bad data) and
  ``DamagedCheckpoint`` (an explicit checkpoint that does not verify) it is reported by
  ``run`` as one line on stderr, exit code 2, no traceback. Anything else (a bug) keeps its
  traceback.
- ``setup_logging``: one root handler that writes through tqdm (log lines never break a
  progress bar), Python warnings routed into it, and third-party warnings that say nothing to
  the user filtered out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

EXIT_USAGE = 2  # argparse's exit code for a bad command line; ours for every user error


class UsageError(ValueError):
    """A flag, path or combination of flags the user can fix; the message names the flag."""


# (module, class name) of the project's other user-facing errors. Looked up in sys.modules
# at error time: a class whose module was never imported cannot have been raised.
_USER_ERRORS = (("data.errors", "DataError"), ("training.checkpointing", "DamagedCheckpoint"))


def user_error_types() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[m], n) for m, n in _USER_ERRORS if m in sys.modules]
    return (UsageError, *found)


def one_line(exc: BaseException) -> str:
    """The message with its line breaks folded: ``"invalid config:\n  a\n  b"`` becomes
    ``"invalid config: a; b"``."""
    parts = [part.strip() for part in str(exc).splitlines() if part.strip()]
    if len(parts) > 1 and parts[0].endswith(":"):
        return f"{parts[0]} {'; '.join(parts[1:])}"
    return "; ".join(parts) or type(exc).__name__


def parse_named(values: Sequence[str], flag: str) -> list[tuple[str, str | None]]:
    """NAME or NAME=VALUE entries, names unique."""
    pairs = [(v.split("=", 1)[0], v.split("=", 1)[1] if "=" in v else None) for v in values]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UsageError(f"{flag}: names must be unique, got {names}")
    return pairs


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block above them) and no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # --learning_rat must not mean --learning_rate
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run(main: Callable[..., Any], argv: Sequence[str] | None = None, prog: str | None = None):
    """Call ``main(argv)``; a user error becomes one stderr line and exit code 2."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        return main(argv)
    except Exception as exc:
        if isinstance(exc, user_error_types()):
            fail(prog, one_line(exc))
        raise


# Messages of third-party loggers and warnings that carry no information for a user of this
# project: transformers falls back to PIL image processors without torchvision (we never need
# it); bitsandbytes' optional CPU kernels package, whose loader (kernels >= 0.19) also notes on
# every offline run that it skips the hub's publisher check; a deprecated argument diffusers passes.
_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back",
    "bitsandbytes.backends.cpu.ops": "gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check",
}
_NOISY_WARNINGS = (r".*local_dir_use_symlinks.*",)


class _DropContaining(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def quiet_third_party() -> None:
    """Install the filters; call before importing transformers, diffusers or bitsandbytes."""
    for name, text in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropContaining) for f in logger.filters):
            logger.addFilter(_DropContaining(text))
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write``, which clears and redraws an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(fmt: str = LOG_FORMAT, level: int = logging.INFO) -> None:
    """Root logging through tqdm, Python warnings as log records, third-party noise dropped."""
    quiet_third_party()
    root = logging.getLogger()
    if not any(isinstance(h, TqdmHandler) for h in root.handlers):
        handler = TqdmHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
