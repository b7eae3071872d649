"""One ``warn_once`` for the integrations: each fallback to the stock code path is said
once per process and reason, through ``logging``, never from inside a torch.compile trace
(a log call there is a graph break; the eager run has said it already)."""

from __future__ import annotations

import logging
import threading

import torch

_said: set[tuple[str, str]] = set()
_lock = threading.Lock()


def warn_once(logger: logging.Logger, reason: str, template: str = "%s") -> bool:
    """Log ``template % reason`` at WARNING on ``logger`` the first time this (logger, reason)
    pair is seen; returns whether it logged."""
    if torch.compiler.is_compiling():
        return False
    key = (logger.name, reason)
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    logger.warning(template, reason)
    return True


def reset() -> None:
    """Forget what was said (tests)."""
    with _lock:
        _said.clear()
