"""Warnings attributed to the caller's line: the first frame outside csm and torch (decorators such as
torch.inference_mode put their own frames between generate and its caller)."""

from __future__ import annotations

import os
import sys
import warnings


def _package_dir(module) -> str:
    return os.path.dirname(os.path.abspath(module.__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message), pointing at the user's code that called into csm."""
    import torch

    import csm

    inside = (_package_dir(csm), _package_dir(torch))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1 if frame is not None else 2)
