"""ModelOutput: the result type of every model call, read the way transformers' outputs are read."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class ModelOutput:
    """Base of the output dataclasses: the fields that are set (not None), in declaration order, read by
    attribute (`out.logits`), by name (`out["logits"]`) or by position (`out[0]`, `out.to_tuple()`).

    A field left at None does not exist for name or position lookups, so `out[0]` is the first field
    that was computed (the loss when there is one, else the logits), as in transformers.
    Subclasses are declared with `@dataclass`.
    """

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple:
        """The set fields' values, in order."""
        return tuple(self.values())

    def returned(self, return_dict: bool | None) -> ModelOutput | tuple:
        """What a call given `return_dict` returns: this object (None or True), or its tuple (False)."""
        return self if return_dict is None or return_dict else self.to_tuple()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no {key!r}; it has {', '.join(self.keys())}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())
