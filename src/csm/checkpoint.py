"""Finding, reading and writing checkpoints: local folders, hub repo ids, sharded safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, partial, or does not match the model."""


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder for a folder path or a hub repo id (cached copies work offline)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    name = str(path_or_repo_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"no checkpoint folder at {name!r}, and it is not a hub repo id like 'sesame/csm-1b'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except Exception as e:
        raise CheckpointError(
            f"could not fetch {name!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "It is not in the local cache either. Check the name and your network; sesame/csm-1b is gated: "
            "accept its terms on the hub and run `hf auth login`."
        ) from None


def best_device() -> torch.device:
    """cuda, then mps, then cpu: where device_map="auto" puts the model."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def loading_device(device=None, device_map=None) -> torch.device | None:
    """The one device to load onto from `device` or the reference's `device_map`: "cuda", "cpu", "mps",
    "cuda:1", a GPU index, a torch.device, "auto" (the best device here) or a dict sending every module
    to the same device ({"": "cuda"}). A map that splits the model over devices is refused."""
    if device_map is None:
        return None if device is None else torch.device(device)
    if isinstance(device_map, dict):
        targets = set(device_map.values())
        if len(targets) != 1:
            raise ValueError(
                f"device_map sends modules to {sorted(map(str, targets))}: this model loads onto one device; "
                'pass device_map="cuda" (or "auto", "cpu", a device)'
            )
        device_map = targets.pop()
    if device_map == "auto":
        chosen = best_device()
    elif isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        try:
            chosen = torch.device(device_map)
        except (RuntimeError, ValueError):
            chosen = None
        if chosen is None:
            raise ValueError(
                f"device_map {device_map!r} is not a device: use 'auto', 'cuda', 'cpu', 'mps', 'cuda:N' or a GPU index"
            )
    else:
        raise ValueError(
            f"device_map must be a device name, index or 'auto', got {type(device_map).__name__}"
        )
    if device is not None and torch.device(device) != chosen:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device_map={device_map!r} asks for CUDA, which this machine lacks; use 'auto' or 'cpu'"
        )
    return chosen


def loading_dtype(dtype=None, torch_dtype=None):
    """`dtype`, or its older name `torch_dtype` (the reference accepts both)."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    return dtype if dtype is not None else torch_dtype


def read_json(folder: Path, name: str = CONFIG_NAME) -> dict:
    """Read a JSON file from a checkpoint folder, with a clear error when it is absent."""
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; a checkpoint folder needs {name}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """`model.safetensors`, or every shard listed in `model.safetensors.index.json`."""
    index = folder / WEIGHTS_INDEX_NAME
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    if not index.is_file():
        raise CheckpointError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    weight_map = read_json(folder, WEIGHTS_INDEX_NAME).get("weight_map", {})
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    for shard in set(weight_map.values()):  # confined to the folder: never `../elsewhere.safetensors`
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{index} lists a shard {str(shard)[:80]!r} that is not a file name in {folder}"
            )
    files = [folder / shard for shard in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} listed in {index} is missing")
    return files


