"""Generate a run folder: images, recorded activations and the index (format in run_folder).

``generate_run`` samples each image once and records every ``attn1`` layer of the UNet at
every step in that single pass, together with the VAE decoder control and the noisy latents.
It resumes an interrupted run: images whose files are complete are skipped.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save as serialize_safetensors

from helpers.hooks import find_vae_decoder_self_attention, layer_infos
from helpers.models import pipeline_with_unet, shuffled_unet, weights_digest
from helpers.progress import progress as progress_bar
from helpers.prompt_lists import PromptTable
from helpers.run_folder import (
    ACTIVATIONS_DIR,
    FORMAT_VERSION,
    IMAGES_DIR,
    INDEX_COLUMNS,
    INDEX_FILE,
    LATENT_KEY,
    RUN_CONFIG_FILE,
    UNET_VARIANTS,
    VAE_DECODER_KEY,
    RunFolder,
    RunFolderError,
    activation_key,
    image_file_name,
    read_index,
    remove_temporary_files,
    write_bytes_atomically,
    write_index,
    write_json_atomically,
    write_png_atomically,
)
from helpers.sampling import (
    RecordingConfig,
    SamplingConfig,
    SamplingResult,
    generate,
    make_scheduler,
    vae_scale_factor,
)

logger = logging.getLogger(__name__)

ACTIVATION_DTYPE = torch.float16

# run.json keys that must match for a run to resume; any other difference is harmless.
RESUME_KEYS = (
    "model",
    "unet_weights_sha256",
    "scheduler",
    "num_steps",
    "guidance_scale",
    "height",
    "width",
    "timesteps",
    "unet_variant",
    "shuffle_seed",
    "activation_storage",
    "activation_dtype",
    "layers",
    "vae_layer",
)

_SHUFFLE_MODES = {"shuffled": "shuffle", "reinit": "reinit"}


def control_pipeline(
    pipe: StableDiffusionPipeline, unet_variant: str, shuffle_seed: int = 0
) -> StableDiffusionPipeline:
    """Return ``pipe`` for "original", or a copy whose UNet is shuffled or re-initialised.

    The copy shares the text encoder, VAE, tokenizer and scheduler with ``pipe``, so the
    control samples from the same prompts and seeds with only the UNet's weights changed.
    """
    if unet_variant not in UNET_VARIANTS:
        raise ValueError(
            f"Unknown unet_variant {unet_variant!r}: use one of {list(UNET_VARIANTS)}."
        )
    if unet_variant == "original":
        return pipe
    unet = shuffled_unet(pipe.unet, seed=shuffle_seed, mode=_SHUFFLE_MODES[unet_variant])
    return pipeline_with_unet(pipe, unet)


def build_run_config(
    pipe: StableDiffusionPipeline,
    sampling_config: SamplingConfig,
    model_id: str,
    *,
    store_activations: bool,
    unet_variant: str,
    shuffle_seed: int | None,
    prompt_file: str,
) -> dict:
    """Describe a run as the run.json object documented in ``helpers.run_folder``."""
    height, width = sampling_config.image_size(pipe)
    factor = vae_scale_factor(pipe.vae)
    latent_grid = (height // factor, width // factor)

    scheduler = make_scheduler(sampling_config.scheduler, pipe.scheduler.config)
    scheduler.set_timesteps(sampling_config.num_steps)

    layers = [
        {"name": info.name, "block": info.block, "width": info.width, "grid": list(info.grid)}
        for info in layer_infos(pipe.unet, latent_grid)
    ]
    # The VAE decoder's mid block works on the latent grid.
    vae_module, vae_attention = find_vae_decoder_self_attention(pipe.vae)
    vae_layer = {
        "name": VAE_DECODER_KEY,
        "block": "vae_decoder_mid",
        "width": vae_attention.to_out[0].out_features,
        "grid": list(latent_grid),
        "module": vae_module,
    }
    return {
        "format_version": FORMAT_VERSION,
        "model": str(model_id),
        "unet_weights_sha256": weights_digest(pipe.unet),
        "scheduler": sampling_config.scheduler,
        "num_steps": sampling_config.num_steps,
        "guidance_scale": float(sampling_config.guidance_scale),
        "height": height,
        "width": width,
        "timesteps": [float(timestep) for timestep in scheduler.timesteps],
        "activation_storage": "stored" if store_activations else "streamed",
        "activation_dtype": str(ACTIVATION_DTYPE).removeprefix("torch."),
        "layers": layers,
        "vae_layer": vae_layer,
        "prompt_file": prompt_file,
        "unet_variant": unet_variant,
        "shuffle_seed": None if unet_variant == "original" else shuffle_seed,
    }


def check_resumable(existing: dict, requested: dict, run_dir: Path) -> None:
    """Raise RunFolderError if ``existing`` run.json differs from the request in a resume key."""
    differences = [
        f"{key}: {existing.get(key)!r} in the folder, {requested[key]!r} requested"
        for key in RESUME_KEYS
        if existing.get(key) != requested[key]
    ]
    if differences:
        shown = "; ".join(_shorten(line) for line in differences)
        raise RunFolderError(
            f"The run folder {run_dir} contains a run with different settings ({shown}). Pass "
            "a new run_dir for these settings, or delete the folder to start it over."
        )


def merge_index(existing_rows: list[dict], table: PromptTable, run_dir: Path) -> list[dict]:
    """Combine the index already in a folder with the prompt table's rows.

    Row ``i`` of the table is image ``i``. An id present in both must have the same prompt,
    seed and split. Ids beyond the existing ones are appended, so a run can grow.
    """
    by_id = {row["image_id"]: row for row in existing_rows}
    merged = list(existing_rows)
    for image_id, table_row in enumerate(table.rows):
        new_row = {
            "image_id": image_id,
            "file": f"{IMAGES_DIR}/{image_file_name(image_id, 'png')}",
            **table_row,
        }
        old_row = by_id.get(image_id)
        if old_row is None:
            merged.append(new_row)
            continue
        for column in ("prompt", "seed", "split"):
            if old_row[column] != new_row[column]:
                raise RunFolderError(
                    f"Image {image_id} of the run folder {run_dir} has {column} "
                    f"{old_row[column]!r}, but the prompt list {table.source} gives "
                    f"{new_row[column]!r}: pass a new run_dir for this prompt list, or delete "
                    "the folder to start it over."
                )
    return sorted(merged, key=lambda row: row["image_id"])


def prepare_run_folder(run_dir: Path, config: dict, table: PromptTable) -> RunFolder:
    """Create or reopen a run folder for ``config``, and write its run.json and index.csv."""
    config_path = run_dir / RUN_CONFIG_FILE
    existing_rows: list[dict] = []
    extra_columns = list(table.extra_columns)
    if config_path.is_file():
        check_resumable(json.loads(config_path.read_text(encoding="utf-8")), config, run_dir)
        index_path = run_dir / INDEX_FILE
        if index_path.is_file():
            existing_rows = read_index(index_path)
            existing_extras = [column for column in existing_rows[0] if column not in INDEX_COLUMNS]
            extra_columns = _merge_columns(existing_extras, table.extra_columns)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(config_path, config)

    (run_dir / IMAGES_DIR).mkdir(exist_ok=True)
    if config["activation_storage"] == "stored":
        (run_dir / ACTIVATIONS_DIR).mkdir(exist_ok=True)
    remove_temporary_files(run_dir)

    rows = merge_index(existing_rows, table, run_dir)
    rows = [{**{column: "" for column in extra_columns}, **row} for row in rows]
    write_index(run_dir / INDEX_FILE, rows, extra_columns)
    return RunFolder(run_dir)


def generate_run(
    pipe: StableDiffusionPipeline,
    prompts_table: PromptTable,
    run_dir: str | Path,
    sampling_config: SamplingConfig,
    model_id: str,
    store_activations: bool = True,
    unet_variant: str = "original",
    *,
    shuffle_seed: int = 0,
    batch_size: int = 4,
    progress: bool | None = None,
) -> RunFolder:
    """Generate every image of ``prompts_table`` into ``run_dir`` and return the RunFolder.

    Each batch of ``batch_size`` images is sampled once, recording in that pass the
    conditional half of every ``attn1`` layer at every step, the VAE decoder's mid-block
    self-attention on each step's predicted clean latent, and each step's noisy latent.
    With ``store_activations=False`` only images are written and run.json records "streamed".

    ``unet_variant`` "shuffled" or "reinit" samples with a control copy of ``pipe``'s UNet
    (``helpers.models.shuffled_unet`` with ``shuffle_seed``); pass the original pipeline.

    Resuming: images whose PNG (and activation file) exist are skipped, and files that a
    killed run left half-written are deleted first. A folder whose run.json differs in
    model or its UNet weights, scheduler, steps, guidance, size, UNet variant or storage
    raises RunFolderError.

    NOTE: images sampled in a different batch composition after a resume can differ from an
    uninterrupted run in the last bits (see ``helpers.sampling.generate``).
    """
    if not isinstance(prompts_table, PromptTable):
        raise TypeError(
            f"prompts_table must be a PromptTable, got {type(prompts_table).__name__}: read the "
            "prompt list with helpers.prompt_lists.read_prompt_table or load_prompt_list."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    run_dir = Path(run_dir)

    # 1. The run.json that describes the run. A control UNet has the original's architecture,
    # so its layers are read from the original.
    if unet_variant not in UNET_VARIANTS:
        raise ValueError(
            f"Unknown unet_variant {unet_variant!r}: use one of {list(UNET_VARIANTS)}."
        )
    config = build_run_config(
        pipe,
        sampling_config,
        model_id,
        store_activations=store_activations,
        unet_variant=unet_variant,
        shuffle_seed=shuffle_seed,
        prompt_file=prompts_table.source,
    )

    # 2. The folder: created, or checked against the request and cleaned of partial files.
    run = prepare_run_folder(run_dir, config, prompts_table)
    requested_ids = list(range(len(prompts_table)))
    pending = [image_id for image_id in requested_ids if not run.is_complete(image_id)]
    logger.info(
        "%s: %d of %d images already complete, %d to generate",
        run_dir,
        len(requested_ids) - len(pending),
        len(requested_ids),
        len(pending),
    )

    # 3. Sampling, one pass per batch, and the files of each image. The control copy of the
    # UNet is only built when there is something to sample, because copying and shuffling
    # Stable Diffusion's UNet takes seconds and a second copy of its weights.
    if not pending:
        return run
    sampling_pipe = control_pipeline(pipe, unet_variant, shuffle_seed)
    recording = None
    if store_activations:
        recording = RecordingConfig(dtype=ACTIVATION_DTYPE, vae_decoder=True)
    bar = progress_bar(
        total=len(requested_ids),
        initial=len(requested_ids) - len(pending),
        desc=f"Generating {run_dir.name}",
        unit="image",
        **({} if progress is None else {"disable": not progress}),
    )
    try:
        for start in range(0, len(pending), batch_size):
            batch_ids = pending[start : start + batch_size]
            rows = [run.row(image_id) for image_id in batch_ids]
            result = generate(
                sampling_pipe,
                [row["prompt"] for row in rows],
                [row["seed"] for row in rows],
                sampling_config,
                recording=recording,
                keep_step_latents=store_activations,
                progress=False,
            )
            for position, row in enumerate(rows):
                write_image_files(run, row, result, position, config)
                bar.update()
    finally:
        bar.close()
    return run


def write_image_files(
    run: RunFolder, row: dict, result: SamplingResult, position: int, config: dict
) -> None:
    """Write one image's activation file (in stored mode) and then its PNG."""
    image_id = row["image_id"]
    if config["activation_storage"] == "stored":
        tensors = image_activations(result, position, config)
        metadata = {"image_id": str(image_id), "prompt": row["prompt"], "seed": str(row["seed"])}
        write_bytes_atomically(
            run.activations_path(image_id), serialize_safetensors(tensors, metadata=metadata)
        )
    image = (np.clip(result.images[position], 0.0, 1.0) * 255.0).round().astype(np.uint8)
    write_png_atomically(run.image_path(image_id), image)


def image_activations(result: SamplingResult, position: int, config: dict) -> dict:
    """Collect the tensors of one image of a batch under their run-folder keys."""
    tensors = {}
    for layer in config["layers"]:
        for step in range(config["num_steps"]):
            activation = result.activations[(layer["name"], step)][position]
            tensors[activation_key(layer["name"], step)] = activation.clone()

    vae_module = config["vae_layer"]["module"]
    for step in range(config["num_steps"]):
        activation = result.vae_activations[(vae_module, step)][position]
        tensors[activation_key(VAE_DECODER_KEY, step)] = activation.clone()

    for record in result.steps:
        # (channels, rows, columns) -> (tokens, channels), tokens in row-major order.
        latent = record.latents[position].flatten(1).transpose(0, 1)
        tensors[activation_key(LATENT_KEY, record.step)] = latent.to(ACTIVATION_DTYPE).contiguous()
    return tensors


def _merge_columns(first: list[str], second: list[str]) -> list[str]:
    return first + [column for column in second if column not in first]


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
