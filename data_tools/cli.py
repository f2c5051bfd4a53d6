"""The ``python -m data_tools`` command line: convert, validate, split, export, stats.

Bad input (a broken record, an unreadable or unwritable file) ends in one line, ``lvlm_cl: error: <message>``,
with exit code 2, as for every lvlm-cl entry point (``lvlm_cl.errors``); so do usage errors (argparse). A
``validate`` that runs and finds problems exits with 1: a result, not an error.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lvlm_cl.data.records import RecordError
from lvlm_cl.errors import report as report_error

FORMATS = ("llava", "sharegpt", "messages", "hf", "csv")

# Options that only mean something for some input formats; giving one to another format is a usage error.
FORMAT_OPTIONS = {
    "dataset_info": ("sharegpt",),
    "dataset": ("sharegpt",),
    "messages_column": ("messages", "hf"),
    "images_column": ("messages", "hf"),
    "question_column": ("csv", "hf"),
    "answer_column": ("csv", "hf"),
    "image_column": ("csv", "hf"),
    "id_column": ("csv", "hf", "messages"),
    "split": ("hf",),
}


def _eval_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools",
                                     description="Bring instruction data into the canonical JSONL format and check it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert llava / sharegpt / messages / hf / csv data to canonical JSONL",
                       description="Convert a file in another tool's format to canonical JSONL.")
    p.set_defaults(command_parser=p)
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="input format")
    p.add_argument("input", help="input file (a folder for --from hf; dataset_info.json for --from sharegpt)")
    p.add_argument("--output", required=True, help="output JSONL file")
    p.add_argument("--image-root", help="folder the input's relative image paths start from "
                                        "(default: the input file's folder)")
    p.add_argument("--task", help="task name written in every record (default: the input file's stem)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="write invalid records to OUT.rejects.jsonl with reasons instead of stopping")
    p.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="do not open every image (faster; missing or corrupt images then fail at training)")
    g = p.add_argument_group("sharegpt")
    g.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json with the entry's columns and tags")
    g.add_argument("--dataset", help="entry name in dataset_info.json")
    g = p.add_argument_group("messages / hf")
    g.add_argument("--messages-column", help="column with the turns (default: messages, else conversations)")
    g.add_argument("--images-column", help="column with the images (default: images, else image)")
    g = p.add_argument_group("csv / hf (VQA-style tables)")
    g.add_argument("--question-column", help="default: question")
    g.add_argument("--answer-column", help="default: answer")
    g.add_argument("--image-column", help="default: image ('' for a table without images)")
    g.add_argument("--id-column", help="default: id when present, else ids <task>-<row>")
    g = p.add_argument_group("hf")
    g.add_argument("--split", help="split of a saved DatasetDict")

    p = sub.add_parser("validate", help="check every record and image of a canonical JSONL file",
                       description="Report every problem of a canonical JSONL file; exit 1 if there is any.")
    p.add_argument("file")
    p.add_argument("--image-root", help="folder image paths start from (default: the file's folder)")
    p.add_argument("--no-check-images", dest="check_images", action="store_false")
    p.add_argument("--model", help="model folder or built-in name (builtin:tiny-llava): check token lengths")
    p.add_argument("--max-length", type=_positive_int,
                   help="maximum sequence length (default: the tokenizer's model_max_length, else the "
                        "recipe default model.max_length)")

    p = sub.add_parser("split", help="deterministic train/eval split",
                       description="Write FILE.train.jsonl and FILE.eval.jsonl; every record goes to exactly one.")
    p.add_argument("file")
    p.add_argument("--eval-fraction", type=_eval_fraction, required=True, help="fraction in (0, 1) for eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="default: the input file's folder")
    p.add_argument("--image-root", help="folder image paths start from (default: the file's folder)")

    p = sub.add_parser("export", help="canonical JSONL back to LLaVA JSON",
                       description="Write canonical records in LLaVA's format.")
    p.add_argument("--to", dest="fmt", required=True, choices=("llava",))
    p.add_argument("file")
    p.add_argument("--output", required=True, help="output .json (a list) or .jsonl")
    p.add_argument("--image-root", help="write image paths relative to this folder (default: the output's folder)")

    p = sub.add_parser("stats", help="records, images, turns, answer and token lengths",
                       description="Summarise a canonical JSONL file.")
    p.add_argument("file")
    p.add_argument("--image-root", help="folder image paths start from (default: the file's folder)")
    p.add_argument("--model", help="model folder or built-in name (builtin:tiny-llava): token lengths")
    p.add_argument("--max-length", type=_positive_int)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _stem(path: Path) -> str:
    return path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.stem


def run_convert(args: argparse.Namespace) -> int:
    from data_tools.conversion import Context, convert

    parser = args.command_parser

    for option, formats in FORMAT_OPTIONS.items():
        if getattr(args, option) is not None and args.fmt not in formats:
            parser.error(f"--{option.replace('_', '-')} only applies to --from {' / '.join(formats)}")
    input_path = Path(args.input)
    output = Path(args.output)
    if os.path.abspath(output) == os.path.abspath(input_path):
        parser.error("--output must not be the input file")
    data_file, default_root = input_path, input_path.parent
    items = to_record = None
    if args.fmt == "llava":
        from data_tools.llava import llava_to_record as to_record
        from data_tools.sources import iter_json_items
        items = iter_json_items(input_path)
    elif args.fmt == "sharegpt":
        from data_tools.sharegpt import resolve_spec, sharegpt_to_record
        from data_tools.sources import iter_json_items
        spec = resolve_spec(input_path, Path(args.dataset_info) if args.dataset_info else None, args.dataset)
        data_file = spec.data_file
        if input_path.name == "dataset_info.json" or args.dataset_info:
            default_root = Path(args.dataset_info).parent if args.dataset_info else input_path.parent
        items = iter_json_items(data_file)
        to_record = lambda raw, i, ctx: sharegpt_to_record(raw, i, ctx, spec=spec)  # noqa: E731
    elif args.fmt == "messages":
        from data_tools.messages import messages_to_record
        from data_tools.sources import iter_json_items
        items = iter_json_items(input_path)
        keys = {"messages_key": args.messages_column or "messages", "images_key": args.images_column or "images",
                "id_key": args.id_column or "id"}
        to_record = lambda raw, i, ctx: messages_to_record(raw, i, ctx, **keys)  # noqa: E731
    elif args.fmt == "hf":
        from data_tools.hf import HFOptions, open_hf
        if input_path.is_dir():
            default_root = input_path
        to_record, items = open_hf(input_path, HFOptions(
            split=args.split, messages_column=args.messages_column, images_column=args.images_column,
            question_column=args.question_column, answer_column=args.answer_column,
            image_column=args.image_column, id_column=args.id_column))
    else:
        from data_tools.csv_table import QAColumns, iter_csv_items, qa_to_record
        columns = QAColumns(question=args.question_column or "question", answer=args.answer_column or "answer",
                            image="image" if args.image_column is None else args.image_column, id=args.id_column)
        columns, items = iter_csv_items(input_path, columns, id_given=args.id_column is not None)
        to_record = lambda raw, i, ctx: qa_to_record(raw, i, ctx, columns=columns)  # noqa: E731
    ctx = Context(input_path=input_path, output_path=output, task=args.task or _stem(data_file),
                  image_root=Path(args.image_root) if args.image_root else default_root,
                  check_images=args.check_images)
    result = convert(items, to_record, ctx, skip_invalid=args.skip_invalid)
    print(f"converted {len(result.records)} record(s) to {output} (task {ctx.task!r})")
    if args.skip_invalid:
        where = f": see {result.rejects_file}" if result.rejects_file else ""
        print(f"rejected {result.rejected} invalid record(s){where}")
    return 0


def _tokens(args: argparse.Namespace):
    if args.model is None:
        if args.max_length is not None:
            raise RecordError("--max-length needs --model (token lengths come from the model's processor)")
        return None
    from data_tools.tokens import load_token_counter
    return load_token_counter(args.model, args.max_length)


def run_validate(args: argparse.Namespace) -> int:
    from data_tools.validate import validate_file

    report = validate_file(args.file, image_root=args.image_root, check_images=args.check_images,
                           tokens=_tokens(args))
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 1 if report.problems else 0


def run_split(args: argparse.Namespace) -> int:
    from data_tools.split import split_file

    r = split_file(args.file, args.eval_fraction, args.seed, output_dir=args.output_dir, image_root=args.image_root)
    print(f"train: {r.n_train} record(s) -> {r.train_path}")
    print(f"eval:  {r.n_eval} record(s) -> {r.eval_path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from data_tools.llava import export_llava

    out = export_llava(args.file, args.output, image_root=args.image_root)
    print(f"exported {len(out)} record(s) to {args.output} (llava)")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from data_tools.stats import file_stats, format_stats

    stats = file_stats(args.file, image_root=args.image_root, tokens=_tokens(args))
    print(json.dumps(stats, indent=2, ensure_ascii=False) if args.json else format_stats(stats))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run = {"convert": run_convert, "validate": run_validate, "split": run_split, "export": run_export,
               "stats": run_stats}[args.command]
        return run(args)
    except (RecordError, OSError) as e:  # OSError: an output that cannot be written, a folder for a file, ...
        return report_error(e)
