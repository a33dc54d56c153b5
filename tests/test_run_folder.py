"""Run folders on a random-weight toy pipeline: format, loading, resuming and mismatches.

Random weights make the images noise, so these tests check the files, keys, shapes and the
resume logic, not image content.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_generation
from helpers.hooks import layer_infos
from helpers.models import build_sd_pipeline_random, build_toy_pipeline_random
from helpers.paths import DATA_DIR, RUNS_DIR
from helpers.prompt_lists import PromptTable, read_prompt_table
from helpers.run_folder import (
    LATENT_KEY,
    TEMPORARY_SUFFIX,
    VAE_DECODER_KEY,
    RunFolder,
    RunFolderError,
    check_same_images,
    resolve_run_dir,
    write_atomically,
)
from helpers.run_generation import generate_run
from helpers.sampling import SamplingConfig, initial_noise, make_scheduler

TWO_STEPS = SamplingConfig(num_steps=2, guidance_scale=4.0)
IMAGE_COUNT = 5
TOKENS_16 = 16 * 16


@pytest.fixture(scope="module")
def pipe():
    return build_toy_pipeline_random(seed=0)


@pytest.fixture(scope="module")
def table():
    """The first rows of the toy prompt list: splits train, test, train, test, train."""
    return read_prompt_table(DATA_DIR / "toy_prompts.csv").head(IMAGE_COUNT)


@pytest.fixture(scope="module")
def run(pipe, table, tmp_path_factory):
    """A complete stored run of five images, generated once for the read-only tests."""
    folder = tmp_path_factory.mktemp("runs") / "toy"
    return generate_run(pipe, table, folder, TWO_STEPS, "toy-random", progress=False)


def _temporary_files(folder):
    return sorted(path.name for path in folder.rglob(f"*{TEMPORARY_SUFFIX}"))


def _file_states(run, image_ids):
    """(mtime_ns, bytes) of each image's PNG and activation file."""
    states = {}
    for image_id in image_ids:
        for path in (run.image_path(image_id), run.activations_path(image_id)):
            states[path] = (path.stat().st_mtime_ns, path.read_bytes())
    return states


class _CrashAfter:
    """Stand-in for helpers.sampling.generate that raises on call number ``calls + 1``."""

    def __init__(self, calls: int):
        self.remaining = calls
        self.real = run_generation.generate

    def __call__(self, *args, **kwargs):
        if self.remaining == 0:
            raise RuntimeError("simulated crash")
        self.remaining -= 1
        return self.real(*args, **kwargs)


# run.json and index.csv


def test_run_json_describes_layers(run, pipe):
    expected = layer_infos(pipe.unet, 16)

    assert [layer["name"] for layer in run.layers] == [info.name for info in expected]
    assert [layer["block"] for layer in run.layers] == [info.block for info in expected]
    assert [layer["width"] for layer in run.layers] == [info.width for info in expected]
    assert [tuple(layer["grid"]) for layer in run.layers] == [info.grid for info in expected]


def test_run_json_sampling_fields(run):
    config = json.loads((run.path / "run.json").read_text())

    assert config["model"] == "toy-random"
    assert config["scheduler"] == "lms"
    assert config["num_steps"] == 2
    assert config["guidance_scale"] == 4.0
    assert (config["height"], config["width"]) == (64, 64)
    assert config["activation_storage"] == "stored"
    assert config["activation_dtype"] == "float16"
    assert config["unet_variant"] == "original"
    assert len(config["unet_weights_sha256"]) == 16
    assert config["shuffle_seed"] is None
    assert config["prompt_file"].endswith("toy_prompts.csv")


def test_run_json_timesteps_match_scheduler(run, pipe):
    scheduler = make_scheduler("lms", pipe.scheduler.config)
    scheduler.set_timesteps(2)

    assert run.config["timesteps"] == [float(t) for t in scheduler.timesteps]


def test_run_json_vae_layer(run):
    vae_layer = run.config["vae_layer"]

    assert vae_layer["name"] == VAE_DECODER_KEY
    assert vae_layer["module"] == "decoder.mid_block.attentions.0"
    assert vae_layer["grid"] == [16, 16]
    assert vae_layer["width"] == 64


def test_index_columns_and_rows(run, table):
    header = (run.path / "index.csv").read_text().splitlines()[0].split(",")

    assert header[:5] == ["image_id", "file", "prompt", "seed", "split"]
    assert header[5:] == table.extra_columns
    assert [row["prompt"] for row in run.index] == [row["prompt"] for row in table.rows]
    assert [row["seed"] for row in run.index] == [row["seed"] for row in table.rows]
    assert run.index[2]["file"] == "images/000002.png"


def test_image_ids_by_split(run):
    assert run.image_ids() == [0, 1, 2, 3, 4]
    assert run.image_ids("train") == [0, 2, 4]
    assert run.image_ids("test") == [1, 3]


