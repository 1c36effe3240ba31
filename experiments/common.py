"""What the experiments' command lines share: name lists and the configure-then-run step."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from jaxroute.cli.common import log


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
