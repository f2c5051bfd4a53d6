"""Chat with a trained run (any stage) or a plain Hugging Face model directory.

    python scripts/chat.py --run runs/seq5 --image cat.png                 # interactive, last stage
    python scripts/chat.py --run runs/seq5 --stage 1 --image cat.png --show-routing
    python scripts/chat.py --run runs/seq5 --image cat.png --prompt "What is this?"   # answer once
    python scripts/chat.py --model path/to/llava-1.5-7b-hf --image cat.png --load-4bit

Interactive: each line is a user turn; the conversation is kept (multi-turn) and the answer streams token
by token. ``/image PATH`` starts a new conversation about another image, ``/reset`` starts over with the
same image; an empty line or end of input quits. A run's model is loaded with every trained part
(adapters, prompts, keys) and routes by itself; ``--show-routing`` prints the task its keys pick for
each turn and the similarities.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lvlm_cl.data.encoding import collate_prompts, encode_prompt
from lvlm_cl.data.records import RecordError, check_image
from lvlm_cl.errors import UserError
from lvlm_cl.models import autocast_for
from lvlm_cl.models.continual import generate as routed_generate, task_router


class ChatError(RuntimeError, UserError):
    """Bad input to the chat: the message says what is wrong."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a training run folder")
    src.add_argument("--model", type=Path, help="a plain Hugging Face model directory (zero-shot, no run)")
    p.add_argument("--stage", type=int, default=None,
                   help="0-based task after which the stage was saved (default: the last trained)")
    p.add_argument("--image", type=Path, help="image to talk about (optional: text-only without it)")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--chat-template", default=None,
                   help="template name (llava15) or .jinja file for a --model whose processor has none")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-4bit", action="store_true", help="language model in 4-bit NF4 (bitsandbytes)")
    q.add_argument("--load-8bit", action="store_true", help="language model in 8-bit (bitsandbytes)")
    p.add_argument("--show-routing", action="store_true", help="print the task the run's keys choose")
    args = p.parse_args(argv)
    if args.stage is not None and args.run is None:
        p.error("--stage needs --run")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


class Chat:
    """One conversation: history of turns, the current image, and how to answer."""

    def __init__(self, model, processor, *, max_length: int, task_names: list[str] | None = None):
        self.model, self.processor = model, processor
        self.max_length = max_length
        self.task_names = task_names or []
        self.image: str | None = None
        self.history: list[dict] = []

    def set_image(self, path: Path | None) -> None:
        if path is not None:
            try:
                check_image(Path(path))
            except RecordError as e:
                raise ChatError(e.reason) from None      # names the file
        self.image = None if path is None else str(Path(path).resolve())
        self.history = []

    def _record(self, text: str) -> dict:
        content = ([{"type": "image"}] if self.image and not self.history else []) + [{"type": "text", "text": text}]
        messages = self.history + [{"role": "user", "content": content},
                                   {"role": "assistant", "content": [{"type": "text", "text": ""}]}]
        return {"id": "chat", "images": [self.image] if self.image else [], "messages": messages}

    def routing(self, text: str) -> str | None:
        """Which task the model's keys pick for this turn, with the similarities (None without a router)."""
        router = task_router(self.model)
        if router is None:
            return None
        enc = encode_prompt(self.processor, self._record(text), self.max_length)
        device = next(self.model.parameters()).device
        best, sims = router.route(enc.input_ids[None].to(device))
        names = self.task_names or [str(i) for i in range(sims.shape[1])]
        ranked = sorted(range(sims.shape[1]), key=lambda i: -float(sims[0, i]))
        return (f"routing: {names[int(best)]} (cos {float(sims[0, int(best)]):.3f}); "
                + ", ".join(f"{names[i]} {float(sims[0, i]):.3f}" for i in ranked))

    @torch.no_grad()
    def answer(self, text: str, *, temperature: float, max_new_tokens: int, stream=None) -> str:
        record = self._record(text)
        enc = encode_prompt(self.processor, record, self.max_length)
        device = next(self.model.parameters()).device
        tok = self.processor.tokenizer
        # A batch of one, as evaluation builds it: the image inputs of every family (Qwen's grid included).
        inputs = {k: v.to(device) for k, v in collate_prompts([enc], tok.pad_token_id).items()}
        streamer = _Streamer(tok, stream) if stream is not None else None
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with autocast_for(self.model):
            out = routed_generate(self.model, **inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, streamer=streamer, **sampling)
        reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.history = record["messages"][:-1] + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        return reply


def _Streamer(tokenizer, stream):
    """transformers' TextStreamer, writing to ``stream`` instead of print()."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def load(args):
    """(model, processor, max_length, task names) for --run or --model."""
    quant = "4bit" if args.load_4bit else "8bit" if args.load_8bit else None
    if args.run is not None:
        from lvlm_cl.stage import load_stage

        if not args.run.is_dir():
            raise ChatError(f"--run {args.run}: no such folder")
        stage = load_stage(args.run, args.stage, quantization=quant)
        return stage.model, stage.processor, stage.cfg.model.max_length, [t.name for t in stage.stream]
    from lvlm_cl.models import ModelError, default_device, load_model_dir

    if not (args.model / "config.json").is_file():
        raise ChatError(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    from lvlm_cl.config import ModelConfig

    try:
        device = default_device()
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        model, processor = load_model_dir(args.model, ModelConfig(path=str(args.model), chat_template=args.chat_template),
                                          quantization=quant, require_markers=False, dtype=dtype, device=device)
    except ModelError as e:
        raise ChatError(str(e)) from None
    model.eval()
    return model, processor, 4096, []


def main(argv=None, stdin=None, stdout=None) -> int:
    from lvlm_cl.errors import report, user_errors

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    args = parse_args(argv)
    try:
        if args.image is not None and not args.image.is_file():
            raise ChatError(f"--image {args.image}: no such file")
        model, processor, max_length, names = load(args)
        chat = Chat(model, processor, max_length=max_length, task_names=names)
        chat.set_image(args.image)
        gen = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
        if args.prompt is not None:
            if args.show_routing:
                _print_routing(chat, args.prompt, stdout)
            stdout.write(chat.answer(args.prompt, **gen) + "\n")
            return 0
        stdout.write("Type a message; /image PATH for another image, /reset to start over, an empty line to quit.\n")
        while True:
            stdout.write("USER: ")
            stdout.flush()
            line = stdin.readline()
            if not line or not line.strip():
                stdout.write("\n")
                return 0
            line = line.strip()
            if line.startswith("/image"):
                path = line[len("/image"):].strip()
                try:
                    chat.set_image(Path(path) if path else None)
                    stdout.write(f"[new conversation about {path or 'no image'}]\n")
                except ChatError as e:
                    stdout.write(f"error: {e}\n")
                continue
            if line == "/reset":
                chat.set_image(Path(chat.image) if chat.image else None)
                stdout.write("[new conversation]\n")
                continue
            if args.show_routing:
                _print_routing(chat, line, stdout)
            stdout.write("ASSISTANT: ")
            stdout.flush()
            chat.answer(line, stream=stdout, **gen)
    except KeyboardInterrupt:
        stdout.write("\n")
        return 0
    except (ChatError, *user_errors()) as e:
        return report(e)


def _print_routing(chat: Chat, text: str, stdout) -> None:
    info = chat.routing(text)
    stdout.write(f"[{info or 'routing: this model does not route by task keys'}]\n")


if __name__ == "__main__":
    sys.exit(main())
