"""A language model as judge (metric ``judge``): does the prediction mean the same as the reference?

Two backends, chosen by :class:`JudgeSettings`:

- ``endpoint``: any OpenAI-compatible server (``vllm serve MODEL`` gives ``http://localhost:8000/v1``);
  one ``POST {endpoint}/chat/completions`` per sample, up to ``max_workers`` at a time, temperature 0.
  The API key, if any, is read from the environment variable named by ``api_key_env``.
- ``local_model_dir``: a Hugging Face causal LM directory (``AutoTokenizer`` + ``AutoModelForCausalLM``,
  text only), prompted through its tokenizer's chat template, greedy decoding, ``batch_size`` prompts
  at a time.

The prompt is ``judge_prompts/{prompt_version}.txt`` (``{question}``, ``{reference}``, ``{prediction}``
are filled in) and asks for one word. A released prompt is never edited: a new wording is a new file
(``v2.txt``), so cached verdicts stay tied to the words that produced them.

The verdict (:func:`parse_verdict`) is the reply's first word, stripped of surrounding punctuation and
``*`` / quotes / backticks, case-insensitive: ``yes`` -> 1.0, ``no`` -> 0.0. Anything else ("The answer is
yes", "Maybe") is *unparseable*: it counts as 0.0 (a wrong answer) and is logged as a warning with the
sample's index, since a judge that does not follow the format has not confirmed the answer.

Every reply is appended to the cache (JSON lines at ``cache``; a ``.lock`` file beside it serialises
writers across processes) under the sha256 of (prompt version, model, question, reference, prediction),
raw reply included, as soon as it arrives; a rerun, or a run resumed after a failure, asks only for what
is missing. A torn last line (a kill mid-write) is skipped when the cache is read.

HTTP 5xx, 429, timeouts and connection failures are retried ``retries`` times, waiting ``backoff_s``,
then twice that, and so on. When the attempts run out, on another HTTP error, or on a 200 answer that
is not a chat completion, :class:`JudgeError` says, on one line, which URL and why.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

from lvlm_cl.errors import UserError

logger = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
"""The prompt file used unless the settings name another."""

_VERDICTS = {"yes": 1.0, "no": 0.0}
_STRIP = " \t\r\n.,;:!?*\"'`()[]"


class JudgeError(ValueError, UserError):
    """The judge cannot be used or could not give verdicts: settings without a model or with no single
    backend, an unreachable endpoint, an answer that is not a chat
    completion, a model directory that does not load, a missing API key."""


@dataclass(frozen=True, kw_only=True)
class JudgeSettings:
    """How to reach the judge and where its answers are cached. Give exactly one of ``endpoint`` and
    ``local_model_dir``.

    ``model`` is the model name sent to the endpoint, and part of the cache key for both backends: name
    a local model so that other weights get another name. ``timeout_s``, ``retries``, ``backoff_s`` and
    ``max_workers`` concern the endpoint; ``batch_size`` and ``device`` (default: CUDA when available)
    the local model. ``max_new_tokens`` bounds the reply.
    """

    model: str
    cache: str | os.PathLike
    endpoint: str | None = None
    api_key_env: str | None = None
    local_model_dir: str | os.PathLike | None = None
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    max_workers: int = 8
    batch_size: int = 8
    device: str | None = None
    max_new_tokens: int = 8
    prompt_version: str = PROMPT_VERSION

    def __post_init__(self) -> None:
        if (self.endpoint is None) == (self.local_model_dir is None):
            raise JudgeError("JudgeSettings: give exactly one of 'endpoint' (an OpenAI-compatible base URL) "
                             "or 'local_model_dir' (a Hugging Face model directory)")
        if not self.model:
            raise JudgeError("JudgeSettings: 'model' must name the judge model (it is part of the cache key)")
        for name in ("timeout_s", "backoff_s"):
            if not getattr(self, name) >= 0:
                raise JudgeError(f"JudgeSettings: {name!r} must be >= 0, got {getattr(self, name)!r}")
        for name, least in (("retries", 0), ("max_workers", 1), ("batch_size", 1), ("max_new_tokens", 1)):
            if getattr(self, name) < least:
                raise JudgeError(f"JudgeSettings: {name!r} must be >= {least}, got {getattr(self, name)!r}")


# --- prompt, verdict, cache key --------------------------------------------------------------------

def settings_from(section, default_cache: str | os.PathLike) -> JudgeSettings:
    """``JudgeSettings`` from a recipe's ``judge`` section (``config.JudgeConfig``: model, endpoint or
    local_model_dir, api_key_env, cache, timeout_s, retries, max_workers, batch_size); an empty ``cache``
    means ``default_cache``."""
    return JudgeSettings(model=section.model, cache=section.cache or default_cache, endpoint=section.endpoint,
                         local_model_dir=section.local_model_dir, api_key_env=section.api_key_env,
                         timeout_s=section.timeout_s, retries=section.retries, max_workers=section.max_workers,
                         batch_size=section.batch_size)


def load_prompt(version: str = PROMPT_VERSION) -> str:
    """The prompt template ``judge_prompts/{version}.txt`` shipped with lvlm_cl."""
    folder = resources.files("lvlm_cl.evaluation") / "judge_prompts"
    path = folder / f"{version}.txt"
    if not path.is_file():
        known = sorted(entry.name.removesuffix(".txt") for entry in folder.iterdir() if entry.name.endswith(".txt"))
        raise ValueError(f"no judge prompt {version!r}; shipped: {', '.join(known)}")
    return path.read_text(encoding="utf-8")


def render_prompt(template: str, question: str, reference: str, prediction: str) -> str:
    """The template with its three fields filled in (their own braces are left alone)."""
    return template.format(question=question, reference=reference, prediction=prediction)


def parse_verdict(reply: str) -> float | None:
    """1.0 for a "yes", 0.0 for a "no", ``None`` when the reply is neither (see the module docstring)."""
    words = reply.split(maxsplit=1)
    if not words:
        return None
    return _VERDICTS.get(words[0].strip(_STRIP).lower())


def cache_key(prompt_version: str, model: str, question: str, reference: str, prediction: str) -> str:
    """sha256 (hex) of the five fields, JSON-encoded so that no separator can make two keys collide."""
    fields = json.dumps([prompt_version, model, question, reference, prediction], ensure_ascii=False)
    return hashlib.sha256(fields.encode("utf-8")).hexdigest()


class JudgeCache:
    """The judge's replies by cache key: a JSON-lines file, read once, appended to line by line."""

    def __init__(self, path: str | os.PathLike):
        from filelock import FileLock

        self.path = Path(path)
        self._thread_lock = threading.Lock()
        self._file_lock = FileLock(str(self.path) + ".lock")
        self._replies: dict[str, str] = {}
        if self.path.is_file():
            with self._file_lock:
                self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self._replies[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s:%d: skipping an unreadable judge cache line (%r)", self.path, number, line[:80])

    def get(self, key: str) -> str | None:
        """The cached reply for ``key``, or ``None``."""
        return self._replies.get(key)

    def put(self, record: dict) -> None:
        """Append ``record`` (with ``key`` and ``reply``) as one line, flushed to disk before returning."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives there too
        with self._thread_lock, self._file_lock:
            with open(self.path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn line from a killed writer: start a fresh line
                        line = "\n" + line
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            self._replies[record["key"]] = record["reply"]


# --- backends --------------------------------------------------------------------------------------

class _EndpointBackend:
    """``POST {endpoint}/chat/completions`` with retries; one prompt per request."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.url = settings.endpoint.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise JudgeError(f"judge endpoint {self.url}: the environment variable {settings.api_key_env} "
                                 "(JudgeSettings.api_key_env) is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def ask(self, prompt: str) -> str:
        """The judge's reply to one prompt."""
        body = json.dumps({"model": self.settings.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.settings.max_new_tokens}).encode("utf-8")
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                return self._content(self._post(body))
            except _Transient as e:
                reason = str(e)
            if attempt + 1 < attempts:
                time.sleep(self.settings.backoff_s * 2 ** attempt)
        raise JudgeError(f"judge endpoint {self.url}: {reason} (gave up after {attempts} attempts)")

    def _post(self, body: bytes) -> bytes:
        """The response body of one request; ``_Transient`` for what is worth retrying."""
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = _snippet(e.read())
            e.close()
            if e.code >= 500 or e.code == 429:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise JudgeError(f"judge endpoint {self.url}: HTTP {e.code} {e.reason}: {detail}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Transient(f"no answer within timeout_s={self.settings.timeout_s}") from None
            raise _Transient(f"cannot connect ({e.reason})") from None
        except TimeoutError:
            raise _Transient(f"no answer within timeout_s={self.settings.timeout_s}") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"connection failed ({type(e).__name__}: {e})") from None

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url}: the answer is not a chat completion "
                             f"(no choices[0].message.content): {_snippet(raw)}") from None
        if not isinstance(content, str):
            raise JudgeError(f"judge endpoint {self.url}: choices[0].message.content is {content!r}, not text")
        return content


