"""``validate``: check every record of a canonical JSONL file and report every problem, not just the first.

Checks: UTF-8 text, JSON syntax, the record rules of ``lvlm_cl.data.records`` (ids, roles and their order,
empty turns, image placeholders against the image list), text that is not valid Unicode (lone surrogates),
duplicate ids, images (exist, open, decode completely), and with a model the token length after image
expansion against the maximum length.

    python -m data_tools validate data/mytask.jsonl [--image-root DIR] [--model tiny]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lvlm_cl.data.records import RecordError, check_image, record_problems, resolve_image

from data_tools.sources import check_not_utf16, json_lines
from data_tools.tokens import TokenCounter


@dataclass
class ValidationReport:
    path: Path
    records: int = 0
    problems: list[RecordError] = field(default_factory=list)

    @property
    def bad_records(self) -> int:
        return len({(p.line, p.record_id) for p in self.problems if p.line is not None})

    def summary(self) -> str:
        if not self.problems:
            return f"{self.path}: {self.records} records, no problems"
        return (f"{self.path}: {self.records} records, {len(self.problems)} problem(s) "
                f"in {self.bad_records} record(s)")


def validate_file(path: str | Path, *, image_root: str | Path | None = None, check_images: bool = True,
                  tokens: TokenCounter | None = None) -> ValidationReport:
    path = Path(path)
    if not path.is_file():
        raise RecordError("file not found", path=path)
    report = ValidationReport(path)
    seen: dict[str, int] = {}
    data = path.read_bytes()
    check_not_utf16(path, data)
    for lineno, record, error in json_lines(data):  # a UTF-8 BOM stays: lvlm_cl does not read it either
        report.records += 1
        found = report.problems

        def problem(message: str, field: str | None = None, rid: str | None = None) -> None:
            found.append(RecordError(message, path=path, line=lineno, record_id=rid, field=field))

        if error is not None:
            problem(error.reason)
            continue
        rid = record.get("id") if isinstance(record, dict) else None
        rid = None if rid is None else str(rid)
        structural = record_problems(record)
        for p in structural:
            problem(p.message, p.field or None, rid)
        if not isinstance(record, dict):
            continue
        if isinstance(record.get("id"), str) and record["id"]:
            if record["id"] in seen:
                problem(f"duplicate id (first seen on line {seen[record['id']]})", "id", rid)
            else:
                seen[record["id"]] = lineno
        images = record.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            continue
        resolved = [resolve_image(path, im, image_root) for im in images]
        images_ok = True
        if check_images:
            for k, im in enumerate(resolved):
                try:
                    check_image(im, record_path=path, line=lineno, record_id=rid, field=f"images[{k}]")
                except RecordError as e:
                    found.append(e)
                    images_ok = False
        if tokens is not None and not structural and images_ok:
            try:
                n = tokens.count(dict(record, images=[str(p) for p in resolved]))
            except Exception as e:  # the processor raises many types; each is a problem of this record
                problem(f"cannot be encoded by the model's processor ({type(e).__name__}: {e})", "messages", rid)
                continue
            if n > tokens.max_length:
                problem(f"{n} tokens after image expansion, more than the maximum length {tokens.max_length}; "
                        f"truncation would cut the sample (and possibly its image tokens): shorten it or raise "
                        f"the maximum length", "messages", rid)
    if report.records == 0:
        report.problems.append(RecordError("no records (the file is empty)", path=path))
    return report


def check_file(path: str | Path) -> None:
    """Raise the first problem ``validate`` finds (images not opened). ``split``, ``stats`` and ``export`` read
    through ``lvlm_cl.data.records.load_records``, which does not catch text that cannot be written back as
    UTF-8 or nesting too deep to parse."""
    report = validate_file(path, check_images=False)
    if report.problems:
        raise report.problems[0]
