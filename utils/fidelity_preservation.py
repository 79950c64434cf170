"""Fidelity Preservation (CoMat Module 3): a latent-space UNet discriminator and the reference latents.

Without an anchor the generator overfits the captioner reward and image quality collapses. CoMat adds
a non-saturating GAN loss in latent space:

* the discriminator D is the pretrained UNet of the same model family, frozen, with its own LoRA
  adapter (recipe rank 128) and a per-latent-pixel ``Linear(4, 1)`` head, giving one logit per latent
  pixel for a clean final latent x̂0 at the last (smallest) timestep of the schedule, conditioned on
  the empty prompt;
* "real" samples are latents of the original, frozen model for the same prompts (same sampler and
  guidance), "fake" samples are the online model's x̂0;
* ``L_D = BCE(D(x_ref), 1) + BCE(D(x̂0.detach()), 0)`` and ``L_adv_G = BCE(D(x̂0), 1)`` with D frozen.

Not in the paper, off by default: :func:`latent_moment_loss` holds the per-channel mean and SD of x̂0 to the
reference latents' (``--latent_moment_loss_weight``), against latents that grow off the VAE's range.

Memory: when D is initialised from the generator's own checkpoint (the default), D does not hold a
second UNet. It is a second peft LoRA adapter ("discriminator") on the *same* UNet module as the
generator adapter ("default"); :meth:`UNetDiscriminator.forward` activates D's adapter for the call
and restores the previous adapter state afterwards. With a different checkpoint D loads its own
frozen UNet (:meth:`UNetDiscriminator.from_pretrained`).

Adapter switching in peft is not side-effect free: ``LoraLayer.set_adapter`` sets ``requires_grad``
to True on the adapters it activates and False on all others, and ``enable_adapters`` /
``disable_adapters`` do the same. Everything here snapshots the ``requires_grad`` flags of the
adapter layers and puts them back, so the training loop alone decides what is trainable.

The reference latents are generated with the generator LoRA switched off (:func:`lora_disabled`),
so no second pipeline is kept in memory, and cached on disk as safetensors, one file per prompt and
sampling settings (:class:`ReferenceLatentCache`).
"""

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DISCRIMINATOR_WEIGHTS_NAME = "discriminator.safetensors"
DISCRIMINATOR_CONFIG_NAME = "discriminator_config.json"
REFERENCE_LATENTS_KEY = "latents"


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _atomic_write(path: str, write_to: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder and ``os.replace`` it: readers (other ranks,
    a resumed run) see either the old file or the complete new one, never a partial write."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write_to(temporary_path)
        with open(temporary_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary_path, path)
    except BaseException:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        raise


def _save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    _atomic_write(path, lambda temporary_path: save_file(tensors, temporary_path, metadata=metadata))


def _save_json_atomic(obj: dict, path: str) -> None:
    def write(temporary_path):
        with open(temporary_path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# peft adapter state
# --------------------------------------------------------------------------------------------------


def _tuner_layers(unet: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


def _active_adapter_names(tuner_layer) -> List[str]:
    active = tuner_layer.active_adapter
    return [active] if isinstance(active, str) else list(active)


class _AdapterState:
    """The active adapters, the enabled switch and ``requires_grad`` of each peft tuner layer.

    Switching goes through the tuner layers' own ``set_adapter`` / ``enable_adapters`` rather than
    diffusers' model-level helpers, which walk the whole module tree once per call per layer kind.
    """

    def __init__(self, tuner_layers: list):
        self.tuner_layers = tuner_layers
        self.active_adapters = [_active_adapter_names(layer) for layer in tuner_layers]
        self.adapters_disabled = [layer.disable_adapters for layer in tuner_layers]
        self.requires_grad = [(param, param.requires_grad) for layer in tuner_layers for param in layer.parameters()]

    def restore_requires_grad(self) -> None:
        for param, requires_grad in self.requires_grad:
            param.requires_grad_(requires_grad)

    def restore(self) -> None:
        for layer, active_adapters, disabled in zip(
            self.tuner_layers, self.active_adapters, self.adapters_disabled, strict=True
        ):
            layer.set_adapter(active_adapters)
            if layer.disable_adapters != disabled:
                layer.enable_adapters(not disabled)
        self.restore_requires_grad()


@contextmanager
def _adapter_state_restored(tuner_layers: list) -> Iterator[_AdapterState]:
    """Put the adapter state of ``tuner_layers`` back on exit, even on error."""
    state = _AdapterState(tuner_layers)
    try:
        yield state
    finally:
        state.restore()


@contextmanager
def _gradient_checkpointing_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Switch diffusers' block-level checkpointing off, keeping each block's checkpointing function."""
    checkpointed_modules = [module for module in unet.modules() if getattr(module, "gradient_checkpointing", False)]
    for module in checkpointed_modules:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in checkpointed_modules:
            module.gradient_checkpointing = True


@contextmanager
def lora_disabled(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``unet`` as the original model: every peft adapter off inside the block, restored after.

    Used to sample the reference ("real") latents with the frozen base weights instead of keeping a
    second pipeline in memory. Active adapters, the enabled switch and ``requires_grad`` of the LoRA
    parameters are exactly as before on exit, also when the block raises, and ``requires_grad`` is
    left untouched inside it too. A UNet without adapters is already the original model.
    """
    tuner_layers = _tuner_layers(unet)
    with _adapter_state_restored(tuner_layers) as state:
        for layer in tuner_layers:
            layer.enable_adapters(False)
        state.restore_requires_grad()
        yield unet


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


def _adapter_parameter_path(parameter_name: str, adapter_name: str) -> Optional[str]:
    """``"...to_q.lora_A.discriminator.weight"`` -> ``"...to_q.lora_A.weight"``; None for other parameters."""
    parts = parameter_name.split(".")
    for index in range(1, len(parts)):
        if parts[index] == adapter_name and parts[index - 1].startswith("lora_"):
            return ".".join(parts[:index] + parts[index + 1 :])
    return None


class UNetDiscriminator(torch.nn.Module):
    """CoMat's latent discriminator: a frozen UNet with its own LoRA adapter and a per-pixel linear head.

    Build it with :meth:`from_unet` (the generator's UNet; D adds only its LoRA and head) or
    :meth:`from_pretrained` (its own frozen UNet from another checkpoint). Either way D's trainable
    parameters (:meth:`trainable_parameters`) are frozen after construction; the training loop calls
    ``requires_grad_(True)`` for the discriminator step and ``requires_grad_(False)`` after it, so the
    generator step sends no gradient into D.

    With a shared UNet the UNet is deliberately *not* registered as a submodule: the base weights
    and the generator adapter belong to the generator, so ``D.parameters()``, ``D.state_dict()`` and
    ``D.to()`` only reach the head. D's LoRA lives inside the shared UNet and moves with it.
    """

    def __init__(self, unet: torch.nn.Module, adapter_name: str = "discriminator", *, owns_unet: bool):
        super().__init__()
        if adapter_name not in getattr(unet, "peft_config", {}):
            raise ValueError(
                f"The UNet has no adapter named '{adapter_name}'. Build the discriminator with "
                "UNetDiscriminator.from_unet or UNetDiscriminator.from_pretrained."
            )
        if owns_unet:
            self.unet = unet
        else:
            # A plain attribute, not a submodule: the shared base belongs to the generator (see above).
            self.__dict__["unet"] = unet
        self.owns_unet = owns_unet
        self.adapter_name = adapter_name
        adapter_config = unet.peft_config[adapter_name]
        self.rank = adapter_config.r
        self.lora_alpha = adapter_config.lora_alpha
        self.target_modules = sorted(adapter_config.target_modules)
        # One logit per latent pixel from the UNet's output channels; kept in fp32 like the LoRA.
        self.head = torch.nn.Linear(unet.config.out_channels, 1, device=unet.device, dtype=torch.float32)
        self._lora_parameters = {
            path: param
            for name, param in unet.named_parameters()
            if (path := _adapter_parameter_path(name, adapter_name)) is not None
        }
        if not self._lora_parameters:
            raise ValueError(f"Adapter '{adapter_name}' has no LoRA parameters on this UNet.")
        self.gradient_checkpointing = False
        self.requires_grad_(False)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint each whole UNet call of D that runs with gradient: it keeps only its inputs, and the
        recomputation in backward runs with D's adapter active (see :meth:`forward`)."""
        self.gradient_checkpointing = True

    @classmethod
    def from_unet(
        cls,
        unet: torch.nn.Module,
        rank: int,
        lora_alpha: Optional[float] = None,
        adapter_name: str = "discriminator",
        generator_adapter: str = "default",
        target_modules: Sequence[str] = LORA_TARGET_MODULES,
    ) -> "UNetDiscriminator":
        """D on the generator's own UNet: a second adapter ``adapter_name`` next to ``generator_adapter``.

        ``lora_alpha`` defaults to ``rank`` (scale 1, the recipe's "no alpha scaling"). The UNet's
        active adapter and every ``requires_grad`` flag are unchanged afterwards; the generator
        adapter must already be there, so that it is the one left active.
        """
        if generator_adapter not in getattr(unet, "peft_config", {}):
            raise ValueError(
                f"Add the generator adapter '{generator_adapter}' to the UNet before building the discriminator on it."
            )
        if adapter_name == generator_adapter:
            raise ValueError(f"The discriminator adapter needs a name other than the generator's ('{adapter_name}').")
        generator_state = _AdapterState(_tuner_layers(unet))
        _add_lora_adapter(unet, adapter_name, rank, lora_alpha, target_modules)
        # peft activates the new adapter on every layer it touched, including layers that only D's
        # adapter targets (not in `generator_state`); give all of them the generator's adapters back.
        unet.set_adapter(generator_state.active_adapters[0])
        generator_state.restore()
        return cls(unet, adapter_name, owns_unet=False)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        rank: int,
        lora_alpha: Optional[float] = None,
        *,
        subfolder: Optional[str] = "unet",
        dtype: Optional[torch.dtype] = None,
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        cache_dir: Optional[str] = None,
        adapter_name: str = "discriminator",
        target_modules: Sequence[str] = LORA_TARGET_MODULES,
    ) -> "UNetDiscriminator":
        """D with its own frozen UNet loaded from another checkpoint (``subfolder`` "unet" of a pipeline)."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(
            pretrained_model_name_or_path,
            subfolder=subfolder,
            dtype=dtype,
            revision=revision,
            variant=variant,
            cache_dir=cache_dir,
        )
        unet.requires_grad_(False)
        _add_lora_adapter(unet, adapter_name, rank, lora_alpha, target_modules)
        return cls(unet, adapter_name, owns_unet=True)

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """D's own parameters: its LoRA adapter and the head (what the D optimizer updates)."""
        return list(self._lora_parameters.values()) + list(self.head.parameters())

    def requires_grad_(self, requires_grad: bool = True) -> "UNetDiscriminator":
        """Freeze or unfreeze D's LoRA and head only; the base UNet stays frozen either way."""
        for param in self.trainable_parameters():
            param.requires_grad_(requires_grad)
        return self

    def forward(
        self,
        latents: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: Optional[dict] = None,
    ) -> torch.Tensor:
        """Logits ``[B, 1, h, w]`` (fp32), one per latent pixel; gradient flows back to ``latents``.

        ``timestep`` is the schedule's last (smallest) timestep and ``encoder_hidden_states`` the
        empty-prompt embedding; SDXL also needs ``added_cond_kwargs`` (pooled empty-prompt
        ``text_embeds`` and ``time_ids``).
        """
        shared_unet_checkpointing = not self.owns_unet and self.unet.is_gradient_checkpointing
        if torch.is_grad_enabled() and (self.gradient_checkpointing or shared_unet_checkpointing):
            # diffusers recomputes a checkpointed block in backward with whatever adapter is active
            # *then* — the generator's — which silently gives wrong gradients. So block-level
            # checkpointing is off inside D's call and the whole call is checkpointed instead: its
            # recomputation runs `_unet_forward` again, which re-activates D's adapter.
            unet_output = checkpoint(
                self._unet_forward, latents, timestep, encoder_hidden_states, added_cond_kwargs, use_reentrant=False
            )
        else:
            unet_output = self._unet_forward(latents, timestep, encoder_hidden_states, added_cond_kwargs)
        return self.head(unet_output.float().movedim(1, -1)).movedim(-1, 1)

    def _unet_forward(self, latents, timestep, encoder_hidden_states, added_cond_kwargs):
        tuner_layers = _tuner_layers(self.unet)
        checkpointing_off = nullcontext() if self.owns_unet else _gradient_checkpointing_disabled(self.unet)
        with _adapter_state_restored(tuner_layers) as state, checkpointing_off:
            for layer in tuner_layers:
                layer.set_adapter([self.adapter_name])
                if layer.disable_adapters:
                    layer.enable_adapters(True)
            # peft's set_adapter made D's adapter trainable and froze the generator's; D's trainability
            # is the training loop's choice (frozen in the generator step), so undo that.
            state.restore_requires_grad()
            unet_dtype = self.unet.dtype
            return self.unet(
                latents.to(unet_dtype),
                timestep,
                encoder_hidden_states=encoder_hidden_states.to(unet_dtype),
                added_cond_kwargs=added_cond_kwargs,
                return_dict=False,
            )[0]

    def _named_trainable_parameters(self) -> Dict[str, torch.nn.Parameter]:
        # The adapter name is dropped from the keys, so a file does not depend on what D was called.
        named = {f"lora.{path}": param for path, param in self._lora_parameters.items()}
        named.update({f"head.{name}": param for name, param in self.head.named_parameters()})
        return named

    def state_dict_for_save(self) -> Dict[str, torch.Tensor]:
        """D's LoRA (``lora.<module>.lora_A.weight``) and head (``head.weight``, ``head.bias``), on CPU."""
        return {
            name: param.detach().to("cpu").contiguous() for name, param in self._named_trainable_parameters().items()
        }

    def save(self, save_directory: str) -> None:
        """Write ``discriminator.safetensors`` and ``discriminator_config.json`` to ``save_directory``."""
        _save_safetensors_atomic(
            self.state_dict_for_save(), os.path.join(save_directory, DISCRIMINATOR_WEIGHTS_NAME), {"format": "pt"}
        )
        config = {
            "adapter_name": self.adapter_name,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "head_in_features": self.head.in_features,
            "shares_generator_unet": not self.owns_unet,
            "base_model_name_or_path": self.unet.config.get("_name_or_path"),
        }
        _save_json_atomic(config, os.path.join(save_directory, DISCRIMINATOR_CONFIG_NAME))

    @torch.no_grad()
    def load(self, load_directory: str) -> None:
        """Restore D's LoRA and head exactly from :meth:`save`'s file; errors name the file."""
        path = os.path.join(load_directory, DISCRIMINATOR_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Discriminator weights not found: {path}")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Discriminator weights file {path} is unreadable or corrupted: {error}") from error
        targets = self._named_trainable_parameters()
        missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"Discriminator weights file {path} does not match this discriminator (rank {self.rank}, "
                f"adapter '{self.adapter_name}'): missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
        for name, param in targets.items():
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"Discriminator weights file {path}: '{name}' has shape {tuple(tensors[name].shape)}, "
                    f"expected {tuple(param.shape)}."
                )
        for name, param in targets.items():
            param.copy_(tensors[name])


def _add_lora_adapter(unet, adapter_name: str, rank: int, lora_alpha: Optional[float], target_modules) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules),
        init_lora_weights=True,
    )
    with warnings.catch_warnings():
        # A second adapter on one model is the point here, not an accident peft should warn about.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=adapter_name)
    # peft creates the adapter in the base layer's dtype; keep D's trainable weights in fp32.
    for name, param in unet.named_parameters():
        if _adapter_parameter_path(name, adapter_name) is not None:
            param.data = param.data.float()


