"""The text-metadata signal of retrieval: TF-IDF cosine between a prompt and each adapter's metadata text.

Words are lowercased, stop words dropped, plural `s` stripped; adjacent kept words also count as bigrams, so
`purple ring` matches a card that says `a purple ring` more than one that says `a purple star inside a red ring`.
IDF is smoothed over the candidate documents (log((1 + N) / (1 + df)) + 1, as scikit-learn's default).
"""

from __future__ import annotations

import math
import re
from collections import Counter


STOP = frozenset(
    "a an the of on in at to with and or its it is are for by from as into within inside this that some one "
    "adapter trained shapes world renders render subject style content lora studio x".split()
)


def terms(text: str) -> list[str]:
    """Unigrams and bigrams of the kept words of `text`."""
    words = [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
             for w in re.findall(r"[a-z0-9]+", text.lower())]
    kept = [w if w not in STOP else None for w in words]
    grams = [w for w in kept if w]
    grams += [f"{a} {b}" for a, b in zip(kept, kept[1:]) if a and b]
    return grams


def tfidf_scores(query: str, documents: list[str]) -> list[float]:
    """Cosine of the query's and each document's TF-IDF vectors (0 where either is empty)."""
    docs = [Counter(terms(d)) for d in documents]
    df = Counter(t for d in docs for t in d)
    n = len(docs)

    def vector(counts: Counter[str]) -> dict[str, float]:
        return {t: c * (math.log((1 + n) / (1 + df.get(t, 0))) + 1) for t, c in counts.items()}

    q = vector(Counter(terms(query)))
    qn = math.sqrt(sum(v * v for v in q.values()))
    out = []
    for d in docs:
        v = vector(d)
        dn = math.sqrt(sum(x * x for x in v.values()))
        out.append(sum(q[t] * v.get(t, 0.0) for t in q) / (qn * dn) if qn and dn else 0.0)
    return out