class _Transient(Exception):
    """A failure worth retrying (HTTP 5xx or 429, a timeout, a failed connection); the message says which."""


def _snippet(raw: bytes, limit: int = 200) -> str:
    return repr(raw[:limit].decode("utf-8", errors="replace"))


class _LocalBackend:
    """A Hugging Face causal LM in this process: chat template, greedy decoding, batches."""

    def __init__(self, settings: JudgeSettings):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        path = Path(settings.local_model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto").to(device)
        except (OSError, ValueError) as e:
            reason = " ".join(str(e).split())
            raise JudgeError(f"judge local_model_dir {path}: cannot load a causal LM ({reason})") from None
        if not self.tokenizer.chat_template:
            raise JudgeError(f"judge local_model_dir {path}: the tokenizer has no chat template")
        self.model.eval()
        self.tokenizer.padding_side = "left"  # generation continues after the last token of each row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def ask_batch(self, prompts: Sequence[str]) -> list[str]:
        """The replies to ``prompts``, in order."""
        import torch

        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True) for prompt in prompts]
        # The chat template writes the special tokens it wants (BOS ...); do not add them twice.
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


# --- judging ---------------------------------------------------------------------------------------

def judge_replies(settings: JudgeSettings, questions: Sequence[str], predictions: Sequence[str],
                  references: Sequence[str]) -> list[str]:
    """The judge's raw reply for each sample: from the cache, else asked (and cached) once per distinct
    (question, reference, prediction)."""
    if not len(questions) == len(predictions) == len(references):
        raise ValueError(f"{len(questions)} questions, {len(predictions)} predictions and {len(references)} "
                         "references; they must pair up")
    template = load_prompt(settings.prompt_version)
    cache = JudgeCache(settings.cache)
    keys = [cache_key(settings.prompt_version, settings.model, question, reference, prediction)
            for question, reference, prediction in zip(questions, references, predictions)]
    missing: dict[str, dict] = {}
    for key, question, reference, prediction in zip(keys, questions, references, predictions):
        if cache.get(key) is None and key not in missing:
            missing[key] = {"key": key, "prompt_version": settings.prompt_version, "model": settings.model,
                            "question": question, "reference": reference, "prediction": prediction}
    if missing:
        prompts = {key: render_prompt(template, record["question"], record["reference"], record["prediction"])
                   for key, record in missing.items()}
        for key, reply in _ask(settings, prompts):
            cache.put({**missing[key], "reply": reply})
    return [cache.get(key) for key in keys]


