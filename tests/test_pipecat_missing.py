"""Without Pipecat installed, `import csm.pipecat` says which extra to install."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_a_missing_pipecat_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pipecat", None)  # as if not installed
    for name in [m for m in sys.modules if m.startswith("pipecat.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "csm.pipecat", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'csm-speech\[pipecat\]'"):
        importlib.import_module("csm.pipecat")
