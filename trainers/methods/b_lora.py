"""B-LoRA (Frenkel, Vinker, Shamir, Cohen-Or, ECCV 2024, arXiv:2403.14572): one image, one LoRA, two adapters.

One LoRA (Hu et al., arXiv:2106.09685, Eq. 3: W = W0 + (alpha / r) B A) is trained jointly on two transformer
blocks of the UNet from ONE image with the prompt "A [v]" (paper section 4.4; joint training is what separates them,
training each alone does not); after training, the LoRA of the content block and that of the style block are two
library entries, `NAME-content` and `NAME-style`, which load alone or together (section 4.3: "style transfer":
content of one image + style of another; "consistent style": the style entry + any prompt; "text-based
stylisation": the content entry + a style word). Per block the LoRA targets to_q, to_k, to_v, to_out.0 of the
self- and cross-attention of every transformer layer (`blora_utils.get_target_modules`); FFN, proj_in/out and the
text encoders stay frozen; the scale is 1 (alpha = r: the paper's script sets no network alpha) and PEFT's gaussian
init A ~ N(0, 1/r^2), B = 0 is the script's, so training starts at the base. The strength of an entry is its
adapter weight, linearly (W0 + w dW): the reference `inference.py` multiplies both factors by alpha, so its alpha
acts squared; the studio does not.

Blocks (content, style):
- SDXL: W4 = `up_blocks.0.attentions.0` (content) and W5 = `up_blocks.0.attentions.1` (style), the paper's
  (section 4.2, prompt-injection analysis; `blora_utils.BLOCKS`).
- The embedded base (every resolution has attention: down 16/8/4, mid 4, up 4/8/16 latent pixels, two attention
  blocks per up block): measured, see MEASURED below.
- SD1.x / SD2.x (attention at latent/1, /2, /4 and in the mid block): no measurement here (no SD1 weights can be
  had offline); the embedded base's pair by role: the mid block (the coarsest) for content, `down_blocks.0` (the
  latent's own size) for style; both names mean the same blocks there. Pass `--content-block` / `--style-block` to
  choose others.

MEASURED on the embedded base (`studio bench adapters --method b_lora --sweep`, `benches/b_lora.py`): one B-LoRA per
candidate pair trained on the single render of the `stripes` object (a large orange circle, center, white), 600
steps of one image, lr 3e-3, rank 16; then each block's entry ALONE, 20 sampling steps: T = stripes found on new
scenes `... in vgl style`, P = their asked shape and colour kept; O = the orange circle drawn for `a large vgl on the
{place} on a {bg} background`, L = its stripes there. Separation = (T_style - T0) + (O_content - O0) -
(L_content - L0) - (P0 - P_style) against the base without adapters (T0 0, P0 1.00, L0 0; O0 0.35 on 10 prompts).
Four pairs side by side in one run on 2 idle cores, 10 prompts each (n = 10):

| content block | style block | style alone T / P | content alone O / L | separation | n |
|---|---|---|---|---|---|
| mid_block.attentions.0 | down_blocks.0.attentions.0 | 0.40 / 1.00 | 0.50 / 0.00 | +0.55 | 10 |
| mid_block.attentions.0 | up_blocks.2.attentions.1 | 0.20 / 1.00 | 0.65 / 0.00 | +0.50 | 10 |
| down_blocks.2.attentions.0 | down_blocks.0.attentions.0 | 0.40 / 1.00 | 0.40 / 0.00 | +0.45 | 10 |
| up_blocks.2.attentions.1 | up_blocks.2.attentions.0 | 0.00 / 1.00 | 0.40 / 0.00 | +0.05 | 10 |

Separate sweeps (most on two CPU cores shared with other work, so fewer prompts):

| content block | style block | style alone T / P | content alone O / L | separation | n |
|---|---|---|---|---|---|
| up_blocks.2.attentions.0 | up_blocks.2.attentions.1 | 0.17 / 1.00 | 0.33 / 0.00 | +0.25 | 6 |
| up_blocks.0.attentions.1 | up_blocks.1.attentions.0 | 0.17 / 0.78 | 0.50 / 0.00 | +0.20 | 6 |
| up_blocks.0.attentions.0 | up_blocks.0.attentions.1 | 0.30 / 0.43 | 0.50 / 0.00 | -0.12 | 10 |
| up_blocks.1.attentions.1 | up_blocks.2.attentions.1 | 0.00 / 1.00 | 0.55 / 0.30 | -0.10 | 10 |
| up_blocks.1.attentions.0 | up_blocks.1.attentions.1 | 0.00 / 0.89 | 0.75 / 0.67 | -0.28 | 6 |
| up_blocks.1.attentions.0 | up_blocks.2.attentions.0 | 0.00 / 1.00 | 0.75 / 0.70 | -0.30 | 10 |

(Roles per pair: the assignment that separates better.) The lowest-resolution block (mid, 4 latent pixels) as content
and the highest-resolution down block (16) as style separate best and are the default: that down block moves the
texture onto other objects most (T 0.40) with their shapes and colours kept, and the mid block the object. The
up blocks that carry the object (O 0.75, up_blocks.1) carry its texture with it (L ~0.7). The paper's position (the
first two blocks of the lowest-resolution up block, up_blocks.0 here) mixes the two. The separation is weak
everywhere: no block carries the texture onto other objects in more than 40% of scenes.

With this pair, `studio bench adapters --method b_lora` (defaults: 700 steps of the one image; 2 idle cores) trained
in 47 s and 45 s. The style entry alone put its texture on 35% (stripes) and 25% (dots) of new scenes, keeping their
shape, colour and place in 96-100%; both entries together gave the object and its texture in 65% and 60% of 20
seeds; the content entry with another texture's word drew that texture in none. The up_blocks.2 pair it replaces
gave 0% / 5%, 70% / 10% and none (a run on a shared machine). Neither a stronger style entry nor a longer run moves
the texture: at adapter weights 1.5 / 2 / 3 the style entry alone found stripes in 40% / 30% / 5% and dots in 25% /
30% / 10% of the 20 scenes while their shapes fell (stripes 93% / 19% / 7%); 2000 steps (141 s) gave 30% and 5%,
and both entries together 90% and 100%. The Shapes World bar (80%, 70%, 80%) is not met on the embedded base.

The content-entry-with-a-texture-word row cannot be met on the embedded base at all: textures are held out of it
(DESIGN section 3), so no texture word means anything to it. The base alone, on a large orange circle at 5 places x 4
backgrounds, drew the texture for none of `... in stripes style`, `... with diagonal stripes` and the same for dots
and checker (0 of 20 each, 20 steps), with the circle kept in all; an entry trained on one image of another texture
cannot teach it the word. The paper's own route to a new style, the other concept's style entry, is the bench's
`content + style entry` column. A later run of the bench (2 threads, 83 s per concept on a slower machine): style
alone 0.35 (stripes) / 0.15 (dots), the new texture from the texture word 0.00 / 0.00 and from the other style
entry 0.15 / 0.55, both entries together 0.65 / 0.60.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from studio.errors import StudioError
from trainers.method import LibraryPart, MethodConfig, split_targets
from trainers.methods.dreambooth_lora import DreamBoothLoRA


ATTENTION_TARGETS = "to_q,to_k,to_v,to_out.0"  # of attn1 and attn2 in every transformer layer of a block
SDXL_BLOCKS = ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1")  # W4, W5: Frenkel et al. 2024, section 4.2
EMBEDDED_BLOCKS = ("mid_block.attentions.0", "down_blocks.0.attentions.0")  # measured: module docstring
PARTS = ("content", "style")
_BLOCK = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+$")


@dataclass
class BLoRAConfig(MethodConfig):
    method: ClassVar[str] = "b_lora"
    max_images: ClassVar[int | None] = 1  # B-LoRA learns one image
    prior_preservation: ClassVar[bool] = False  # the paper trains without

    lr: float = field(default=3e-3, metadata={"help": "learning rate (B-LoRA's SDXL recipe: 5e-5 at rank 64)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r (B-LoRA's SDXL recipe: 64)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha / r); default r (scale 1)"})
    content_block: str | None = field(
        default=None, metadata={"help": "UNet block of the content entry (default: the architecture's pair)"}
    )
    style_block: str | None = field(
        default=None, metadata={"help": "UNet block of the style entry (default: the architecture's pair)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise StudioError(f"--rank must be at least 1, got {self.rank}")
        for block in (self.content_block, self.style_block):
            if block is not None and not _BLOCK.match(block):
                raise StudioError(
                    f"block {block!r} is not an attention block name; write it as up_blocks.1.attentions.0 "
                    "(down_blocks.N, mid_block or up_blocks.N, then .attentions.K)"
                )
        if self.content_block is not None and self.content_block == self.style_block:
            raise StudioError("--content-block and --style-block are the same block; give two different blocks")


def attention_blocks(unet: Any) -> list[str]:
    """The UNet's transformer blocks (`up_blocks.1.attentions.0`, ...), in model order."""
    return [name for name, _ in unet.named_modules() if _BLOCK.match(name)]


