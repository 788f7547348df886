"""Conversations in, model inputs out: chat template, tokenizer, audio placeholders, labels."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from .audio import SAMPLING_RATE, AudioLike, load_audio, save_audio
from .checkpoint import CheckpointError, read_json, resolve_checkpoint

CSM_CONTEXT = 2048  # backbone max_position_embeddings of csm-1b, used when no config.json says otherwise
PROCESSOR_FILES = ["*.json", "*.jinja"]
_NO_LIMIT = 10**12  # tokenizer configs write ~1e30 for "no maximum length"
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class CodecGeometry:
    """Mimi's encoder conv stack (kernel, stride, dilation per layer): it fixes the frames per clip."""

    kernel_sizes: tuple[int, ...] = (7, 3, 1, 8, 3, 1, 10, 3, 1, 12, 3, 1, 16, 3, 4)
    strides: tuple[int, ...] = (1, 1, 1, 4, 1, 1, 5, 1, 1, 6, 1, 1, 8, 1, 2)
    dilations: tuple[int, ...] = (1,) * 15
    causal: bool = True

    def num_frames(self, num_samples: int) -> int:
        """Codec frames (audio tokens) that `num_samples` samples encode to."""
        length = num_samples
        for kernel, stride, dilation in zip(self.kernel_sizes, self.strides, self.dilations, strict=True):
            span = (kernel - 1) * dilation + 1
            pad = kernel - stride
            # Pad the end so the last window is complete, then apply the conv.
            windows = math.ceil((length - span + pad) / stride + 1) - 1
            extra = windows * stride + kernel - pad - length
            left, right = (pad, extra) if self.causal else (pad - pad // 2, pad // 2 + extra)
            length = (length + left + right - dilation * (kernel - 1) - 1) // stride + 1
        return length


class BatchInputs(dict):
    """Model inputs by name (`input_ids`, `attention_mask`, ...), readable as attributes; `model(**inputs)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no input named {name!r}; have {', '.join(self)}") from None

    def to(
        self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> BatchInputs:
        """Move every tensor to `device`; cast only floating tensors (the audio) to `dtype`."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        out = BatchInputs()
        for name, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            out[name] = value
        return out


def _token_content(value: Any) -> str | None:
    """A special token from a tokenizer config: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _plain(value: Any) -> Any:
    """What a template may see: JSON-like data; anything else (arrays, tensors) as '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox, with the globals chat templates expect."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from None


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: text is not valid unicode ({e.reason} at character {e.start})") from None
    return text


def _is_clip(x: Any) -> bool:
    if isinstance(x, (str, os.PathLike, bytes, bytearray, np.ndarray, torch.Tensor)):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, (int, float)) for v in x)


def _flatten_clips(audio: Any) -> list[Any]:
    """One clip, a list of clips, or a list of lists of clips (one list per text) as a flat list."""
    if _is_clip(audio):
        return [audio]
    if not isinstance(audio, (list, tuple)):
        raise ValueError(
            f"audio must be a path, an array, a tensor or a list of them, got {type(audio).__name__}"
        )
    flat = []
    for item in audio:
        group = [item] if _is_clip(item) else item if isinstance(item, (list, tuple)) else [item]
        for clip in group:
            if not _is_clip(clip):
                raise ValueError(f"audio items must be paths, arrays or tensors, got {type(clip).__name__}")
            flat.append(clip)
    return flat


