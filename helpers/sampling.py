"""The denoising loop of a Stable Diffusion pipeline, written out so each step can be observed.

``generate`` does what ``StableDiffusionPipeline.__call__`` does for text-to-image sampling
(encode prompts, draw noise, denoise with classifier-free guidance, decode), and adds
activation recording, per-step latents and callbacks. With the same scheduler and one
``torch.Generator`` per image it reproduces the pipeline's images.
"""

import logging
import math
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from helpers.hooks import (
    SUPPORTED_ACTIVATION_DTYPES,
    ActivationStore,
    find_vae_decoder_self_attention,
    record_activations,
    vae_decoder_attention_output,
)
from helpers.progress import progress as progress_bar

logger = logging.getLogger(__name__)

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "lms": LMSDiscreteScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
}


@dataclass
class SamplingConfig:
    """Settings of one sampling run.

    The defaults are those that Chen, Viégas and Wattenberg ("Beyond Surface Statistics",
    NeurIPS 2023) used with Stable Diffusion v1.4: LMS, 15 steps, guidance scale 7.5.
    """

    scheduler: str = "lms"
    """Sampler: ``"lms"`` (LMSDiscreteScheduler), ``"ddim"`` (DDIM with eta 0, deterministic)
    or ``"euler"`` (EulerDiscreteScheduler without churn, deterministic)."""
    num_steps: int = 15
    """Number of denoising steps, each one UNet call."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale s, at least 1. Above 1 the UNet runs on the batch
    ``[unconditional; conditional]``; at 1 only on the conditional batch."""
    height: int | None = None
    """Image height in pixels, a multiple of the VAE's downsampling factor. None takes the
    model's default, ``unet.config.sample_size`` times that factor (512 for SD v1.x)."""
    width: int | None = None
    """Image width in pixels, under the same rule as ``height``."""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"Unknown scheduler {self.scheduler!r}: choose one of {sorted(SCHEDULERS)}."
            )
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int):
            raise TypeError(f"num_steps must be an int, got {self.num_steps!r}.")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}.")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 1:
            raise ValueError(
                f"guidance_scale must be a finite number of at least 1 (1 switches "
                f"classifier-free guidance off), got {self.guidance_scale}."
            )
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of pixels, got {value!r}.")

    @property
    def guidance_batches(self) -> int:
        """2 when the UNet batch is ``[unconditional; conditional]``, 1 without guidance."""
        return 2 if self.guidance_scale > 1 else 1

    def image_size(self, pipe: StableDiffusionPipeline) -> tuple[int, int]:
        """Return (height, width) in pixels, filling unset sides with the model's default."""
        default = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
        return (self.height or default, self.width or default)


@dataclass
class RecordingConfig:
    """Activations that ``generate`` records besides the images."""

    layers: Collection[str] | None = None
    """Self-attention layer names from ``hooks.find_self_attention_layers``; None for all."""
    steps: Collection[int] | None = None
    """Step indices to record; None for every step."""
    dtype: torch.dtype = torch.float32
    """Storage type of the activations on the CPU. float16 halves the memory."""
    vae_decoder: bool = False
    """Also record the VAE decoder's mid-block self-attention at each recorded step, fed
    with the latent chosen by ``vae_input``. This control costs part of a VAE decode per
    step."""
    vae_input: Literal["predicted_original", "latent"] = "predicted_original"
    """Latent fed to the VAE decoder at each step. ``"predicted_original"`` is the
    scheduler's estimate of the clean latent from this step's noise prediction, which has
    the scale the VAE was trained on. ``"latent"`` is the partly denoised latent that the
    UNet received at this step; with LMS and Euler its scale grows with the noise level."""

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_ACTIVATION_DTYPES:
            raise ValueError(
                f"Unsupported activation dtype {self.dtype!r}: use torch.float32, "
                "torch.float16 or torch.bfloat16."
            )
        if self.vae_input not in ("predicted_original", "latent"):
            raise ValueError(
                f"vae_input must be 'predicted_original' or 'latent', got {self.vae_input!r}."
            )


@dataclass
class StepRecord:
    """State of one denoising step, on the CPU."""

    step: int
    """Index of the step, 0 for the noisiest."""
    timestep: float
    """Scheduler timestep t of this step, from 999 down towards 0 for SD's 1000 training
    timesteps."""
    latents: torch.Tensor
    """Latent z_t that the UNet received at this step, before ``scale_model_input``:
    (batch, channels, latent rows, latent columns)."""
    predicted_original: torch.Tensor | None
    """The scheduler's estimate of the clean latent z_0 from this step, same shape, or None
    if the scheduler does not provide one."""


