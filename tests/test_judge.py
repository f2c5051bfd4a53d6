"""The ``judge`` metric: a stub OpenAI-compatible server on 127.0.0.1 for the endpoint backend (verdicts,
cache, retries, timeouts, unreachable and garbage endpoints), and a tiny random Llama for the local one."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lvlm_cl.evaluation.judge import (
    PROMPT_VERSION,
    JudgeCache,
    JudgeError,
    JudgeSettings,
    cache_key,
    judge_many,
    judge_replies,
    load_prompt,
    parse_verdict,
)
from lvlm_cl.evaluation.scorers import corpus_score


class StubJudge:
    """What the stub server does and what it saw. It says "Yes." when the candidate equals a ``|``
    alternative of the reference (ignoring case), "Maybe" for the candidate "???", else "no"."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.authorization: list[str | None] = []
        self.fail_first = 0          # answer the first N requests with `fail_status`
        self.fail_status = 500
        self.delay_s = 0.0           # sleep before answering
        self.raw: bytes | None = None  # answer this body instead of a chat completion
        self.url = ""

    @staticmethod
    def reply(prompt: str) -> str:
        fields = dict(line.split(": ", 1) for line in prompt.splitlines()
                      if line.startswith(("Reference answer: ", "Candidate answer: ")))
        candidate = fields["Candidate answer"].strip().lower()
        if candidate == "???":
            return "Maybe"
        alternatives = [alt.strip().lower() for alt in fields["Reference answer"].split("|")]
        return "Yes." if candidate in alternatives else "no"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        stub: StubJudge = self.server.stub
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with stub.lock:
            stub.requests += 1
            number = stub.requests
            stub.bodies.append(body)
            stub.paths.append(self.path)
            stub.authorization.append(self.headers.get("Authorization"))
        if number <= stub.fail_first:
            return self._send(stub.fail_status, b'{"error": "try again"}')
        time.sleep(stub.delay_s)
        if stub.raw is not None:
            return self._send(200, stub.raw)
        content = StubJudge.reply(body["messages"][0]["content"])
        self._send(200, json.dumps({"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (a timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.stub = StubJudge()
    server.stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.stub
    server.shutdown()
    server.server_close()


def _settings(tmp_path, url, **overrides) -> JudgeSettings:
    values = dict(endpoint=url, model="stub-judge", cache=tmp_path / "judge.jsonl", timeout_s=5.0, retries=2,
                  backoff_s=0.01, max_workers=4)
    return JudgeSettings(**{**values, **overrides})


QUESTIONS = ["What color is the car?", "How many dogs?", "Which city?", "What is on the table?"]
PREDICTIONS = ["red", "three", "Paris", "blue"]
REFERENCES = ["red", "2", "paris", "red | blue"]
EXPECTED = [1.0, 0.0, 1.0, 1.0]


def _cache_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- endpoint backend ----------------------------------------------------------------------------------

def test_verdicts_come_back_in_sample_order(stub, tmp_path):
    assert judge_many(_settings(tmp_path, stub.url), QUESTIONS, PREDICTIONS, REFERENCES) == EXPECTED
    assert stub.requests == 4
    assert set(stub.paths) == {"/v1/chat/completions"}
    body = stub.bodies[0]
    assert body["model"] == "stub-judge" and body["temperature"] == 0.0 and body["max_tokens"] == 8
    prompts = [b["messages"][0]["content"] for b in stub.bodies]
    assert any("Question: How many dogs?" in p and "Candidate answer: three" in p for p in prompts)
    assert all(p.rstrip().endswith("Reply with exactly one word: yes or no.") for p in prompts)
    assert stub.authorization == [None] * 4


def test_the_cache_answers_a_rerun_without_asking(stub, tmp_path):
    settings = _settings(tmp_path, stub.url)
    judge_many(settings, QUESTIONS, PREDICTIONS, REFERENCES)
    assert stub.requests == 4
    assert judge_many(settings, QUESTIONS, PREDICTIONS, REFERENCES) == EXPECTED
    assert stub.requests == 4
    records = _cache_lines(settings.cache)
    assert len(records) == 4
    assert {r["prediction"]: r["reply"] for r in records} == {"red": "Yes.", "three": "no", "Paris": "Yes.",
                                                            "blue": "Yes."}
    for r in records:
        assert r["key"] == cache_key(PROMPT_VERSION, "stub-judge", r["question"], r["reference"], r["prediction"])
    # Only the new sample is asked; another model name is another key.
    judge_many(settings, QUESTIONS + ["Which animal?"], PREDICTIONS + ["cat"], REFERENCES + ["cat"])
    assert stub.requests == 5
    judge_many(_settings(tmp_path, stub.url, model="another-judge"), QUESTIONS[:1], PREDICTIONS[:1], REFERENCES[:1])
    assert stub.requests == 6


def test_identical_samples_are_asked_once_and_the_cache_folder_is_created(stub, tmp_path):
    settings = _settings(tmp_path, stub.url, cache=tmp_path / "runs" / "eval" / "judge.jsonl")
    assert judge_many(settings, ["Q?"] * 3, ["red"] * 3, ["red"] * 3) == [1.0, 1.0, 1.0]
    assert stub.requests == 1 and len(_cache_lines(settings.cache)) == 1


def test_a_server_error_is_retried_then_succeeds(stub, tmp_path):
    stub.fail_first = 2
    settings = _settings(tmp_path, stub.url, retries=2, max_workers=1)
    assert judge_many(settings, QUESTIONS[:1], PREDICTIONS[:1], REFERENCES[:1]) == [1.0]
    assert stub.requests == 3


def test_retries_run_out_with_a_one_line_error(stub, tmp_path):
    stub.fail_first = 10
    with pytest.raises(JudgeError) as info:
        judge_many(_settings(tmp_path, stub.url, retries=1), QUESTIONS[:1], PREDICTIONS[:1], REFERENCES[:1])
    message = str(info.value)
    assert f"{stub.url}/chat/completions" in message and "HTTP 500" in message and "after 2 attempts" in message
    assert "\n" not in message
    assert stub.requests == 2


def test_a_client_error_is_not_retried(stub, tmp_path):
    stub.fail_first, stub.fail_status = 1, 404
    with pytest.raises(JudgeError, match="HTTP 404"):
        judge_many(_settings(tmp_path, stub.url, retries=3), QUESTIONS[:1], PREDICTIONS[:1], REFERENCES[:1])
    assert stub.requests == 1


def test_a_timeout_is_a_judge_error_naming_the_url(stub, tmp_path):
    stub.delay_s = 1.0
    start = time.monotonic()
    with pytest.raises(JudgeError) as info:
        judge_many(_settings(tmp_path, stub.url, timeout_s=0.2, retries=0), QUESTIONS[:1], PREDICTIONS[:1],
                   REFERENCES[:1])
    assert time.monotonic() - start < 1.0
    assert f"{stub.url}/chat/completions" in str(info.value) and "timeout_s=0.2" in str(info.value)


def test_an_unreachable_port_is_a_judge_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeError, match=rf"{url}/chat/completions: cannot connect .*after 2 attempts"):
        judge_many(_settings(tmp_path, url, retries=1), ["Q?"], ["a"], ["a"])


@pytest.mark.parametrize("raw", [b"<html>Bad gateway</html>", b'{"choices": []}', b'{"choices": [{"text": "yes"}]}',
                                 b'{"choices": [{"message": {"content": null}}]}'])
def test_garbage_answers_are_a_judge_error(stub, tmp_path, raw):
    stub.raw = raw
    with pytest.raises(JudgeError, match=rf"{stub.url}/chat/completions"):
        judge_many(_settings(tmp_path, stub.url), ["Q?"], ["a"], ["a"])
    assert stub.requests == 1  # a malformed answer is not retried
    assert not (tmp_path / "judge.jsonl").exists() or _cache_lines(tmp_path / "judge.jsonl") == []


def test_an_unparseable_verdict_counts_as_wrong_and_is_logged(stub, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lvlm_cl.evaluation.judge"):
        verdicts = judge_many(_settings(tmp_path, stub.url), ["Q?", "Q?"], ["???", "a"], ["a", "a"])
    assert verdicts == [0.0, 1.0]
    assert "sample 0: unparseable verdict 'Maybe'" in caplog.text


def test_the_api_key_comes_from_the_named_environment_variable(stub, tmp_path, monkeypatch):
    monkeypatch.delenv("LVLM_CL_TEST_JUDGE_KEY", raising=False)
    settings = _settings(tmp_path, stub.url, api_key_env="LVLM_CL_TEST_JUDGE_KEY")
    with pytest.raises(JudgeError, match="LVLM_CL_TEST_JUDGE_KEY"):
        judge_many(settings, ["Q?"], ["a"], ["a"])
    assert stub.requests == 0
    monkeypatch.setenv("LVLM_CL_TEST_JUDGE_KEY", "s3cret")
    assert judge_many(settings, ["Q?"], ["a"], ["a"]) == [1.0]
    assert stub.authorization == ["Bearer s3cret"]


def test_corpus_score_judge_goes_through_the_registry(stub, tmp_path):
    settings = _settings(tmp_path, stub.url)
    value = corpus_score("judge", ["blue", "3"], [["red", "blue"], ["2"]], questions=["Color?", "How many?"],
                         judge=settings)
    assert value == 50.0
    assert any("Reference answer: red | blue" in b["messages"][0]["content"] for b in stub.bodies)
    with pytest.raises(ValueError, match="1 questions but 2 predictions"):
        corpus_score("judge", ["blue", "3"], [["blue"], ["2"]], questions=["Color?"], judge=settings)


def test_lengths_must_pair_up(tmp_path):
    settings = JudgeSettings(endpoint="http://127.0.0.1:9/v1", model="m", cache=tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="must pair up"):
        judge_many(settings, ["Q?"], ["a", "b"], ["a", "b"])


# --- pieces ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, verdict", [
    ("yes", 1.0), ("Yes.", 1.0), ("  YES!\n", 1.0), ("**Yes**", 1.0), ('"yes"', 1.0), ("Yes, it matches.", 1.0),
    ("no", 0.0), ("No.", 0.0), ("no - the count differs", 0.0),
    ("The answer is yes", None), ("Maybe", None), ("yesterday", None), ("yes/no", None), ("", None), ("  ", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_cache_key_depends_on_every_field():
    fields = ["v1", "model", "question", "reference", "prediction"]
    key = cache_key(*fields)
    assert len(key) == 64 and key == cache_key(*fields)
    for i in range(len(fields)):
        changed = list(fields)
        changed[i] += "x"
        assert cache_key(*changed) != key
    assert cache_key("v1", "m", "a|b", "c", "d") != cache_key("v1", "m", "a", "b|c", "d")


def test_the_cache_skips_a_torn_last_line_and_appends_on_a_fresh_line(tmp_path, caplog):
    path = tmp_path / "judge.jsonl"
    path.write_text(json.dumps({"key": "k1", "reply": "yes"}) + "\n" + '{"key": "k2", "rep', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lvlm_cl.evaluation.judge"):
        cache = JudgeCache(path)
    assert cache.get("k1") == "yes" and cache.get("k2") is None
    assert "judge.jsonl:2: skipping" in caplog.text
    cache.put({"key": "k3", "reply": "no"})
    reloaded = JudgeCache(path)
    assert reloaded.get("k1") == "yes" and reloaded.get("k3") == "no"
    assert path.read_text(encoding="utf-8").endswith('{"key": "k3", "reply": "no"}\n')


def test_the_prompt_is_a_versioned_file():
    prompt = load_prompt(PROMPT_VERSION)
    assert PROMPT_VERSION == "v1"
    for field in ("{question}", "{reference}", "{prediction}"):
        assert prompt.count(field) == 1
    with pytest.raises(ValueError, match="no judge prompt 'v0'; shipped: v1"):
        load_prompt("v0")


@pytest.mark.parametrize("overrides, message", [
    ({"local_model_dir": "/some/model"}, "exactly one of"),
    ({"endpoint": None}, "exactly one of"),
    ({"retries": -1}, "'retries' must be >= 0"),
    ({"max_workers": 0}, "'max_workers' must be >= 1"),
    ({"timeout_s": -1.0}, "'timeout_s' must be >= 0"),
    ({"model": ""}, "'model'"),
])
def test_settings_are_checked(tmp_path, overrides, message):
    values = dict(endpoint="http://127.0.0.1:8000/v1", model="m", cache=tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match=message):
        JudgeSettings(**{**values, **overrides})


# --- local backend -----------------------------------------------------------------------------------

def _tiny_judge_dir(path):
    """A random 1-layer Llama with the built-in tiny tokenizer and LLaVA-1.5 chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lvlm_cl.models.tiny import build_tokenizer, chat_template

    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("llava15")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _scripted_judge_dir(path, word: str):
    """A tiny Llama that greedily answers `` {word}`` then ends: its layers add nothing to the residual
    stream (``o_proj`` and ``down_proj`` are zero), so the last hidden state is the normalised embedding of
    the last token, and the untied ``lm_head`` maps the prompt's last token to the word, the word to EOS,
    and ``<pad>`` to " cat" (a prompt padded on the right would answer that). All these states have the
    same norm, so each token's own row wins (Cauchy-Schwarz)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lvlm_cl.models.tiny import build_tokenizer, chat_template

    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("llava15")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # <pad>'s embedding starts at zero (padding_idx): give it a direction of its own
            model.model.embed_tokens.weight[tokenizer.pad_token_id] = torch.randn(config.hidden_size)
    (word_id,) = tokenizer.encode(f" {word}", add_special_tokens=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                           add_generation_prompt=True)
    last_id = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]  # ":" of "ASSISTANT:", in every prompt
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        (cat_id,) = tokenizer.encode(" cat", add_special_tokens=False)
        hidden = model.model.norm(model.model.embed_tokens.weight[[last_id, word_id, tokenizer.pad_token_id]])
        model.lm_head.weight.zero_()
        model.lm_head.weight[word_id] = hidden[0]
        model.lm_head.weight[tokenizer.eos_token_id] = hidden[1]
        model.lm_head.weight[cat_id] = hidden[2]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("word, verdict", [("yes", 1.0), ("no", 0.0)])
def test_the_local_backend_returns_the_models_verdict(tmp_path, word, verdict):
    model_dir = _scripted_judge_dir(tmp_path / f"says-{word}", word)
    settings = JudgeSettings(local_model_dir=model_dir, model=f"says-{word}", cache=tmp_path / "local.jsonl",
                             max_new_tokens=4, batch_size=2, device="cpu")
    questions, predictions, references = ["Color?", "How many dogs here?", "City?"], ["red", "3", "Paris"], \
        ["red", "2", "paris"]
    assert judge_many(settings, questions, predictions, references) == [verdict] * 3
    assert [r["reply"] for r in _cache_lines(settings.cache)] == [f" {word}"] * 3


def test_the_local_backend_runs_end_to_end_and_caches(tmp_path, monkeypatch):
    model_dir = _tiny_judge_dir(tmp_path / "tiny-judge")
    settings = JudgeSettings(local_model_dir=model_dir, model="tiny-random-llama", cache=tmp_path / "local.jsonl",
                             max_new_tokens=3, batch_size=2, device="cpu")
    questions, predictions, references = ["Color?", "How many?", "Which city?"], ["red", "3", "Paris"], \
        ["red", "2", "paris"]
    verdicts = judge_many(settings, questions, predictions, references)
    assert len(verdicts) == 3 and set(verdicts) <= {0.0, 1.0}
    records = {r["prediction"]: r for r in _cache_lines(settings.cache)}
    assert len(records) == 3
    for prediction, verdict in zip(predictions, verdicts):
        reply = records[prediction]["reply"]
        assert isinstance(reply, str)
        assert verdict == (parse_verdict(reply) or 0.0)  # the verdict is what the model generated, parsed
    assert judge_replies(settings, questions, predictions, references) == [records[p]["reply"] for p in predictions]

    # A rerun is answered by the cache: the model is not even loaded.
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every answer is cached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert judge_many(settings, questions, predictions, references) == verdicts


def test_the_local_backend_reports_a_directory_it_cannot_load(tmp_path):
    settings = JudgeSettings(local_model_dir=tmp_path / "missing", model="m", cache=tmp_path / "c.jsonl")
    with pytest.raises(JudgeError, match="missing: cannot load a causal LM"):
        judge_many(settings, ["Q?"], ["a"], ["a"])