def _ask(settings: JudgeSettings, prompts: dict[str, str]) -> Iterator[tuple[str, str]]:
    """``(key, reply)`` for every prompt, as they arrive."""
    keys = list(prompts)
    if settings.local_model_dir is not None:
        backend = _LocalBackend(settings)
        for start in range(0, len(keys), settings.batch_size):
            batch = keys[start:start + settings.batch_size]
            yield from zip(batch, backend.ask_batch([prompts[key] for key in batch]))
        return
    endpoint = _EndpointBackend(settings)
    with ThreadPoolExecutor(max_workers=settings.max_workers) as pool:
        futures = {pool.submit(endpoint.ask, prompts[key]): key for key in keys}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:  # on an error, drop the requests not yet started
                future.cancel()


def judge_many(settings: JudgeSettings, questions: Sequence[str], predictions: Sequence[str],
               references: Sequence[str]) -> list[float]:
    """One verdict per sample: 1.0 (yes) or 0.0 (no, or an unparseable reply, which is logged)."""
    verdicts = []
    for index, reply in enumerate(judge_replies(settings, questions, predictions, references)):
        verdict = parse_verdict(reply)
        if verdict is None:
            logger.warning("judge %s: sample %d: unparseable verdict %r counted as wrong", settings.model, index,
                           reply[:80])
            verdict = 0.0
        verdicts.append(verdict)
    return verdicts
