"""Caption metrics: BLEU-4, ROUGE-L and CIDEr-D through pycocoevalcap's pure-Python scorers.

pycocoevalcap (salaniz/pycocoevalcap, the Python 3 port of tylin/coco-caption) is the code COCO caption
numbers come from. Its scorers are used as they are; only its tokenizer is replaced, because
``PTBTokenizer`` runs Stanford CoreNLP and needs Java. :func:`caption_tokenize` stands in for it:

- lower case;
- every ASCII punctuation character (``string.punctuation``) becomes a space, so ``"dog's"`` gives
  ``dog s``, ``"t-shirt"`` gives ``t shirt`` and ``"3.5"`` gives ``3 5``;
- whitespace is collapsed and the tokens are joined by single spaces (pycocoevalcap splits on spaces).

PTB tokenisation differs in details (it keeps ``'s`` and ``n't`` as tokens, and hyphenated words whole),
so numbers computed here are close to, not identical with, numbers computed through ``PTBTokenizer``.

Each function takes ``predictions`` (one string per sample) and ``references`` (a non-empty list of
strings per sample) and returns :class:`CaptionScores` on pycocoevalcap's own scale:

- :func:`bleu4`: BLEU-4, corpus level (n-gram counts pooled over all samples, "closest" reference
  length for the brevity penalty), in [0, 1]; ``per_sample`` holds each sentence's own BLEU-4;
- :func:`rouge_l`: ROUGE-L F-measure with beta = 1.2 (precision and recall of the longest common
  subsequence, each the max over references), mean over samples, in [0, 1];
- :func:`cider_d`: CIDEr-D (Vedantam et al. 2015). pycocoevalcap calls its class ``Cider``, but its
  ``cider_scorer.py`` is the CIDEr-D variant: tf-idf n-gram vectors (n = 1..4) with document
  frequencies counted over the references of the whole corpus, clipped hypothesis counts
  (``min(hyp, ref)``), a Gaussian length penalty with sigma = 6, the mean over n and references, times 10.
  The value is in [0, 10] (1.0 is a typical COCO score; papers print it times 100). It is a corpus
  metric: a sample's score depends on every other sample's references, and a corpus of one sample
  scores 0 (every n-gram occurs in every "document", so every idf weight is 0).

A sample whose references list is empty, or a reference with no token after tokenisation, raises
``ValueError`` naming the sample: it is a data error. An empty prediction is scored (low).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Sequence

_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")


def caption_tokenize(text: str) -> str:
    """Lower case, ASCII punctuation to spaces, tokens joined by single spaces (see the module docstring)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class CaptionScores:
    """A caption metric on pycocoevalcap's scale: the corpus value and one value per sample."""

    corpus: float
    per_sample: tuple[float, ...]


def check_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ``ValueError`` unless ``references`` holds a non-empty list of strings for each prediction.

    The message names the first offending sample by its index.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists; they must pair up")
    if not predictions:
        raise ValueError("no samples: a corpus metric needs at least one prediction")
    for index, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"sample {index}: references must be a list of strings per sample, got the string "
                             f"{refs!r} (wrap it: [{refs!r}])")
        if len(refs) == 0:
            raise ValueError(f"sample {index}: empty references list; every sample needs at least one reference")
        for ref in refs:
            if not isinstance(ref, str):
                raise ValueError(f"sample {index}: reference {ref!r} is not a string")
    for index, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"sample {index}: prediction {prediction!r} is not a string")


def _tokenized(predictions: Sequence[str], references: Sequence[Sequence[str]]
               ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """pycocoevalcap's inputs ``(gts, res)``: ``{sample: [tokenised references]}``, ``{sample: [prediction]}``."""
    check_corpus(predictions, references)
    gts: dict[int, list[str]] = {}
    for index, refs in enumerate(references):
        tokenized = [caption_tokenize(ref) for ref in refs]
        for position, (ref, tokens) in enumerate(zip(refs, tokenized)):
            if not tokens:
                raise ValueError(f"sample {index}: reference {position} ({ref!r}) has no words after tokenisation")
        gts[index] = tokenized
    res = {index: [caption_tokenize(prediction)] for index, prediction in enumerate(predictions)}
    return gts, res


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> CaptionScores:
    """Corpus BLEU-4 in [0, 1] (pycocoevalcap ``Bleu(4)``) and each sentence's BLEU-4."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _tokenized(predictions, references)
    corpus, per_sample = Bleu(4).compute_score(gts, res, verbose=0)
    return CaptionScores(float(corpus[3]), tuple(float(value) for value in per_sample[3]))


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> CaptionScores:
    """ROUGE-L F-measure (beta 1.2, pycocoevalcap ``Rouge``), mean over samples, in [0, 1]."""
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenized(predictions, references)
    corpus, per_sample = Rouge().compute_score(gts, res)
    return CaptionScores(float(corpus), tuple(float(value) for value in per_sample))


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> CaptionScores:
    """CIDEr-D in [0, 10] (pycocoevalcap ``Cider``, sigma 6), mean over samples; see the module docstring."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _tokenized(predictions, references)
    corpus, per_sample = Cider().compute_score(gts, res)
    return CaptionScores(float(corpus), tuple(float(value) for value in per_sample))
