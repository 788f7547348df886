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
_OPEN_END = "<|csm:continue-final-message|>"  # marks where continue_final_message cuts the rendered text


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


class ConversationError(ValueError, jinja2.exceptions.TemplateError):
    """A conversation the chat template cannot take. A ValueError with our message, and jinja2's
    TemplateError, which the reference raises for the same conversations."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)  # jinja2's `message` reads args[0]


class CsmTokenizer:
    """The processor's text tokenizer, called as the reference's fast tokenizer is: `tokenizer(text)`,
    `encode`, `decode`, `batch_decode`, `convert_tokens_to_ids`, the special tokens and their ids.
    `backend_tokenizer` is the `tokenizers.Tokenizer` underneath."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, backend: Tokenizer, special_tokens: dict[str, str], padding_side: str = "left"):
        self.backend_tokenizer = backend
        self.padding_side = padding_side
        for name, token in special_tokens.items():
            setattr(self, name, token)
            setattr(self, name + "_id", backend.token_to_id(token))

    @property
    def vocab_size(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text."""
        return self.backend_tokenizer.encode(
            _check_text(text, "text"), add_special_tokens=add_special_tokens
        ).ids

    def __call__(
        self,
        text: str | list[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchInputs:
        """`input_ids` and `attention_mask` of a text or a batch of texts (padded on `padding_side`)."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens) for t in texts]
        out = _pad_ids(ids, self.pad_token_id, self.padding_side, padding, max_length, return_tensors)
        if isinstance(text, str) and return_tensors is None:
            out = BatchInputs({k: v[0] for k, v in out.items()})
        return out

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Token ids (a list, or a 1-D tensor or array) back to text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]


PADDING = (True, False, "longest", "max_length", "do_not_pad")
RETURN_TENSORS = ("pt", "np", None)


def _check_padding(padding: Any, return_tensors: Any) -> None:
    if padding not in PADDING:
        raise ValueError(
            f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}"
        )
    if return_tensors not in RETURN_TENSORS:
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")


def _check_processor_tensors(return_tensors: Any) -> None:
    if return_tensors != "pt":
        raise ValueError(
            f"CsmProcessor returns PyTorch tensors only (return_tensors='pt', as the reference); got {return_tensors!r}"
        )


