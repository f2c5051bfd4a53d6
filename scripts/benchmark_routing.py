"""Routing accuracy of task keys on a recipe's test prompts, before any training: one mean key per task
(what L2P's learned key converges to) against k-means prototypes of each task's training queries.

    python scripts/benchmark_routing.py recipes/seq5.yaml --keys 1 4 8 16

The queries are the ones ``task_prompts`` and ``task_lora`` use: the recipe's base language model, frozen,
mean-pooled over each instruction's text tokens (``lvlm_cl.methods.routing.InstructionEncoder``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    from lvlm_cl.config import cache_dir, load_recipe
    from lvlm_cl.data.encoding import collate_prompts, encode_prompt
    from lvlm_cl.methods.queries import InstructionEncoder
    from lvlm_cl.models import load_model_dir, parts, resolve_model_dir
    from lvlm_cl.stream import build_stream
    from lvlm_cl.train import pretrained_base

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 4, 8, 16], help="keys per task to compare")
    args = parser.parse_args(argv)

    cfg = load_recipe(args.recipe)
    cache = cache_dir(cfg)
    model, processor = load_model_dir(resolve_model_dir(cfg.model, cfg.seed, cache, pretrained=pretrained_base), cfg.model)
    stream, _ = build_stream(cfg, cache)
    pad = processor.tokenizer.pad_token_id
    encoder = InstructionEncoder(parts(model)["language_model"], model.config.image_token_id, pad)

    def queries(records):
        out = []
        for i in range(0, len(records), 256):
            batch = collate_prompts([encode_prompt(processor, r, cfg.model.max_length) for r in records[i:i + 256]], pad)
            out.append(encoder(batch["input_ids"], batch["attention_mask"]))
        return F.normalize(torch.cat(out), dim=-1)

    train = [queries(t.train_records) for t in stream]
    test = [queries(t.test_records) for t in stream]
    print("keys per task | " + " | ".join(t.name for t in stream))
    for k in args.keys:
        keys = []
        for q in train:
            if k == 1:
                keys.append(F.normalize(q.mean(0, keepdim=True), dim=-1))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                centroids = KMeans(n_clusters=k, n_init=4, random_state=0).fit(q.double().numpy()).cluster_centers_
            keys.append(torch.as_tensor(centroids, dtype=torch.float32))
        accuracy = []
        for t, q in enumerate(test):
            sims = torch.stack([F.cosine_similarity(q[:, None], key[None], dim=-1).amax(-1) for key in keys], -1)
            accuracy.append(100.0 * float((sims.argmax(-1) == t).float().mean()))
        print(f"{k} ({'mean key' if k == 1 else 'prototypes'}) | " + " | ".join(f"{a:.1f}" for a in accuracy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
