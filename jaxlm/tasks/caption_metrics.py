"""Caption and answer scores: CIDEr-D (Vedantam et al. 2015, as the COCO caption evaluation
computes it) and exact-match answers.

CIDEr-D compares a caption with every reference of its image by the cosine of their TF-IDF
n-gram vectors (n = 1..4; a reference n-gram's IDF comes from how many images' references hold
it), with the caption's counts clipped at the reference's and a Gaussian penalty on the length
difference (sigma 6 words); the mean over references and n, times 10. A caption equal to a
reference of its image scores about 10 when its n-grams are rare among other images, less when
every image is described alike.
"""

import collections
import math
import re

_WORD = re.compile(r"[a-z0-9'-]+")
SIGMA = 6.0


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (how captions and answers are compared)."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def cider_d(predictions: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus CIDEr-D of one prediction per image against that image's references."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"CIDEr needs one prediction per image and some images "
                         f"({len(predictions)} predictions, {len(references)} reference lists)")
    refs = [[words(r) for r in rs] for rs in references]
    frequency = collections.Counter()  # n-gram -> images whose references hold it
    for rs in refs:
        frequency.update({g for r in rs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_images = math.log(len(predictions))

    def vectors(tokens):
        out = []
        for n in range(1, max_n + 1):
            vec = {g: count * (log_images - math.log(max(1.0, frequency[g]))) for g, count in _ngrams(tokens, n).items()}
            out.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
        return out

    total = 0.0
    for prediction, rs in zip(predictions, refs):
        hyp, length = vectors(words(prediction)), len(words(prediction))
        score = 0.0
        for r in rs:
            penalty = math.exp(-((length - len(r)) ** 2) / (2 * SIGMA ** 2))
            for (h, h_norm), (v, v_norm) in zip(hyp, vectors(r)):
                if h_norm and v_norm:
                    dot = sum(min(h[g], v[g]) * v[g] for g in h if g in v)
                    score += penalty * dot / (h_norm * v_norm)
        total += 10.0 * score / (max_n * max(1, len(rs)))
    return total / len(predictions)


def exact_match(prediction: str, answer: str) -> bool:
    """The answer, word for word (case and punctuation aside)."""
    return words(prediction) == words(answer)