# --------------------------------------------------------------------------------------------------
# Losses (non-saturating GAN, BCE with logits averaged over all logits)
# --------------------------------------------------------------------------------------------------


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``L_D = BCE(real_logits, 1) + BCE(fake_logits, 0)``; pass the fake logits of detached latents."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real_loss + fake_loss


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``L_adv_G = BCE(fake_logits, 1)`` (non-saturating), computed with D frozen."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def latent_moment_loss(latents: torch.Tensor, reference_latents: torch.Tensor) -> torch.Tensor:
    """Squared differences of the per-channel mean and SD (over the batch and the latent pixels) of the generated
    ``latents`` and the ``reference_latents`` ([B, C, h, w] each), summed over channels; in fp32.

    An anchor for the scale of the latents, which the discriminator does not hold by itself: a pixel-space reward can be
    lowered by latents far larger than any the VAE makes (its decoder saturates), which D tells from real ones at once
    but whose gradient does not bring back (README, "Does it work?")."""
    latents, reference_latents = latents.float(), reference_latents.float()
    dims = (0, 2, 3)
    mean_gap = latents.mean(dim=dims) - reference_latents.mean(dim=dims)
    sd_gap = latents.std(dim=dims) - reference_latents.std(dim=dims)
    return (mean_gap**2 + sd_gap**2).sum()


