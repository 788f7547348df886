"""What a request that cannot be parsed is told: what is wrong, where (`param`, the field's path as OpenAI's
errors give it: `context.0.audio`) and how to fix it, in place of pydantic's and FastAPI's generic texts."""

from __future__ import annotations

import json
import typing

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from .schemas import DialogueRequest, SpeechRequest

BODY_MODELS = {"/v1/audio/speech": SpeechRequest, "/v1/audio/dialogue": DialogueRequest}
PARSE_FAILED = "There was an error parsing the body"  # FastAPI's words for any exception while reading a body


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `list[X] | None` or `str | X`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _locate(model: type[BaseModel] | None, loc: tuple) -> tuple[list[str], object | None]:
    """The field path of a pydantic error location, without the union branch names pydantic puts in it
    (`voice.str`, `voice.VoiceRef.id.int`), and the innermost field's FieldInfo."""
    path, field, current, keyed = [], None, model, False
    for part in loc:
        if isinstance(part, int) or keyed:  # a list index or a dict key
            path.append(str(part))
            keyed = False
        elif current is not None and part in current.model_fields:
            field = current.model_fields[part]
            path.append(part)
            keyed = typing.get_origin(field.annotation) is dict
            current = None if keyed else _model_in(field.annotation)
        elif field is not None:  # a union's branch: a model's name (its fields follow), or `str`, `int`, ...
            nested = _model_in(field.annotation)
            current = nested if nested is not None and part == nested.__name__ else None
        else:
            path.append(str(part))
    return path, field


def _shown(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_message(
    e: RequestValidationError, path: str, content_type: str | None
) -> tuple[str, str | None]:
    """The message and `param` for a body or form that does not fit its schema."""
    errors = e.errors()
    # The deepest error first: of a union's branches, the one the input went furthest into is the one meant
    # (`{"id": 5.5}` is a voice object with a bad id, not a string that is not a string).
    first = max(errors, key=lambda x: len(x.get("loc", ()))) if errors else {}
    loc = tuple(x for x in first.get("loc", ()) if x != "body")
    kind = first.get("type", "")
    if kind == "json_invalid":
        at = first.get("loc", ("body", None))[-1]
        where = f" at character {at}" if isinstance(at, int) else ""
        return f"the body must be JSON: {first.get('ctx', {}).get('error', 'invalid')}{where}", None
    model = BODY_MODELS.get(path)
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        given = (content_type or "").split(";")[0].strip()
        if not given.endswith("json"):
            got = f"`{given}`" if given else "none"
            return (
                "the body must be JSON sent with `Content-Type: application/json` (the request's Content-Type: "
                f"{got}); with curl, add -H 'Content-Type: application/json'",
                None,
            )
        return (
            f"the body must be a JSON object with the request's fields, got {_shown(first.get('input'))}",
            None,
        )
    names, field = _locate(model, loc)
    param = ".".join(names) or None
    if kind == "extra_forbidden":
        parent, _ = _locate(model, loc[:-1])
        known = ", ".join(_fields_at(model, loc[:-1]))
        place = f" in {'.'.join(parent)}" if parent else ""
        param = ".".join([*parent, str(loc[-1])])
        return f"unknown field {str(loc[-1])!r}{place}; the fields are: {known}", param
    if kind == "missing":
        return f"{param} is required", param
    # Errors from every branch of a union (`voice`: a string, a number or {"id": ...}) share one param.
    branches = [x for x in errors if _locate(model, tuple(y for y in x["loc"] if y != "body"))[0] == names]
    if len(branches) > 1 and field is not None and field.description:
        return f"{param} must be {field.description}; got {_shown(first.get('input'))}", param
    message = first.get("msg", "invalid value")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        message += f", got {_shown(first.get('input'))}"
    return f"{param or 'body'}: {message}", param


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    current = model
    for part in loc:
        if current is None:
            break
        if isinstance(part, str) and part in current.model_fields:
            current = _model_in(current.model_fields[part].annotation)
    return list(current.model_fields) if current is not None else []


def parse_failure_message(cause: BaseException | None) -> str:
    """FastAPI's "There was an error parsing the body", said with its cause."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body must be JSON in UTF-8: byte 0x{cause.object[cause.start]:02x} at position {cause.start} "
            "is not UTF-8"
        )
    if cause is not None:
        return f"could not read the body ({type(cause).__name__}): send a complete JSON or multipart body"
    return "could not read the body: send a complete JSON or multipart body"