def test_image_ids_reject_unknown_split(run):
    with pytest.raises(ValueError, match="validation"):
        run.image_ids("validation")


def test_load_image_is_uint8_rgb(run):
    image = run.load_image(3)

    assert image.dtype == np.uint8
    assert image.shape == (64, 64, 3)


# Activation files


def test_activation_keys_match_run_json(run):
    activations = run.load_activations(0)
    expected = {f"{layer['name']}@{step}" for layer in run.layers for step in (0, 1)}
    expected |= {f"{VAE_DECODER_KEY}@{step}" for step in (0, 1)}
    expected |= {f"{LATENT_KEY}@{step}" for step in (0, 1)}

    assert set(activations) == expected


def test_activation_shapes_match_run_json(run):
    activations = run.load_activations(1)

    for layer in [*run.layers, run.config["vae_layer"]]:
        rows, columns = layer["grid"]
        for step in (0, 1):
            tensor = activations[f"{layer['name']}@{step}"]
            assert tensor.shape == (rows * columns, layer["width"]), layer["name"]
            assert tensor.dtype == torch.float16, layer["name"]
    assert activations["latent@0"].shape == (TOKENS_16, 4)


def test_activation_file_metadata(run):
    from safetensors import safe_open

    with safe_open(str(run.activations_path(2)), framework="pt") as handle:
        metadata = handle.metadata()

    assert metadata == {
        "image_id": "2",
        "prompt": run.row(2)["prompt"],
        "seed": str(run.row(2)["seed"]),
    }


def test_latent_is_unscaled_model_input(run, pipe):
    # At step 0 the UNet receives z_T = noise * init_noise_sigma, before scale_model_input.
    scheduler = make_scheduler("lms", pipe.scheduler.config)
    scheduler.set_timesteps(2)
    seed = run.row(0)["seed"]
    noise = initial_noise([seed], (4, 16, 16), torch.device("cpu"), torch.float32)
    expected = (noise[0] * scheduler.init_noise_sigma).flatten(1).transpose(0, 1)

    stored = run.load_activations(0, [f"{LATENT_KEY}@0"])[f"{LATENT_KEY}@0"]

    torch.testing.assert_close(stored.float(), expected, rtol=1e-3, atol=1e-2)


def test_load_activations_selected_keys(run):
    key = f"{run.layer_names[0]}@1"

    assert list(run.load_activations(4, [key])) == [key]


def test_load_activations_unknown_key_names_prefixes(run):
    with pytest.raises(KeyError, match="latent"):
        run.load_activations(0, ["no_such_layer@0"])


# load_cell


def test_load_cell_shapes_per_layer(run):
    for layer in run.layers:
        rows, columns = layer["grid"]
        cell = run.load_cell(layer["name"], 1, "train")
        assert cell.shape == (3, rows * columns, layer["width"]), layer["name"]
        assert cell.dtype == torch.float32


def test_load_cell_controls_shapes(run):
    assert run.load_cell(VAE_DECODER_KEY, 0, "test").shape == (2, TOKENS_16, 64)
    assert run.load_cell(LATENT_KEY, 1, None).shape == (IMAGE_COUNT, TOKENS_16, 4)


def test_load_cell_follows_index_order(run):
    layer = run.layer_names[2]
    cell = run.load_cell(layer, 0, "train")

    for position, image_id in enumerate(run.image_ids("train")):
        stored = run.load_activations(image_id, [f"{layer}@0"])[f"{layer}@0"]
        assert torch.equal(cell[position], stored.float())


def test_load_cell_rejects_unknown_prefix(run):
    with pytest.raises(KeyError, match="vae_decoder"):
        run.load_cell("up_blocks.9.attn1", 0, "train")


def test_load_cell_rejects_step_out_of_range(run):
    with pytest.raises(ValueError, match="0 to 1"):
        run.load_cell(LATENT_KEY, 2, "train")


# Resuming


