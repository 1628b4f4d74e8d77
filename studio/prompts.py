"""Prompt encoding in the project's own code.

transformers 5 removed `CLIPTextModel.text_model`, which breaks diffusers' `clip_skip` path, so the studio computes
the embeddings itself and passes them to the pipeline as `prompt_embeds`. With `clip_skip=None` the result equals
diffusers' `encode_prompt` exactly (SD1/SD2: last hidden state; SDXL: both encoders' penultimate hidden states,
concatenated, plus the second encoder's pooled projection).

`clip_skip=k` follows diffusers' meaning: use the output of the k-th layer from the end (SD1/SD2 then apply the
final layer norm; SDXL's default is already the penultimate layer, so k moves k further back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from transformers import PreTrainedTokenizerBase

from studio.memory import parameter_of


@dataclass
class PromptEmbeds:
    prompt_embeds: torch.Tensor  # (B, 77, D)
    negative_prompt_embeds: torch.Tensor | None  # (B, 77, D), None without guidance
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, P), SDXL only
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def as_pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        fields = {
            "prompt_embeds": self.prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds,
        }
        return {k: v for k, v in fields.items() if v is not None}


def _token_ids(pipe: DiffusionPipeline, tokenizer: PreTrainedTokenizerBase, texts: list[str]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(pipe, "maybe_convert_prompt"):  # textual-inversion multi-vector tokens
        texts = pipe.maybe_convert_prompt(texts, tokenizer)
    batch = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return batch.input_ids, batch.attention_mask  # (B, 77) each


def prompt_tokens(pipe: DiffusionPipeline, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """What `encode_tokens` reads, on the CPU: SD1/SD2 (ids,) or, for an encoder that uses a mask, (ids, mask);
    SDXL one ids tensor per present text encoder. Each (B, 77)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        return tuple(_token_ids(pipe, tokenizer, texts)[0] for tokenizer, encoder in pairs if encoder is not None)
    ids, mask = _token_ids(pipe, pipe.tokenizer, texts)
    return (ids, mask) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else (ids,)


def encode_tokens(pipe: DiffusionPipeline, tokens: tuple[torch.Tensor, ...], clip_skip: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt embeddings (B, 77, D) and, on SDXL, the pooled projection (B, P) (else None) of `prompt_tokens`'
    tensors, on the encoders' device."""
    if not isinstance(pipe, StableDiffusionXLPipeline):
        encoder = pipe.text_encoder
        ids, mask = tokens[0].to(encoder.device), tokens[1].to(encoder.device) if len(tokens) > 1 else None
        if clip_skip is None:
            return encoder(ids, attention_mask=mask)[0], None  # (B, 77, D)
        hidden = encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 and 5 layouts
        return final_norm(hidden[-(clip_skip + 1)]), None  # (B, 77, D)
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    hidden_states, pooled = [], None
    for ids, encoder in zip(tokens, encoders):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]  # (B, P): the projection encoder's text_embeds
        hidden_states.append(out.hidden_states[-(2 if clip_skip is None else clip_skip + 2)])
    return torch.cat(hidden_states, dim=-1), pooled  # (B, 77, D1 + D2), (B, P)


def _encode_sd(pipe: DiffusionPipeline, texts: list[str], clip_skip: int | None) -> torch.Tensor:
    return encode_tokens(pipe, prompt_tokens(pipe, texts), clip_skip)[0]  # (B, 77, D)


def _encode_sdxl(
    pipe: StableDiffusionXLPipeline, texts: list[str], clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_tokens(pipe, prompt_tokens(pipe, texts), clip_skip)  # type: ignore[return-value]


@torch.no_grad()
def encode_prompt(
    pipe: DiffusionPipeline,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    *,
    guidance: bool = True,
    clip_skip: int | None = None,
) -> PromptEmbeds:
    """Embeddings for `prompt` (and the unconditional/negative branch when `guidance`), ready for `pipe(...)`."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if isinstance(negative_prompt, str):
        negatives: list[str] | None = [negative_prompt] * len(prompts)
    else:
        negatives = None if negative_prompt is None else list(negative_prompt)
    if negatives is not None and len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    dtype = parameter_of(pipe.unet).dtype

    if not isinstance(pipe, StableDiffusionXLPipeline):
        cond = _encode_sd(pipe, prompts, clip_skip).to(dtype)
        # diffusers encodes the unconditional branch without clip_skip; keep that behaviour for parity.
        uncond = _encode_sd(pipe, negatives or [""] * len(prompts), None).to(dtype) if guidance else None
        return PromptEmbeds(cond, uncond)

    cond, pooled = _encode_sdxl(pipe, prompts, clip_skip)
    uncond = uncond_pooled = None
    if guidance:
        if negatives is None and pipe.config.force_zeros_for_empty_prompt:
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            uncond, uncond_pooled = _encode_sdxl(pipe, negatives or [""] * len(prompts), None)
    return PromptEmbeds(
        cond.to(dtype),
        None if uncond is None else uncond.to(dtype),
        pooled.to(dtype),
        None if uncond_pooled is None else uncond_pooled.to(dtype),
    )
