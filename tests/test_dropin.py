"""The reference's public API at its edges: outputs, padding, long positions, loading arguments, generate's
options. Each test runs the reference (transformers) and ours on the same random weights."""

import pytest
import torch
from reference_models import BOS, PAD, TEXT_VOCAB

from csm import CsmForConditionalGeneration


@pytest.fixture(scope="module")
def pair(csm_checkpoint):
    path, ref = csm_checkpoint
    return CsmForConditionalGeneration.from_pretrained(path), ref


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def padded_ids(lengths, T, side):
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, span] = torch.randint(4, TEXT_VOCAB, (n,))
        ids[i, span.start] = BOS
        mask[i, span] = 1
    return ids, mask


# ---- forward outputs ------------------------------------------------------------------------------


def test_outputs_read_like_the_reference_by_name_position_and_tuple(pair):
    ours, ref = pair
    codes = torch.randint(0, 2048, (2, 6, 8))
    labels = torch.randint(0, 2048, (2, 6, 8))
    with torch.no_grad():
        for kwargs in ({}, {"labels": labels}):
            a, b = ours(input_ids=codes, **kwargs), ref(input_ids=codes, use_cache=False, **kwargs)
            assert list(a.keys()) == list(b.keys())
            for i, (x, y) in enumerate(zip(a.to_tuple(), b.to_tuple(), strict=True)):
                close(x, y)
                close(a[i], b[i])
            close(a["logits"], b["logits"])
            close(a[0], b[0])  # the loss when there are labels, else the logits
            as_tuple = ours(input_ids=codes, return_dict=False, **kwargs)
            assert isinstance(as_tuple, tuple) and len(as_tuple) == len(b.to_tuple())
            close(as_tuple[0], b[0])
    with pytest.raises(KeyError, match="loss"):
        ours(input_ids=codes)["loss"]


def test_hidden_states_and_position_ids_match_reference(pair):
    ours, ref = pair
    codes = torch.randint(0, 2048, (2, 7, 8))
    labels = torch.randint(0, 2048, (2, 7, 8))
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        a = ours(input_ids=codes, labels=labels, output_hidden_states=True, position_ids=positions)
        b = ref(
            input_ids=codes, labels=labels, output_hidden_states=True, position_ids=positions, use_cache=False
        )
    close(a.logits, b.logits)
    close(a.loss, b.loss)
    for name in ("hidden_states", "depth_decoder_hidden_states"):
        assert len(getattr(a, name)) == len(getattr(b, name)) == 3
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            close(x, y)


def test_forward_past_max_position_embeddings_matches_reference(pair):
    ours, ref = pair
    limit = ours.config.max_position_embeddings
    codes = torch.randint(0, 2048, (1, 3, 8))
    positions = torch.arange(limit - 1, limit + 2)[None]  # the last two past the table
    with torch.no_grad():
        close(
            ours(input_ids=codes, position_ids=positions).logits,
            ref(input_ids=codes, position_ids=positions, use_cache=False).logits,
        )
        # and the normal path is unchanged afterwards
        close(ours(input_ids=codes).logits, ref(input_ids=codes, use_cache=False).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_positions_give_the_reference_logits_and_loss(pair, side):
    ours, ref = pair
    ids, mask = padded_ids([9, 5, 2], 9, side)
    labels = torch.randint(0, 2048, (3, 9, 8))  # every position labelled: padded queries are scored too
    with torch.no_grad():
        a = ours(inputs_embeds=ref.embed_text_tokens(ids), attention_mask=mask, labels=labels)
        b = ref(inputs_embeds=ref.embed_text_tokens(ids), attention_mask=mask, labels=labels, use_cache=False)
    close(a.logits, b.logits)
    close(a.loss, b.loss, 1e-5)
