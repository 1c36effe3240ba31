"""What the experiments' command lines share: name lists and the configure-then-run step."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from jaxroute.cli.common import log


REPO = Path(os.path.abspath(__file__)).parents[1]


def portable_path(path) -> str:
    """``path`` as a cache records it: relative to the repository root when it lies beside or
    inside it (``../shared/...``), else absolute.

    A committed result cache then matches in any clone that has ``../shared``
    beside it, whatever the clone's own location.
    """
    # absolute but not resolved: a ../shared that is a symbolic link stays ../shared
    p = Path(os.path.abspath(path))
    if p.is_relative_to(REPO.parent):
        return os.path.relpath(p, REPO)
    return str(p)


def comma_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, blanks dropped: ``"a, b,"`` -> ``("a", "b")``."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def configure_and_run(parser: argparse.ArgumentParser, make_config: Callable[[], Any],
                      run: Callable[..., Any], out) -> int:
    """``run(make_config(), Path(out), log=...)``, progress on stderr.

    A ValueError from ``make_config`` (a configuration's own validation) ends the
    command as ``parser``'s one-line usage error, exit 2, before any work.
    """
    try:
        cfg = make_config()
    except ValueError as e:
        parser.error(str(e))
    run(cfg, Path(out), log=log)
    return 0
