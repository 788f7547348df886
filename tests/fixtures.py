"""Tiny CSM processor files written by the reference (transformers), for processor, generation and pipeline tests.

    from fixtures import write_reference_processor, AUDIO_ID
    write_reference_processor(tmp_path)            # tokenizer.json, tokenizer_config.json, chat template, ...
    processor = csm.CsmProcessor.from_pretrained(tmp_path)

The token ids match the tiny model in `reference_models.py` (text vocab 300, bos 1, audio 2, audio eos 3), so a
processor and a tiny model written to the same folder work together.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEXT_VOCAB_SIZE = 300
EOS_ID, BOS_ID, AUDIO_ID, AUDIO_EOS_ID = 0, 1, 2, 3  # also the pad token: eos, as in csm-1b
SPECIAL_TOKENS = ["<|end_of_text|>", "<|begin_of_text|>", "<|AUDIO|>", "<|audio_eos|>"]

# The chat template sesame/csm-1b ships (written by transformers' CSM conversion script).
CHAT_TEMPLATE = (
    "\n{%- for message in messages %}\n    {#-- Validate role is a stringified integer --#}\n"
    "    {%- if not message['role'] is string or not message['role'].isdigit() %}\n"
    "        {{- raise_exception(\"The role must be an integer or a stringified integer (e.g. '0') designating the"
    ' speaker id") }}\n    {%- endif %}\n\n    {#-- Validate content is a list --#}\n'
    "    {%- set content = message['content'] %}\n    {%- if content is not iterable or content is string %}\n"
    '        {{- raise_exception("The content must be a list") }}\n    {%- endif %}\n\n'
    "    {#-- Collect content types --#}\n    {%- set content_types = content | map(attribute='type') | list %}\n"
    "    {%- set is_last = loop.last %}\n\n    {#-- Last message validation --#}\n    {%- if is_last %}\n"
    "        {%- if 'text' not in content_types %}\n"
    "            {{- raise_exception(\"The last message must include one item of type 'text'\") }}\n"
    "        {%- elif (content_types | select('equalto', 'text') | list | length > 1) or (content_types |"
    " select('equalto', 'audio') | list | length > 1) %}\n"
    "            {{- raise_exception(\"At most two items are allowed in the last message: one 'text' and one"
    " 'audio'\") }}\n        {%- endif %}\n\n    {#-- All other messages validation --#}\n    {%- else %}\n"
    "        {%- if content_types | select('equalto', 'text') | list | length != 1\n"
    "              or content_types | select('equalto', 'audio') | list | length != 1 %}\n"
    "            {{- raise_exception(\"Each message (except the last) must contain exactly one 'text' and one"
    " 'audio' item\") }}\n"
    "        {%- elif content_types | reject('in', ['text', 'audio']) | list | length > 0 %}\n"
    "            {{- raise_exception(\"Only 'text' and 'audio' types are allowed in content\") }}\n"
    "        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n\n{%- for message in messages %}\n"
    "    {{- bos_token }}\n    {{- '[' + message['role'] + ']' }}\n    {{- message['content'][0]['text'] }}\n"
    "    {{- eos_token }}\n    {%- if message['content']|length > 1 %}\n"
    "        {{- '<|AUDIO|><|audio_eos|>' }}\n    {%- endif %}\n{%- endfor %}\n"
)

# Llama-3's pre-tokenizer split.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_CORPUS = [
    "This is a test sentence. Hello from Sesame! How are you doing today?",
    "The quick brown fox jumps over the lazy dog. I think that is the one we wanted.",
    "Speech models speak; we listen, and then they answer in the voice of the speaker.",
]


def build_tokenizer() -> Tokenizer:
    """A Llama-3-style byte-level BPE with 300 ids; the four CSM special tokens are ids 0-3."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    assert tokenizer.get_vocab_size() == TEXT_VOCAB_SIZE, tokenizer.get_vocab_size()
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(  # what csm-1b adds with add_special_tokens=True
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1",
        special_tokens=[(bos, BOS_ID), (eos, EOS_ID)],
    )
    return tokenizer


def reference_processor():
    """transformers' CsmProcessor over the tiny tokenizer, with csm-1b's chat template and 24 kHz audio."""
    from transformers import CsmProcessor, EncodecFeatureExtractor, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )
    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0)
    return CsmProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def write_reference_processor(path: str | Path) -> None:
    """Save the reference processor's files (tokenizer, chat template, processor config) into `path`."""
    reference_processor().save_pretrained(str(path))