def load_safetensors(
    folder: Path, device: str | torch.device = "cpu", transform: Callable | None = None
) -> dict[str, torch.Tensor]:
    """Load `model.safetensors`, or every shard listed in `model.safetensors.index.json`.

    `transform(name, tensor) -> {name: tensor}`, when given, sees each tensor as it is read, so a tensor it
    replaces (e.g. by its quantized form) is never held beside the others.
    """
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        with open(file, "rb") as f:
            read_header(f, file)  # checked as safetensors checks it, with one-line errors
        if transform is None:
            try:
                state.update(load_file(file, device=str(device)))
            except Exception as e:  # safetensors' own check, in case it finds more than ours
                raise CheckpointError(f"{file} is not a valid safetensors file: {e}") from None
            continue
        for name, tensor in _read_one_by_one(file, device):
            state.update(transform(name, tensor))
    return state


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def read_header(f, file: Path | str | None = None) -> tuple[int, dict]:
    """A safetensors file's header length and its tensor entries (name -> dtype, shape, data_offsets), checked
    as safetensors checks them before anything is read: a header length within the file (and 100 MB), JSON
    of entries with a known dtype, a shape of non-negative integers and data_offsets that match it, the
    tensors' bytes back to back, none shared or overlapping, ending at the file's end. CheckpointError (one
    line, naming the file and the tensor) otherwise."""
    name = str(file or getattr(f, "name", "the weights file"))
    file_size = f.seek(0, os.SEEK_END)
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{name} is not a safetensors file: it is {file_size} bytes long")
    size = int.from_bytes(raw, "little")
    if size > min(MAX_HEADER_BYTES, file_size - 8):
        raise CheckpointError(
            f"{name}: its header claims {size} bytes, more than the file holds or safetensors allows"
        )
    try:
        header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{name}: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: its header is not a JSON object of tensors")
    header.pop("__metadata__", None)
    data_size, spans = file_size - 8 - size, []
    for key, v in header.items():
        where = f"{name}: tensor {key[:80]!r}"
        if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
            raise CheckpointError(f"{where} lacks its dtype, shape or data_offsets")
        dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
        if dtype not in _ITEM_BYTES:
            raise CheckpointError(f"{where} has an unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
            raise CheckpointError(f"{where} has a shape that is not a list of sizes: {str(shape)[:60]}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise CheckpointError(f"{where} has data_offsets {str(offsets)[:60]} outside the file's data")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _ITEM_BYTES[dtype]:
            raise CheckpointError(f"{where}: its data_offsets span {offsets[1] - offsets[0]} bytes, its shape "
                                  f"{shape} of {dtype} needs {numel * _ITEM_BYTES[dtype]}")  # fmt: skip
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            what = "overlaps another tensor" if start < end else "leaves a gap before it"
            raise CheckpointError(
                f"{name}: tensor {key[:80]!r} {what} (safetensors stores them back to back)"
            )
        end = stop
    if end != data_size:
        raise CheckpointError(
            f"{name}: the tensors end at byte {end} of the data, the file holds {data_size}"
        )
    return size, header


def stored_float_dtype(folder: Path) -> torch.dtype | None:
    """The dtype holding most of a checkpoint's floating-point bytes, from its safetensors headers (nothing
    else is read); None when there is none it knows."""
    totals: dict[torch.dtype, int] = {}
    for file in weight_files(folder):
        with open(file, "rb") as f:
            _, header = read_header(f, file)
        for v in header.values():
            dtype = _DTYPES.get(v["dtype"])
            if dtype is not None and dtype.is_floating_point:
                totals[dtype] = totals.get(dtype, 0) + v["data_offsets"][1] - v["data_offsets"][0]
    return max(totals, key=totals.get) if totals else None


def _read_one_by_one(file: Path, device):
    """(name, tensor) for each tensor of a safetensors file, each read into memory of its own with plain
    reads: a memory map would keep every page read so far counted in the process's RSS until the file is
    closed, so a quantizing load would peak at the quantized model plus the whole file. Files with dtypes
    this does not know are read through safetensors."""
    with open(file, "rb") as f:
        size, header = read_header(f, file)
        if torch.device(device).type != "cpu" or any(v["dtype"] not in _DTYPES for v in header.values()):
            with safe_open(file, framework="pt", device=str(device)) as st:
                yield from ((name, st.get_tensor(name)) for name in st.keys())
            return
        for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = v["data_offsets"]
            buffer = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + size + start)
            if f.readinto(memoryview(buffer.numpy())) != end - start:
                raise CheckpointError(f"{file} is truncated: {name} is cut short")
            yield name, buffer.view(_DTYPES[v["dtype"]]).view(v["shape"])


def tensor_names(folder: Path) -> set[str]:
    """The names of every tensor of a checkpoint, from its (checked) safetensors headers alone."""
    names: set[str] = set()
    for file in weight_files(folder):
        with open(file, "rb") as f:
            names.update(read_header(f, file)[1])
    return names


def save_safetensors(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Write a state dict as one `model.safetensors` (shared storage cloned, as safetensors requires)."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.detach().clone().contiguous() if ptr in seen else tensor.detach().contiguous()
        seen.add(ptr)
    save_file(out, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (0600); give it its siblings' permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / WEIGHTS_NAME, 0o666 & ~umask)


def load_into(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict_unexpected: bool = False
) -> None:
    """Copy `state` into `module`, naming any missing tensor or shape mismatch in the error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) the model needs: {shown}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, the config expects {tuple(v.shape)}"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected and strict_unexpected:
        raise CheckpointError(f"{source} has tensors the model does not know: {', '.join(unexpected[:5])}")
    module.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
