"""What callers read on transformers' configs beyond their fields, shared by CSM's and Mimi's configs (a module
of its own, so that csm.mimi's config does not import csm.config, which names Mimi's config)."""

from __future__ import annotations

from typing import Any


class ReferenceConfigMethods:
    """`is_encoder_decoder`, `get_text_config()`, `sub_configs` and `to_diff_dict()`, as transformers' configs
    have them."""

    is_encoder_decoder = False
    sub_configs: dict[str, type] = {}  # noqa: RUF012 (read-only; CsmConfig names its nested configs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None):
        """This config: CSM's text settings are its own, not a nested text config (as in the reference)."""
        return self

    def to_diff_dict(self) -> dict[str, Any]:
        """The reference diffs against a bare PreTrainedConfig, which has none of these models' fields,
        so every field is kept: the same as `to_dict()`."""
        return self.to_dict()
