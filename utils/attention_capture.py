"""Capture of cross-attention maps for CoMat's attribute-concentration losses (paper Sec. 3.3).

The token and pixel losses need the cross-attention probabilities ``softmax(Q Kᵀ / √d)`` of a few UNet
layers, with grad, at the r attention-loss steps of the online sampler. This module captures exactly
that and nothing else:

* **Only the selected layers** get a :class:`CrossAttentionCaptureProcessor`; every other attention layer
  keeps its processor (``AttnProcessor2_0``, i.e. SDPA, by default). The authors' code replaces *every*
  attention layer with a manual softmax, also at the no-grad steps and at inference.
* **Only when asked**: a processor computes the explicit probabilities only inside
  :meth:`AttentionStore.capturing` *and* with grad enabled (or, for diagnostics at inference, when the store
  was made with ``record_without_grad=True``). Otherwise it runs the very same operations as
  ``AttnProcessor2_0``, so its output is bitwise identical.
* **Only the conditional half** of the classifier-free-guidance batch (``[uncond; cond]`` in diffusers
  pipelines), in the same UNet call as the unconditional half.

How the map relates to the layer output: the layer output is always computed by SDPA, and when capturing
the processor *additionally* computes ``softmax(Q Kᵀ / √d)`` for the conditional half from the very same
``Q`` and ``K`` tensors (same LoRA-adapted projections, same masks, same scale). The captured map is
therefore the attention the layer applied, up to floating-point rounding inside the SDPA kernel, and the
gradient of a loss on it reaches ``to_q``/``to_k`` (and their LoRA weights) exactly as if the layer had been
computed explicitly. Keeping the SDPA output has two consequences we rely on:

1. Capturing never changes the sample: a captured step produces the same latents, bit for bit, as an
   uncaptured one, so choosing the attention-loss steps does not perturb the trajectory.
2. It is safe under diffusers' gradient checkpointing (non-reentrant ``torch.utils.checkpoint``). In
   backward, the checkpointed transformer blocks are recomputed after :meth:`AttentionStore.capturing` has
   been left, i.e. through the non-capturing path; checkpointing requires the recomputation to save the same
   tensors as the original forward. The extra capture operations therefore save their tensors outside the
   checkpoint's bookkeeping (see :func:`_saved_outside_checkpoint`) and the rest of the layer is unchanged.
   Call ``backward`` after leaving ``capturing()``: a recomputation inside it would capture again.

Layer selection (``--attention_layers``) names groups ``(place, size)``: ``place`` is ``down``, ``mid`` or
``up`` (the UNet part) and ``size`` is the attention map's side length *at 512 px image resolution*, so the
same spec means the same layers at any training resolution (at 768 px, ``up:64`` selects the 96×96 maps).
The side of every cross-attention layer is derived from the UNet's block structure and the latent size,
without running the UNet.
"""

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

PLACES = ("down", "mid", "up")
REFERENCE_RESOLUTION = 512
SD_DEFAULT_ATTENTION_LAYERS = "mid:8,up:16,up:32,up:64"
SDXL_DEFAULT_ATTENTION_LAYERS = "mid:16,up:16,up:32"
COND_HALVES = ("first", "second", "all")