def test_crash_then_resume_completes_run(pipe, table, tmp_path, monkeypatch):
    folder = tmp_path / "crashed"
    monkeypatch.setattr(run_generation, "generate", _CrashAfter(calls=2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_run(pipe, table, folder, TWO_STEPS, "toy-random", batch_size=1, progress=False)

    crashed = RunFolder(folder)
    assert crashed.completed_ids() == [0, 1]

    monkeypatch.undo()
    resumed = generate_run(pipe, table, folder, TWO_STEPS, "toy-random", progress=False)

    assert resumed.completed_ids() == list(range(IMAGE_COUNT))


def test_resume_leaves_finished_images_untouched(pipe, table, tmp_path, monkeypatch):
    folder = tmp_path / "crashed"
    monkeypatch.setattr(run_generation, "generate", _CrashAfter(calls=2))
    with pytest.raises(RuntimeError):
        generate_run(pipe, table, folder, TWO_STEPS, "toy-random", batch_size=1, progress=False)
    before = _file_states(RunFolder(folder), [0, 1])

    monkeypatch.undo()
    generate_run(pipe, table, folder, TWO_STEPS, "toy-random", progress=False)

    assert _file_states(RunFolder(folder), [0, 1]) == before


def test_resume_redoes_image_killed_between_files(pipe, table, tmp_path, run):
    folder = tmp_path / "killed"
    generate_run(pipe, table.head(3), folder, TWO_STEPS, "toy-random", progress=False)
    killed = RunFolder(folder)
    # A process killed after image 2's activation file but before its PNG, and inside the
    # write of image 3's PNG, leaves these files behind.
    killed.image_path(2).unlink()
    leftover = killed.path / "images" / f".000003.png.4242{TEMPORARY_SUFFIX}"
    leftover.write_bytes(b"partial png")

    resumed = generate_run(pipe, table, folder, TWO_STEPS, "toy-random", progress=False)

    assert resumed.completed_ids() == list(range(IMAGE_COUNT))
    assert _temporary_files(folder) == []
    # Image 2 was sampled again with another batch, so it matches the module's run only up
    # to the last bits (see helpers.sampling.generate).
    key = f"{run.layer_names[0]}@1"
    torch.testing.assert_close(
        resumed.load_activations(2, [key])[key].float(),
        run.load_activations(2, [key])[key].float(),
        rtol=1e-2,
        atol=1e-2,
    )


def test_crash_leaves_no_temporary_files(pipe, table, tmp_path, monkeypatch):
    folder = tmp_path / "crashed"
    monkeypatch.setattr(run_generation, "generate", _CrashAfter(calls=1))
    with pytest.raises(RuntimeError):
        generate_run(pipe, table, folder, TWO_STEPS, "toy-random", batch_size=2, progress=False)

    assert _temporary_files(folder) == []


def test_atomic_write_failure_leaves_no_file(tmp_path):
    target = tmp_path / "000000.png"

    def write_then_fail(handle):
        handle.write(b"half an image")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, write_then_fail)

    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_complete_run_resumes_without_sampling(run, pipe, table, monkeypatch):
    monkeypatch.setattr(run_generation, "generate", _CrashAfter(calls=0))

    resumed = generate_run(pipe, table, run.path, TWO_STEPS, "toy-random", progress=False)

    assert resumed.completed_ids() == list(range(IMAGE_COUNT))


def test_run_grows_with_longer_prompt_list(pipe, table, tmp_path):
    folder = tmp_path / "growing"
    generate_run(pipe, table.head(2), folder, TWO_STEPS, "toy-random", progress=False)
    before = _file_states(RunFolder(folder), [0, 1])

    grown = generate_run(pipe, table.head(3), folder, TWO_STEPS, "toy-random", progress=False)

    assert grown.completed_ids() == [0, 1, 2]
    assert _file_states(grown, [0, 1]) == before


# Rejected resumes


@pytest.mark.parametrize(
    ("changed_config", "changed_key"),
    [
        (SamplingConfig(num_steps=3, guidance_scale=4.0), "num_steps"),
        (SamplingConfig(num_steps=2, guidance_scale=7.5), "guidance_scale"),
        (SamplingConfig(num_steps=2, guidance_scale=4.0, scheduler="ddim"), "scheduler"),
        (SamplingConfig(num_steps=2, guidance_scale=4.0, height=32, width=32), "height"),
    ],
    ids=["steps", "guidance", "scheduler", "size"],
)
def test_resume_rejects_changed_sampling(run, pipe, table, changed_config, changed_key):
    with pytest.raises(RunFolderError, match=changed_key) as raised:
        generate_run(pipe, table, run.path, changed_config, "toy-random", progress=False)

    assert "new run_dir" in str(raised.value)


def test_resume_rejects_changed_model(run, pipe, table):
    with pytest.raises(RunFolderError, match="model"):
        generate_run(pipe, table, run.path, TWO_STEPS, "another-model", progress=False)


def test_resume_rejects_retrained_weights(run, table):
    retrained = build_toy_pipeline_random(seed=1)

    with pytest.raises(RunFolderError, match="unet_weights_sha256"):
        generate_run(retrained, table, run.path, TWO_STEPS, "toy-random", progress=False)


def test_resume_rejects_changed_unet_variant(run, pipe, table):
    with pytest.raises(RunFolderError, match="unet_variant"):
        generate_run(
            pipe, table, run.path, TWO_STEPS, "toy-random", unet_variant="shuffled", progress=False
        )


def test_resume_rejects_changed_prompt(run, pipe, table):
    rows = [dict(row) for row in table.rows]
    rows[1]["prompt"] = "a blue cone on the left"
    changed = PromptTable(table.source, rows, table.extra_columns)

    with pytest.raises(RunFolderError, match="Image 1 .* prompt"):
        generate_run(pipe, changed, run.path, TWO_STEPS, "toy-random", progress=False)


# Storage modes and controls


def test_streamed_run_has_no_activation_files(pipe, table, tmp_path):
    streamed = generate_run(
        pipe,
        table.head(2),
        tmp_path / "streamed",
        TWO_STEPS,
        "toy-random",
        store_activations=False,
        progress=False,
    )

    assert streamed.config["activation_storage"] == "streamed"
    assert streamed.completed_ids() == [0, 1]
    assert not (tmp_path / "streamed" / "activations").exists()
    with pytest.raises(RunFolderError, match="store_activations=True"):
        streamed.load_cell(LATENT_KEY, 0, "train")


def test_shuffled_control_run(pipe, table, run, tmp_path):
    original_weights = [parameter.clone() for parameter in pipe.unet.parameters()]

    control = generate_run(
        pipe,
        table,
        tmp_path / "shuffled",
        TWO_STEPS,
        "toy-random",
        unet_variant="shuffled",
        shuffle_seed=3,
        progress=False,
    )

    assert control.config["unet_variant"] == "shuffled"
    assert control.config["shuffle_seed"] == 3
    assert all(
        torch.equal(before, after)
        for before, after in zip(original_weights, pipe.unet.parameters(), strict=True)
    )
    key = f"{run.layer_names[0]}@1"
    assert not torch.equal(
        control.load_activations(0, [key])[key], run.load_activations(0, [key])[key]
    )
    check_same_images(run, control)


def test_check_same_images_rejects_other_seeds(run, pipe, table, tmp_path):
    rows = [dict(row, seed=row["seed"] + 100) for row in table.rows]
    other = generate_run(
        pipe,
        PromptTable(table.source, rows, table.extra_columns),
        tmp_path / "other",
        TWO_STEPS,
        "toy-random",
        store_activations=False,
        progress=False,
    )

    with pytest.raises(RunFolderError, match="'seed'"):
        check_same_images(run, other)


# Reading errors


def test_missing_run_folder_names_fix(tmp_path):
    with pytest.raises(RunFolderError, match="01_generate"):
        RunFolder(tmp_path / "nothing here")


def test_incomplete_run_load_cell_names_fix(pipe, table, tmp_path, monkeypatch):
    folder = tmp_path / "crashed"
    monkeypatch.setattr(run_generation, "generate", _CrashAfter(calls=1))
    with pytest.raises(RuntimeError):
        generate_run(pipe, table, folder, TWO_STEPS, "toy-random", batch_size=1, progress=False)

    with pytest.raises(RunFolderError, match="generate_run on this folder again"):
        RunFolder(folder).load_cell(LATENT_KEY, 0, "train")


def test_png_is_written_after_activations(run):
    for image_id in run.image_ids():
        png_time = run.image_path(image_id).stat().st_mtime_ns
        assert run.activations_path(image_id).stat().st_mtime_ns <= png_time
        with Image.open(run.image_path(image_id)) as image:
            assert image.format == "PNG"


def test_relative_run_dir_is_under_runs():
    assert resolve_run_dir("toy") == RUNS_DIR / "toy"
    assert resolve_run_dir("/tmp/elsewhere").as_posix() == "/tmp/elsewhere"


def test_summary_lists_layers(run):
    summary = run.summary()

    assert "lms scheduler, 2 steps" in summary
    assert "5 of 5 images complete (3 train, 2 test)" in summary
    for layer in run.layers:
        assert layer["name"] in summary


@pytest.mark.slow
def test_sd_architecture_run_layers(table, tmp_path):
    # Stable Diffusion v1.x's UNet at 64x64 pixels: an 8x8 latent, so grids 8, 4, 2 and 1.
    pipe = build_sd_pipeline_random(sample_size=8, seed=0)
    config = SamplingConfig(num_steps=1, guidance_scale=7.5)

    sd_run = generate_run(pipe, table.head(1), tmp_path / "sd", config, "sd-random", progress=False)

    widths = [layer["width"] for layer in sd_run.layers]
    grids = [layer["grid"][0] for layer in sd_run.layers]
    assert len(sd_run.layers) == 16
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3
    assert grids == [8, 8, 4, 4, 2, 2, 1] + [2] * 3 + [4] * 3 + [8] * 3
    activations = sd_run.load_activations(0)
    for layer in sd_run.layers:
        tokens = layer["grid"][0] * layer["grid"][1]
        assert activations[f"{layer['name']}@0"].shape == (tokens, layer["width"])
    assert activations["vae_decoder@0"].shape == (64, sd_run.config["vae_layer"]["width"])
