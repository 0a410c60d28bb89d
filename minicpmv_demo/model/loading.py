"""Model loading in one place: which checkpoint, which precision, which device, which runner.

MiniCPM-V 4.x checkpoints load with transformers' Auto classes; MiniCPM-V 2.5 and 2.6 (`model_type`
"minicpmv") with the project's own classes (model/minicpmv2/), which read the releases' files as
they are. No checkpoint's own code is ever run (the 2.x releases' `auto_map` is never followed).
The built-in tiny model is built locally and then loaded exactly like a downloaded checkpoint.
Every failure becomes one `ModelLoadError` line that says what to do.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config.settings import TINY_MODEL, Settings
from .minicpmv4.runner import MiniCPMV4Runner
from .sampling_defaults import checkpoint_sampling
from .minicpmv4.tiny import ensure_tiny_model

if TYPE_CHECKING:
    from .minicpmv2.runner import MiniCPMV2Runner

log = logging.getLogger(__name__)

DEFAULT_GPU_MODEL = "openbmb/MiniCPM-V-4.6"
NATIVE_MODEL_TYPES = ("minicpmv4_6", "minicpmv4_7")
MINICPMV2_MODEL_TYPE = "minicpmv"  # MiniCPM-Llama3-V 2.5 and MiniCPM-V 2.6 (other versions share it: refused)
MINICPMV2_VERSIONS = ("2.5", "2.6")  # config.json's `version` of those served (2.6 writes it as a number)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# What --quant int4/int8 leaves in 16 bits, as the official int4 releases do: the vision tower,
# the merger (resampler) that maps its output into the language model, and the output head
# (tied to the embeddings in 4.6). The vision MLP width 4304 is no multiple of 64: bitsandbytes
# runs it on a slow fallback on the GPU and refuses it on CPUs with AVX512-BF16, and the tower
# is a small share of a 4.6's weights anyway. Names: MiniCPM-V 4.x `model.vision_tower`,
# `model.merger`, `lm_head`; 2.5/2.6 `vpm`, `resampler`, `llm.lm_head`. Each is a regex
# matched from the module name's start (transformers' rule), so any parent prefix is allowed.
UNQUANTIZED_MODULES = [rf"(?:.*\.)?{name}" for name in ("vision_tower", "merger", "vpm", "resampler", "lm_head")]


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; str() is one line saying what is wrong and what to do."""


@dataclass
class LoadedModel:
    runner: MiniCPMV4Runner | MiniCPMV2Runner | None  # None: the model runs on a backend (`--backend`)
    model_id: str
    is_tiny: bool
    device: str
    dtype: str
    quantization: str
    # The sampling settings the checkpoint names (SamplingParams field names): what the page
    # starts at and what a client that sends none gets; the server's own for the rest.
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    remote_thinks: bool = False  # a backend's model: whether it reasons unless told not to

    @property
    def public_name(self) -> str:
        """The name strangers may see: a local folder's base name, not where it lies on this machine."""
        path = Path(self.model_id).expanduser()
        return path.name if path.is_dir() else self.model_id

    @property
    def description(self) -> str:
        if self.runner is None:
            return f"{self.model_id} · on a remote model server"
        precision = self.quantization if self.quantization != "none" else self.dtype
        return f"{self.model_id} · {precision} · {self.device}"

    @property
    def thinks_by_default(self) -> bool:
        """Whether a request that does not choose gets reasoning (where the page's Thinking
        toggle starts). 2.5 / 2.6 checkpoints never think."""
        if self.runner is None:
            return self.remote_thinks
        return self.runner.thinks_by_default

    @classmethod
    def remote(cls, model_name: str, default_thinking: str = "auto") -> LoadedModel:
        """What the page says about a model a backend serves (`model_name` as the backend lists it)."""
        return cls(runner=None, model_id=model_name, is_tiny=model_name == TINY_MODEL, device="remote",
                   dtype="", quantization="none",
                   remote_thinks=thinks_by_default(default_thinking, model_name))


def resolve_model_id(settings: Settings, cuda: bool) -> str:
    """`auto` means the real model where it can run (a CUDA GPU) and the tiny one elsewhere."""
    if settings.model == "auto":
        return DEFAULT_GPU_MODEL if cuda else TINY_MODEL
    return settings.model


def load_model(settings: Settings) -> LoadedModel:
    cuda = torch.cuda.is_available()
    model_id = resolve_model_id(settings, cuda)
    is_tiny = model_id == TINY_MODEL
    source = str(ensure_tiny_model(settings.tiny_model_dir or None)) if is_tiny else _check_source(model_id)
    config = _load_config(source, model_id)
    model_type = config.get("model_type", "")
    if model_type not in (*NATIVE_MODEL_TYPES, MINICPMV2_MODEL_TYPE):
        raise ModelLoadError(f"{model_id} is a '{model_type}' model, not MiniCPM-V: pick a MiniCPM-V "
                             f"checkpoint (e.g. {DEFAULT_GPU_MODEL}).")
    minicpmv2 = model_type == MINICPMV2_MODEL_TYPE
    if minicpmv2 and str(config.get("version")) not in MINICPMV2_VERSIONS:
        raise ModelLoadError(f"{model_id} is MiniCPM-V {config.get('version', 'of an unknown version')}, which this "
                             f"demo does not serve: pick MiniCPM-V 4.6, 2.6 or 2.5 (e.g. {DEFAULT_GPU_MODEL}).")
    # A pre-quantized 2.x release computes in the dtype its quantization config names (the 2.5
    # int4 release: float16); `--dtype` still wins.
    dtype = choose_dtype(settings.dtype, cuda, model_type, _shipped_compute_dtype(config) if minicpmv2 else None)
    quantization, quant_config = _choose_quantization(settings.quant, config, dtype, cuda)
    device_map = _choose_device_map(settings.device_map, cuda)
    kwargs = {"dtype": dtype, "device_map": device_map}
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    log.info("loading %s (%s, %s, device_map=%s)", model_id, dtype, quantization, device_map)
    try:
        if minicpmv2:
            runner = _load_minicpmv2(source, kwargs)
        else:
            runner = _load_native(source, kwargs, thinks_by_default(settings.default_thinking, model_id))
    except torch.OutOfMemoryError:
        raise ModelLoadError(f"Not enough GPU memory to load {model_id} in {quantization if quant_config else dtype}: "
                             "try --quant int4, a smaller model, or a bigger GPU.") from None
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"Could not load {model_id}: {_first_line(exc)}") from None
    device = str(getattr(runner.model, "device", "cpu"))
    # The 2.x releases name no sampling in generation_config.json; their chat() samples with its own.
    sampling = (dict(runner.chat_sampling) if minicpmv2
                else checkpoint_sampling(getattr(runner.model, "generation_config", None)))
    return LoadedModel(runner=runner, model_id=model_id, is_tiny=is_tiny, device=device,
                       dtype=str(dtype).removeprefix("torch."), quantization=quantization,
                       sampling_defaults=sampling)


