"""Token lengths of canonical records with a model's processor (for ``validate`` and ``stats``).

The count is the length after image-token expansion, the length the trainer sees: a sample longer than
the maximum would be truncated and could lose image tokens, which the model cannot recover from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lvlm_cl.data.records import RecordError

# A tokenizer without a real limit reports a huge model_max_length (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 10**8


@dataclass
class TokenCounter:
    count: Callable[[dict], int]   # record with absolute image paths -> number of tokens
    max_length: int | None


def load_token_counter(model: str, max_length: int | None = None) -> TokenCounter:
    """A counter for ``model`` (a built-in name or a local Hugging Face folder).

    ``max_length`` defaults to the tokenizer's ``model_max_length`` when that is a real limit.
    """
    try:
        from lvlm_cl.data.encoding import count_tokens
        from lvlm_cl.models import load_processor
    except ImportError as e:
        raise RecordError(f"--model needs lvlm_cl.data.encoding.count_tokens and lvlm_cl.models.load_processor, "
                          f"which are not available in this installation ({e})") from None
    try:
        processor = load_processor(model)
    except (OSError, ValueError, KeyError) as e:
        raise RecordError(f"cannot load a processor from {model!r}: {e}") from None
    if max_length is None:
        tokenizer = getattr(processor, "tokenizer", processor)
        limit = getattr(tokenizer, "model_max_length", None)
        max_length = int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None
    return TokenCounter(lambda record: int(count_tokens(processor, record)), max_length)
