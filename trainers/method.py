"""The method contract (DESIGN.md section 5): everything the one training loop needs from an adapter method.

A method file holds a `MethodConfig` subclass with the paper's defaults, a `Method` subclass and its private math,
nothing about data, accelerate, logging or the UI. The loop calls, in this order:

    claim(config, library, name)   before the run (a classmethod): library-allocated settings
    attach(components)        once; components is the diffusers pipeline, every model frozen, on the training device
    trainable_tensors()       name -> Parameter, the tensors the optimizer trains (stable names: checkpoint keys;
                              `<component>.` first, and a `text_encoder*.` name makes the loop run that encoder
                              with gradients)
    trainable_parameters()    optimizer param groups (default: one group at `config.lr`)
    regularizer(step)         a term added to each micro-step's loss, or None
    on_step_end(step)         after each optimizer step (progressive re-selection and the like)
    state_dict() / load_state_dict(state)   checkpoint and exact resume

After training, `export()` gives the library's canonical tensors and an `AdapterMeta` (peft_type, ranks, alphas,
method fields); `library_entries(name)` turns them into the library entries of the run (one, `name`, unless the
method splits its adapter, as B-LoRA does into content and style; `entry_names` says which before the run), and
`delta_weights()` (`<component>.<module>` -> dW, float32, the weight's shape) feeds merges,
composition by sum, kernels and parity tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from studio.configs import check_numbers
from studio.errors import StudioError
from studio.library.meta import AdapterMeta


@dataclass
class MethodConfig:
    """Common fields of every method config. Subclasses set `method` (the METHODS key) and the paper's `lr`."""

    method: ClassVar[str] = ""
    min_images: ClassVar[int] = 1  # fewer training images than this is refused
    max_images: ClassVar[int | None] = None  # more is refused (B-LoRA: one image); world sources render this many
    prior_preservation: ClassVar[bool] = True  # its default where class prompts are known (the paper's practice)

    lr: float = field(default=1e-4, metadata={"help": "learning rate (default: the method's paper value)"})

    def __post_init__(self) -> None:
        check_numbers(self)  # every method's fields: subclasses call this first
        if not self.lr > 0:
            raise StudioError(f"--lr must be positive, got {self.lr}")


@dataclass
class LibraryPart:
    """One library entry a finished run writes: its name, canonical tensors, meta and model-card notes."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: AdapterMeta
    card_notes: str = ""


class Method(ABC):
    """One adapter method. Subclasses implement `attach`, `trainable_tensors`, `delta_weights` and `export`."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    # Its UNet is plain module math between optimizer steps, so a GPU run may record the UNet's training step as
    # CUDA graphs (`trainers.graphs`); a method that changes the UNet's tensors or code mid-run leaves it False.
    graphable: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @abstractmethod
    def attach(self, components: Any) -> None:
        """Inject or mark this method's parameters in the pipeline's models (all frozen when this is called)."""

    @abstractmethod
    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        """The trained tensors by stable name, in a fixed order (the optimizer's parameter order)."""

    def trainable_parameters(self) -> list[dict[str, Any]]:
        return [{"params": list(self.trainable_tensors().values()), "lr": self.config.lr}]

    @classmethod
    def claim(cls, config: MethodConfig, library: Any, name: str) -> MethodConfig:
        """Before a run: the config with whatever the library allocates to adapter `name` filled in (orthogonal
        adaptation: its basis columns); recorded with the run, so a resumed run gets the same."""
        return config

    def regularizer(self, step: int) -> torch.Tensor | None:
        return None

    def on_step_end(self, step: int) -> None:
        return None

    @abstractmethod
    def delta_weights(self) -> dict[str, torch.Tensor]:
        """`<component>.<module>` -> dW (float32, shaped like the module's weight): W_adapted = W + dW."""

    @abstractmethod
    def export(self) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
        """Canonical library tensors (`unet.<module>.lora_A.weight`, `...lokr_w1`, ...) and their meta."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable_tensors().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_tensors()
        if set(own) != set(state):
            odd = sorted(set(own) ^ set(state))[0]
            raise StudioError(
                f"checkpoint does not match this method's tensors (first difference: {odd}); "
                "resume with the method options the run was started with"
            )
        with torch.no_grad():
            for name, p in own.items():
                if p.shape != state[name].shape:
                    raise StudioError(
                        f"checkpoint tensor {name} has shape {list(state[name].shape)}, the method "
                        f"made {list(p.shape)}; resume with the options the run was started with"
                    )
                p.copy_(state[name])

    @classmethod
    def entry_names(cls, config: MethodConfig, name: str) -> list[str]:
        """The library names a run called `name` writes (checked free before the run starts)."""
        return [name]

    def library_entries(self, name: str) -> list[LibraryPart]:
        """The entries of a finished run, named as `entry_names` says: by default `export()` as one entry."""
        tensors, meta = self.export()
        return [LibraryPart(name, tensors, meta, self.card_notes())]

    def card_notes(self) -> str:
        """Markdown the model card adds about this method (what the implementation follows, its settings)."""
        return ""

    def meta(self, **fields: Any) -> AdapterMeta:
        """An AdapterMeta carrying this method's key and config; `fields` fill the rest (ranks, alphas, ...)."""
        return AdapterMeta(method=self.config.method, method_config=asdict(self.config), **fields)


# The default UNet targets of the adapter methods: attention q, k, v, out; the transformer's in/out projections and
# feed-forward; the ResNet 3x3 convolutions (the inner shapes of a subject need them: see the method files).
UNET_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2"
# The text encoders' attention projections (diffusers' DreamBooth-LoRA `--train_text_encoder`; both CLIPs on SDXL).
TEXT_TARGETS = "q_proj,k_proj,v_proj,out_proj"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def find_layers(
    model: nn.Module, targets: Sequence[str], kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
) -> dict[str, nn.Module]:
    """Layers of `kinds` whose path is a target or ends with `.target` (PEFT's suffix matching), in model order."""
    found = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, kinds) and any(path == t or path.endswith(f".{t}") for t in targets)
    }
    if not found:
        names = " or ".join(k.__name__ for k in kinds)
        raise StudioError(
            f"no {names} layer matches the target modules {list(targets)}; name layers as in the model "
            "(e.g. to_q,to_k,to_v,to_out.0,conv1,conv2)"
        )
    return found


def find_linears(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """The Linear layers among `find_layers`."""
    return find_layers(model, targets, (nn.Linear,))  # type: ignore[return-value]


def add_output_delta(module: nn.Module, delta: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
    """Add `delta(x)` to a layer's output with a forward hook, y = W x + b + delta(x); `.remove()` undoes it."""

    def hook(_module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out + delta(args[0]).to(out.dtype)

    return module.register_forward_hook(hook)


def split_targets(text: str) -> list[str]:
    """`"to_q, to_k"` -> `["to_q", "to_k"]`; an empty list is refused."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise StudioError("--target-modules is empty; give module names such as to_q,to_k,to_v,to_out.0")
    return targets
