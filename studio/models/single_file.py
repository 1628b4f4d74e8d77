"""Original-layout (LDM / CompVis / A1111) single-file `.safetensors` checkpoints of SD1.x, SD2.x and SDXL.

`load_single_file` detects the family from the key names, starts from the diffusers configs the studio ships in
`configs/` (never fetched), adjusts every size that the tensor shapes reveal, converts UNet and VAE with diffusers'
own converters and the text encoders with `ldm_keys`, and loads each part strictly. `save_single_file` is the
inverse: "export for A1111 / ComfyUI". Files written by the studio also carry the few settings that shapes cannot
tell (attention heads, scheduler, VAE scaling factor) in the safetensors header, so they round-trip exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from studio.errors import StudioError
from studio.models import ldm_keys as K
from studio.models.ldm_keys import infer_text_config, infer_unet_config, infer_vae_config
from studio.models.tokenizer import clip_tokenizer


CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_FOLDERS = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl-base"}
META_KEY = "studio.single_file"  # JSON in the safetensors header: {"family": ..., "<component>": {config}}
_TEXT_PREFIXES = {  # family -> [(component, prefix, OpenCLIP tower?)]
    "sd1": [("text_encoder", "cond_stage_model.transformer.", False)],
    "sd2": [("text_encoder", K.SD2_TEXT_PREFIX, True)],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.", False),
        ("text_encoder_2", K.SDXL_TEXT2_PREFIX, True),
    ],
}


def detect_family(keys: set[str] | list[str]) -> str:
    """'sd1', 'sd2' or 'sdxl' from original-layout key names; StudioError for anything else."""
    keys = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if any("lora_down" in k or "lora_A" in k or k.startswith("lora_") for k in keys):
        raise StudioError("this file is a LoRA adapter, not a base model; load it as an adapter, not with --model")
    if not has(K.UNET_PREFIX):
        raise StudioError(
            "this is not an original-layout SD checkpoint (no `model.diffusion_model.` UNet weights); pass a full "
            "SD1.x/SD2.x/SDXL .safetensors checkpoint or a diffusers folder"
        )
    if has(K.SDXL_TEXT2_PREFIX):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise StudioError("SDXL refiner checkpoints are not supported; use an SDXL base checkpoint")
    if has(K.SD2_TEXT_PREFIX):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise StudioError(
        "the checkpoint has a UNet but no text encoder weights (UNet-only file?); pass a full checkpoint that "
        "includes `cond_stage_model` (SD1/SD2) or `conditioner.embedders` (SDXL)"
    )


def shipped_config(family: str, component: str) -> dict[str, Any]:
    """The shipped diffusers config of `component` ('unet', 'scheduler', 'tokenizer_2', ...) for `family`."""
    name = {"scheduler": "scheduler_config.json"}.get(component, "config.json")
    if component.startswith("tokenizer"):
        name = "tokenizer_config.json"
    return json.loads((CONFIG_DIR / CONFIG_FOLDERS[family] / component / name).read_text())


# --- reading ---------------------------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file; a damaged file raises StudioError naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise StudioError(
            f"{path} is not a .safetensors file; the studio loads single-file checkpoints as safetensors"
        )
    if not path.is_file():
        raise StudioError(f"{path} does not exist; check the path")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state = load_file(path)
    except Exception as err:  # SafetensorError and friends derive from Exception only
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudioError(f"{path} is damaged or incomplete ({first}); re-download or re-export it") from err
    return state, metadata


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _studio_configs(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        meta = json.loads(metadata.get(META_KEY, "{}"))
    except ValueError:
        return {}
    return {k: v for k, v in meta.items() if isinstance(v, dict)} if isinstance(meta, dict) else {}


# --- building ----------------------------------------------------------------------------------------------------


def _key_check(path: Path, part: str, have: set[str], expected: set[str]) -> None:
    if missing := sorted(expected - have):
        raise StudioError(
            f"{path} lacks {len(missing)} {part} weights, first {missing[0]!r}: the file is incomplete or pruned "
            "(a UNet-only or VAE-less export?); use a full checkpoint"
        )
    if unexpected := sorted(have - expected):
        raise StudioError(
            f"{path} has {len(unexpected)} {part} weights the detected layout does not use, first {unexpected[0]!r}: "
            "it is a variant the studio does not support (or not an SD1/SD2/SDXL checkpoint)"
        )


def _load_strict(
    path: Path, part: str, model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.nn.Module:
    expected = set(model.state_dict())
    _key_check(path, part, set(state), expected)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise StudioError(
            f"{path}: the {part} weights do not fit the inferred config ({detail}); is it an SD model?"
        ) from err
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are still on the meta device
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise StudioError(f"internal: {part} buffer {name!r} was not initialised; please report this")
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.eval()


def _text_encoder(
    path: Path, family: str, component: str, prefix: str, openclip: bool, state: dict, meta: dict, dtype: torch.dtype
) -> torch.nn.Module:
    tower = _strip(state, prefix)
    if openclip:
        tower = {k: v for k, v in tower.items() if k not in K.OPENCLIP_IGNORED and not k.startswith("visual.")}
        layers = K.openclip_num_layers(set(tower))
        if family == "sd2" and "text_projection" in tower and layers > 1:
            # A full OpenCLIP tower: SD2 reads the penultimate layer, so the last block and projection go unused.
            last = f"transformer.resblocks.{layers - 1}."
            tower = {k: v for k, v in tower.items() if not k.startswith(last) and k != "text_projection"}
        try:
            hf = K.openclip_to_hf(tower)
        except KeyError as err:
            _key_check(path, component, {prefix + str(err.args[0])}, set())  # always raises: an unknown key
            raise
    else:
        hf = {k.removeprefix("text_model."): v for k, v in tower.items()}
        hf.pop("embeddings.position_ids", None)
        prefix += "text_model."
    from_file = meta.get(component, {})
    base = {**shipped_config(family, component), **from_file}
    config = CLIPTextConfig.from_dict(infer_text_config(hf, base, "num_attention_heads" in from_file))
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    canonical = [k.removeprefix("text_model.") for k in model.state_dict()]
    to_file = (lambda k: K.hf_key_to_openclip(k)[0]) if openclip else (lambda k: k)
    file_keys = {prefix + k for k in tower} if openclip else {prefix + k for k in hf}
    _key_check(path, component, file_keys, {prefix + to_file(k) for k in canonical})
    wrapped = hasattr(model, "text_model")
    hf = {("text_model." + k if wrapped and k != "text_projection.weight" else k): v for k, v in hf.items()}
    return _load_strict(path, component, model, hf, dtype)


def _unet(
    path: Path, family: str, state: dict, meta: dict, dtype: torch.dtype, text_2_dim: int | None
) -> UNet2DConditionModel:
    ldm = _strip(state, K.UNET_PREFIX)
    from_file = meta.get("unet", {})
    base = {**shipped_config(family, "unet"), **from_file}
    config = infer_unet_config(ldm, base, family, heads_known="attention_head_dim" in from_file)
    if text_2_dim is not None and "projection_class_embeddings_input_dim" in config:
        # SDXL's added embedding: pooled text (text_encoder_2 projection) + 6 size/crop numbers, each embedded.
        config["addition_time_embed_dim"] = (config["projection_class_embeddings_input_dim"] - text_2_dim) // 6
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    up_attention = ["CrossAttn" in t for t in model.config.up_block_types]
    lpb = model.config.layers_per_block
    expected = {K.UNET_PREFIX + K.unet_key_to_ldm(k, lpb, up_attention) for k in model.state_dict()}
    _key_check(path, "UNet", {K.UNET_PREFIX + k for k in ldm}, expected)
    converted = convert_ldm_unet_checkpoint({K.UNET_PREFIX + k: v for k, v in ldm.items()}, dict(model.config))
    return _load_strict(path, "UNet", model, converted, dtype)


def _vae(path: Path, family: str, state: dict, meta: dict, dtype: torch.dtype) -> AutoencoderKL:
    ldm = _strip(state, K.VAE_PREFIX)
    config = infer_vae_config(ldm, {**shipped_config(family, "vae"), **meta.get("vae", {})})
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    levels = len(model.config.block_out_channels)
    expected = {K.VAE_PREFIX + K.vae_key_to_ldm(k, levels) for k in model.state_dict()}
    _key_check(path, "VAE", {K.VAE_PREFIX + k for k in ldm}, expected)
    converted = convert_ldm_vae_checkpoint({K.VAE_PREFIX + k: v for k, v in ldm.items()}, dict(model.config))
    return _load_strict(path, "VAE", model, converted, dtype)


def shipped_scheduler(family: str, meta: dict | None = None, prediction_type: str | None = None) -> Any:
    """The family's scheduler from its shipped config (with a file's `meta` settings over it)."""
    meta = meta or {}
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    config = {**shipped_config(family, "scheduler"), **meta.get("scheduler", {})}
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        config = shipped_config(family, "scheduler")
        cls = getattr(diffusers, config["_class_name"])
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return cls.from_config(config)


def shipped_tokenizer(family: str, component: str = "tokenizer", meta: dict | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer, built offline, with the family's shipped settings for `component`."""
    meta = meta or {}
    settings = {**shipped_config(family, component), **meta.get(component, {})}
    tokenizer = clip_tokenizer()
    tokenizer.pad_token = settings.get("pad_token", tokenizer.pad_token)
    tokenizer.model_max_length = int(settings.get("model_max_length", tokenizer.model_max_length))
    return tokenizer


