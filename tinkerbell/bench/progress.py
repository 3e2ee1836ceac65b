"""Progress bars: tqdm when installed (it comes with the dependencies), else a line at each quarter."""

from __future__ import annotations

import sys
from typing import Any


class _Lines:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self._shown = max(total, 1), desc, 0, -1

    def update(self, n: int = 1) -> None:
        self.n += n
        quarter = 4 * self.n // self.total
        if quarter != self._shown:
            self._shown = quarter
            print(f"  {self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, enabled: bool = True) -> Any:
    if not enabled:
        return _Off()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, desc)
    return tqdm(total=total, desc=f"  {desc}", leave=False, dynamic_ncols=True, file=sys.stderr)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
