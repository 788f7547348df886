"""csm: a fast, faithful pure-PyTorch implementation of Sesame's Conversational Speech Model."""

__version__ = "0.1.0"
