"""csm: a fast, faithful pure-PyTorch implementation of Sesame's Conversational Speech Model.

The public names below are imported on first use (PEP 562), so that `import csm` (and light commands such
as `csm voice list` or `csm --help`) does not load torch; `from csm import CsmForConditionalGeneration`
works as before.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "load_audio": "audio",
    "save_audio": "audio",
    "CsmConfig": "config",
    "CsmDepthDecoderConfig": "config",
    "Conversation": "conversation",
    "DialogueAudio": "conversation",
    "Sampling": "engine",
    "CsmGenerateOutput": "generate",
    "GenerationConfig": "generate",
    "MimiConfig": "mimi",
    "MimiModel": "mimi",
    "CsmBackboneModel": "model",
    "CsmDepthDecoderForCausalLM": "model",
    "CsmDepthDecoderModel": "model",
    "CsmForConditionalGeneration": "model",
    "TextToAudioPipeline": "pipeline",
    "pipeline": "pipeline",
    "BatchInputs": "processor",
    "ConversationError": "processor",
    "CsmProcessor": "processor",
    "CsmTokenizer": "processor",
    "Voice": "voice",
    "list_voices": "voice",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'csm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """`csm.pipeline` is the function, as it was when every name was imported eagerly, even after the
    `csm.pipeline` module is imported (which binds the module to the package's attribute)."""

    def __getattribute__(self, name: str):
        value = super().__getattribute__(name)
        if name == "pipeline" and isinstance(value, types.ModuleType):
            return value.pipeline
        return value


sys.modules[__name__].__class__ = _Package
