"""Token lengths of canonical records with a model's processor (for ``validate`` and ``stats``).

The count is the length after image-token expansion, the length the trainer sees: a sample longer than
the recipe's ``model.max_length`` would be refused at training time (truncating it would cut the answer or
image tokens), so ``validate --model`` reports it before a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lvlm_cl.data.records import RecordError

# A tokenizer without a real limit reports a huge model_max_length (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 10**8


@dataclass
class TokenCounter:
    count: Callable[[dict], int]   # record with absolute image paths -> number of tokens
    max_length: int


def default_max_length(processor) -> int:
    """The tokenizer's ``model_max_length`` when it is a real limit, else the recipe default ``model.max_length``."""
    from lvlm_cl.config import ModelConfig

    tokenizer = getattr(processor, "tokenizer", processor)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else ModelConfig().max_length


def load_token_counter(model: str, max_length: int | None = None) -> TokenCounter:
    """A counter for ``model``: a built-in name (``builtin:tiny-llava``) or a local Hugging Face folder."""
    from lvlm_cl.data.encoding import count_tokens
    from lvlm_cl.models import load_processor

    if not model.startswith("builtin:") and not Path(model).is_dir():
        # Checked here: from_pretrained would otherwise try the network for a while before failing.
        raise RecordError(f"--model {model!r}: expected a local model folder or a built-in name "
                          f"such as 'builtin:tiny-llava'")
    try:
        processor = load_processor(model)
    except (OSError, ValueError, KeyError) as e:
        raise RecordError(f"--model {model!r}: cannot load a processor: {e}") from None
    return TokenCounter(lambda record: int(count_tokens(processor, record)),
                        max_length if max_length is not None else default_max_length(processor))
