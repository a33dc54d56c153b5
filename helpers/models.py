"""Load latent diffusion models and build the controls the probes are compared against.

- ``load_ldm`` loads the embedded toy LDM, a Hugging Face model id or a local folder into a
  diffusers ``StableDiffusionPipeline``.
- ``shuffled_unet`` copies a UNet with every parameter tensor permuted (or re-initialised),
  the control that keeps each tensor's distribution but destroys what training learned.
- ``build_sd_unet_random`` and ``build_sd_pipeline_random`` build the full-size Stable
  Diffusion v1.x architecture with random weights and no download, and
  ``build_toy_pipeline_random`` does the same for the toy architecture.
"""

import copy
import hashlib
import logging
import re
import tempfile
from pathlib import Path
from typing import Literal

import huggingface_hub.errors
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from helpers.paths import REPO_ROOT, TOY_LDM_DIR, TOY_LDM_TRAINING_COMMANDS
from helpers.toyworld.architecture import (
    SCHEDULER_CONFIG,
    build_text_encoder,
    build_unet,
    build_vae,
)
from helpers.toyworld.tokenizer import save_tokenizer

logger = logging.getLogger(__name__)

TOY_MODEL = "toy"

# UNet of Stable Diffusion v1.4 and v1.5, from unet/config.json of CompVis/stable-diffusion-v1-4
# and runwayml/stable-diffusion-v1-5. Entries that equal diffusers' defaults are written out too,
# so the architecture stays fixed if a default changes.
SD_V1_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
}

# Noise schedule of CompVis/stable-diffusion-v1-4 (scheduler/scheduler_config.json). That file
# configures a PNDMScheduler, so its PNDM-only keys (skip_prk_steps, set_alpha_to_one) are left
# out here.
SD_V1_LMS_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}

SD_V1_TEXT_WIDTH = 768
SD_V1_MAX_PROMPT_TOKENS = 77
SD_V1_VAE_SCALING_FACTOR = 0.18215

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A Hugging Face repository id: "name" or "owner/name" from letters, digits, "-", "_" and ".".
_HUB_ID_PATTERN = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class ModelNotFoundError(ValueError):
    """Raised when a model id or folder cannot be loaded as a diffusion pipeline."""


def toy_ldm_dir() -> Path:
    """Return the folder of the embedded toy LDM (``helpers.paths.TOY_LDM_DIR``)."""
    return TOY_LDM_DIR


def validate_device_and_dtype(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    """Parse ``device`` and raise ValueError unless it is available and supports ``dtype``."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"Invalid device {device!r}: use 'cpu', 'cuda', 'cuda:1' or 'mps'."
        ) from error

    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"Unsupported dtype {dtype!r}: use torch.float32, or torch.float16 or "
            "torch.bfloat16 on a GPU."
        )
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available: use device='cpu'."
        )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device={device!r} was requested but MPS is not available: use device='cpu'."
        )
    if parsed.type == "cpu" and dtype == torch.float16:
        raise ValueError(
            "dtype=torch.float16 is not supported on the CPU, where several diffusers "
            "operations lack half-precision kernels or run very slowly: use "
            "dtype=torch.float32 on the CPU, or float16 on a GPU."
        )
    return parsed


def load_ldm(
    model: str | Path = TOY_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    local_files_only: bool = False,
    variant: str | None = None,
) -> StableDiffusionPipeline:
    """Load a latent diffusion model as a StableDiffusionPipeline without safety checker.

    Args:
        model: ``"toy"`` for the embedded toy LDM, a local folder in diffusers'
            ``StableDiffusionPipeline`` layout, or a Hugging Face model id such as
            ``"CompVis/stable-diffusion-v1-4"`` or
            ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``. An existing folder wins over
            a model id of the same spelling.
        device: device to move every component to.
        dtype: floating-point type of the weights. float16 is rejected on the CPU.
        local_files_only: load a model id from the Hugging Face cache only, with no network.
        variant: weight variant of a hub repository, such as ``"fp16"``.

    Raises:
        ModelNotFoundError: the toy model or folder is missing, or the hub cannot provide the
            model id (unknown id, gated repository, no network and not cached).
        ValueError: the device is unavailable or does not support the dtype.
    """
    validate_device_and_dtype(device, dtype)
    source = _resolve_model_source(model)
    logger.info("Loading %s from %s onto %s as %s", model, source, device, dtype)

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local_files_only or isinstance(source, Path),
            variant=variant,
        )
    except (
        huggingface_hub.errors.HfHubHTTPError,
        huggingface_hub.errors.HFValidationError,
        huggingface_hub.errors.EntryNotFoundError,
        OSError,
    ) as error:
        raise ModelNotFoundError(_load_failure_message(model, source, local_files_only)) from error

    return pipe.to(device)


def _resolve_model_source(model: str | Path) -> str | Path:
    """Map ``model`` to a local pipeline folder or a hub model id, checking what can be checked."""
    if isinstance(model, str) and model == TOY_MODEL:
        folder = toy_ldm_dir()
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"The embedded toy LDM was not found at {folder} (no model_index.json). "
                f"Restore it from the repository, or train and export it from {REPO_ROOT}: "
                f"{TOY_LDM_TRAINING_COMMANDS}"
            )
        return folder

    path = Path(model).expanduser()
    if path.is_file():
        raise ModelNotFoundError(
            f"model={str(model)!r} is a file: pass the pipeline folder that contains "
            "model_index.json."
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"The folder {path} is not a diffusers pipeline (no model_index.json): pass a "
                "folder written by StableDiffusionPipeline.save_pretrained."
            )
        return path

    if isinstance(model, Path) or not _HUB_ID_PATTERN.match(model):
        raise ModelNotFoundError(
            f"model={str(model)!r} is neither an existing folder nor a valid Hugging Face model "
            "id such as 'CompVis/stable-diffusion-v1-4': check the path, or use model='toy'."
        )
    return model


def _load_failure_message(model: str | Path, source: str | Path, local_files_only: bool) -> str:
    if isinstance(source, Path):
        return (
            f"Could not load the pipeline folder {source} for model={str(model)!r}: a component "
            "is missing or unreadable. Export the folder again with "
            "StableDiffusionPipeline.save_pretrained."
        )
    cache_note = " (local_files_only=True, so only the local cache was searched)"
    return (
        f"Could not load the model {model!r} from the Hugging Face hub"
        f"{cache_note if local_files_only else ''}. Check the model id; for a gated model, "
        "accept its license on huggingface.co and log in with `huggingface-cli login`; when "
        "offline, download it once with network access so it is cached. To work without "
        "the hub, use model='toy'."
    )


def pipeline_with_unet(
    pipe: StableDiffusionPipeline, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """Return a pipeline that shares every component of ``pipe`` except its UNet."""
    components = {**pipe.components, "unet": unet}
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def weights_digest(module: torch.nn.Module, length: int = 16) -> str:
    """Return the first ``length`` hex digits of a SHA-256 over a module's state dict.

    Names, dtypes, shapes and raw bytes of every parameter and buffer enter the hash, so two
    modules share a digest only when their weights are bit-identical. Each tensor is copied
    to the CPU in turn. For Stable Diffusion's UNet (3.4 GB in float32) that is an estimated
    few seconds.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:length]


