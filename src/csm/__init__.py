"""csm: a fast, faithful pure-PyTorch implementation of Sesame's Conversational Speech Model."""

from .config import CsmConfig, CsmDepthDecoderConfig
from .model import (
    CsmBackboneModel,
    CsmDepthDecoderForCausalLM,
    CsmDepthDecoderModel,
    CsmForConditionalGeneration,
)

__version__ = "0.1.0"

__all__ = [
    "CsmBackboneModel",
    "CsmConfig",
    "CsmDepthDecoderConfig",
    "CsmDepthDecoderForCausalLM",
    "CsmDepthDecoderModel",
    "CsmForConditionalGeneration",
]
