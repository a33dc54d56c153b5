"""Save and resume training state in safetensors, with no pickled objects.

Model weights and optimizer moments are tensors and go into one safetensors file; the step
counter and optimizer hyperparameters go into its JSON metadata. Writes are atomic, so an
interrupted save leaves the previous checkpoint intact.
"""

import json
import logging
import os
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)


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


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a checkpoint in one pass.

    Raises:
        ValueError: if the file is damaged or not a safetensors file, naming it and the fix.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise ValueError(
            f"The checkpoint {path} is damaged or not a safetensors file ({error}). An interrupted "
            "save never leaves such a file, so it was changed outside training; move it away to "
            "train from the start."
        ) from error
    return tensors, metadata


def load_model_weights(path, modules: dict, optional: Collection[str] = ()) -> None:
    """Load the named modules' weights from a training checkpoint in place.

    A module named in ``optional`` that the file does not contain keeps its current weights.

    Raises:
        ValueError: if the file's weights do not fit a module, e.g. another architecture.
    """
    tensors, _ = read_checkpoint(path)
    restore_modules(tensors, modules, optional, path)


def restore_modules(tensors: dict, modules: dict, optional: Collection[str], path) -> None:
    """Load each module's ``model.<name>.`` tensors into it; see load_model_weights."""
    for name, module in modules.items():
        prefix = f"model.{name}."
        state = {
            key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)
        }
        if not state and name in optional:
            continue
        if not state:
            raise ValueError(
                f"The checkpoint {path} has no weights for the {name!r} model, so another "
                "training wrote it; move it away to train from the start."
            )
        try:
            module.load_state_dict(state)
        except RuntimeError as error:
            summary = " ".join(str(error).split())[:300]
            raise ValueError(
                f"The checkpoint {path} does not fit the {name!r} model that this code builds "
                f"({summary}). Resume with the code that wrote it, or move the file away to "
                "train from the start."
            ) from error


def load_training_state(
    path, modules: dict, optimizer, optional: Collection[str] = ()
) -> tuple[int, dict]:
    """Restore modules and optimizer in place; returns the step and the extra metadata.

    Modules named in ``optional`` may be missing from the file, e.g. a module added to the
    training after the checkpoint was written. They keep their initial weights, and their
    parameters, which must come last in the optimizer's last group, start with fresh moments.
    """
    tensors, metadata = read_checkpoint(path)
    restore_modules(tensors, modules, optional, path)
    if "step" not in metadata or "param_groups" not in metadata:
        raise ValueError(
            f"{path} has no training metadata (step, optimizer settings), so it was not written "
            "by this training code; move it away to train from the start."
        )

    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    groups = json.loads(metadata["param_groups"])
    missing = [
        name for name in optional if not any(k.startswith(f"model.{name}.") for k in tensors)
    ]
    if missing:
        logger.warning("%s has no weights for %s; they start from scratch", path, missing)
        new_parameters = sum(len(list(modules[name].parameters())) for name in missing)
        groups = _append_new_parameters(groups, optimizer, new_parameters, path)
    try:
        optimizer.load_state_dict({"state": moments, "param_groups": groups})
    except ValueError as error:
        raise ValueError(
            f"The optimizer state in {path} does not fit this training ({error}); move the file "
            "away to train from the start."
        ) from error
    return int(metadata["step"]), json.loads(metadata["extra"])


def _append_new_parameters(groups: list[dict], optimizer, new_parameters: int, path) -> list[dict]:
    """Extend the saved last parameter group by the optimizer's parameters it lacks."""
    current = optimizer.param_groups
    earlier_match = all(
        len(saved["params"]) == len(group["params"])
        for saved, group in zip(groups[:-1], current[:-1], strict=False)
    )
    added = len(current[-1]["params"]) - len(groups[-1]["params"])
    if len(groups) != len(current) or not earlier_match or added != new_parameters:
        raise ValueError(
            f"The optimizer state in {path} has another parameter layout than this training; "
            "move the file away to train from the start."
        )
    first_new = sum(len(saved["params"]) for saved in groups)
    groups[-1]["params"] = groups[-1]["params"] + list(range(first_new, first_new + added))
    return groups
