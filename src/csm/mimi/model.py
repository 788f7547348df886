"""MimiModel: 24 kHz audio <-> 12.5 Hz frames of codes, whole or streamed; loads the reference's checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_into,
    load_safetensors,
    loading_device,
    loading_dtype,
    read_json,
    resolve_checkpoint,
    save_safetensors,
)
from ..output import ModelOutput
from .config import MimiConfig
from .conv import Conv1d, ConvTranspose1d
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetDecoder, SeanetEncoder
from .streaming import StreamState
from .transformer import Transformer


@dataclass
class MimiEncoderOutput(ModelOutput):
    """`encode`'s result, as the reference's: `out.audio_codes` or `out[0]`."""

    audio_codes: torch.Tensor | None = None  # (B, Q, F)
    encoder_past_key_values: MimiStreamingEncoder | None = None  # the stream, when streaming
    padding_cache: MimiStreamingEncoder | None = None  # the same stream (the reference keeps two caches)


@dataclass
class MimiDecoderOutput(ModelOutput):
    """`decode`'s result, as the reference's: `out.audio_values` or `out[0]`."""

    audio_values: torch.Tensor | None = None  # (B, 1, samples)
    decoder_past_key_values: MimiStreamingDecoder | None = None  # the stream, when streaming


@dataclass
class MimiOutput(ModelOutput):
    """`forward`'s result (encode, then decode), as the reference's."""

    audio_codes: torch.Tensor | None = None
    audio_values: torch.Tensor | None = None
    encoder_past_key_values: MimiStreamingEncoder | None = None
    decoder_past_key_values: MimiStreamingDecoder | None = None


class MimiModel(nn.Module):
    """Mimi: SEANet + transformer encoder, split RVQ, transformer + SEANet decoder.

    Submodule names are the reference checkpoint's (`encoder.layers.0.conv.weight`, ...).
    """

    @classmethod
    def can_generate(cls) -> bool:
        """False: a codec encodes and decodes; it has no `generate` (as transformers' MimiModel reports)."""
        return False

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.config = config
        hidden, stride = config.hidden_size, config.latent_stride
        self.encoder = SeanetEncoder(config)
        self.encoder_transformer = Transformer(config)
        self.downsample = self.upsample = None
        if config.has_resampling:
            # The reference pads this one by repeating the edge frames, whatever `pad_mode` says.
            self.downsample = Conv1d(
                hidden,
                hidden,
                2 * stride,
                stride,
                bias=False,
                causal=config.use_causal_conv,
                pad_mode="replicate",
            )
        self.quantizer = SplitResidualVectorQuantizer(config)
        if config.has_resampling:
            self.upsample = ConvTranspose1d(
                hidden,
                hidden,
                2 * stride,
                stride,
                groups=config.upsample_groups,
                bias=False,
                causal=config.use_causal_conv,
                trim_right_ratio=config.trim_right_ratio,
            )
        self.decoder_transformer = Transformer(config)
        self.decoder = SeanetDecoder(config)

    # Sizes.
    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per frame of codes (1920 for Mimi)."""
        total = 1
        for m in [*self.encoder.layers, self.downsample]:
            if isinstance(m, Conv1d):
                total *= m.stride
        return total

    def encoded_length(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Frames that `encode` gives for `num_samples` samples (an int or a tensor of lengths)."""
        frames = self.encoder.output_length(num_samples)
        return frames if self.downsample is None else self.downsample.output_length(frames)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.layers[0].conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.layers[0].conv.weight.device

    def get_encoded_length(self, input_length: int | torch.Tensor) -> int | torch.Tensor:
        """The reference's name for `encoded_length`."""
        return self.encoded_length(input_length)

    def get_audio_codes_mask(self, padding_mask: torch.Tensor, padding_side: str = "right") -> torch.Tensor:
        """Which frames (B, F) hold audio, from a sample mask (B, T): the first encoded_length(n) of each row."""
        frames = torch.as_tensor(self.encoded_length(padding_mask.sum(-1)), device=padding_mask.device)
        mask = torch.arange(int(frames.max()), device=padding_mask.device)[None] < frames[:, None]
        return mask if padding_side == "right" else mask.flip(-1)

    # Whole clips.
    @torch.no_grad()
    def encode(
        self,
        input_values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        num_quantizers: int | None = None,
        encoder_past_key_values: MimiStreamingEncoder | None = None,
        padding_cache: MimiStreamingEncoder | None = None,
        use_streaming: bool | None = None,
        return_dict: bool | None = None,
    ) -> MimiEncoderOutput | tuple:
        """Audio (B, 1, T) in [-1, 1] -> `audio_codes` (B, Q, ceil(T / 1920)).

        padding_mask: (B, T) or (B, 1, T), nonzero on samples, zero on padding at the end of each row.
        With it, clip i gets in its first `encoded_length(len_i)` frames the codes it gets alone (for
        causal convolutions, as in Mimi); the frames after those are padding. Without it, every row is
        taken as T samples of audio.
        num_quantizers: the first Q codebooks (default all 32).
        use_streaming=True (or the config's use_streaming) encodes a chunk of a live stream: the result's
        `padding_cache` (also `encoder_past_key_values`) holds the stream, to pass to the next call; each call
        gives the frames its samples complete (see `streaming_encoder`).
        return_dict=False returns a tuple.
        """
        stream = padding_cache if padding_cache is not None else encoder_past_key_values
        if stream is not None or (use_streaming if use_streaming is not None else self.config.use_streaming):
            if stream is not None and not isinstance(stream, MimiStreamingEncoder):
                raise TypeError(
                    "padding_cache / encoder_past_key_values must be the stream a previous "
                    f"encode(..., use_streaming=True) returned, got {type(stream).__name__}"
                )
            if padding_mask is not None:
                raise ValueError(
                    "a streamed encode takes no padding_mask: send each row's samples as they come"
                )
            if stream is None:
                stream = self.streaming_encoder(input_values.shape[0], num_quantizers)
            out = MimiEncoderOutput(stream.step(input_values), stream, stream)
            return out.returned(return_dict)
        audio = self._check_audio(input_values)
        num_quantizers = self._check_num_quantizers(num_quantizers)
        lengths = None if padding_mask is None else self._check_padding_mask(padding_mask, audio)
        if lengths is not None and bool((lengths == audio.shape[-1]).all()):
            lengths = None
        codes = self.quantizer.encode(self._encode_latents(audio, lengths=lengths), num_quantizers)
        out = MimiEncoderOutput(audio_codes=codes)
        return out.returned(return_dict)

    @torch.no_grad()
    def decode(
        self,
        audio_codes: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        decoder_past_key_values: MimiStreamingDecoder | None = None,
        use_streaming: bool | None = None,
        return_dict: bool | None = None,
    ) -> MimiDecoderOutput | tuple:
        """Codes (B, Q, F) -> `audio_values` (B, 1, F * 1920).

        padding_mask (B, T) or (B, 1, T): the audio is cut to its last dimension T when shorter, as the
        reference does. use_streaming=True (or the config's use_streaming), or a `decoder_past_key_values`
        from a previous streamed call, decodes the next frames of a stream (see `streaming_decoder`): the
        concatenated results equal one decode of all the frames.
        return_dict=False returns a tuple.
        """
        stream = decoder_past_key_values
        if stream is not None or (use_streaming if use_streaming is not None else self.config.use_streaming):
            if stream is not None and not isinstance(stream, MimiStreamingDecoder):
                raise TypeError(
                    "decoder_past_key_values must be the stream a previous decode(..., use_streaming=True) "
                    f"returned, got {type(stream).__name__}"
                )
            if stream is None:
                stream = self.streaming_decoder(audio_codes.shape[0])
            audio, stream = stream.step(audio_codes), stream
        else:
            codes = self._check_codes(audio_codes)
            if codes.shape[-1] == 0:
                audio = torch.zeros(
                    codes.shape[0], self.config.audio_channels, 0, device=self.device, dtype=self.dtype
                )
            else:
                audio = self._decode_latents(self.quantizer.decode(codes, self.dtype))
        if padding_mask is not None and padding_mask.shape[-1] < audio.shape[-1]:
            audio = audio[..., : padding_mask.shape[-1]]
        out = MimiDecoderOutput(audio, stream)
        return out.returned(return_dict)

    def forward(
        self,
        input_values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        num_quantizers: int | None = None,
        audio_codes: torch.Tensor | None = None,
        encoder_past_key_values: MimiStreamingEncoder | None = None,
        decoder_past_key_values: MimiStreamingDecoder | None = None,
        return_dict: bool | None = None,
    ) -> MimiOutput | tuple:
        """Encode `input_values` (B, 1, T) (unless `audio_codes` are given), then decode: `audio_codes` and
        `audio_values`, the audio cut to T samples, as the reference's forward."""
        if audio_codes is None:
            encoded = self.encode(
                input_values, padding_mask, num_quantizers, encoder_past_key_values=encoder_past_key_values
            )
            audio_codes, encoder_past_key_values = encoded.audio_codes, encoded.encoder_past_key_values
        if padding_mask is None:
            padding_mask = torch.ones(input_values.shape[-1], dtype=torch.bool)
        decoded = self.decode(audio_codes, padding_mask, decoder_past_key_values)
        out = MimiOutput(
            audio_codes, decoded.audio_values, encoder_past_key_values, decoded.decoder_past_key_values
        )
        return out.returned(return_dict)

    def _encode_latents(
        self, audio: torch.Tensor, stream: StreamState | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.encoder(audio, stream, lengths)  # (B, D, T / 960)
        x = self.encoder_transformer(x.transpose(1, 2), stream).transpose(1, 2)
        if self.downsample is not None:
            x = self.downsample(x, stream, None if lengths is None else self.encoder.output_length(lengths))
        return x  # (B, D, T / 1920)

    def _decode_latents(self, latents: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        x = latents if self.upsample is None else self.upsample(latents, stream)
        x = self.decoder_transformer(x.transpose(1, 2), stream).transpose(1, 2)
        return self.decoder(x, stream)

    # Streams.
    def streaming_decoder(self, batch_size: int = 1) -> MimiStreamingDecoder:
        """A decoder that turns codes into audio a few frames at a time, for playback during generation."""
        return MimiStreamingDecoder(self, batch_size)

    def streaming_encoder(
        self, batch_size: int = 1, num_quantizers: int | None = None
    ) -> MimiStreamingEncoder:
        """An encoder that turns live audio into codes as samples arrive."""
        return MimiStreamingEncoder(self, batch_size, self._check_num_quantizers(num_quantizers))

    # Checking input where it enters.
    def _check_audio(
        self, audio: torch.Tensor, batch_size: int | None = None, allow_empty: bool = False
    ) -> torch.Tensor:
        channels = self.config.audio_channels
        if not isinstance(audio, torch.Tensor):
            raise TypeError(
                f"audio must be a torch.Tensor of shape (batch, {channels}, samples), got {type(audio).__name__}"
            )
        if not audio.is_floating_point():
            raise TypeError(f"audio must hold float samples in [-1, 1], got dtype {audio.dtype}")
        if audio.dim() != 3:
            hint = (
                " (add the missing dims with audio.view(1, 1, -1) or audio.unsqueeze(1))"
                if audio.dim() < 3
                else ""
            )
            raise ValueError(
                f"audio must have shape (batch, {channels}, samples), got {tuple(audio.shape)}{hint}"
            )
        if audio.shape[1] != channels:
            hint = " (mix stereo down with audio.mean(dim=1, keepdim=True))" if channels == 1 else ""
            raise ValueError(f"Mimi takes {channels}-channel audio, got {audio.shape[1]} channels{hint}")
        if audio.shape[0] == 0:
            raise ValueError("audio holds no clip: the batch is empty")
        if batch_size is not None and audio.shape[0] != batch_size:
            raise ValueError(
                f"this stream was opened for batch size {batch_size}, got audio of batch size {audio.shape[0]}"
            )
        if audio.shape[-1] == 0 and not allow_empty:
            raise ValueError("audio clip is empty (0 samples)")
        return audio.to(device=self.device, dtype=self.dtype)

    def _check_padding_mask(self, padding_mask: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        B, _, T = audio.shape
        if padding_mask.dim() == 3 and padding_mask.shape[1] == 1:
            padding_mask = padding_mask[:, 0]
        if tuple(padding_mask.shape) != (B, T):
            raise ValueError(
                f"padding_mask must have shape ({B}, {T}) like the audio, got {tuple(padding_mask.shape)}"
            )
        valid = padding_mask.to(audio.device) != 0
        lengths = valid.sum(dim=-1)
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"audio clip(s) {empty} are empty: their padding_mask is all zeros")
        if not bool((valid == (torch.arange(T, device=valid.device) < lengths[:, None])).all()):
            raise ValueError(
                "padding_mask must mark samples first and padding last in each row (right padding)"
            )
        return lengths

    def _check_num_quantizers(self, num_quantizers: int | None) -> int:
        if num_quantizers is None:
            return self.config.num_quantizers
        low, high = self.config.num_semantic_quantizers, self.config.num_quantizers
        if not low <= num_quantizers <= high:
            raise ValueError(f"num_quantizers must be between {low} and {high}, got {num_quantizers}")
        return num_quantizers

    def _check_codes(self, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        if (
            not isinstance(codes, torch.Tensor)
            or codes.is_floating_point()
            or codes.is_complex()
            or codes.dtype == torch.bool
        ):
            raise TypeError("codes must be an integer torch.Tensor of shape (batch, codebooks, frames)")
        if codes.dim() != 3:
            raise ValueError(f"codes must have shape (batch, codebooks, frames), got {tuple(codes.shape)}")
        B, Q, _ = codes.shape
        if not self.config.num_semantic_quantizers <= Q <= self.config.num_quantizers:
            raise ValueError(
                f"codes have {Q} codebooks; Mimi decodes {self.config.num_semantic_quantizers} to "
                f"{self.config.num_quantizers} (shape must be (batch, codebooks, frames))"
            )
        if B == 0:
            raise ValueError("codes hold no clip: the batch is empty")
        if batch_size is not None and B != batch_size:
            raise ValueError(
                f"this stream was opened for batch size {batch_size}, got codes of batch size {B}"
            )
        if codes.numel() and not bool(((codes >= 0) & (codes < self.config.codebook_size)).all()):
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got values from {int(codes.min())} to {int(codes.max())}"
            )
        return codes.to(device=self.device, dtype=torch.long)

    # Checkpoints.
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        device_map=None,
        torch_dtype: torch.dtype | None = None,
    ) -> MimiModel:
        """Load a Mimi checkpoint in the reference's layout (e.g. kyutai/mimi), or the codec of a CSM one.
        device_map and torch_dtype as in CsmForConditionalGeneration.from_pretrained."""
        device = loading_device(device, device_map) or torch.device("cpu")
        dtype = loading_dtype(dtype, torch_dtype)
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype.removeprefix("torch."))
        folder = resolve_checkpoint(path_or_repo_id, allow_patterns=["*.json", "*.safetensors"])
        raw = read_json(folder)
        config = MimiConfig.from_dict(raw)
        # A CSM checkpoint holds the codec under `codec_model.`: read only those tensors.
        state = _read_tensors(folder, "codec_model." if "codec_config" in raw else "", device)
        if dtype is not None:
            # Codebooks stay float32: nearest-centroid search is where low precision changes codes.
            state = {
                k: v.to(dtype) if v.is_floating_point() and ".codebook." not in k else v
                for k, v in state.items()
            }
        with torch.device("meta"):
            model = cls(config)
        load_into(model, state, source=str(folder))
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors, which the reference's MimiModel also loads."""
        folder = Path(folder)
        self.config.save_pretrained(folder)
        save_safetensors(self.state_dict(), folder)


def _read_tensors(folder: Path, prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, or only those under `prefix` (with it stripped) without reading the rest."""
    if not prefix:
        return load_safetensors(folder, device)
    if (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    elif (folder / WEIGHTS_INDEX_NAME).is_file():
        files = sorted(set(read_json(folder, WEIGHTS_INDEX_NAME).get("weight_map", {}).values()))
    else:
        raise CheckpointError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"shard {name} of {folder} is missing")
        with safe_open(folder / name, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = f.get_tensor(key)
    return state


class MimiStreamingDecoder:
    """Decodes codes a few frames at a time; the concatenated steps equal one `decode` of all the frames.

    Convolution overlaps and a sliding window of transformer keys are kept between steps, in buffers of
    fixed size, so a step costs the same however long the stream has run.

    Its `batch_size` rows are independent streams. `step(codes)` advances all of them; `step(codes, rows)`
    only those rows, so streams that started at different times (a server's requests) decode in one call
    whenever they have the same number of frames; `reset(rows)` starts new streams in some rows. A
    `step(codes, rows)` that raises leaves every row's stream as it was, so its rows can be stepped again.
    """

    def __init__(self, model: MimiModel, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.reset()

    def reset(self, rows: list[int] | torch.Tensor | None = None) -> None:
        """Start a new stream in every row, or in `rows` only (the others go on)."""
        m = self.model
        if rows is not None:
            self.state.reset_rows(self._rows(rows))
            return
        modules = [mod for mod in (m.upsample, m.decoder_transformer, m.decoder) if mod is not None]
        self.state = StreamState(modules, self.batch_size, m.device, m.dtype)

    @torch.no_grad()
    def step(self, codes: torch.Tensor, rows: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, Q, n) -> audio (B, 1, n * 1920); with `rows`, codes (len(rows), Q, n) for those rows."""
        m = self.model
        index = None if rows is None else self._rows(rows)
        codes = m._check_codes(codes, self.batch_size if index is None else len(index))
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], m.config.audio_channels, 0, device=m.device, dtype=m.dtype)
        if index is None:
            return m._decode_latents(m.quantizer.decode(codes, m.dtype), self.state)
        self.state.rows, self.state.writes = index, []  # held back: a step that raises changes no row
        try:
            audio = m._decode_latents(m.quantizer.decode(codes, m.dtype), self.state)
            for write in self.state.writes:
                write()
            return audio
        finally:
            self.state.rows = self.state.writes = None

    def _rows(self, rows) -> torch.Tensor:
        index = torch.as_tensor(rows, dtype=torch.long).flatten()
        if index.numel() == 0 or len(set(index.tolist())) != index.numel():
            raise ValueError(f"rows must be distinct row numbers, got {index.tolist()}")
        if index.min() < 0 or index.max() >= self.batch_size:
            raise ValueError(f"rows must lie in [0, {self.batch_size}), got {index.tolist()}")
        return index.to(self.model.device)


class MimiStreamingEncoder:
    """Encodes live audio into codes as it arrives, one frame per whole 1920 samples received.

    `flush()` at the end of the clip gives the last, partial frame; the concatenated codes then equal
    one `encode` of all the audio.
    """

    def __init__(self, model: MimiModel, batch_size: int, num_quantizers: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.num_quantizers = num_quantizers
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        m = self.model
        modules = [mod for mod in (m.encoder, m.encoder_transformer, m.downsample) if mod is not None]
        self.state = StreamState(modules, self.batch_size, m.device, m.dtype)

    @torch.no_grad()
    def step(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio (B, 1, n), any n -> codes (B, Q, frames completed by these samples)."""
        return self._encode(self.model._check_audio(audio, self.batch_size, allow_empty=True))

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """Codes (B, Q, 0 or 1) of the samples left over, padded as `encode` pads a clip's end; then reset."""
        m = self.model
        self.state.final = True
        codes = self._encode(
            torch.zeros(self.batch_size, m.config.audio_channels, 0, device=m.device, dtype=m.dtype)
        )
        self.reset()
        return codes

    def _encode(self, audio: torch.Tensor) -> torch.Tensor:
        m = self.model
        latents = m._encode_latents(audio, self.state)
        if latents.shape[-1] == 0:
            return torch.zeros(self.batch_size, self.num_quantizers, 0, device=m.device, dtype=torch.long)
        return m.quantizer.encode(latents, self.num_quantizers)