_SPEC_GRAMMAR = (
    "a comma-separated list of `place[:size]`, place one of down/mid/up and size the attention map's side "
    f"length at {REFERENCE_RESOLUTION} px image resolution (no size = every cross-attention layer of that "
    f"place), e.g. '{SD_DEFAULT_ATTENTION_LAYERS}'"
)


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention module of a UNet and where it sits.

    Attributes:
        name: module path inside the UNet, e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
        place: ``"down"``, ``"mid"`` or ``"up"``.
        side: side length of its (square) attention map at the resolution it was located for.
        size: ``side`` expressed at 512 px image resolution, the unit of ``--attention_layers``.
    """

    name: str
    place: str
    side: int
    size: int | Fraction

    @property
    def group(self) -> tuple[str, int | Fraction]:
        return (self.place, self.size)


def parse_attention_layers(spec: str) -> list[tuple[str, int | None]]:
    """Parses an ``--attention_layers`` value into ``[(place, size or None), ...]`` (duplicates removed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Invalid --attention_layers {spec!r}: expected {_SPEC_GRAMMAR}.")
    entries = []
    for item in spec.split(","):
        place, sep, size_text = item.strip().partition(":")
        place = place.strip().lower()
        size_text = size_text.strip()
        if place not in PLACES or (sep and not size_text.isdigit()) or (sep and int(size_text) == 0):
            raise ValueError(
                f"Invalid --attention_layers {spec!r} (entry {item.strip()!r}): expected {_SPEC_GRAMMAR}."
            )
        entry = (place, int(size_text) if sep else None)
        if entry not in entries:
            entries.append(entry)
    return entries


def find_cross_attention_layers(unet, resolution: int, vae_scale_factor: int = 8) -> list[CrossAttentionLayer]:
    """Every cross-attention module of ``unet`` with its place and map side at ``resolution`` px, in UNet order.

    Works from the block structure only: a down block's attentions run at the resolution of its input, each
    down block with a downsampler halves it (rounding up, as the stride-2 convolution does), the mid block
    runs at the lowest resolution, and each up block runs at the resolution of the down level it mirrors
    (diffusers forwards the skip connections' sizes to the upsamplers). Blocks without attention
    (``DownBlock2D``, SDXL's first level) contribute nothing; several transformer layers per block
    (``transformer_layers_per_block`` > 1) contribute one layer each.
    """
    if resolution % vae_scale_factor:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE scale factor {vae_scale_factor}.")
    side = resolution // vae_scale_factor
    level_sides = [side]
    placed_blocks = []
    for index, block in enumerate(unet.down_blocks):
        placed_blocks.append(("down", f"down_blocks.{index}", block, level_sides[-1]))
        if getattr(block, "downsamplers", None) is not None:
            level_sides.append(math.ceil(level_sides[-1] / 2))
    if unet.mid_block is not None:
        placed_blocks.append(("mid", "mid_block", unet.mid_block, level_sides[-1]))
    level = len(level_sides) - 1
    for index, block in enumerate(unet.up_blocks):
        placed_blocks.append(("up", f"up_blocks.{index}", block, level_sides[level]))
        if getattr(block, "upsamplers", None) is not None:
            level -= 1

    layers = []
    for place, prefix, block, block_side in placed_blocks:
        size = Fraction(block_side * REFERENCE_RESOLUTION, resolution)
        size = int(size) if size.denominator == 1 else size
        for name, module in block.named_modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                layers.append(CrossAttentionLayer(f"{prefix}.{name}", place, block_side, size))
    return layers


def select_attention_layers(
    unet, layer_spec: str, resolution: int, vae_scale_factor: int = 8
) -> list[CrossAttentionLayer]:
    """The cross-attention layers of ``unet`` that ``layer_spec`` selects at ``resolution`` px, in UNet order.

    Every entry of the spec must select at least one layer, so that a typo or a spec written for another
    architecture fails loudly instead of silently dropping a loss term.
    """
    entries = parse_attention_layers(layer_spec)
    layers = find_cross_attention_layers(unet, resolution, vae_scale_factor)
    available = sorted({layer.group for layer in layers}, key=lambda group: (PLACES.index(group[0]), -group[1]))
    selected = set()
    for place, size in entries:
        matches = [layer for layer in layers if layer.place == place and size in (None, layer.size)]
        if not matches:
            pairs = ", ".join(f"{p}:{s}" for p, s in available) or "none"
            raise ValueError(
                f"--attention_layers entry '{place}{'' if size is None else f':{size}'}' selects no cross-attention "
                f"layer of this UNet at {resolution} px (sizes are map sides at {REFERENCE_RESOLUTION} px). "
                f"Available place:size pairs: {pairs}."
            )
        selected.update(layer.name for layer in matches)
    return [layer for layer in layers if layer.name in selected]


class AttentionStore:
    """Holds the cross-attention maps captured during the attention-loss steps of one training iteration.

    Capture is off by default. Inside :meth:`capturing`, every UNet call that runs with grad enabled records,
    for each selected layer, a tensor ``[B_cond, heads, pixels, tokens]`` (softmax over tokens, in the layer's
    compute dtype, attached to the autograd graph). Under ``torch.no_grad`` nothing is recorded, even inside
    ``capturing()``, unless ``record_without_grad`` is set.

    Steps: each captured UNet call is one *step*. :attr:`step_maps` keeps them apart (one dict per step,
    group ``(place, size)`` → list of the group's maps in UNet order), because the pixel loss averages the maps
    of a group *within* a step. A new step starts at every ``capturing()`` entry and whenever a layer records
    a second time, so wrapping each attention-loss UNet call in its own ``capturing()`` and wrapping several
    calls in one are equivalent. The training loop calls :meth:`clear` every iteration.

    Args:
        layers: the layers whose processors record into this store.
        cond_half: which part of the UNet batch is the conditional branch: ``"second"`` (diffusers' CFG batch
            ``[uncond; cond]``), ``"first"`` (``[cond; uncond]``) or ``"all"`` (no CFG batching). May be
            changed between calls.
        record_without_grad: also record UNet calls that run without grad (as diffusers pipelines run at
            inference), for diagnostics such as token activations; the maps are then detached. Training leaves
            it off so that its no-grad sampling steps cost nothing extra.
    """

    def __init__(
        self, layers: list[CrossAttentionLayer], cond_half: str = "second", record_without_grad: bool = False
    ):
        if cond_half not in COND_HALVES:
            raise ValueError(f"cond_half must be one of {COND_HALVES}, got {cond_half!r}.")
        self.layers = list(layers)
        self.cond_half = cond_half
        self.record_without_grad = record_without_grad
        self.previous_processors: dict[str, object] = {}
        self._is_capturing = False
        self._step_maps: list[dict[tuple, list[torch.Tensor]]] = []
        self._layers_in_current_step: set[str] | None = None

    @property
    def groups(self) -> list[tuple]:
        """The ``(place, size)`` groups of the selected layers, in UNet order."""
        return list(dict.fromkeys(layer.group for layer in self.layers))

    @property
    def is_capturing(self) -> bool:
        return self._is_capturing

    @contextlib.contextmanager
    def capturing(self):
        """Turns capture on for the UNet calls inside the ``with`` block (those that run with grad)."""
        previous = self._is_capturing
        self._is_capturing = True
        self._layers_in_current_step = None
        try:
            yield self
        finally:
            self._is_capturing = previous
            self._layers_in_current_step = None

    @property
    def step_maps(self) -> list[dict[tuple, list[torch.Tensor]]]:
        """One dict per captured step: group ``(place, size)`` → list of maps ``[B_cond, heads, pixels, tokens]``."""
        return self._step_maps

    @property
    def maps(self) -> dict[tuple, list[torch.Tensor]]:
        """All captured maps by group ``(place, size)``, steps concatenated in capture order."""
        merged: dict[tuple, list[torch.Tensor]] = {}
        for step in self._step_maps:
            for group, group_maps in step.items():
                merged.setdefault(group, []).extend(group_maps)
        return merged

    def clear(self):
        """Drops every captured map (and with them the autograd graph they hold)."""
        self._step_maps = []
        self._layers_in_current_step = None

    def cond_slice(self, batch_size: int) -> slice:
        """The slice of a UNet batch of ``batch_size`` that holds the conditional branch."""
        if self.cond_half == "all":
            return slice(None)
        if batch_size % 2:
            raise ValueError(
                f"cond_half={self.cond_half!r} expects a classifier-free-guidance batch of even size, got "
                f"{batch_size}; use cond_half='all' for a batch without CFG."
            )
        half = batch_size // 2
        return slice(half, None) if self.cond_half == "second" else slice(0, half)

    def record(self, layer: CrossAttentionLayer, attention_probs: torch.Tensor):
        """Adds one layer's map to the current step (starting a new step when needed)."""
        if self._layers_in_current_step is None or layer.name in self._layers_in_current_step:
            self._step_maps.append({})
            self._layers_in_current_step = set()
        self._layers_in_current_step.add(layer.name)
        self._step_maps[-1].setdefault(layer.group, []).append(attention_probs)


def _pack_saved_tensor(tensor: torch.Tensor) -> torch.Tensor:
    # Detached (same storage and version counter): keeping a saved *output* together with its own grad_fn
    # would form a reference cycle through the autograd graph that Python's garbage collector cannot see.
    return tensor.detach()


def _unpack_saved_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _saved_outside_checkpoint():
    # Innermost saved-tensor hooks win, so inside a non-reentrant checkpoint region the tensors that the
    # capture operations save for backward are kept as usual instead of being registered for recomputation.
    # The recomputation (which runs without capture) then sees the same saved tensors as the forward did.
    return torch.autograd.graph.saved_tensors_hooks(_pack_saved_tensor, _unpack_saved_tensor)


class CrossAttentionCaptureProcessor:
    """``AttnProcessor2_0`` that also records ``softmax(Q Kᵀ / √d)`` of the conditional half when capturing.

    The layer's computation is exactly ``AttnProcessor2_0``'s (same operations, SDPA, peft LoRA on
    ``to_q``/``to_k``/``to_v``/``to_out.0`` through the module calls), so outputs are bitwise identical to
    the stock processor whether or not the store is capturing. When ``store.is_capturing`` and grad is
    enabled, the probabilities of the conditional half are computed explicitly from the same query and key
    tensors (honouring the attention mask and ``attn.upcast_attention``/``attn.upcast_softmax``) and
    recorded in the store in the query's dtype (also without grad if the store has ``record_without_grad``).
    """

    def __init__(self, store: AttentionStore, layer: CrossAttentionLayer):
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("CrossAttentionCaptureProcessor requires PyTorch 2.0 or newer.")
        self.store = store
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.store.is_capturing and (torch.is_grad_enabled() or self.store.record_without_grad):
            with _saved_outside_checkpoint():
                self.store.record(self.layer, self._conditional_probabilities(attn, query, key, attention_mask))

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _conditional_probabilities(self, attn, query, key, attention_mask):
        """``softmax(Q Kᵀ / √d)`` of the conditional half: ``[B_cond, heads, pixels, tokens]``, query's dtype."""
        cond = self.store.cond_slice(query.shape[0])
        query, key = query[cond], key[cond]
        compute_dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        # SDPA's default scale, which is what the layer output uses (AttnProcessor2_0 ignores attn.scale).
        scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
        if attention_mask is not None:
            mask = attention_mask[cond]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        softmax_dtype = torch.float32 if attn.upcast_softmax else None
        return scores.softmax(dim=-1, dtype=softmax_dtype).to(compute_dtype)


def install_attention_capture(
    unet,
    layer_spec: str,
    resolution: int,
    vae_scale_factor: int = 8,
    cond_half: str = "second",
    record_without_grad: bool = False,
) -> AttentionStore:
    """Puts a :class:`CrossAttentionCaptureProcessor` on the layers ``layer_spec`` selects; returns their store.

    All other attention layers keep their current processor. Undo with :func:`remove_attention_capture`.
    ``cond_half`` and ``record_without_grad`` are passed to the :class:`AttentionStore`.
    """
    layers = select_attention_layers(unet, layer_spec, resolution, vae_scale_factor)
    store = AttentionStore(layers, cond_half=cond_half, record_without_grad=record_without_grad)
    processors = unet.attn_processors
    for layer in layers:
        key = f"{layer.name}.processor"
        if isinstance(processors[key], CrossAttentionCaptureProcessor):
            raise ValueError(f"Attention capture is already installed on {layer.name}; remove it first.")
        store.previous_processors[key] = processors[key]
        processors[key] = CrossAttentionCaptureProcessor(store, layer)
    unet.set_attn_processor(processors)
    return store


def remove_attention_capture(unet, store: AttentionStore):
    """Restores the processors that :func:`install_attention_capture` replaced, and clears ``store``."""
    processors = unet.attn_processors
    for key, processor in store.previous_processors.items():
        if getattr(processors[key], "store", None) is not store:
            raise ValueError(f"{key} does not hold a capture processor of this store.")
        processors[key] = processor
    unet.set_attn_processor(processors)
    store.previous_processors = {}
    store.clear()