def _check_source(model_id: str) -> str:
    """A local folder is used as is; something that looks like a path but is missing is an error."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelLoadError(f"Model folder {model_id} does not exist.")
    return model_id


def _load_config(source: str, model_id: str) -> dict:
    """config.json as it is: its `model_type` picks the classes, and no class it names is looked up
    (the 2.x releases' `auto_map` points at their own code, which is never run)."""
    from transformers import PreTrainedConfig

    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"{model_id} is not a model folder (it has no config.json).")
    try:
        return PreTrainedConfig.get_config_dict(source)[0]
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"{model_id} has an unreadable config: {_first_line(exc)}") from None
        raise ModelLoadError(
            f"Could not find {model_id} on the Hugging Face Hub or in the local cache (no network, a typo, "
            "or a gated model?). Check the id, log in with `hf auth login`, or pass a local folder; "
            "--model tiny runs offline.") from None


def choose_dtype(name: str, cuda: bool, model_type: str, shipped: torch.dtype | None = None,
                 bf16: bool | None = None) -> torch.dtype:
    """`--dtype auto`: what a pre-quantized checkpoint computes in (`shipped`), else bf16 on a GPU
    that has it, float32 on the CPU. On a GPU without bf16 (a T4), MiniCPM-V 4.x runs in float32:
    Qwen3.5's layers can overflow float16's range (a row that does then fails alone, with a
    message); 2.5 / 2.6 keep float16, their release's dtype."""
    if name != "auto":
        return DTYPES[name]
    if shipped is not None:
        return shipped
    if not cuda:
        return torch.float32
    if torch.cuda.is_bf16_supported() if bf16 is None else bf16:
        return torch.bfloat16
    return torch.float32 if model_type in NATIVE_MODEL_TYPES else torch.float16


def _shipped_compute_dtype(config: dict) -> torch.dtype | None:
    """The compute dtype a pre-quantized checkpoint's bitsandbytes config names, if any."""
    name = str((config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype", "")).removeprefix("torch.")
    return DTYPES.get(name)


def _choose_quantization(quant: str, config: dict, dtype: torch.dtype, cuda: bool):
    """Returns (label, transformers quantization config or None)."""
    shipped = config.get("quantization_config")
    if shipped is not None:
        return f"pre-quantized ({shipped.get('quant_method', '?')})", None
    if quant in ("auto", "none"):
        return "none", None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"--quant {quant} needs bitsandbytes: pip install bitsandbytes.")
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        quiet_int8_cast_warning()
        return "int8 (bitsandbytes)", BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    compute = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    # The configuration of the original MiniCPM-V int4 release: nf4 with double quantization.
    return "int4 (nf4, double quant)", BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=UNQUANTIZED_MODULES)


class _OnceFilter(logging.Filter):
    """Lets a log message that starts with `prefix` through the first time only."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def quiet_int8_cast_warning() -> None:
    """bitsandbytes' int8 matmul warns on every call whose input is not float16 (about 170 lines
    per decode step of the published model in bf16): say it once."""
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_log.filters):
        bnb_log.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def _choose_device_map(device_map: str, cuda: bool) -> str:
    if device_map == "auto":
        return "auto" if cuda else "cpu"
    if device_map.startswith("cuda") and not cuda:
        raise ModelLoadError(f"--device-map {device_map} asks for a GPU, but CUDA is not available here.")
    return device_map


def thinks_by_default(choice: str, model_id: str) -> bool:
    """`--default-thinking`: "on", "off", or "auto": on for a Thinking checkpoint.

    MiniCPM-V 4.6 ships its Instruct and Thinking models as separate checkpoints whose chat
    templates both take the same switch, so the template cannot tell them apart; their names
    can: `openbmb/MiniCPM-V-4.6-Thinking`, its `-BNB` variant, and any local copy whose path
    keeps the name (the hub cache's `models--openbmb--MiniCPM-V-4.6-Thinking/snapshots/...`).
    A copy under another name needs `--default-thinking on`.
    """
    if choice != "auto":
        return choice == "on"
    return "thinking" in model_id.lower()


def _load_native(source: str, kwargs: dict, thinks: bool) -> MiniCPMV4Runner:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).eval()
    return MiniCPMV4Runner(model, processor, thinks_by_default=thinks)


def _load_minicpmv2(source: str, kwargs: dict) -> MiniCPMV2Runner:
    from .minicpmv2 import load
    from .minicpmv2.runner import MiniCPMV2Runner

    return MiniCPMV2Runner(*load(source, **kwargs))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