# --- public API --------------------------------------------------------------------------------------------------


def load_single_file(
    path: str | Path, *, dtype: torch.dtype = torch.float32, prediction_type: str | None = None
) -> DiffusionPipeline:
    """Load an original-layout SD1.x / SD2.x / SDXL `.safetensors` checkpoint as a diffusers pipeline, offline.

    SD2 files do not say whether they predict noise or velocity: the default is the shipped 768 v-prediction
    config; pass `prediction_type="epsilon"` for 512-base SD2 models.
    """
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise StudioError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', not {prediction_type!r}")
    path = Path(path).expanduser()
    state, metadata = read_checkpoint(path)
    meta = _studio_configs(metadata)
    family = detect_family(list(state))
    try:
        return _build(path, family, state, meta, dtype, prediction_type)
    except (TypeError, ValueError, KeyError) as err:
        raise StudioError(
            f"{path}: could not build the {family} pipeline ({type(err).__name__}: {err}); if the file was exported "
            "by the studio its header may be damaged, re-export it"
        ) from err


def _build(
    path: Path, family: str, state: dict, meta: dict, dtype: torch.dtype, prediction_type: str | None
) -> DiffusionPipeline:
    texts = {
        component: _text_encoder(path, family, component, prefix, openclip, state, meta, dtype)
        for component, prefix, openclip in _TEXT_PREFIXES[family]
    }
    text_2 = texts.get("text_encoder_2")
    text_2_dim = text_2.config.projection_dim if text_2 is not None else None
    parts: dict[str, Any] = {
        "unet": _unet(path, family, state, meta, dtype, text_2_dim),
        "vae": _vae(path, family, state, meta, dtype),
        "scheduler": shipped_scheduler(family, meta, prediction_type),
        "tokenizer": shipped_tokenizer(family, "tokenizer", meta),
        **texts,
    }
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, tokenizer_2=shipped_tokenizer(family, "tokenizer_2", meta))
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def pipeline_family(pipe: DiffusionPipeline) -> str:
    """'sdxl' for an SDXL pipeline; 'sd2' when the text encoder is an OpenCLIP tower (gelu), else 'sd1'."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if not isinstance(pipe, StableDiffusionPipeline):
        raise StudioError(f"cannot export a {type(pipe).__name__}; the studio exports SD1.x/SD2.x/SDXL pipelines")
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


def _config_of(module: Any) -> dict[str, Any]:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def _export(component: str, model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if adapter := next((k for k in state if ".lora_" in k or ".base_layer." in k), None):
        raise StudioError(
            f"the {component} has adapter weights attached ({adapter}); merge them with `pipe.fuse_lora()` and "
            "`pipe.unload_lora_weights()` before exporting, or export the adapter on its own"
        )
    try:
        if component == "unet":
            up_attention = ["CrossAttn" in t for t in model.config.up_block_types]
            lpb = model.config.layers_per_block
            return {K.UNET_PREFIX + K.unet_key_to_ldm(k, lpb, up_attention): v for k, v in state.items()}
        if component == "vae":
            levels = len(model.config.block_out_channels)
            names = {k: K.vae_key_to_ldm(k, levels) for k in state}
            return {K.VAE_PREFIX + names[k]: K.vae_tensor_to_ldm(names[k], v) for k, v in state.items()}
        hf = {k.removeprefix("text_model."): v for k, v in state.items()}
        if family == "sd1":
            return {K.SD1_TEXT_PREFIX + k: v for k, v in hf.items()}
        if component == "text_encoder" and family == "sdxl":
            return {K.SDXL_TEXT_PREFIX + k: v for k, v in hf.items()}
        prefix = K.SD2_TEXT_PREFIX if family == "sd2" else K.SDXL_TEXT2_PREFIX
        return {prefix + k: v for k, v in K.hf_to_openclip(hf).items()}
    except (KeyError, TypeError) as err:
        raise StudioError(
            f"cannot export the {component}: {err.args[0] if err.args else err}; only standard SD1/SD2/SDXL "
            "components have an original layout"
        ) from err


def save_single_file(
    pipe: DiffusionPipeline, path: str | Path, *, dtype: torch.dtype | None = None, family: str | None = None
) -> Path:
    """Export an SD1/SD2/SDXL diffusers pipeline as one original-layout `.safetensors` file (A1111, ComfyUI).

    Written atomically. `dtype` (e.g. torch.float16) converts the floating-point weights; `family` overrides the
    SD1/SD2 guess for unusual pipelines. The header records the settings shapes cannot tell, for an exact reload.
    """
    from safetensors.torch import save_file

    from studio.atomic import atomic_write

    family = family or pipeline_family(pipe)
    if family not in CONFIG_FOLDERS:
        raise StudioError(f"unknown family {family!r}; use one of {', '.join(CONFIG_FOLDERS)}")
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"family": family}
    for component in components:
        model = getattr(pipe, component, None)
        if model is None:
            raise StudioError(f"the pipeline has no {component}; a checkpoint needs UNet, VAE and text encoder(s)")
        tensors.update(_export(component, model, family))
        meta[component] = _config_of(model)
    meta["scheduler"] = {**_config_of(pipe.scheduler), "_class_name": type(pipe.scheduler).__name__}
    for name in ("tokenizer", "tokenizer_2"):
        if (tokenizer := getattr(pipe, name, None)) is not None:
            meta[name] = {"pad_token": str(tokenizer.pad_token), "model_max_length": int(tokenizer.model_max_length)}
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    header = {META_KEY: json.dumps(meta, default=str), "format": "pt"}
    return atomic_write(Path(path).expanduser(), lambda tmp: save_file(out, str(tmp), metadata=header))
