"""ModelOutput: the result type of every model call, read the way transformers' outputs are read."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields, is_dataclass
from typing import Any


class ModelOutput(OrderedDict):
    """Base of the output dataclasses: an OrderedDict of the fields that are set (not None), in declaration
    order, read by attribute (`out.logits`), by name (`out["logits"]`), by position (`out[0]`,
    `out.to_tuple()`) or as a dict (`isinstance(out, dict)`, `dict(out)`, `out.keys()`), as transformers'
    ModelOutput is.

    A field left at None is not a key, so `out[0]` is the first field that was computed (the loss when
    there is one, else the logits). Subclasses are declared with `@dataclass`.
    """

    def __post_init__(self) -> None:
        self._sync()

    def _sync(self) -> None:
        """The dict's entries: the set fields, in declaration order (a field set later keeps its place)."""
        OrderedDict.clear(self)
        for f in fields(self):
            value = self.__dict__.get(f.name)
            if value is not None:
                OrderedDict.__setitem__(self, f.name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in self.__dataclass_fields__:
            self._sync()

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.__dataclass_fields__:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self:
                raise KeyError(f"{type(self).__name__} has no {key!r}; it has {', '.join(self.keys())}")
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} is changed by setting its fields, not by dict methods")

    __delitem__ = setdefault = pop = popitem = update = clear = _refuse

    def __reduce__(self):
        if not is_dataclass(self):
            return super().__reduce__()
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self) -> tuple:
        """The set fields' values, in order."""
        return tuple(self.values())

    def returned(self, return_dict: bool | None) -> ModelOutput | tuple:
        """What a call given `return_dict` returns: this object (None or True), or its tuple (False)."""
        return self if return_dict is None or return_dict else self.to_tuple()
