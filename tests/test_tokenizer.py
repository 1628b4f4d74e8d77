from __future__ import annotations

from studio.models.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer


def test_sd_ids_for_known_prompt() -> None:
    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("sks").input_ids == [BOS_ID, 48136, EOS_ID]
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == 77


def test_padding_and_truncation_follow_sd() -> None:
    tokenizer = clip_tokenizer()
    ids = tokenizer("a red star", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == BOS_ID
    assert ids[ids.index(EOS_ID) :] == [EOS_ID] * (77 - ids.index(EOS_ID))  # SD pads with end-of-text
    long = tokenizer(" ".join(["star"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == EOS_ID


def test_open_clip_agrees_on_plain_prompts() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    ours, theirs = clip_tokenizer(), SimpleTokenizer()
    for text in ["a large red star on the left", "Hello, World! 123", "emoji 🙂 and ünïcode"]:
        assert ours(text).input_ids == [BOS_ID, *theirs.encode(text), EOS_ID]
