"""Progress bars for the long loops (perplexity windows, throughput repeats, routing, tokenisation).

Every bar goes through ``progress_bar`` so that all of them behave alike: tqdm on stderr (stdout stays
the report), off when the caller says ``progress=False`` (``--no-progress``) and off when stderr is not
a terminal, so logs and pipes get no carriage-return noise. ``tqdm.auto`` as training uses, which in a
notebook draws a widget (tqdm's ``disable=None`` means "off on a non-terminal", and the notebook bar
treats it as on). A bar is cleared when done: the result printed next replaces it.
"""

from __future__ import annotations

import sys


def progress_bar(total=None, desc=None, unit="it", enabled: bool = True, leave: bool = False, **tqdm_kwargs):
    """A tqdm bar of ``total`` steps, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, file=sys.stderr,
                leave=leave, dynamic_ncols=True, **tqdm_kwargs)


def shows_progress(enabled: bool = True) -> bool:
    """Whether ``progress_bar`` would draw in a terminal: for child processes that take a ``--no-progress``."""
    return enabled and sys.stderr.isatty()
