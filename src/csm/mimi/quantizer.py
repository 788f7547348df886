"""Split residual vector quantizer: one semantic codebook, then acoustic codebooks on the same latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MimiConfig
from .derived import derived


class Codebook(nn.Module):
    """k-means centroids stored as the reference stores them: their sums and their usage counts."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))

    def centroids(self) -> torch.Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=1e-5)[:, None]


class ResidualVectorQuantizer(nn.Module):
    """Each codebook quantizes what the previous ones left; the codes' centroids sum to the latent."""

    def __init__(self, config: MimiConfig, num_quantizers: int) -> None:
        super().__init__()
        # `layers.{i}.codebook` keeps the checkpoint's names.
        self.layers = nn.ModuleList(
            [
                nn.ModuleDict({"codebook": Codebook(config.codebook_size, config.codebook_dim)})
                for _ in range(num_quantizers)
            ]
        )
        self.input_proj = self.output_proj = None
        dim = config.vector_quantization_hidden_dimension
        if dim != config.hidden_size:
            self.input_proj = nn.Conv1d(config.hidden_size, dim, 1, bias=False)
            self.output_proj = nn.Conv1d(dim, config.hidden_size, 1, bias=False)

    def centroids(self) -> torch.Tensor:
        """(Q, K, dim) float32 centroids of all codebooks."""
        sources = [
            t for layer in self.layers for t in (layer.codebook.embed_sum, layer.codebook.cluster_usage)
        ]
        return derived(
            self,
            "centroids",
            sources,
            lambda: torch.stack([layer.codebook.centroids().float() for layer in self.layers]),
        )

    def encode(self, latents: torch.Tensor, num_quantizers: int) -> torch.Tensor:
        """(B, D, T) latents -> (B, num_quantizers, T) codes."""
        if self.input_proj is not None:
            latents = self.input_proj(latents)
        B, D, T = latents.shape
        residual = latents.transpose(1, 2).reshape(B * T, D).float()
        centroids = self.centroids()
        codes = []
        for q in range(num_quantizers):
            # cdist as the reference computes it, so that near ties break the same way.
            index = torch.cdist(residual[None], centroids[q][None])[0].argmin(dim=-1)
            residual = residual - F.embedding(index, centroids[q])
            codes.append(index)
        return torch.stack(codes, dim=1).view(B, T, num_quantizers).transpose(1, 2)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, Q, T) codes -> (B, D, T) latents."""
        B, Q, T = codes.shape
        centroids = self.centroids()[:Q]  # (Q, K, dim)
        # One lookup in the stacked table instead of one per codebook.
        offsets = torch.arange(Q, device=codes.device)[:, None] * centroids.shape[1]
        z = F.embedding(codes + offsets, centroids.flatten(0, 1)).sum(dim=1)  # (B, T, dim)
        z = z.transpose(1, 2).to(dtype)
        return z if self.output_proj is None else self.output_proj(z)


class SplitResidualVectorQuantizer(nn.Module):
    """Semantic codebooks first, then acoustic ones, both quantizing the same latents."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.num_semantic = config.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(
            config, config.num_semantic_quantizers
        )
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(
            config, config.num_quantizers - config.num_semantic_quantizers
        )

    def encode(self, latents: torch.Tensor, num_quantizers: int) -> torch.Tensor:
        """(B, D, T) latents -> (B, num_quantizers, T) codes."""
        codes = self.semantic_residual_vector_quantizer.encode(latents, self.num_semantic)
        if num_quantizers > self.num_semantic:
            acoustic = self.acoustic_residual_vector_quantizer.encode(
                latents, num_quantizers - self.num_semantic
            )
            codes = torch.cat([codes, acoustic], dim=1)
        return codes

    def decode(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, Q, T) codes -> (B, D, T) latents."""
        z = self.semantic_residual_vector_quantizer.decode(codes[:, : self.num_semantic], dtype)
        if codes.shape[1] > self.num_semantic:
            z = z + self.acoustic_residual_vector_quantizer.decode(codes[:, self.num_semantic :], dtype)
        return z
