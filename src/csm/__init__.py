"""csm: a fast, faithful pure-PyTorch implementation of Sesame's Conversational Speech Model."""

from .audio import load_audio, save_audio
from .config import CsmConfig, CsmDepthDecoderConfig
from .conversation import Conversation, DialogueAudio
from .engine import Sampling
from .generate import CsmGenerateOutput, GenerationConfig
from .mimi import MimiConfig, MimiModel
from .model import (
    CsmBackboneModel,
    CsmDepthDecoderForCausalLM,
    CsmDepthDecoderModel,
    CsmForConditionalGeneration,
)
from .pipeline import TextToAudioPipeline, pipeline
from .processor import BatchInputs, ConversationError, CsmProcessor, CsmTokenizer
from .voice import Voice, list_voices

__version__ = "0.1.0"

__all__ = [
    "BatchInputs",
    "ConversationError",
    "CsmTokenizer",
    "Conversation",
    "DialogueAudio",
    "CsmBackboneModel",
    "CsmProcessor",
    "CsmGenerateOutput",
    "GenerationConfig",
    "MimiConfig",
    "MimiModel",
    "Sampling",
    "TextToAudioPipeline",
    "Voice",
    "list_voices",
    "pipeline",
    "load_audio",
    "save_audio",
    "CsmConfig",
    "CsmDepthDecoderConfig",
    "CsmDepthDecoderForCausalLM",
    "CsmDepthDecoderModel",
    "CsmForConditionalGeneration",
]
