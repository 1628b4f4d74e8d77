"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open_clip_torch ships.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE: 256 byte symbols, the same with `</w>`, one entry per
merge (48,894), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407), 49,408 ids in all. open_clip ships
the merges as `bpe_simple_vocab_16e6.txt.gz`; building the transformers tokenizer from it needs no download.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

from studio.errors import StudioError


BOS_ID, EOS_ID, VOCAB_SIZE, MAX_LENGTH = 49406, 49407, 49408, 77
_NUM_MERGES = 49152 - 256 - 2  # open_clip's SimpleTokenizer keeps this many merges


def bpe_vocab_file() -> Path:
    """Locate open_clip's BPE merges file without importing open_clip (its import pulls torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise StudioError("open_clip_torch is not installed; run `pip install open_clip_torch` (it ships CLIP's BPE)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise StudioError(f"{path} is missing; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> list[str]:
    # The GPT-2 / CLIP byte-to-printable-character table, in CLIP's order.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_vocab_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = _bytes_to_unicode()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """A fresh `CLIPTokenizer` with SD's ids: `a photo of a cat` -> 49406, 320, 1125, 539, 320, 2368, 49407."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
