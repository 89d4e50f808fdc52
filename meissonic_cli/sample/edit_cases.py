"""Reading `meissonic edit` cases: the flags of one edit, or a `--cases` file (JSONL, one case per
line, or a JSON list such as the official inpaint.py `cases.json`); see `meissonic_cli.sample.edit`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from meissonic_cli.errors import InputError
from meissonic_cli.readers import parse_json
from meissonic_cli.safety import derive_seed
from meissonic_cli.sample.sample import parse_resolution, parse_temperature
from meissonic_cli.textfiles import STDIN, jsonl_lines, read_text

if TYPE_CHECKING:
    from meissonic_cli.sample.edit import EditCase, EditConfig

# The rules' names before `edit_rule` (JSONL `remask`): random -> exact-count, confidence -> confidence.
_LEGACY_REMASK = {"random": "exact-count", "confidence": "confidence"}
# Keys of the official cases.json format (inpaint.py) and the case fields they fill.
OFFICIAL_CASE_KEYS = {"input": "image", "mask": "mask", "prompt": "prompt", "negative_prompts": "negative_prompt"}



def parse_ints(text: Any, n: int, flag: str) -> tuple[int, ...]:
    """'1,2,3,4' or [1, 2, 3, 4] -> a tuple of n ints."""
    values = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n:
        raise InputError(f"{flag} {text!r} must be {n} comma-separated integers")
    return out


def parse_size(text: Any, flag: str) -> tuple[int, int]:
    """'768x512' or [768, 512] -> (width, height)."""
    if isinstance(text, (list, tuple)):
        return parse_ints(text, 2, flag)  # type: ignore[return-value]
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise InputError(f"{flag} {text!r} must be a size like 1024x768 (width x height)")
    return int(m.group(1)), int(m.group(2))


def _resolve_path(value: Any, base: Optional[Path]) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    return path.resolve()


def single_case(cfg: EditConfig) -> EditCase:
    """The one case described by flags."""
    from meissonic_cli.sample.edit import EditCase

    s = cfg.sample
    case = EditCase(
        index=0, image=_resolve_path(cfg.image, None), prompt=cfg.prompt or "", mode=cfg.mode,
        mask=_resolve_path(cfg.mask, None) if cfg.mask else None,
        box=parse_ints(cfg.box, 4, "--box") if cfg.box else None,  # type: ignore[arg-type]
        extend=parse_ints(cfg.extend, 4, "--extend") if cfg.extend else None,  # type: ignore[arg-type]
        target=parse_size(cfg.target, "--target") if cfg.target else None, strength=float(cfg.strength),
        edit_rule=cfg.edit_rule, dilate=int(cfg.dilate), blend=int(cfg.blend), seed=int(s.seed),
        negative_prompt=s.negative_prompt, steps=int(s.steps), cfg=float(s.cfg), name=cfg.name,
        resolution=parse_resolution(cfg.resolution), temperature=parse_temperature(s.temperature),
        token_temperature=float(s.token_temperature), exact=bool(s.exact), text_encoder=s.text_encoder,
    )
    case.check()
    return case


def _case_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """(where, row) for each case: JSONL lines, or the items of a JSON list such as the official
    cases.json, whose keys (`input`, `negative_prompts`) are renamed to ours (a null negative prompt
    means none); the older JSONL key `remask` maps to `edit_rule`."""
    rows: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        items = parse_json(text, f"--cases {path}")
        if not isinstance(items, list):
            raise InputError(f"--cases {path}: expected a list of {{input, mask, prompt, negative_prompts}} objects or "
                             "one JSON object per line")
        rows = [(f"{path} case {number}", item) for number, item in enumerate(items, start=1)]
    else:
        for number, line in enumerate(jsonl_lines(text), start=1):
            if not line.strip():
                continue
            rows.append((f"{path} line {number}", parse_json(line, f"{path} line {number}")))
    out = []
    for where, row in rows:
        if isinstance(row, dict):
            row = dict(row)
            for official, ours in OFFICIAL_CASE_KEYS.items():
                if official != ours and official in row and ours not in row:
                    row[ours] = row.pop(official)
            if "negative_prompt" in row and row["negative_prompt"] is None:
                row["negative_prompt"] = ""
            if "remask" in row and "edit_rule" not in row:
                old = row.pop("remask")
                row["edit_rule"] = _LEGACY_REMASK.get(str(old), str(old))
        out.append((where, row))
    return out


def read_cases(cfg: EditConfig) -> list[EditCase]:
    """Cases from --cases: one JSON object per line, or the official cases.json list; missing fields
    take the command's values."""
    from meissonic_cli.sample.edit import CASE_FIELDS, EditCase

    spec = str(cfg.cases)
    if spec != STDIN and not Path(spec).expanduser().exists():
        raise InputError(f"--cases {spec}: no such file; expected a .jsonl file with one edit per line, or an "
                         f"official cases.json (or - for standard input)")
    text = read_text(spec, "--cases")
    path = Path("(stdin)") if spec == STDIN else Path(spec)
    base = Path.cwd() if spec == STDIN else path.resolve().parent
    s = cfg.sample
    cases: list[EditCase] = []
    for where, row in _case_rows(path, text):
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with image, prompt and mode")
        unknown = sorted(set(row) - set(CASE_FIELDS))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CASE_FIELDS)} (or the "
                             f"official cases.json's input, negative_prompts)")
        if not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{where}: 'image' and 'prompt' are required strings")
        try:
            case = EditCase(
                index=len(cases), image=_resolve_path(row["image"], base), prompt=row["prompt"],
                mode=str(row.get("mode", "inpaint" if row.get("mask") else cfg.mode)),
                mask=_resolve_path(row["mask"], base) if row.get("mask") else None,
                box=parse_ints(row["box"], 4, "box") if row.get("box") is not None else None,  # type: ignore[arg-type]
                extend=parse_ints(row["extend"], 4, "extend") if row.get("extend") is not None else None,  # type: ignore[arg-type]
                target=parse_size(row["target"], "target") if row.get("target") is not None else None,
                strength=float(row.get("strength", cfg.strength)), edit_rule=str(row.get("edit_rule", cfg.edit_rule)),
                dilate=int(row.get("dilate", cfg.dilate)), blend=int(row.get("blend", cfg.blend)),
                seed=int(row["seed"]) if "seed" in row else derive_seed(s.seed, len(cases)),
                negative_prompt=str(row.get("negative_prompt", s.negative_prompt)),
                steps=int(row.get("steps", s.steps)), cfg=float(row.get("cfg", s.cfg)),
                name=str(row["name"]) if row.get("name") else None, resolution=parse_resolution(cfg.resolution),
                temperature=parse_temperature(s.temperature), token_temperature=float(s.token_temperature),
                exact=bool(s.exact), text_encoder=s.text_encoder,
                extra={k: row[k] for k in ("source_prompt", "category") if k in row},
            )
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        except (TypeError, ValueError, OverflowError) as err:
            raise InputError(f"{where}: {err}") from None
        case.check(where)
        cases.append(case)
    if not cases:
        raise InputError(f"--cases {path}: no cases (one JSON object per line, or a JSON list)")
    names = [c.stem for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"--cases {path}: several cases would write {dupes[0]}.png; give them different 'name's")
    return cases


__all__ = ["OFFICIAL_CASE_KEYS", "parse_ints", "parse_size", "read_cases", "single_case"]