class CsmProcessor:
    """Turns CSM conversations (speaker turns with text and audio) into model inputs.

    Output matches transformers' CsmProcessor: left-padded `input_ids` and `attention_mask`, the audio of each
    conversation concatenated in `input_values` (B, 1, samples) with `input_values_cutoffs`, and `labels`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        *,
        bos_token: str = "<|begin_of_text|>",
        eos_token: str = "<|end_of_text|>",
        pad_token: str | None = None,
        unk_token: str | None = None,
        audio_token: str = "<|AUDIO|>",
        audio_eos_token: str = "<|audio_eos|>",
        sampling_rate: int = SAMPLING_RATE,
        max_length: int | None = CSM_CONTEXT,
        padding_side: str = "left",
        geometry: CodecGeometry = CodecGeometry(),
        tokenizer_config: dict | None = None,
        feature_extractor_config: dict | None = None,
    ):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token or eos_token,
        }
        if unk_token is not None:
            self.special_tokens["unk_token"] = unk_token
        self.audio_token, self.audio_eos_token = audio_token, audio_eos_token
        self.sampling_rate = sampling_rate
        self.max_length = max_length
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.geometry = geometry
        self.tokenizer_config = dict(tokenizer_config or {})
        self.feature_extractor_config = dict(feature_extractor_config or {})
        fe = self.feature_extractor_config
        if fe.get("feature_size", 1) != 1:
            raise ValueError(
                f"CSM takes mono audio, but the feature extractor has feature_size={fe['feature_size']}"
            )
        self.padding_value = float(fe.get("padding_value", 0.0))
        self.audio_padding_side = fe.get("padding_side", "right")
        self.chunk = (fe.get("chunk_length_s"), fe.get("overlap"))

        ids = {}
        for name, token in [
            *self.special_tokens.items(),
            ("audio_token", audio_token),
            ("audio_eos_token", audio_eos_token),
        ]:
            ids[name] = tokenizer.token_to_id(token)
            if ids[name] is None:
                raise CheckpointError(
                    f"the tokenizer has no {token!r} token ({name}); is this a CSM tokenizer?"
                )
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            ids["bos_token"],
            ids["eos_token"],
            ids["pad_token"],
        )
        self.audio_token_id, self.audio_eos_token_id = ids["audio_token"], ids["audio_eos_token"]
        self._template = _compile_template(chat_template) if chat_template else None

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, max_length: int | None = None
    ) -> CsmProcessor:
        """Load the tokenizer, chat template and audio settings saved by either library.

        max_length: the model's context in tokens; by default `max_position_embeddings` from the folder's
        config.json, else 2048 (csm-1b).
        """
        folder = resolve_checkpoint(path_or_repo_id, allow_patterns=PROCESSOR_FILES)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{folder} has no tokenizer.json; a CSM processor needs the fast tokenizer file"
            )
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{folder / 'tokenizer.json'} could not be read: {e}") from None
        optional = {name: read_json(folder, name) if (folder / name).is_file() else {} for name in (
            "tokenizer_config.json", "processor_config.json", "preprocessor_config.json", "chat_template.json",
            "config.json",
        )}  # fmt: skip
        tok_cfg, proc_cfg = optional["tokenizer_config.json"], optional["processor_config.json"]
        names = {
            k: _token_content(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        extra = tok_cfg.get("extra_special_tokens")
        extra = extra if isinstance(extra, dict) else {}
        _complete_tokenizer(tokenizer, tok_cfg, names)

        # Same precedence as the reference: processor config, chat_template.json, chat_template.jinja;
        # then, unlike the reference, the tokenizer's template.
        template = proc_cfg.get("chat_template") or optional["chat_template.json"].get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        template = _default_template(template if template is not None else tok_cfg.get("chat_template"))

        if max_length is None:
            max_length = optional["config.json"].get("max_position_embeddings", CSM_CONTEXT)
            model_max = tok_cfg.get("model_max_length")
            if isinstance(model_max, int) and model_max < min(max_length, _NO_LIMIT):
                max_length = model_max
        feature_cfg = proc_cfg.get("feature_extractor") or optional["preprocessor_config.json"]
        return cls(
            tokenizer,
            template,
            bos_token=names["bos_token"] or "<|begin_of_text|>",
            eos_token=names["eos_token"] or "<|end_of_text|>",
            pad_token=names["pad_token"],
            unk_token=names["unk_token"],
            audio_token=_token_content(tok_cfg.get("audio_token") or extra.get("audio_token")) or "<|AUDIO|>",
            audio_eos_token=_token_content(tok_cfg.get("audio_eos_token") or extra.get("audio_eos_token"))
            or "<|audio_eos|>",
            sampling_rate=int(feature_cfg.get("sampling_rate", SAMPLING_RATE)),
            max_length=max_length,
            padding_side=tok_cfg.get("padding_side", "left"),
            tokenizer_config=tok_cfg,
            feature_extractor_config=feature_cfg,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and processor_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.tokenizer_config,
            **self.special_tokens,
        }
        tok_cfg.pop("chat_template", None)
        tok_cfg["processor_class"] = "CsmProcessor"
        _write_json(folder / "tokenizer_config.json", tok_cfg)
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        feature = {
            "feature_extractor_type": "EncodecFeatureExtractor",
            "feature_size": 1,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": True,
            "chunk_length_s": None,
            "overlap": None,
            **self.feature_extractor_config,
            "sampling_rate": self.sampling_rate,
        }
        feature.pop("processor_class", None)
        _write_json(
            folder / "processor_config.json",
            {"feature_extractor": feature, "processor_class": "CsmProcessor"},
        )

    # ---------------------------------------------------------------- conversations

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        tokenize: bool = True,
        return_dict: bool = True,
        output_labels: bool = False,
        depth_decoder_labels_ratio: float = 1.0,
        chat_template: str | None = None,
    ) -> BatchInputs | torch.Tensor | str | list[str]:
        """Render one conversation or a batch of them and, by default, turn them into model inputs.

        A conversation is a list of turns `{"role": "0", "content": [{"type": "text", "text": ...},
        {"type": "audio", "audio": array | tensor | path}]}`. Every turn but the last is context and needs
        both its text and its audio; the last turn is the text to speak. An audio block may carry a
        `sampling_rate` for an array that is not at 24 kHz.
        """
        template = _compile_template(chat_template) if chat_template else self._template
        if template is None:
            raise ValueError(
                "this processor has no chat template; pass chat_template= or use processor(text)"
            )
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        rendered, clips = [], []
        for c, conv in enumerate(conversations):
            where = f"conversation {c}" if batched else "the conversation"
            messages, sources = self._check_conversation(conv, where)
            rendered.append(self._render(template, messages, where))
            if tokenize:
                clips.append([self._load(src, rate, f"{where}, turn {t}") for t, src, rate in sources])
        if not tokenize:
            return rendered if batched else rendered[0]
        ids = self._tokenize(rendered, clips, add_special_tokens=False)
        for c, row in enumerate(ids):
            if self.max_length is not None and len(row) > self.max_length:
                turn = self._overflow_turn(template, conversations[c], clips[c])
                name = f"conversation {c}" if batched else "the conversation"
                raise ValueError(
                    f"{name} is {len(row)} tokens (text and "
                    f"audio frames), more than the model's context of {self.max_length}; it overflows at turn "
                    f"{turn}. Drop early turns, shorten their audio or split the text."
                )
        inputs = self._encode(ids, clips, output_labels, depth_decoder_labels_ratio)
        return inputs if return_dict else inputs["input_ids"]

    def _check_conversation(
        self, conv: Any, where: str
    ) -> tuple[list[dict], list[tuple[int, Any, int | None]]]:
        """Validate turns; return template-ready messages and (turn, audio source, rate) per clip."""
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"{where} must be a non-empty list of turns, got {conv!r:.80}")
        messages, sources = [], []
        for t, turn in enumerate(conv):
            at = f"{where}, turn {t}"
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise ValueError(
                    f"{at}: a turn is a dict with 'role' (speaker id) and 'content', got {turn!r:.80}"
                )
            role = turn["role"]
            if isinstance(role, int) and not isinstance(role, bool) and role >= 0:
                role = str(role)
            if not isinstance(role, str) or not _DIGITS.fullmatch(role):
                raise ValueError(f"{at}: role must be a speaker id like 0 or '0', got {role!r}")
            content = turn["content"]
            if not isinstance(content, (list, tuple)):
                raise ValueError(
                    f"{at}: content must be a list of blocks like [{{'type': 'text', 'text': ...}}], "
                    f"got {type(content).__name__}"
                )
            texts, audios = [], []
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "text":
                    text = _check_text(block.get("text"), at)
                    for token in (self.audio_token, self.audio_eos_token):
                        if token in text:
                            raise ValueError(f"{at}: text contains the reserved token {token}")
                    texts.append(block)
                elif kind == "audio":
                    keys = [k for k in ("audio", "path", "url") if block.get(k) is not None]
                    if len(keys) != 1:
                        raise ValueError(
                            f"{at}: an audio block needs exactly one of 'audio', 'path' or 'url'"
                        )
                    audios.append(block)
                    sources.append((t, block[keys[0]], block.get("sampling_rate")))
                else:
                    raise ValueError(
                        f"{at}: content blocks must be {{'type': 'text'|'audio', ...}}, got {block!r:.80}"
                    )
            last = t == len(conv) - 1
            if len(texts) != 1 or len(audios) > 1 or (not last and not audios):
                need = (
                    "one text block and at most one audio block"
                    if last
                    else "one text block and one audio block"
                )
                role_of = "the last turn (to speak)" if last else "a context turn"
                raise ValueError(
                    f"{at}: {role_of} needs {need}; got {len(texts)} text and {len(audios)} audio"
                )
            extra = {k: v for k, v in turn.items() if k not in ("role", "content") and v is not None}
            messages.append(_plain({**extra, "role": role, "content": texts + audios}))
        return messages, sources

    def _render(self, template: jinja2.Template, messages: list[dict], where: str) -> str:
        try:
            return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                                   **self.special_tokens)  # fmt: skip
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template rejected {where}: {e}") from None

    def _load(self, source: AudioLike, sampling_rate: int | None, where: str) -> np.ndarray:
        try:
            return load_audio(source, sampling_rate=sampling_rate, target_rate=self.sampling_rate)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def _overflow_turn(self, template: jinja2.Template, conv: list[dict], clips: list[np.ndarray]) -> int:
        """The first turn at which the conversation no longer fits in the context."""
        messages, sources = self._check_conversation(conv, "the conversation")
        for t in range(len(messages)):
            used = [clip for (turn, _, _), clip in zip(sources, clips, strict=True) if turn <= t]
            prompt = self._render(template, messages[: t + 1], "the conversation")
            if len(self._tokenize([prompt], [used], add_special_tokens=False)[0]) > self.max_length:
                return t
        return len(messages) - 1

    # ---------------------------------------------------------------- text with audio placeholders

    def __call__(
        self,
        text: str | list[str],
        audio: AudioLike | list[AudioLike] | None = None,
        sampling_rate: int | None = None,
        output_labels: bool = False,
        depth_decoder_labels_ratio: float = 1.0,
        add_special_tokens: bool = False,
    ) -> BatchInputs:
        """Tokenize prompts like "[0]Hello<|AUDIO|>", one audio clip per `<|AUDIO|>` in order.

        sampling_rate: the rate of array clips (default 24 kHz); files are resampled from their own rate.
        """
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError("text must be a string or a non-empty list of strings")
        texts = [_check_text(t, f"text {i}") for i, t in enumerate(texts)]
        flat = [] if audio is None else _flatten_clips(audio)
        wanted = [t.count(self.audio_token) for t in texts]
        if sum(wanted) != len(flat):
            raise ValueError(
                f"the text has {sum(wanted)} {self.audio_token} placeholder(s) (per text: {wanted}) but "
                f"{len(flat)} audio clip(s) were given; pass one clip per placeholder, in order"
            )
        loaded = [self._load(clip, sampling_rate, f"audio {i}") for i, clip in enumerate(flat)]
        clips, start = [], 0
        for n in wanted:
            clips.append(loaded[start : start + n])
            start += n
        ids = self._tokenize(texts, clips, add_special_tokens)
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"text {i} is empty: there is nothing to tokenize")
            if self.max_length is not None and len(row) > self.max_length:
                raise ValueError(
                    f"text {i} is {len(row)} tokens (text and audio frames), more than the model's context of "
                    f"{self.max_length}; shorten the text or its audio"
                )
        return self._encode(ids, clips, output_labels, depth_decoder_labels_ratio)

    def num_audio_frames(self, num_samples: int) -> int:
        """Audio tokens (codec frames) a clip of `num_samples` samples becomes."""
        return self.geometry.num_frames(num_samples)

    def _expand(self, text: str, clips: list[np.ndarray]) -> str:
        """Repeat each audio placeholder once per codec frame of its clip."""
        parts = text.split(self.audio_token)
        out = [parts[0]]
        for clip, part in zip(clips, parts[1:], strict=True):
            out += [self.audio_token * self.num_audio_frames(clip.shape[-1]), part]
        return "".join(out)

    def _tokenize(
        self, texts: list[str], clips: list[list[np.ndarray]], add_special_tokens: bool
    ) -> list[list[int]]:
        expanded = [self._expand(t, c) for t, c in zip(texts, clips, strict=True)]
        return [e.ids for e in self.tokenizer.encode_batch(expanded, add_special_tokens=add_special_tokens)]

    def _encode(
        self,
        ids: list[list[int]],
        clips: list[list[np.ndarray]],
        output_labels: bool,
        depth_decoder_labels_ratio: float,
    ) -> BatchInputs:
        """Pad token ids and audio into tensors, and add labels when asked."""
        if not 0.0 <= depth_decoder_labels_ratio <= 1.0:
            raise ValueError(
                f"depth_decoder_labels_ratio must be in [0, 1], got {depth_decoder_labels_ratio}"
            )
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, row in enumerate(ids):
            span = slice(width - len(row), width) if self.padding_side == "left" else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, span] = 1
        out = BatchInputs(input_ids=input_ids, attention_mask=attention_mask)
        if any(clips):
            out["input_values"], out["input_values_cutoffs"] = self._audio_values(clips)
        if output_labels:
            out["labels"] = self._labels(input_ids, depth_decoder_labels_ratio)
        return out

    def _audio_values(self, clips: list[list[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's clips end to end, padded: (B, 1, samples), and cumulative clip ends (B, max clips), -1 padded."""
        rows = [np.concatenate(c) if c else np.zeros(0, dtype=np.float32) for c in clips]
        width = max(len(r) for r in rows)
        chunk_s, overlap = self.chunk
        if chunk_s is not None and overlap is not None:  # a chunked extractor pads to whole chunks
            chunk = int(chunk_s * self.sampling_rate)
            step = max(1, int((1.0 - overlap) * chunk))
            width = (math.ceil(width / step) - 1) * step + chunk
        values = torch.full((len(rows), 1, width), self.padding_value, dtype=torch.float32)
        for b, row in enumerate(rows):
            span = (
                slice(0, len(row)) if self.audio_padding_side == "right" else slice(width - len(row), width)
            )
            values[b, 0, span] = torch.from_numpy(row)
        most = max(len(c) for c in clips)
        cutoffs = torch.full((len(rows), max(most, 1)), -1, dtype=torch.long)
        for b, c in enumerate(clips):
            if c:
                cutoffs[b, : len(c)] = torch.tensor([x.shape[-1] for x in c]).cumsum(0)
        return values, cutoffs

    def _labels(self, input_ids: torch.Tensor, depth_decoder_labels_ratio: float) -> torch.Tensor:
        """Audio and audio-eos positions keep their id, others -100; a random share of frames -101 (backbone only)."""
        is_audio = input_ids == self.audio_token_id
        frames = is_audio.nonzero()  # (N, 2)
        # Same draw as the reference, so a seeded run gives the same labels.
        skipped = frames[
            torch.randperm(frames.shape[0])[: int(frames.shape[0] * (1 - depth_decoder_labels_ratio))]
        ]
        labels = torch.where(is_audio | (input_ids == self.audio_eos_token_id), input_ids, -100)
        labels[skipped[:, 0], skipped[:, 1]] = -101
        return labels

    # ---------------------------------------------------------------- decoding and audio out

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Token ids back to text."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_audio(self, audio: Any, path_or_paths: str | os.PathLike | list[str | os.PathLike]) -> None:
        """Write generated audio at the processor's sampling rate; the format follows the extension."""
        save_audio(audio, path_or_paths, sampling_rate=self.sampling_rate)


def _default_template(template: Any) -> str | None:
    """A template from a config: a string, a {name: template} dict or a [{name, template}] list."""
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def _complete_tokenizer(tokenizer: Tokenizer, config: dict, names: dict[str, str | None]) -> None:
    """Add the tokens tokenizer_config.json names but tokenizer.json lacks, as transformers does.

    (transformers ignores the config's add_bos_token/add_eos_token when tokenizer.json exists.)
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = []
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("content") not in vocab:
            keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
            missing.append(AddedToken(entry["content"], **{k: entry[k] for k in keys if k in entry}))
    extra = config.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    for token in [*names.values(), *(config.get("additional_special_tokens") or []), *extra]:
        token = _token_content(token)
        if token and token not in vocab and all(token != t.content for t in missing):
            missing.append(AddedToken(token, special=True, normalized=False))
    if missing:
        tokenizer.add_tokens(missing)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
