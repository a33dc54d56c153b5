"""Save and resume training state in safetensors, with no pickled objects.

Model weights and optimizer moments are tensors and go into one safetensors file; the step
counter and optimizer hyperparameters go into its JSON metadata. Writes are atomic, so an
interrupted save leaves the previous checkpoint intact.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_training_state(path, modules: dict, optimizer, step: int, extra: dict | None = None):
    tensors = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"model.{name}.{key}"] = value.detach().cpu().contiguous()

    state = optimizer.state_dict()
    for index, moments in state["state"].items():
        for key, value in moments.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer.{index}.{key}"] = tensor.detach().cpu().contiguous()
    metadata = {
        "step": str(step),
        "param_groups": json.dumps(state["param_groups"]),
        "extra": json.dumps(extra or {}),
    }

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def load_model_weights(path, modules: dict) -> dict:
    """Load the named modules' weights from a training checkpoint in place.

    Returns all tensors of the file, so a caller can read the optimizer state without
    loading the file again.
    """
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"model.{name}."
        module.load_state_dict(
            {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        )
    return tensors


def load_training_state(path, modules: dict, optimizer) -> tuple[int, dict]:
    """Restore modules and optimizer in place; returns the step and the extra metadata."""
    tensors = load_model_weights(path, modules)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()

    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": moments, "param_groups": json.loads(metadata["param_groups"])}
    )
    return int(metadata["step"]), json.loads(metadata["extra"])
