"""What the studio knows about an adapter besides its tensors, and how it maps onto PEFT configs.

Canonical tensor keys are diffusers-PEFT keys: `<component>.<module>.lora_A.weight` / `.lora_B.weight` for LoRA and
`<component>.<module>.lokr_w1` (`lokr_w1_a`, `lokr_w1_b`, `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`, `lokr_t2`) for LoKr,
with component one of `unet`, `text_encoder`, `text_encoder_2`; a sparse delta (SaRA, `studio.library.sparse`) has
`<component>.<module>.weight.indices` / `.weight.values` (and `bias.*`), no ranks nor alphas. Alpha is kept per
module as given (PEFT semantics: scale = alpha / r), never folded into the weights.

A LoRA on a text encoder's token table (`token_embedding`: ED-LoRA trigger rows, trainers/methods/orthogonal.py) uses
the same keys and reads the table as a linear map from one-hot tokens: lora_A (r, vocab), lora_B (dim, r), so
dW = B A (dim, vocab) is the change of the table's transpose, and merging by concatenated ranks works unchanged. PEFT
names these `lora_embedding_A` / `lora_embedding_B` (same shapes); `peft_key` and `canonical_key` translate.
"""

from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from studio.configs import finite
from studio.errors import StudioError


if TYPE_CHECKING:
    import torch

STUDIO_VERSION = "0.1.0"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KINDS = ("subject", "style", "content", "unknown")
FORMATS = ("kohya", "diffusers", "peft", "lycoris")  # the formats adapters are exported in (studio.library.formats)
EXPORT_FORMATS = (*FORMATS, "diff")  # diff: one safetensors of full-weight differences (export only)
PEFT_TYPES = ("LORA", "LOKR", "SPARSE")
LORA_PARAMS = ("lora_A.weight", "lora_B.weight")
LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_PARAM_RE = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A\.weight|lora_B\.weight|lokr_\w+|(?:weight|bias)\.(?:indices|values))$"
)


@dataclass
class BaseInfo:
    """The base an adapter was made for. `fingerprint` hashes the adapted modules' names and shapes."""

    family: str = "unknown"  # sd1 | sd2 | sdxl | unknown
    name: str = ""
    fingerprint: str = ""
    checkpoint: str = ""
    layers_per_block: int = 2


@dataclass
class AdapterMeta:
    """Studio fields of an adapter. Trainers fill `method`, `method_config`, `base`, `trigger_words`, `kind`."""

    peft_type: str = "LORA"  # LORA | LOKR | SPARSE
    alphas: dict[str, float] = field(default_factory=dict)  # "<component>.<module>" -> alpha
    ranks: dict[str, int] = field(default_factory=dict)  # "<component>.<module>" -> PEFT r
    lokr: dict[str, Any] = field(default_factory=dict)  # decompose_both, decompose_factor, use_effective_conv2d
    sparse: dict[str, Any] = field(default_factory=dict)  # SPARSE: "shapes" (<component>.<param> -> shape), threshold
    method: str = "lora"
    method_config: dict[str, Any] = field(default_factory=dict)
    kind: str = "unknown"
    trigger_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    description: str = ""
    base: BaseInfo = field(default_factory=BaseInfo)
    source: dict[str, Any] = field(default_factory=dict)  # import provenance: format, kept metadata, alpha dtype
    version: str = STUDIO_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.base, dict):
            self.base = BaseInfo(**self.base)
        if self.peft_type not in PEFT_TYPES:
            raise StudioError(f"peft_type {self.peft_type!r} is not supported; use {', '.join(PEFT_TYPES)}")
        if self.kind not in KINDS:
            raise StudioError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")


EMBEDDINGS = ("token_embedding",)  # module names of the text encoders' token tables


def is_embedding(module: str) -> bool:
    """Whether `<component>.<module>` is a token table (its LoRA reads one-hot tokens; see the module docstring)."""
    return module.rsplit(".", 1)[-1] in EMBEDDINGS


def peft_key(key: str) -> str:
    """A canonical key as PEFT's layer holds it (`lora_embedding_A` on a token table); other keys are unchanged."""
    for param, peft_param in (("lora_A.weight", "lora_embedding_A"), ("lora_B.weight", "lora_embedding_B")):
        if key.endswith(f".{param}") and is_embedding(key[: -len(param) - 1]):
            return f"{key[: -len(param)]}{peft_param}"
    return key


def canonical_key(key: str) -> str:
    """The inverse of `peft_key` (an embedding LoRA on another table stays as it is, and is refused as unsupported)."""
    for param, peft_param in (("lora_A.weight", "lora_embedding_A"), ("lora_B.weight", "lora_embedding_B")):
        if key.endswith(f".{peft_param}") and is_embedding(key[: -len(peft_param) - 1]):
            return f"{key[: -len(peft_param)]}{param}"
    return key


def split_key(key: str) -> tuple[str, str, str]:
    """`unet.a.b.lora_A.weight` -> `("unet", "a.b", "lora_A.weight")`."""
    m = _PARAM_RE.match(key)
    if not m:
        raise StudioError(f"tensor {key!r} is not a canonical adapter key (<component>.<module>.lora_A.weight)")
    return m.group(1), m.group(2), m.group(3)


