"""Hard negative captions for the world CLIP: the same scene with one position or colour binding changed.

CLIP's contrastive loss can be minimised as a bag of words (Yuksekgonul et al., "When and why vision-language models
behave like bags-of-words", arXiv:2210.01936): random batch captions almost always differ in colours or shapes, so
word order and position words are never needed. NegCLIP (their section 4) adds, for every image, a caption of the
same scene with words swapped as an extra text column of the image-to-text softmax. Here the negative moves one
object to another position, or swaps the colours of two objects (a binding error); the text tower must then encode
both in its pooled state, which is what the embedded base reads its prompts through.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from studio.world.grammar import POSITIONS, Scene


def hard_negative(scene: Scene, rng: np.random.Generator) -> Scene:
    """`scene` with one object at another free position or, half the time when two colours differ, two colours swapped.

    The result always differs from `scene` in its canonical caption and in nothing but that one change.
    """
    objects = list(scene.objects)
    colours = [i for i in range(len(objects)) for j in range(len(objects)) if objects[i].colour != objects[j].colour]
    if colours and rng.random() < 0.5:
        i = int(rng.choice(colours))
        j = int(rng.choice([j for j in range(len(objects)) if objects[j].colour != objects[i].colour]))
        a, b = objects[i], objects[j]
        objects[i], objects[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
    else:
        i = int(rng.integers(len(objects)))
        taken = {o.position for o in objects}
        free = [p for p in POSITIONS if p not in taken]
        objects[i] = replace(objects[i], position=str(rng.choice(free)))
    return replace(scene, objects=tuple(objects))