def shuffled_unet(
    unet: torch.nn.Module, seed: int = 0, mode: Literal["shuffle", "reinit"] = "shuffle"
) -> torch.nn.Module:
    """Return a copy of ``unet`` whose weights no longer carry what training learned.

    ``mode="shuffle"`` permutes the elements of every parameter tensor (weights, biases and
    normalisation scales) with its own random permutation, so each tensor keeps its exact
    multiset of values and therefore its distribution. ``mode="reinit"`` builds a fresh
    model of the same class from ``unet.config``, so it needs a diffusers model. Its weights
    get the initialisation of that class's constructor, which for diffusers' layers is
    PyTorch's default. Both modes are deterministic in ``seed`` and leave ``unet`` unchanged.
    """
    if mode == "shuffle":
        copied = copy.deepcopy(unet)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in copied.parameters():
                # The permutation is drawn on the CPU, so a seed gives the same copy on
                # every device.
                permutation = torch.randperm(parameter.numel(), generator=generator)
                flat = parameter.reshape(-1)
                parameter.copy_(flat[permutation.to(flat.device)].view_as(parameter))
        return copied

    if mode == "reinit":
        if not isinstance(unet, ModelMixin):
            raise TypeError(
                f"mode='reinit' needs a diffusers model with a config, got {type(unet).__name__}: "
                "use mode='shuffle' for other modules."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = type(unet).from_config(unet.config)
        fresh.to(unet.device)
        if fresh.dtype != unet.dtype:
            fresh.to(unet.dtype)
        fresh.train(unet.training)
        return fresh

    raise ValueError(f"Unknown mode={mode!r}: use 'shuffle' or 'reinit'.")


def build_sd_unet_random(sample_size: int = 64, seed: int = 0) -> UNet2DConditionModel:
    """Build Stable Diffusion v1.x's UNet (about 860M parameters) with random weights.

    ``sample_size`` is the latent size: 64 for SD's 512x512 images, 8 for 64x64 images.
    Its 16 ``attn1`` layers have widths 320/640/1280 on grids of the latent size and its
    halves, quarters and eighths.
    """
    config = {**SD_V1_UNET_CONFIG, "sample_size": sample_size}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return unet.eval()


def build_sd_pipeline_random(sample_size: int = 64, seed: int = 0) -> StableDiffusionPipeline:
    """Build a random-weight pipeline with Stable Diffusion v1.x's UNet, for offline tests.

    The UNet is full size. The text encoder is a 2-layer CLIP text model of SD's width (768)
    and prompt length (77 tokens), and the VAE is a small AutoencoderKL that keeps SD's
    4-channel latent and 8x downsampling. The tokenizer has the toy world's vocabulary, and
    the scheduler is LMS with SD v1.4's noise schedule. Default images are
    ``8 * sample_size`` pixels square.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _build_toy_vocabulary_tokenizer(SD_V1_MAX_PROMPT_TOKENS)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=SD_V1_TEXT_WIDTH,
                intermediate_size=4 * SD_V1_TEXT_WIDTH,
                num_hidden_layers=2,
                num_attention_heads=12,
                max_position_embeddings=SD_V1_MAX_PROMPT_TOKENS,
                projection_dim=SD_V1_TEXT_WIDTH,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        # Four blocks give three 2x downsamplings, so 8x like SD's VAE, at a fraction of
        # SD's widths (128/256/512/512).
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=8 * sample_size,
            scaling_factor=SD_V1_VAE_SCALING_FACTOR,
        )
    unet = build_sd_unet_random(sample_size=sample_size, seed=seed)
    scheduler = LMSDiscreteScheduler(**SD_V1_LMS_SCHEDULER_CONFIG)
    return _assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def build_toy_pipeline_random(seed: int = 0) -> StableDiffusionPipeline:
    """Build the toy LDM's architecture with random weights and its DDIM scheduler."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _build_toy_vocabulary_tokenizer()
        text_encoder = build_text_encoder(
            len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
        )
        vae = build_vae()
        unet = build_unet()
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return _assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def _build_toy_vocabulary_tokenizer(max_tokens: int | None = None) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = save_tokenizer(folder)
    if max_tokens is not None:
        tokenizer.model_max_length = max_tokens
    return tokenizer


def _assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
