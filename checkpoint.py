"""Reading weight files safely, and checking that they fit the model they are loaded into.

Every loader in the project (VidTok, DINOv2, I3D, our own checkpoints) goes through these two
functions, so that unsafe unpickling is never silent and a mismatched file always gets the same
complete report: which keys are missing, which are unexpected, which have the wrong shape.
"""
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
    """Raise a ValueError naming every missing, unexpected and mis-shaped key, then `fix`."""
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
