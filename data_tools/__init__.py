"""Bring instruction data from other tools into lvlm_cl's canonical JSONL, check it, split it, export it.

    python -m data_tools convert --from {llava,sharegpt,messages,hf,csv} INPUT --output OUT.jsonl
    python -m data_tools validate FILE.jsonl [--image-root DIR] [--model PATH_OR_BUILTIN]
    python -m data_tools split FILE.jsonl --eval-fraction 0.1 --seed 0
    python -m data_tools export --to llava FILE.jsonl --output OUT.json
    python -m data_tools stats FILE.jsonl [--model PATH_OR_BUILTIN] [--json]

One module per input format (``llava``, ``sharegpt``, ``messages``, ``hf``, ``csv_table``); ``conversion``
holds the driver they share (checks, rejects, atomic output). See docs/data.md.
"""
