"""MiniCPM-V 2.5 and 2.6 as native transformers models: the releases' module tree, no remote code.

The module tree and so the weight names are the releases' (`modeling_minicpmv.py: MiniCPMV`):
`llm` (transformers' `LlamaForCausalLM` for 2.5, `Qwen2ForCausalLM` for 2.6), `vpm`
(transformers' `Idefics2VisionTransformer` for 2.5; the same modules with 2.6's NaViT forward,
vision.py), `resampler` (resampler.py, the same in both). So `from_pretrained` reads the published
safetensors as they are, pre-quantized bitsandbytes checkpoints included.

What a runner calls (batch of one prompt; the engine batches and keeps its own caches):
- `vision_features(pixel_values, tgt_sizes)`: the resampled embeddings of some picture slices,
  [slices, query_num, hidden]. 2.6 reads each slice on its own, so features cached per picture
  are exact; 2.5's tower sees the padding of the slices packed with it (the release's mask), so
  to get the release's numbers give it a prompt's slices together (cache per set of pictures).
- `embed_prompt(input_ids, image_bound, features=... or pixel_values=..., tgt_sizes=...)`: the
  prompt's input embeddings [1, L, hidden] with the slices' embeddings in their placeholders.
- then `llm.model(inputs_embeds=..., attention_mask=..., position_ids=..., cache=...)` and
  `llm.lm_head(...)` for prefill, and `llm.model(input_ids=...)` for decode steps, as for any
  Llama. `generate_greedy` is that loop written out once, for tests and equivalence checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers import initialization as init
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from .config import MiniCPMV25Config, MiniCPMV26Config
from .resampler import Resampler, ResamplerAttention
from .vision import NavitVisionTransformer

# The release gives the resampler one attention head per 128 channels of the language model.
RESAMPLER_HEAD_WIDTH = 128


class MiniCPMVBase(PreTrainedModel):
    """What MiniCPM-V 2.5 and 2.6 share: the module tree, the resampler, the prompt embedding.

    Versions differ in the text model, the vision tower and how that tower is called; a subclass
    overrides `_build_llm`, `_build_vision` and `_run_vision`.
    """

    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["Resampler"]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.llm = self._build_llm(config)
        self.vpm = self._build_vision(config)
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=config.hidden_size,
            num_heads=config.hidden_size // RESAMPLER_HEAD_WIDTH,
            kv_dim=config.vision_config.hidden_size,
        )
        self.post_init()

    # -- construction (per version) ---------------------------------------------------------
    def _build_llm(self, config) -> nn.Module:
        raise NotImplementedError

    def _build_vision(self, config) -> nn.Module:
        raise NotImplementedError

    def _run_vision(self, pixels: torch.Tensor, patch_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """The vision tower's last hidden states [B, max_patches, vision width] for packed slices."""
        raise NotImplementedError

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights for a new model, and the position table after `from_pretrained`.

        transformers 5 creates the model on the meta device, loads the checkpoint, gives every
        non-persistent buffer an uninitialised tensor and then calls this for each module that
        is not fully loaded: that is where the resampler's table (not in the checkpoint) gets its
        values. `init.*` skip tensors the checkpoint filled, so loaded weights stay as loaded.
        """
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim**-0.5)
            init.copy_(module.pos_embed, module.position_table(tuple(module.pos_embed.shape[:2])))
        elif isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            init.zeros_(module.out_proj.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then one dtype for every 16-bit part of a quantized model.

        transformers 5 loads a pre-quantized bitsandbytes checkpoint (the `-int4` releases) with
        the unquantized modules' weights in the stored dtype (float16) but their biases in the
        requested `dtype`: a float32 or bfloat16 load then fails in the first convolution or layer
        norm ("Input type (HalfTensor) and bias type (FloatTensor)"). Those parameters are cast
        to the requested dtype (float16, the release's, when none is asked for); quantized layers
        keep theirs and compute in their own `bnb_4bit_compute_dtype` whatever their input.
        """
        model = super().from_pretrained(*args, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
            requested = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if not isinstance(requested, torch.dtype):
                requested = model.get_input_embeddings().weight.dtype
            model.unify_unquantized_dtype(requested)
        return model

    def unify_unquantized_dtype(self, dtype: torch.dtype) -> None:
        """Cast every floating-point parameter outside quantized layers to `dtype` (buffers such
        as the position tables stay float32)."""
        for module in self.modules():
            if type(module).__module__.startswith("bitsandbytes"):
                continue
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)

    # -- embeddings the transformers machinery asks for -----------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    # -- the runner's API -------------------------------------------------------------------
    def vision_features(self, pixel_values: Sequence[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Resampled embeddings of picture slices: [slices, query_num, hidden], in the resampler's dtype.

        `pixel_values`: one float tensor [3, patch, patches * patch] per slice (what the processor
        gives); `tgt_sizes` [slices, 2]: each slice's (rows, columns) of patches. Slices are packed,
        padded and masked as `modeling_minicpmv.py: get_vllm_embedding` of the 2.5 release does
        (all slices given here go through the tower together: give it one picture's slices to
        cache per picture, or a whole prompt's to compute exactly as the release's `chat()`).
        Inputs are cast to each part's own dtype and device, so a model whose parts differ in
        precision (int4 with another compute dtype) still runs.
        """
        if len(pixel_values) != len(tgt_sizes):
            raise ValueError(f"{len(pixel_values)} slices but {len(tgt_sizes)} sizes")
        if not len(pixel_values):
            return self.resampler.query.new_zeros((0, *self.resampler.query.shape))
        if not getattr(self.config, "batch_vision_input", True) and len(pixel_values) > 1:
            # One slice at a time, as the release does without `batch_vision_input`.
            return torch.cat([self.vision_features([one], tgt_sizes[i : i + 1]) for i, one in enumerate(pixel_values)])
        conv = self.vpm.embeddings.patch_embedding.weight
        tgt_sizes = torch.as_tensor(tgt_sizes).to(device=conv.device, dtype=torch.int32)
        rows = [slice_pixels.flatten(end_dim=1).permute(1, 0) for slice_pixels in pixel_values]
        packed = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0.0)
        batch, length, _ = packed.shape
        pixels = packed.permute(0, 2, 1).reshape(batch, 3, -1, length).to(device=conv.device, dtype=conv.dtype)
        patches = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        patch_mask = torch.arange(int(patches.max()), device=conv.device)[None, :] < patches[:, None]
        hidden = self._run_vision(pixels, patch_mask[:, None, :], tgt_sizes)
        resampler_device = self.resampler.query.device
        return self.resampler(hidden.to(resampler_device, self.resampler.dtype), tgt_sizes.to(resampler_device))

    def embed_prompt(self, input_ids: torch.Tensor, image_bound: torch.Tensor | None = None, *,
                     features: torch.Tensor | None = None, pixel_values: Sequence[torch.Tensor] | None = None,
                     tgt_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings [1, L, hidden] of one prompt: token embeddings, with each placeholder
        range of `image_bound` ([K, 2] half-open [start, end)) replaced by one slice's features,
        in order, as `get_vllm_embedding` of the 2.5 release scatters them.

        Give `features` ([K, query_num, hidden], e.g. cached per picture and concatenated in the
        prompt's order), or `pixel_values` and `tgt_sizes` to compute them here.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"embed_prompt takes one prompt [1, L], not {tuple(input_ids.shape)}")
        embed_tokens = self.llm.get_input_embeddings()
        embeds = embed_tokens(input_ids.to(embed_tokens.weight.device))
        if features is None and pixel_values is not None and len(pixel_values):
            features = self.vision_features(pixel_values, tgt_sizes)
        bounds = [] if image_bound is None else torch.as_tensor(image_bound).tolist()
        if features is None or not len(features):
            if bounds:
                raise ValueError(f"the prompt has {len(bounds)} picture placeholders but no picture features")
            return embeds
        if len(bounds) != features.shape[0] or any(end - start != features.shape[1] for start, end in bounds):
            raise ValueError(f"{features.shape[0]} slices of {features.shape[1]} embeddings do not fit the "
                             f"placeholders {bounds}")
        index = torch.cat([torch.arange(start, end) for start, end in bounds]).to(embeds.device)
        embeds[0, index] = features.reshape(-1, features.shape[-1]).to(embeds.device, embeds.dtype)
        return embeds

    @torch.inference_mode()
    def generate_greedy(self, inputs_embeds: torch.Tensor, max_new_tokens: int,
                        stop_token_ids: Sequence[int] = ()) -> list[int]:
        """Greedy decoding of one prompt's embeddings, with the calls a runner makes: prefill
        through `llm.model` with positions 0..L-1, then one token at a time. Stops after a stop id
        (which is returned) or `max_new_tokens`."""
        cache = DynamicCache(config=self.llm.config)
        length = inputs_embeds.shape[1]
        device = inputs_embeds.device
        out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=torch.ones((1, length), device=device),
                             position_ids=torch.arange(length, device=device)[None, :], cache=cache, use_cache=True)
        tokens: list[int] = []
        while True:
            token = int(self.llm.lm_head(out.last_hidden_state[:, -1, :]).argmax(dim=-1))
            tokens.append(token)
            if token in stop_token_ids or len(tokens) >= max_new_tokens:
                return tokens
            position = length + len(tokens) - 1
            out = self.llm.model(input_ids=torch.tensor([[token]], device=device),
                                 attention_mask=torch.ones((1, position + 1), device=device),
                                 position_ids=torch.tensor([[position]], device=device), cache=cache, use_cache=True)


class MiniCPMV25(MiniCPMVBase):
    """MiniCPM-Llama3-V 2.5 (`openbmb/MiniCPM-Llama3-V-2_5` and its `-int4` release)."""

    config_class = MiniCPMV25Config
    config: MiniCPMV25Config
    _no_split_modules = ["LlamaDecoderLayer", "Idefics2EncoderLayer", "Resampler"]

    def _build_llm(self, config: MiniCPMV25Config) -> nn.Module:
        # The whole config, as the release passes it: its top level is the Llama configuration.
        return LlamaForCausalLM(config)

    def _build_vision(self, config: MiniCPMV25Config) -> nn.Module:
        tower = Idefics2VisionTransformer(config.vision_config)
        if config.drop_vision_last_layer:  # as the release does: the last layer's output is not used
            tower.encoder.layers = tower.encoder.layers[:-1]
        return tower

    def _run_vision(self, pixels: torch.Tensor, patch_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """2.5 hands the tower each slice as one row of patches with a [B, 1, patches] mask, as the
        release does, and that mask is all True: the release means to mark each slice's own
        patches (`patch_attn_mask[i, :h * w] = True`), but on a [B, 1, N] tensor that index fills
        row i whole. So the tower attends over the zero padding of slices shorter than the
        batch's longest, and buckets every slice's positions as one row of the longest length.
        Kept as is: it is what the model computes in the release (the resampler after it masks
        padding correctly). A slice's features thus depend on the longest slice it is packed
        with: pass a whole prompt's slices together to get the release's numbers."""
        return self.vpm(pixels, patch_attention_mask=torch.ones_like(patch_mask)).last_hidden_state


class MiniCPMV26(MiniCPMVBase):
    """MiniCPM-V 2.6 (`openbmb/MiniCPM-V-2_6` and its `-int4` release): 2.5's tree with a Qwen2
    text model and 2.6's vision forward (vision.py)."""

    config_class = MiniCPMV26Config
    config: MiniCPMV26Config
    _no_split_modules = ["Qwen2DecoderLayer", "Idefics2EncoderLayer", "Resampler"]

    def _build_llm(self, config: MiniCPMV26Config) -> nn.Module:
        return Qwen2ForCausalLM(config)

    def _build_vision(self, config: MiniCPMV26Config) -> nn.Module:
        tower = NavitVisionTransformer(config.vision_config)
        if config.drop_vision_last_layer:
            tower.encoder.layers = tower.encoder.layers[:-1]
        return tower

    def _vision_attention(self) -> str:
        """The release runs its tower with eager attention unless flash attention 2 was asked for."""
        chosen = self.config._attn_implementation or ""
        return chosen if chosen.startswith("flash_attention") else "eager"

    def _run_vision(self, pixels: torch.Tensor, patch_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """The tower over `vision_batch_size` slices at a time (as the release does), each slice
        masked to its own patches and positioned on its own grid."""
        # transformers gives sub-configs the model's attention kernel at load; 2.6 keeps its own rule
        self.vpm.config._attn_implementation = self._vision_attention()
        step = max(int(self.config.vision_batch_size), 1)
        chunks = [self.vpm(pixels[start:start + step], patch_attention_mask=patch_mask[start:start + step],
                           tgt_sizes=tgt_sizes[start:start + step]).last_hidden_state
                  for start in range(0, pixels.shape[0], step)]
        return torch.cat(chunks)


def model_class(config) -> type[MiniCPMVBase]:
    """The native class for a MiniCPM-V 2.x config (by its `version`)."""
    version = float(getattr(config, "version", 2.5))
    if version == 2.5:
        return MiniCPMV25
    if version == 2.6:
        return MiniCPMV26
    raise ValueError(f"MiniCPM-V {version} is not supported natively (2.5 and 2.6 are)")
