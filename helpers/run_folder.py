"""Run folders: everything that later notebooks read about one (model, dataset) pair.

``helpers.run_generation.generate_run`` writes a run folder and ``helpers.pseudo_labels``
adds its labels. ``RunFolder`` reads it. The layout::

    run_dir/
      run.json                             sampling settings, layers and UNet variant
      index.csv                            one row per image
      images/{image_id:06d}.png            RGB, uint8
      activations/{image_id:06d}.safetensors   (only when activation_storage is "stored")
      labels/depth/{image_id:06d}.npy      float32 (height, width)
      labels/saliency/{image_id:06d}.npy   float32 (height, width)
      labels/labels.json                   labeler name and version per label kind
      figures/                             figures the notebooks save

``run.json`` is one JSON object:

- ``model``: the model id (``"toy"``, a Hugging Face id or a local folder);
- ``unet_weights_sha256``: 16 hex digits of a hash of the original UNet's weights
  (``helpers.models.weights_digest``), so a retrained model with the same id is detected;
- ``scheduler`` (``"lms"``, ``"ddim"``, ``"euler"``), ``num_steps``, ``guidance_scale``,
  ``height`` and ``width`` in pixels;
- ``timesteps``: the scheduler timestep of each step index 0 .. num_steps - 1;
- ``activation_storage``: ``"stored"`` (activation files exist) or ``"streamed"`` (no
  activation files; probes must sample again and consume activations as they come);
- ``activation_dtype``: ``"float16"``, the type of every stored tensor;
- ``layers``: the UNet's ``attn1`` layers in network order, each
  ``{"name", "block", "width", "grid": [rows, columns]}`` (see ``helpers.hooks.LayerInfo``);
- ``vae_layer``: the same fields for the VAE decoder's mid-block self-attention, with
  ``"name": "vae_decoder"`` and its module path under ``"module"``, or null;
- ``prompt_file``: the prompt list the run was generated from;
- ``unet_variant``: ``"original"``, ``"shuffled"`` (every weight tensor permuted) or
  ``"reinit"`` (freshly initialised), and ``shuffle_seed``, the seed of that control (null
  for the original UNet);
- ``format_version``: 1.

``index.csv`` has the columns image_id, file (the PNG's path relative to the run folder),
prompt, seed, split (``train``, ``test`` or empty) and the extra columns of the prompt list.

Each activation file contains float16 tensors under the keys

- ``"{layer_name}@{step}"``: (tokens, width), the layer's output for the conditional half of
  the classifier-free guidance batch at step index ``step``; tokens are the layer's grid
  cells in row-major order;
- ``"vae_decoder@{step}"``: (tokens, width), the output of the VAE decoder's mid-block
  self-attention when it decodes the clean latent that the scheduler predicts at that step;
- ``"latent@{step}"``: (tokens, 4), the noisy latent z_t that the UNet received at that step,
  taken before ``scheduler.scale_model_input``, with tokens the latent grid in row-major order;

and the metadata ``image_id``, ``prompt`` and ``seed`` (as strings).

Labels follow ``helpers.labels``: depth is relative inverse depth (larger is nearer) and
saliency is the probability of the salient object, a mask where it exceeds 0.5.

Every file is written to a temporary name in its folder and then renamed, and an image's PNG
is written after its activation file. A PNG therefore only exists once the image is
complete, and a run that was killed resumes without redoing or corrupting finished images.
One process at a time may write to a run folder.
"""

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from helpers.paths import RUNS_DIR
from helpers.prompt_lists import SPLITS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RUN_CONFIG_FILE = "run.json"
INDEX_FILE = "index.csv"
IMAGES_DIR = "images"
ACTIVATIONS_DIR = "activations"
LABELS_DIR = "labels"
LABELS_FILE = "labels.json"
FIGURES_DIR = "figures"

LABEL_KINDS = ("depth", "saliency")
UNET_VARIANTS = ("original", "shuffled", "reinit")
VAE_DECODER_KEY = "vae_decoder"
LATENT_KEY = "latent"
INDEX_COLUMNS = ("image_id", "file", "prompt", "seed", "split")

# Temporary files are hidden and end with this suffix, so that globs over finished files
# never match them and a resumed run can delete those a killed process left behind.
TEMPORARY_SUFFIX = ".tmp"