def _pad_ids(
    ids: list[list[int]],
    pad_id: int,
    side: str,
    padding: bool | str,
    max_length: int | None,
    return_tensors: str | None,
) -> BatchInputs:
    """Rows of ids padded as the reference's tokenizer pads them, as tensors ("pt"), arrays ("np") or
    lists (None)."""
    _check_padding(padding, return_tensors)
    longest = max(len(row) for row in ids)
    if padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if longest > max_length:
            raise ValueError(
                f"a row is {longest} tokens, more than max_length={max_length}; truncation would cut audio "
                "placeholders, so it is not done: raise max_length or shorten the input"
            )
        width = max_length
    elif padding in (True, "longest"):
        width = longest
    else:
        width = None
    rows, masks = [], []
    for row in ids:
        fill = [] if width is None else [pad_id] * (width - len(row))
        ones = [1] * len(row)
        rows.append(fill + row if side == "left" else row + fill)
        masks.append([0] * len(fill) + ones if side == "left" else ones + [0] * len(fill))
    if return_tensors is not None and len({len(r) for r in rows}) > 1:
        raise ValueError(
            f"rows have different lengths and padding={padding!r}: they cannot make one tensor; "
            "use padding=True or return_tensors=None"
        )
    out = BatchInputs(input_ids=rows, attention_mask=masks)
    if return_tensors == "pt":
        out = BatchInputs({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
    elif return_tensors == "np":
        out = BatchInputs({k: np.array(v, dtype=np.int64) for k, v in out.items()})
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


TEMPLATE_SECONDS = 2.0  # a chat template's render may take this long (a planted template may loop for ever)
TEMPLATE_MAX_CHARS = 1 << 21  # and make this much text, or any one string or list this long


class TemplateLimit(jinja2.exceptions.SecurityError):
    """A chat template passed its time budget or output cap."""


def _too_big(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > TEMPLATE_MAX_CHARS


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > TEMPLATE_MAX_CHARS:
        raise TemplateLimit(
            f"the chat template made a value of {len(value)} items, over {TEMPLATE_MAX_CHARS}"
        )
    return value


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with sizes bounded: `*` and `**` that would make a string or list (or a
    number) past TEMPLATE_MAX_CHARS are refused before they are computed, as are calls given such a number
    (`'x'.ljust(10**10)`); `_render_bounded` adds the time budget and the output cap."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if (
                isinstance(seq, (str, list, tuple))
                and isinstance(n, int)
                and len(seq) * n > TEMPLATE_MAX_CHARS
            ):
                raise TemplateLimit(
                    f"the chat template repeats a value {n} times, past {TEMPLATE_MAX_CHARS} items"
                )
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimit("the chat template raises a number to a power over 64")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise TemplateLimit(f"the chat template passes a number over {TEMPLATE_MAX_CHARS} to a call")
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _bounded_filter(f):
    import functools

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise TemplateLimit(f"the chat template passes a number over {TEMPLATE_MAX_CHARS} to a filter")
        return _check_size(f(*args, **kwargs))

    return bounded


def _render_bounded(template: jinja2.Template, **variables) -> str:
    """`template.render(**variables)` within TEMPLATE_SECONDS and TEMPLATE_MAX_CHARS of output: the template's
    own code (jinja compiles it to Python in "<template>") is traced, so that a loop that makes no output is
    stopped too. Where a tracer is installed already (a debugger, coverage), only the size limits apply."""
    import sys
    import time

    deadline = time.monotonic() + TEMPLATE_SECONDS
    ticks = [0]

    def local(frame, event, arg):
        ticks[0] += 1
        if ticks[0] % 512 == 0 and time.monotonic() > deadline:
            raise TemplateLimit(f"the chat template ran past its {TEMPLATE_SECONDS:g} s budget")
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    traced = sys.gettrace() is None
    if traced:
        sys.settrace(calls)
    try:
        out, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise TemplateLimit(f"the chat template made more than {TEMPLATE_MAX_CHARS} characters")
            out.append(piece)
        return "".join(out)
    finally:
        if traced:
            sys.settrace(None)


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

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
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
        if isinstance(tokenizer, CsmTokenizer):
            tokenizer = tokenizer.backend_tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
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
        # Alone, the reference's tokenizer pads as its config says (right by default); the processor
        # pads on `padding_side` (left by default).
        self.tokenizer = CsmTokenizer(
            tokenizer,
            {**self.special_tokens, "audio_token": audio_token, "audio_eos_token": audio_eos_token},
            (tokenizer_config or {}).get("padding_side", "right"),
        )
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
        self.tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
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

    @property
    def model_input_names(self) -> list[str]:
        """The names of what `__call__` returns that the model reads, as the reference's processor lists them."""
        return [*self.tokenizer.model_input_names, "input_values", "input_values_cutoffs"]

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tokenize: bool = False,
        return_dict: bool = False,
        output_labels: bool = False,
        depth_decoder_labels_ratio: float = 1.0,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        padding: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchInputs | torch.Tensor | str | list[str]:
        """Render one conversation or a batch of them; with `tokenize=True`, turn them into model inputs.

        A conversation is a list of turns `{"role": "0", "content": [{"type": "text", "text": ...},
        {"type": "audio", "audio": array | tensor | path}]}`. Every turn but the last is context and needs
        both its text and its audio; the last turn is the text to speak. An audio block may carry a
        `sampling_rate` for an array that is not at 24 kHz; when not tokenizing it needs no audio at all.

        As the reference: the rendered text by default; with tokenize=True the `input_ids` tensor, or with
        return_dict=True every input (`input_ids`, `attention_mask`, `input_values`, ...).
        continue_final_message=True leaves the last turn open (no end-of-text after its text);
        padding ("max_length" pads to max_length) and return_tensors ("pt" only) as in `__call__`.
        A conversation the template cannot take raises ConversationError (a ValueError and jinja2's
        TemplateError).
        """
        template = _compile_template(chat_template) if chat_template else self._template
        if template is None:
            raise ValueError(
                "this processor has no chat template; pass chat_template= or use processor(text)"
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set")
        _check_padding(padding, None)
        if tokenize:
            _check_processor_tensors(return_tensors)
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        rendered, clips = [], []
        for c, conv in enumerate(conversations):
            where = f"conversation {c}" if batched else "the conversation"
            try:
                messages, sources = self._check_conversation(conv, where, need_audio=tokenize)
            except ValueError as e:
                raise e if isinstance(e, ConversationError) else ConversationError(str(e)) from None
            options = dict(add_generation_prompt=add_generation_prompt, open_end=continue_final_message)
            rendered.append(self._render(template, messages, where, **options))
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
        inputs = self._encode(ids, clips, output_labels, depth_decoder_labels_ratio, padding, max_length)
        return inputs if return_dict else inputs["input_ids"]

    def _check_conversation(
        self, conv: Any, where: str, need_audio: bool = True
    ) -> tuple[list[dict], list[tuple[int, Any, int | None]]]:
        """Validate turns; return template-ready messages and (turn, audio source, rate) per clip.
        Without `need_audio` (rendering only), an audio block may carry no audio, as the reference allows."""
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
                    if len(keys) > 1 or (need_audio and not keys):
                        raise ValueError(
                            f"{at}: an audio block needs exactly one of 'audio', 'path' or 'url'"
                        )
                    audios.append(block)
                    if keys:
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

    def _render(
        self,
        template: jinja2.Template,
        messages: list[dict],
        where: str,
        add_generation_prompt: bool = False,
        open_end: bool = False,
    ) -> str:
        """Render messages; with `open_end`, cut right after the last turn's text (continue_final_message)."""
        if open_end:
            messages = [*messages[:-1], dict(messages[-1])]
            content = [dict(block) for block in messages[-1]["content"]]
            text = next(block for block in reversed(content) if block.get("type") == "text")
            text["text"] += _OPEN_END
            messages[-1]["content"] = content
        try:
            out = _render_bounded(template, messages=messages, tools=None, documents=None,
                                  add_generation_prompt=add_generation_prompt, **self.special_tokens)  # fmt: skip
        except jinja2.exceptions.TemplateError as e:
            raise ConversationError(f"the chat template rejected {where}: {e}") from None
        if open_end:
            if _OPEN_END not in out:
                raise ConversationError(
                    f"the chat template drops the last turn's text of {where}: cannot continue it"
                )
            out = out[: out.rindex(_OPEN_END)]
        return out

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
        padding: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchInputs:
        """Tokenize prompts like "[0]Hello<|AUDIO|>", one audio clip per `<|AUDIO|>` in order.

        sampling_rate: the rate of array clips (default 24 kHz); files are resampled from their own rate.
        padding: True / "longest" (default), "max_length" (to max_length), False / "do_not_pad";
        return_tensors: "pt" only, as the reference's CsmProcessor.
        """
        _check_padding(padding, None)
        _check_processor_tensors(return_tensors)
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
        return self._encode(ids, clips, output_labels, depth_decoder_labels_ratio, padding, max_length)

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
        encoded = self.tokenizer.backend_tokenizer.encode_batch(
            expanded, add_special_tokens=add_special_tokens
        )
        return [e.ids for e in encoded]

    def _encode(
        self,
        ids: list[list[int]],
        clips: list[list[np.ndarray]],
        output_labels: bool,
        depth_decoder_labels_ratio: float,
        padding: bool | str = True,
        max_length: int | None = None,
    ) -> BatchInputs:
        """Pad token ids and audio into tensors, and add labels when asked."""
        if not 0.0 <= depth_decoder_labels_ratio <= 1.0:
            raise ValueError(
                f"depth_decoder_labels_ratio must be in [0, 1], got {depth_decoder_labels_ratio}"
            )
        out = _pad_ids(ids, self.pad_token_id, self.padding_side, padding, max_length, "pt")  # (B, T)
        if any(clips):
            out["input_values"], out["input_values_cutoffs"] = self._audio_values(clips)
        if output_labels:
            out["labels"] = self._labels(out["input_ids"], depth_decoder_labels_ratio)
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