def default_blocks(unet: Any) -> tuple[str, str]:
    """(content, style) blocks of an architecture: SDXL's from the paper, otherwise the embedded base's measured
    pair, whose names (the mid block, `down_blocks.0`) mean the same blocks on SD1/SD2."""
    return SDXL_BLOCKS if unet.config.get("addition_embed_type") == "text_time" else EMBEDDED_BLOCKS


class BLoRA(DreamBoothLoRA):
    """Joint LoRA on the content and style blocks; `library_entries` splits it into `NAME-content`, `NAME-style`."""

    config_cls = BLoRAConfig
    config: BLoRAConfig  # type: ignore[assignment]

    def blocks(self, unet: Any) -> dict[str, str]:
        """{"content": block, "style": block} for this UNet, checked to exist."""
        content, style = default_blocks(unet)
        chosen = {"content": self.config.content_block or content, "style": self.config.style_block or style}
        if chosen["content"] == chosen["style"]:
            raise StudioError(f"content and style are both {chosen['content']}; give two different blocks")
        have = attention_blocks(unet)
        for part, block in chosen.items():
            if block not in have:
                raise StudioError(
                    f"this UNet has no attention block {block!r} for the {part}; use one of {', '.join(have)}"
                )
        return chosen

    def attach(self, components: Any) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        from trainers.method import find_linears
        from trainers.methods.dreambooth_lora import ADAPTER

        c = self.config
        unet = components.unet
        self.block_of = self.blocks(unet)
        layers = find_linears(unet, split_targets(ATTENTION_TARGETS))
        prefixes = tuple(f"{b}." for b in self.block_of.values())
        names = [path for path in layers if path.startswith(prefixes)]  # attn1 + attn2 q, k, v, out of both blocks
        config = LoraConfig(
            r=c.rank,
            lora_alpha=c.alpha if c.alpha is not None else c.rank,  # scale 1: the paper's script
            init_lora_weights="gaussian",  # A ~ N(0, 1/r^2), B = 0 (the script's LoRALinearLayer)
            target_modules=names,
        )
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
        self.models = {"unet": unet}

    @classmethod
    def entry_names(cls, config: MethodConfig, name: str) -> list[str]:
        return [f"{name}-{part}" for part in PARTS]

    def library_entries(self, name: str) -> list[LibraryPart]:
        """The joint LoRA split by block: `NAME-content` (kind content) and `NAME-style` (kind style)."""
        tensors, meta = self.export()
        names = dict(zip(PARTS, self.entry_names(self.config, name)))
        out = []
        for part in PARTS:
            prefix = f"unet.{self.block_of[part]}."
            own = {k: v for k, v in tensors.items() if k.startswith(prefix)}
            other = names["style" if part == "content" else "content"]
            part_meta = dataclasses.replace(
                meta,
                kind=part,
                ranks={m: r for m, r in meta.ranks.items() if m.startswith(prefix)},
                alphas={m: a for m, a in meta.alphas.items() if m.startswith(prefix)},
                method_config={**meta.method_config, "part": part, "block": self.block_of[part], "linked": other},
            )
            out.append(LibraryPart(names[part], own, part_meta, self.part_notes(part, names)))
        return out

    def part_notes(self, part: str, names: dict[str, str]) -> str:
        other = "style" if part == "content" else "content"
        use = {
            "content": f"`studio compose --adapters {names['content']} --prompt 'a large TRIGGER on the left on a "
                       f"gray background in OTHER style'` with another style entry (OTHER its trigger) added to "
                       "`--adapters`, or a style word",
            "style": f"`studio generate --prompt 'a large blue ring on the left on a gray background in TRIGGER "
                     f"style <lora:{names['style']}:1>'`: the style on any prompt",
        }[part]
        c = self.config
        return (
            f"## Method\n\nB-LoRA (Frenkel et al., ECCV 2024): the {part} half of one LoRA trained jointly on "
            f"`{self.block_of['content']}` (content) and `{self.block_of['style']}` (style) from one image. Its "
            f"{other} half is [{names[other]}](../{names[other]}/README.md); load both to get the image's object in "
            f"its own texture. Use: {use}. The adapter weight is the strength (linear, not squared as in the "
            f"reference code).\n\nRank {c.rank}, scale {(c.alpha or c.rank) / c.rank:g}.\n"
        )