def modules_of(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The adapted modules as `<component>.<module>`, in key order."""
    seen: dict[str, None] = {}
    for key in state_dict:
        component, module, _ = split_key(key)
        seen[f"{component}.{module}"] = None
    return list(seen)


def infer_ranks_and_alphas(
    state_dict: dict[str, torch.Tensor], alphas: dict[str, float] | None = None
) -> tuple[dict[str, int], dict[str, float]]:
    """LoRA ranks from `lora_A` shapes; alpha defaults to the rank (scale 1), as kohya and diffusers do."""
    ranks = {}
    for key, tensor in state_dict.items():
        component, module, param = split_key(key)
        if param == "lora_A.weight":
            ranks[f"{component}.{module}"] = int(tensor.shape[0])
    alphas = dict(alphas or {})
    return ranks, {m: float(alphas.get(m, r)) for m, r in ranks.items()}


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def component_configs(meta: AdapterMeta, modules: list[str]) -> dict[str, dict[str, Any]]:
    """One PEFT config dict (LoraConfig or LoKrConfig kwargs) per component; patterns are escaped exact names."""
    out: dict[str, dict[str, Any]] = {}
    for component in COMPONENTS:
        names = [m.split(".", 1)[1] for m in modules if m.split(".", 1)[0] == component]
        if not names:
            continue
        if meta.peft_type == "SPARSE":  # no PEFT type: the parameters the delta touches (studio.library.sparse)
            params = sorted(p.split(".", 1)[1] for p in meta.sparse.get("shapes", {}) if p.startswith(f"{component}."))
            out[component] = {"peft_type": "SPARSE", "target_modules": sorted(names), "target_parameters": params}
            continue
        ranks = [meta.ranks[f"{component}.{n}"] for n in names]
        alphas = [meta.alphas[f"{component}.{n}"] for n in names]
        r, alpha = _most_common(ranks), _most_common(alphas)
        rank_pattern = {re.escape(n): rk for n, rk in zip(names, ranks) if rk != r}
        alpha_pattern = {re.escape(n): a for n, a in zip(names, alphas) if a != alpha}
        config: dict[str, Any] = {
            "peft_type": meta.peft_type,
            "r": r,
            "target_modules": sorted(names),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
        }
        if meta.peft_type == "LORA":
            config |= {"lora_alpha": alpha, "init_lora_weights": True, "bias": "none"}
        else:
            config |= {
                "alpha": alpha,
                "init_weights": True,
                "decompose_both": bool(meta.lokr.get("decompose_both")),
                "decompose_factor": int(meta.lokr.get("decompose_factor", -1)),
                "use_effective_conv2d": bool(meta.lokr.get("use_effective_conv2d")),
            }
        out[component] = config
    return out


def peft_config(config: dict[str, Any]) -> Any:
    """A peft `LoraConfig` / `LoKrConfig` from a component config dict."""
    from peft import LoKrConfig, LoraConfig

    kwargs = {k: v for k, v in config.items() if k != "peft_type"}
    cls = LoraConfig if config.get("peft_type", "LORA") == "LORA" else LoKrConfig
    allowed = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in kwargs.items() if k in allowed})


# Adapted from peft/src/peft/utils/other.py@v0.21.2 `get_pattern_key` (9 lines; importing peft costs a listing ~3 s)
def get_pattern_key(pattern_keys: list[str], key_to_match: str) -> str:
    """The first pattern key that matches the end of `key_to_match` at a module boundary, else `key_to_match`."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def ranks_alphas_from_configs(
    configs: dict[str, dict[str, Any]], modules: list[str]
) -> tuple[dict[str, int], dict[str, float]]:
    """Resolve per-module r and alpha from PEFT config dicts (patterns matched as PEFT matches them)."""
    ranks, alphas = {}, {}
    if any(isinstance(c, dict) and c.get("peft_type") == "SPARSE" for c in configs.values()):
        return ranks, alphas  # a sparse delta has neither
    for full in modules:
        component, name = full.split(".", 1)
        if component not in configs:
            raise StudioError(f"adapter_config.json has no config for component {component!r} (module {full})")
        cfg = configs[component]
        if not isinstance(cfg, dict):
            raise StudioError(f"the {component} config is not a JSON object; re-export the adapter")
        patterns = {}
        for key in ("rank_pattern", "alpha_pattern"):
            patterns[key] = cfg.get(key) or {}
            if not isinstance(patterns[key], dict):
                raise StudioError(f"the {component} config's {key} is not a JSON object of name: number")
        try:
            rank_key = get_pattern_key(list(patterns["rank_pattern"]), name)
            alpha_key = get_pattern_key(list(patterns["alpha_pattern"]), name)
        except re.error as err:
            raise StudioError(f"the {component} config has a pattern that is not a regular expression ({err})") \
                from None
        default_alpha = cfg.get("lora_alpha", cfg.get("alpha", cfg.get("r", 8)))
        where = f"the {component} config's"
        rank = patterns["rank_pattern"].get(rank_key, cfg.get("r", 8))
        ranks[full] = finite(rank, f"{where} rank of {name}", int)
        alpha = patterns["alpha_pattern"].get(alpha_key, default_alpha)
        alphas[full] = float(finite(alpha, f"{where} alpha of {name}"))
    return ranks, alphas


def to_studio_dict(meta: AdapterMeta) -> dict[str, Any]:
    d = asdict(meta)
    for key in ("alphas", "ranks", "peft_type"):
        d.pop(key)
    return d


def from_studio_dict(studio: dict[str, Any], configs: dict[str, dict[str, Any]], modules: list[str]) -> AdapterMeta:
    fields = {k: v for k, v in studio.items() if k in AdapterMeta.__dataclass_fields__ and k != "components"}
    peft_type = next(iter(configs.values()), {}).get("peft_type", "LORA")
    ranks, alphas = ranks_alphas_from_configs(configs, modules)
    return AdapterMeta(peft_type=peft_type, ranks=ranks, alphas=alphas, **fields)