@dataclass
class SamplingResult:
    """Output of ``generate``; images and tensors on the CPU."""

    images: np.ndarray
    """Decoded images, float32 in [0, 1], (batch, height, width, 3)."""
    latents: torch.Tensor
    """Final denoised latents, (batch, channels, latent rows, latent columns)."""
    timesteps: list[float]
    """Scheduler timestep of each step."""
    steps: list[StepRecord] = field(default_factory=list)
    """Per-step latents, filled when ``keep_step_latents=True``."""
    activations: ActivationStore | None = None
    """UNet self-attention outputs keyed by (layer, step), when recording was requested."""
    vae_activations: ActivationStore | None = None
    """VAE decoder mid-block self-attention outputs keyed by (layer, step), when requested."""


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Return the VAE's spatial downsampling factor (8 for Stable Diffusion)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def make_scheduler(name: str, base_config: dict) -> SchedulerMixin:
    """Build a fresh scheduler of the kind ``name`` with the noise schedule of ``base_config``.

    ``base_config`` is a scheduler config such as ``pipe.scheduler.config``. Keys that only
    the original scheduler class takes are dropped by diffusers' ``from_config``. A fresh
    instance per run matters because LMS keeps past derivatives as state.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}: choose one of {sorted(SCHEDULERS)}.")
    return SCHEDULERS[name].from_config(base_config)


def _validate_generate_inputs(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplingConfig,
    recording: RecordingConfig | None,
) -> tuple[int, int]:
    """Raise on invalid arguments to ``generate``; return the image (height, width)."""
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, component, None) is None:
            raise ValueError(
                f"The pipeline has no {component}: pass a StableDiffusionPipeline from "
                "helpers.models.load_ldm."
            )
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}.")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt.")
    bad_prompts = [prompt for prompt in prompts if not isinstance(prompt, str)]
    if bad_prompts:
        raise TypeError(f"Every prompt must be a string, got {bad_prompts[:3]}.")
    if len(prompts) != len(seeds):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt."
        )
    bad_seeds = [
        seed for seed in seeds if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0
    ]
    if bad_seeds:
        raise ValueError(f"Seeds must be non-negative ints, got {bad_seeds[:3]}.")

    height, width = config.image_size(pipe)
    factor = vae_scale_factor(pipe.vae)
    if height % factor or width % factor:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the VAE's downsampling "
            f"factor {factor}: round height and width to multiples of {factor}."
        )

    if recording is not None and recording.steps is not None:
        out_of_range = sorted(
            step for step in recording.steps if isinstance(step, int) and step >= config.num_steps
        )
        if out_of_range:
            raise ValueError(
                f"Recording steps {out_of_range} are out of range for num_steps="
                f"{config.num_steps}: record step indices 0 to {config.num_steps - 1}."
            )
    return height, width


def encode_prompts(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> torch.Tensor:
    """Encode prompts with the pipeline's text encoder: (batch, prompt tokens, text width).

    Prompts are padded to the tokenizer's maximum length, and longer prompts are truncated
    with a warning, as StableDiffusionPipeline does.
    """
    tokenizer = pipe.tokenizer
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    untruncated = tokenizer(list(prompts), padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > tokens.input_ids.shape[-1]:
        logger.warning(
            "Some prompts exceed %d tokens and were truncated", tokenizer.model_max_length
        )

    device = pipe.text_encoder.device
    attention_mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(device)
    embeddings = pipe.text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]
    return embeddings.to(dtype=pipe.unet.dtype)


def initial_noise(
    seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Draw each image's starting noise from its own CPU generator: (batch, *shape).

    Noise is drawn on the CPU in float32, so an image gets the same noise alone or in a batch,
    on any device, and in any dtype up to rounding.
    """
    noise = [
        torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed))
        for seed in seeds
    ]
    return torch.cat(noise).to(device=device, dtype=dtype)