class RunFolderError(ValueError):
    """Raised when a run folder is missing, incomplete or does not fit the request."""


def resolve_run_dir(run_dir: str | Path) -> Path:
    """Return ``run_dir`` as an absolute path, taking a relative path under ``RUNS_DIR``."""
    path = Path(run_dir).expanduser()
    return path if path.is_absolute() else RUNS_DIR / path


def activation_key(key_prefix: str, step: int) -> str:
    """Return the key of a stored tensor, such as ``"mid_block...attn1@3"``."""
    return f"{key_prefix}@{step}"


def image_file_name(image_id: int, extension: str) -> str:
    """Return an image's file name, such as ``000042.png``."""
    return f"{image_id:06d}.{extension}"


# Atomic writes ----------------------------------------------------------------------------


def write_atomically(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through ``write(handle)`` under a temporary name, then rename it to ``path``.

    The rename is atomic on POSIX and Windows file systems when both names are in the same
    folder, so readers see either no file or the complete one. The data reaches the disk
    before the rename, so after a machine crash the file is likewise missing or complete.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda handle: handle.write(data))


def write_json_atomically(path: Path, value) -> None:
    write_bytes_atomically(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def write_png_atomically(path: Path, image: np.ndarray) -> None:
    """Write a uint8 (height, width, 3) image as PNG."""
    write_atomically(path, lambda handle: Image.fromarray(image).save(handle, format="PNG"))


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    write_atomically(path, lambda handle: np.save(handle, array, allow_pickle=False))


def remove_temporary_files(run_dir: Path) -> int:
    """Delete the temporary files that an interrupted writer left, and return how many."""
    removed = 0
    for path in run_dir.rglob(f".*{TEMPORARY_SUFFIX}"):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        logger.info("Removed %d temporary files left by an interrupted run in %s", removed, run_dir)
    return removed


# Index ------------------------------------------------------------------------------------


def write_index(path: Path, rows: Sequence[dict], extra_columns: Sequence[str]) -> None:
    """Write ``index.csv`` atomically with the standard columns first."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[*INDEX_COLUMNS, *extra_columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomically(path, text.getvalue().encode("utf-8"))


def read_index(path: Path) -> list[dict]:
    """Read ``index.csv`` with image_id and seed as ints and the other columns as strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["image_id"] = int(row["image_id"])
        row["seed"] = int(row["seed"])
    return rows


# Reading a run folder ---------------------------------------------------------------------


class RunFolder:
    """Read access to a run folder written by ``generate_run`` and ``label_run``.

    ``config`` is the parsed run.json and ``index`` the rows of index.csv, both read when the
    object is created. File checks (``completed_ids``, ``has_labels``) look at the disk on
    every call.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_path = self.path / RUN_CONFIG_FILE
        if not config_path.is_file():
            raise RunFolderError(
                f"No run folder at {self.path}: {RUN_CONFIG_FILE} is missing. Generate the run "
                "first with notebooks/01_generate.ipynb or helpers.run_generation.generate_run."
            )
        self.config: dict = json.loads(config_path.read_text(encoding="utf-8"))
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise RunFolderError(
                f"The run folder {self.path} has no {INDEX_FILE}: it was interrupted before any "
                "image was planned. Run generate_run on it again."
            )
        self.index: list[dict] = read_index(index_path)
        self._rows_by_id = {row["image_id"]: row for row in self.index}

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, images={len(self.index)})"

    def summary(self) -> str:
        """Describe the run in a few lines: model, sampling, images per split, layers."""
        config = self.config
        splits = {split: len(self.image_ids(split)) for split in SPLITS}
        variant = config["unet_variant"]
        if config.get("shuffle_seed") is not None:
            variant += f" (seed {config['shuffle_seed']})"
        lines = [
            f"Run folder {self.path}",
            f"  model {config['model']}, UNet {variant}",
            f"  {config['scheduler']} scheduler, {config['num_steps']} steps, guidance scale "
            f"{config['guidance_scale']}, {config['height']}x{config['width']} pixels",
            f"  {len(self.completed_ids())} of {len(self.index)} images complete "
            f"({splits['train']} train, {splits['test']} test), activations "
            f"{config['activation_storage']}",
            f"  {'layer':<56} {'block':<16} {'width':>5}  grid",
        ]
        described = list(self.layers)
        if config.get("vae_layer") is not None:
            described.append(config["vae_layer"])
        for layer in described:
            rows, columns = layer["grid"]
            lines.append(
                f"  {layer['name']:<56} {layer['block']:<16} {layer['width']:>5}  {rows}x{columns}"
            )
        return "\n".join(lines)

    # Layout

    @property
    def layers(self) -> list[dict]:
        """UNet self-attention layers in network order: name, block, width, grid."""
        return self.config["layers"]

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.layers]

    @property
    def steps(self) -> list[int]:
        """Step indices 0 .. num_steps - 1."""
        return list(range(self.config["num_steps"]))

    @property
    def stores_activations(self) -> bool:
        return self.config["activation_storage"] == "stored"

    @property
    def figures_dir(self) -> Path:
        """Folder for figures, created on first access."""
        folder = self.path / FIGURES_DIR
        folder.mkdir(exist_ok=True)
        return folder

    def key_prefixes(self) -> list[str]:
        """Return the prefixes of the stored keys: layer names, then "vae_decoder" and "latent"."""
        prefixes = list(self.layer_names)
        if self.config.get("vae_layer") is not None:
            prefixes.append(VAE_DECODER_KEY)
        prefixes.append(LATENT_KEY)
        return prefixes

    def image_path(self, image_id: int) -> Path:
        return self.path / IMAGES_DIR / image_file_name(image_id, "png")

    def activations_path(self, image_id: int) -> Path:
        return self.path / ACTIVATIONS_DIR / image_file_name(image_id, "safetensors")

    def label_path(self, kind: str, image_id: int) -> Path:
        _check_label_kind(kind)
        return self.path / LABELS_DIR / kind / image_file_name(image_id, "npy")

    # Images and their index rows

    def image_ids(self, split: str | None = None) -> list[int]:
        """Return image ids in index order, all of them or those of one split ("train", "test")."""
        if split is None:
            return [row["image_id"] for row in self.index]
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}: use one of {list(SPLITS)} or None.")
        return [row["image_id"] for row in self.index if row["split"] == split]

    def row(self, image_id: int) -> dict:
        """Return the index row of an image."""
        try:
            return self._rows_by_id[image_id]
        except KeyError:
            raise KeyError(
                f"Image id {image_id} is not in {self.path / INDEX_FILE}, which has ids "
                f"{_describe_ids(self.image_ids())}."
            ) from None

    def is_complete(self, image_id: int) -> bool:
        """Return whether the image's PNG exists, and its activation file in stored mode."""
        if not self.image_path(image_id).is_file():
            return False
        return not self.stores_activations or self.activations_path(image_id).is_file()

    def completed_ids(self) -> list[int]:
        """Return the ids of the images whose files are all written, in index order."""
        return [image_id for image_id in self.image_ids() if self.is_complete(image_id)]

    def load_image(self, image_id: int) -> np.ndarray:
        """Load an image as uint8 (height, width, 3)."""
        self.row(image_id)
        path = self.image_path(image_id)
        if not path.is_file():
            raise RunFolderError(self._incomplete_message([image_id]))
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    # Activations

    def load_activations(
        self, image_id: int, keys: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Load an image's stored tensors (float16), all of them or the given keys."""
        self._require_stored_activations()
        self.row(image_id)
        path = self.activations_path(image_id)
        if not self.is_complete(image_id):
            raise RunFolderError(self._incomplete_message([image_id]))
        with safe_open(str(path), framework="pt") as handle:
            available = set(handle.keys())
            requested = sorted(available) if keys is None else list(keys)
            missing = [key for key in requested if key not in available]
            if missing:
                raise KeyError(
                    f"Keys {missing[:3]} are not stored in {path}. Keys are "
                    f"'<prefix>@<step>' with a prefix from {self.key_prefixes()} and a step "
                    f"from 0 to {self.config['num_steps'] - 1}."
                )
            return {key: handle.get_tensor(key) for key in requested}

    def load_cell(self, key_prefix: str, step: int, split: str | None) -> torch.Tensor:
        """Stack one (layer, step) cell over a split's images: float32 (images, tokens, width).

        ``key_prefix`` is a layer name, "vae_decoder" or "latent", and ``step`` a step index.
        Images are in index order, and ``split=None`` takes all of them.
        """
        self._require_stored_activations()
        if key_prefix not in self.key_prefixes():
            raise KeyError(f"Unknown key prefix {key_prefix!r}: use one of {self.key_prefixes()}.")
        if isinstance(step, bool) or not isinstance(step, int) or step not in self.steps:
            raise ValueError(
                f"Step {step!r} is out of range: this run has step indices 0 to "
                f"{self.config['num_steps'] - 1}."
            )
        image_ids = self._complete_ids_of_split(split)
        key = activation_key(key_prefix, step)
        tensors = []
        for image_id in image_ids:
            with safe_open(str(self.activations_path(image_id)), framework="pt") as handle:
                tensors.append(handle.get_tensor(key))
        return torch.stack(tensors).float()

    # Labels

    def labelers(self) -> dict:
        """Return the labeler name and version per label kind, {} before labelling."""
        path = self.path / LABELS_DIR / LABELS_FILE
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def has_labels(self, kind: str) -> bool:
        """Return whether labels of this kind exist for every image in the index."""
        _check_label_kind(kind)
        if kind not in self.labelers():
            return False
        return all(self.label_path(kind, image_id).is_file() for image_id in self.image_ids())

    def load_label(self, kind: str, image_id: int) -> np.ndarray:
        """Load one image's label, float32 (height, width)."""
        path = self.label_path(kind, image_id)
        if not path.is_file():
            raise RunFolderError(
                f"No {kind} label for image {image_id} in {self.path}: label the run with "
                "helpers.pseudo_labels.label_run (notebooks/02_pseudo_label.ipynb)."
            )
        return np.load(path, allow_pickle=False)

    def load_labels(self, kind: str, split: str | None) -> np.ndarray:
        """Stack a split's labels in index order: float32 (images, height, width)."""
        image_ids = self.image_ids(split)
        missing = [
            image_id for image_id in image_ids if not self.label_path(kind, image_id).is_file()
        ]
        if missing:
            raise RunFolderError(
                f"{len(missing)} of {len(image_ids)} images in {self.path} have no {kind} label "
                f"(ids {_describe_ids(missing)}): label the run with "
                "helpers.pseudo_labels.label_run (notebooks/02_pseudo_label.ipynb)."
            )
        return np.stack([self.load_label(kind, image_id) for image_id in image_ids])

    # Checks

    def _require_stored_activations(self) -> None:
        if not self.stores_activations:
            raise RunFolderError(
                f"The run {self.path} was generated with activation_storage="
                f"{self.config['activation_storage']!r}, so it has no activation files: sample "
                "again and stream the activations, or generate the run with "
                "store_activations=True."
            )

    def _complete_ids_of_split(self, split: str | None) -> list[int]:
        image_ids = self.image_ids(split)
        if not image_ids:
            raise RunFolderError(
                f"The run {self.path} has no image in split {split!r}: give the prompt list a "
                "split column with both 'train' and 'test' rows, or use more images."
            )
        incomplete = [image_id for image_id in image_ids if not self.is_complete(image_id)]
        if incomplete:
            raise RunFolderError(self._incomplete_message(incomplete))
        return image_ids

    def _incomplete_message(self, image_ids: Sequence[int]) -> str:
        return (
            f"{len(image_ids)} images of {self.path} are not generated yet (ids "
            f"{_describe_ids(image_ids)}): run generate_run on this folder again, which "
            "resumes where it stopped."
        )


def _check_label_kind(kind: str) -> None:
    if kind not in LABEL_KINDS:
        raise ValueError(f"Unknown label kind {kind!r}: use one of {list(LABEL_KINDS)}.")


def _describe_ids(image_ids: Sequence[int], shown: int = 5) -> str:
    listed = ", ".join(str(image_id) for image_id in image_ids[:shown])
    return listed + (f", ... ({len(image_ids)} in all)" if len(image_ids) > shown else "")


def check_same_images(run: RunFolder, control: RunFolder) -> None:
    """Raise RunFolderError unless ``control`` has the same image ids, prompts, seeds and splits
    as ``run``, which probes on a control run need because they use ``run``'s labels."""
    for column in ("image_id", "prompt", "seed", "split"):
        ours = [row[column] for row in run.index]
        theirs = [row[column] for row in control.index]
        if ours != theirs:
            raise RunFolderError(
                f"The control run {control.path} differs from {run.path} in the index column "
                f"{column!r}: generate the control from the same prompt list and number of "
                "images (notebooks/01_generate.ipynb does both)."
            )
