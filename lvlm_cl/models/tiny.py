"""The built-in tiny LLaVA: a real ``LlavaForConditionalGeneration`` built offline from a config.

It is the same code path as ``llava-hf/llava-1.5-7b-hf``: a CLIP vision tower, a two-layer projector, a
Llama decoder, a ``LlavaProcessor`` with a chat template and a byte-level BPE tokenizer (any UTF-8 text
encodes, no unknown tokens). It is built, then written with ``save_pretrained`` and read back with
``from_pretrained`` like any Hugging Face directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# A small fixed English corpus for the BPE merges: common words of instructions, answers and captions.
# Merges only make sequences shorter; byte-level fallback keeps every other text encodable.
_CORPUS_WORDS = """
what which who where when why how is are was were the a an of in on at to for with from by and or not no yes
this that these those there here it its image picture photo shown written show describe write short caption
answer question using single word phrase option options letter given choices directly choose select correct
color colour colors shape shapes object objects number numbers digit digits handwritten identify read text says
say sign many count how box bounding coordinates locate output give find position left right top bottom middle
center corner upper lower red green blue yellow purple orange black white gray grey pink brown cyan
circle square triangle diamond cross star rectangle line dot small large big
zero one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 0.00 0.25 0.50 0.75 1.00 [0.25, 0.50, 0.75, 1.00]
A. B. C. D. A B C D
you see list nothing something contain contains does do can could would should please tell me about
cat dog sun car bus map pen cup hat box key sky sea red tree book lamp door fish bird milk rain snow wind
USER: ASSISTANT: <image>
"""


def _corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    # Repeat capitalised and sentence forms so merges cover both.
    return lines + [line.capitalize() + "?" for line in lines] + [line.upper() for line in lines[:4]]


def build_tokenizer(vocab_size: int = 1024, special: dict | None = None):
    """A byte-level BPE trained in memory on a fixed corpus: deterministic and offline. ``special`` gives
    another family's special tokens: {"unk", "bos", "eos", "pad", "extra": {attribute: token}, "more": [...]};
    ``unk`` and ``bos`` may be None (a family without them: Qwen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = special or {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>",
                          "extra": {"image_token": IMAGE_TOKEN}}
    tokens = [t for t in dict.fromkeys([special["unk"], special["bos"], special["eos"], special["pad"],
                                        *special["extra"].values(), *special.get("more", [])]) if t is not None]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=special["unk"], bos_token=special["bos"],
                                   eos_token=special["eos"], pad_token=special["pad"],
                                   extra_special_tokens=dict(special["extra"]),
                                   padding_side="left", clean_up_tokenization_spaces=False)


def chat_template(name: str = "llava15") -> str:
    """A chat template shipped with lvlm_cl (with ``{% generation %}`` markers for assistant masks)."""
    path = resources.files("lvlm_cl.models") / "templates" / f"{name}.jinja"
    if not path.is_file():
        raise ValueError(f"no built-in chat template {name!r}")
    return path.read_text(encoding="utf-8")


@dataclass
class TinyLlavaSize:
    """Sizes of the built-in model (recipe ``model.tiny`` keys)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 384
    vocab_size: int = 1024
    max_position_embeddings: int = 512


# The sizes the benchmark scripts measure: the default, and a 16.7 M-parameter configuration of the same family.
BENCHMARK_SIZES = {
    "tiny (default)": {},
    "larger": {"text_hidden": 512, "text_layers": 4, "text_intermediate": 1376, "text_heads": 8,
               "vision_hidden": 256, "vision_layers": 4, "vision_heads": 4},
}


def build_tiny_llava(size: TinyLlavaSize, seed: int):
    """Build ``(model, processor)`` from config; weights are deterministic for a seed."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if size.image_size % size.patch_size:
        raise ValueError(f"model.tiny.image_size ({size.image_size}) must be a multiple of patch_size ({size.patch_size})")
    processor = build_tiny_processor(size)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                              image_size=size.image_size, patch_size=size.patch_size, num_channels=3,
                              projection_dim=size.vision_hidden)
    text = LlamaConfig(hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
                       num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                       num_key_value_heads=size.text_heads, vocab_size=len(tokenizer),
                       max_position_embeddings=size.max_position_embeddings,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def build_tiny_processor(size: TinyLlavaSize):
    """The built-in model's processor alone: tokenizer, PIL image processor, LLaVA-1.5 chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size.image_size}, crop_size={"height": size.image_size, "width": size.image_size},
        do_resize=True, do_center_crop=True, do_normalize=True, do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(size.vocab_size),
                          patch_size=size.patch_size, vision_feature_select_strategy="default",
                          chat_template=chat_template("llava15"), image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def save_model_dir(model, processor, path: str | Path) -> Path:
    """Write a Hugging Face model directory atomically (``from_pretrained`` reads it back)."""
    from lvlm_cl.io import atomic_replace_dir
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return atomic_replace_dir(tmp, path)
