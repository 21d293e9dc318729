"""A progress bar for long command-line steps: tqdm when it is installed, a plain text bar otherwise.

tqdm is not a dependency of orthotune (transformers brings it); without it the bar redraws in place on a
terminal and prints a line every tenth of the way when the output goes to a file or a CI log.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO


class ProgressBar:
    """``with ProgressBar(total, "train") as bar: bar.update(1, loss=0.3)``.

    Args:
        total: number of steps.
        description: shown before the bar.
        enabled: ``False`` draws nothing (``--quiet``).
        stream: where to draw; standard error by default, so standard output stays the report.
    """

    def __init__(self, total: int, description: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.description = description
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self._postfix = ""
        self._tqdm: Any = None
        self._started = time.perf_counter()
        self._last_tenth = -1
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(total=total, desc=description, file=self.stream, unit="step", dynamic_ncols=True)

    def update(self, steps: int = 1, **postfix: float) -> None:
        """Advance by ``steps`` and show ``postfix`` values (a running loss, say)."""
        self.count += steps
        self._postfix = " ".join(f"{key}={value:.4g}" for key, value in postfix.items())
        if not self.enabled:
            return
        if self._tqdm is not None:
            if postfix:
                self._tqdm.set_postfix({key: f"{value:.4g}" for key, value in postfix.items()}, refresh=False)
            self._tqdm.update(steps)
            return
        self._draw()

    def _draw(self, final: bool = False) -> None:
        fraction = self.count / self.total if self.total else 1.0
        elapsed = time.perf_counter() - self._started
        width = 30
        filled = int(width * fraction)
        line = (
            f"{self.description}: {fraction:4.0%} |{'#' * filled}{'.' * (width - filled)}| "
            f"{self.count}/{self.total} [{elapsed:.0f}s] {self._postfix}"
        )
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            tenth = int(fraction * 10)
            if tenth == self._last_tenth and not final:
                return
            self._last_tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.count != self.total or self.stream.isatty():
            self._draw(final=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