def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    """Decode latents into float32 images in [0, 1], (batch, height, width, 3)."""
    vae_latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
    images = pipe.vae.decode(vae_latents, return_dict=False)[0]
    images = (images / 2 + 0.5).clamp(0, 1)
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    recording: RecordingConfig | None = None,
    keep_step_latents: bool = False,
    step_callback: Callable[[StepRecord], None] | None = None,
    progress: bool | None = None,
) -> SamplingResult:
    """Generate one image per (prompt, seed) and optionally record what the model computes.

    Args:
        pipe: a pipeline from ``helpers.models.load_ldm`` or the random-weight builders. Its
            own scheduler only lends its noise schedule; ``config.scheduler`` picks the sampler.
        prompts: one prompt per image.
        seeds: one seed per image. Each image draws its noise from its own CPU generator,
            so it is reproducible alone or in any batch.
        config: sampler settings; None uses ``SamplingConfig()``.
        recording: self-attention outputs to record; None records nothing.
        keep_step_latents: keep each step's latent and predicted clean latent in
            ``result.steps``, to decode partly denoised images later.
        step_callback: called after every step with its StepRecord.
        progress: show a tqdm bar over the steps. None follows the ``TQDM_DISABLE``
            environment variable (see ``helpers.progress``), which CI sets.

    The loop runs under ``torch.no_grad``, not ``torch.inference_mode``, so that hooks from
    ``hooks.edit_activations`` can optimise an edit with autograd.

    NOTE: the UNet runs all images as one batch. CPU convolution and GEMM kernels pick their
    blocking by batch size, so an image sampled in a batch can differ from the same image
    sampled alone in the last bits (about 1e-6 per UNet call). Runs with the same batch are
    bit-identical.
    """
    config = config or SamplingConfig()
    height, width = _validate_generate_inputs(pipe, prompts, seeds, config, recording)
    vae_layer = None
    if recording is not None and recording.vae_decoder:
        vae_layer, _ = find_vae_decoder_self_attention(pipe.vae)

    unet, scheduler_name = pipe.unet, config.scheduler
    device, dtype = unet.device, unet.dtype
    guidance_batches = config.guidance_batches

    # Legend: names in this loop and the symbols of DDPM (Ho et al. 2020) and classifier-free
    # guidance (Ho and Salimans 2022).
    #   latents              z_t, the noisy latent at timestep t
    #   step / timestep      index i = 0 .. T-1 of the step / the scheduler's t_i
    #   text_embeddings      c, the text encoder's output ([c_empty; c] under guidance)
    #   noise_pred_cond      eps_theta(z_t, t, c), noise predicted with the prompt
    #   noise_pred_uncond    eps_theta(z_t, t, c_empty), noise predicted with the empty prompt
    #   guidance_scale       s in eps = eps_uncond + s * (eps_cond - eps_uncond)
    #   predicted_original   z_0 estimate, the scheduler's prediction of the clean latent
    with ExitStack() as contexts, torch.no_grad():
        # 1. Scheduler: a fresh sampler with the pipeline's noise schedule.
        scheduler = make_scheduler(scheduler_name, pipe.scheduler.config)
        scheduler.set_timesteps(config.num_steps, device=device)
        timesteps = scheduler.timesteps

        # 2. Hooks: record the conditional half of every selected attn1 output per UNet call.
        activations = None
        if recording is not None:
            activations = contexts.enter_context(
                record_activations(
                    unet,
                    guidance_batches=guidance_batches,
                    layers=recording.layers,
                    steps=recording.steps,
                    dtype=recording.dtype,
                )
            )
        vae_activations = ActivationStore() if vae_layer is not None else None

        # 3. Text conditioning c, with the empty prompt's c_empty first under guidance.
        text_embeddings = encode_prompts(pipe, prompts)
        if guidance_batches == 2:
            empty_embeddings = encode_prompts(pipe, [""] * len(prompts))
            text_embeddings = torch.cat([empty_embeddings, text_embeddings])

        # 4. Initial noise z_T, one generator per image, scaled to the first noise level.
        factor = vae_scale_factor(pipe.vae)
        latent_shape = (unet.config.in_channels, height // factor, width // factor)
        latents = initial_noise(seeds, latent_shape, device, dtype)
        latents = latents * scheduler.init_noise_sigma

        steps: list[StepRecord] = []
        bar_options = {} if progress is None else {"disable": not progress}
        for step, timestep in enumerate(progress_bar(timesteps, desc="Sampling", **bar_options)):
            # 5. Noise prediction on [z_t; z_t] (or z_t), scaled as the scheduler needs.
            model_input = torch.cat([latents] * guidance_batches)
            model_input = scheduler.scale_model_input(model_input, timestep)
            noise_pred = unet(model_input, timestep, encoder_hidden_states=text_embeddings).sample

            # 6. Classifier-free guidance.
            if guidance_batches == 2:
                noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + config.guidance_scale * (
                    noise_pred_cond - noise_pred_uncond
                )

            # 7. Scheduler update z_t -> z_{t-1}, with its estimate of z_0.
            step_output = scheduler.step(noise_pred, timestep, latents)
            predicted_original = getattr(step_output, "pred_original_sample", None)

            # 8. Observers: VAE control, per-step latents and the callback.
            if vae_activations is not None and (recording.steps is None or step in recording.steps):
                vae_input = _vae_control_input(recording, latents, predicted_original)
                activation = vae_decoder_attention_output(pipe.vae, vae_input.to(pipe.vae.dtype))
                activation = activation.to(
                    device="cpu", dtype=recording.dtype, memory_format=torch.contiguous_format
                )
                vae_activations.add(vae_layer, step, activation)
            if keep_step_latents or step_callback is not None:
                record = StepRecord(
                    step=step,
                    timestep=float(timestep),
                    latents=_cpu_copy(latents),
                    predicted_original=(
                        None if predicted_original is None else _cpu_copy(predicted_original)
                    ),
                )
                if keep_step_latents:
                    steps.append(record)
                if step_callback is not None:
                    step_callback(record)

            latents = step_output.prev_sample

        # 9. Decode z_0 into pixels.
        images = decode_latents(pipe, latents)

    return SamplingResult(
        images=images,
        latents=_cpu_copy(latents),
        timesteps=[float(timestep) for timestep in timesteps],
        steps=steps,
        activations=activations,
        vae_activations=vae_activations,
    )


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", copy=True)


def _vae_control_input(
    recording: RecordingConfig, latents: torch.Tensor, predicted_original: torch.Tensor | None
) -> torch.Tensor:
    """Pick the latent that the VAE control decodes at this step."""
    if recording.vae_input == "latent":
        return latents
    if predicted_original is None:
        raise RuntimeError(
            "The scheduler returned no predicted original sample for the VAE control: set "
            "RecordingConfig(vae_input='latent') to decode the partly denoised latent instead."
        )
    return predicted_original
