"""Reading weight files safely, and checking that they fit the model they are loaded into.

Every loader in the project (VidTok, DINOv2, I3D, T5, the official VideoFlexTok release, our own
checkpoints) goes through these functions, so that unsafe unpickling is never silent and a
mismatched file always gets the same complete report: which keys are missing, which are
unexpected, which have the wrong shape.

- `torch_load`: pickled files, tensors only unless the caller trusts the file.
- `check_state_dict`: the report; `check_finite`: NaN or infinite weights are refused.
- `build_checked`: a model built from a file's config only once its tensors are known to fit it.
- `read_safetensors_header`, `load_safetensors`, `load_safetensors_metadata`: a dependency-free
  safetensors reader that validates the header (length, JSON, dtypes, offsets inside the file)
  before touching data. Reference: the safetensors format specification (huggingface/safetensors).
"""
import json
import math
import pickle
from pathlib import Path

import torch


def torch_load(path, trusted=False):
    """`torch.load` with `weights_only=True` (tensors and plain containers only).

    Some published files (Lightning checkpoints) also pickle configuration objects, which the safe
    loader refuses. Loading those runs code from the file, so it takes an explicit `trusted=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError) as err:  # empty, truncated or not a torch file at all
        reason = str(err).split(". ")[0] or "empty"
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({path.stat().st_size} bytes: {reason}); it is "
                         "truncated or of another format") from None
    except pickle.UnpicklingError as err:
        if not trusted:
            raise ValueError(
                f"{path} holds pickled objects besides tensors ({str(err).splitlines()[0]}). Loading it runs "
                "code from the file: pass trusted=True only for a file from a source you trust, or re-save "
                "just its tensors with torch.save(state_dict, new_path)") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as missing:
        raise ValueError(
            f"{path} needs module {missing.name!r} to unpickle; install it, or re-save only the weights with "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path) where it is installed"
        ) from missing


def check_state_dict(model, state, source, fix):
    """Raise a ValueError naming every missing, unexpected and mis-shaped key, then `fix`; or naming the
    tensors that are not finite."""
    expected = model.state_dict()
    found = {
        "missing keys": [k for k in expected if k not in state],
        "unexpected keys": [k for k in state if k not in expected],
        "shape mismatches": [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                             for k, v in expected.items() if k in state and state[k].shape != v.shape],
    }
    problems = [f"{what} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                for what, items in found.items() if items]
    if problems:
        raise ValueError(f"{source} does not match the {type(model).__name__} it is loaded into: "
                         f"{'; '.join(problems)}. {fix}")
    check_finite(state, source, "The run that wrote it diverged: use an earlier checkpoint of that run.")


def build_checked(make, weights, source, fix):
    """The model a file describes: `make()` builds it from the file's own config, `weights` are the
    file's tensors. It is built first on the meta device, which allocates nothing, and compared with
    the tensors, so that a config asking for more than the file holds (a 1 KB file can ask for
    billions of parameters) is refused before any memory is spent; then built for real."""
    try:
        with torch.device("meta"):
            shell = make()
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{source}: its config is not valid ({err}). {fix}") from None
    check_state_dict(shell, weights, source, fix)
    return make()


def non_finite(state):
    """Names of the floating-point tensors in a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(state, source, fix):
    """Raise a ValueError when weights are NaN or infinite: such a file came from a run that
    diverged, and everything computed from it would be NaN too."""
    bad = non_finite(state)
    if bad:
        raise ValueError(f"{source} holds non-finite weights ({len(bad)} tensors: {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}). {fix}")


################################################################################
# safetensors
#
# The format: u64 little-endian header length N | N bytes of JSON | data section. The header maps
# tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data
# section, C order, little endian) plus an optional "__metadata__" map of strings.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; anything larger is a corrupt file


def read_safetensors_header(path):
    """Parse and validate a safetensors header without reading tensor data.

    Returns (tensors, metadata, data_offset): tensors maps name -> {"dtype", "shape",
    "data_offsets"}, metadata is the `__metadata__` str -> str map ({} if absent) and data_offset
    is the absolute file offset of the data section. Raises ValueError naming the problem for a
    malformed file: bad header length or JSON, unknown dtype, shape not matching the byte span,
    tensors overlapping, leaving gaps or not covering the data section exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: {file_size} bytes is too short for a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n < 2 or n > min(_MAX_HEADER_BYTES, file_size - 8):
            raise ValueError(f"{path}: header length {n} does not fit the file "
                             f"({file_size} bytes); not a safetensors file or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: header JSON is nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, found {metadata!r}")

    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: entry {name!r} must have exactly dtype, shape and "
                             f"data_offsets, found {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; "
                             f"supported: {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}; "
                             "expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; "
                             "expected [begin, end] with 0 <= begin <= end")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {nbytes} "
                             f"bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))

    data_size = file_size - 8 - n
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f"{path}: tensor {name!r} starts at data byte {begin}, expected "
                             f"{position}; tensors must be contiguous and must not overlap")
        position = end
    if position != data_size:
        raise ValueError(f"{path}: tensors cover {position} bytes but the data section has "
                         f"{data_size}; the file is truncated or has trailing bytes")
    return header, metadata, 8 + n


def load_safetensors_metadata(path):
    """The header's `__metadata__` map (e.g. a model configuration stored as a JSON string)."""
    return read_safetensors_header(path)[1]


def load_safetensors(path, device="cpu", names=None):
    """Read tensors from a safetensors file (all of them, or only `names`) onto `device`."""
    header, _, data_offset = read_safetensors_header(path)
    names = list(header) if names is None else list(names)
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(f"{path}: no tensors named {missing[:5]} "
                         f"({len(missing)} missing); the file has {len(header)} tensors")
    tensors = {}
    with open(path, "rb") as f:
        for name in names:
            info = header[name]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            buffer = bytearray(end - begin)  # writable and owned, so the tensor outlives the file
            f.seek(data_offset + begin)
            f.readinto(buffer)
            flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"]).to(device)
    return tensors


# The bundled demo models (assets/demo, made by `make demo-train`): sample.py's default, demo.py's models.
DEMO_ASSETS = Path(__file__).resolve().parent / "assets" / "demo"