@torch.no_grad()
def discriminator_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fractions of real logits > 0 and of fake logits < 0 (per latent pixel), for logging."""
    return (real_logits > 0).float().mean(), (fake_logits < 0).float().mean()


# --------------------------------------------------------------------------------------------------
# Reference latents
# --------------------------------------------------------------------------------------------------


def reference_noise_seed(prompt: str, base_seed: int) -> int:
    """A seed in ``[0, 2**63)`` fixed by ``(prompt, base_seed)``: the same prompt gets the same reference
    noise whichever process or run samples it. sha256, not ``hash()``, which is salted per process."""
    digest = hashlib.sha256(f"{base_seed}\n{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


class ReferenceLatentCache:
    """Latents of the original model, one safetensors file per (prompt, sampling settings).

    ``settings`` is everything that determines the reference latents (JSON-serialisable): base model
    id and revision, sampler, ``num_inference_steps``, guidance scale, resolution, dtype, base seed.
    The file name is the sha256 of the prompt and the canonical JSON of ``settings``; the prompt,
    the settings and a checksum of the latents are stored in the file's metadata, and a file whose
    header, checksum or metadata does not match is deleted and treated as a miss, never loaded.

    Latents are stored and returned on CPU, one ``[C, h, w]`` tensor per prompt.
    """

    def __init__(self, cache_dir: str, settings: dict):
        self.cache_dir = cache_dir
        self.settings = dict(settings)
        self._settings_json = _canonical_json(self.settings)
        os.makedirs(cache_dir, exist_ok=True)
        self._remove_stale_temporary_files()

    def _remove_stale_temporary_files(self, max_age_seconds=3600):
        """Temporary files of writes killed outright (a write takes well under a second; one an hour old is
        debris, not another run's write in progress)."""
        now = time.time()
        for name in os.listdir(self.cache_dir):
            path = os.path.join(self.cache_dir, name)
            try:
                if name.endswith(".tmp") and now - os.path.getmtime(path) > max_age_seconds:
                    os.remove(path)
            except FileNotFoundError:  # another process removed it first
                pass

    def key(self, prompt: str) -> str:
        return hashlib.sha256(
            _canonical_json({"prompt": prompt, "settings": self.settings}).encode("utf-8")
        ).hexdigest()

    def path(self, prompt: str) -> str:
        return os.path.join(self.cache_dir, f"{self.key(prompt)}.safetensors")

    def get(self, prompt: str) -> Optional[torch.Tensor]:
        """The cached latents of ``prompt``, or None (missing, or invalid and now deleted)."""
        path = self.path(prompt)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("prompt") != prompt or metadata.get("settings") != self._settings_json:
                    raise ValueError("stored prompt or settings differ from the requested ones")
                latents = f.get_tensor(REFERENCE_LATENTS_KEY)
            if metadata.get("sha256") != _tensor_sha256(latents):
                raise ValueError("checksum mismatch")
        except (SafetensorError, OSError, ValueError) as error:
            logger.warning("Discarding invalid reference latents %s (%s); they will be regenerated.", path, error)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return None
        return latents

    def put(self, prompt: str, latents: torch.Tensor) -> None:
        """Write one prompt's latents atomically, with the prompt, settings and checksum as metadata."""
        latents = latents.detach().to("cpu").contiguous()
        metadata = {"prompt": prompt, "settings": self._settings_json, "sha256": _tensor_sha256(latents)}
        _save_safetensors_atomic({REFERENCE_LATENTS_KEY: latents}, self.path(prompt), metadata)

    def get_or_create(self, prompts: Sequence[str], generate_fn: Callable[[List[str]], torch.Tensor]) -> torch.Tensor:
        """``[B, C, h, w]`` latents for ``prompts``: cached ones loaded, the missing (distinct) prompts
        generated in one ``generate_fn(missing_prompts)`` call, written, and returned as stored."""
        latents_by_prompt = {prompt: self.get(prompt) for prompt in dict.fromkeys(prompts)}
        missing = [prompt for prompt, latents in latents_by_prompt.items() if latents is None]
        if missing:
            latents_by_prompt.update(self._generate_and_put(missing, generate_fn))
        return torch.stack([latents_by_prompt[prompt] for prompt in prompts])

    def prefill(
        self,
        prompts: Sequence[str],
        generate_fn: Callable[[List[str]], torch.Tensor],
        batch_size: int,
        show_progress: bool = True,
    ) -> int:
        """Generate and write the latents of every uncached prompt, ``batch_size`` prompts per call;
        returns how many were generated. Splitting prompts across processes is the caller's choice."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        missing = [prompt for prompt in dict.fromkeys(prompts) if self.get(prompt) is None]
        with tqdm(total=len(missing), desc="Reference latents", unit="prompt", disable=not show_progress) as progress:
            for start in range(0, len(missing), batch_size):
                batch = missing[start : start + batch_size]
                self._generate_and_put(batch, generate_fn)
                progress.update(len(batch))
        return len(missing)

    def _generate_and_put(self, prompts: List[str], generate_fn) -> Dict[str, torch.Tensor]:
        generated = generate_fn(list(prompts))
        if not isinstance(generated, torch.Tensor) or generated.ndim < 1 or generated.shape[0] != len(prompts):
            shape = tuple(generated.shape) if isinstance(generated, torch.Tensor) else type(generated).__name__
            raise ValueError(
                f"generate_fn returned {shape} for {len(prompts)} prompts; expected a [{len(prompts)}, ...] tensor."
            )
        stored = {}
        for prompt, latents in zip(prompts, generated.detach().to("cpu"), strict=True):
            latents = latents.contiguous()
            self.put(prompt, latents)
            stored[prompt] = latents
        return stored
