"""Reading the text files users hand to commands (prompt files, edit cases): from a path, a FIFO,
`/dev/stdin`, a process substitution `<(...)` or standard input (`-`), with one set of line rules.

- Text is decoded as `utf-8-sig`: a byte-order mark (Windows editors write one) is dropped, so it
  cannot hide a leading `# comment`.
- `.txt` lines are split on `\\n` and `\\r\\n` only. `str.splitlines` also splits on U+2028,
  U+2029, U+0085, form feed, vertical tab and U+001C-U+001E, which would turn one prompt into
  several and shift every later index, seed and file name.
- JSONL lines are split on `\\n` only (a trailing `\\r` is JSON whitespace), so U+2028/U+2029/U+0085
  inside a JSON string are kept.
- A file may hold at most `MAX_TEXT_BYTES` (a stray `/dev/zero` cannot fill the memory).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from meissonic_cli.errors import InputError

STDIN = "-"
TEXT_FORMATS = ("txt", "jsonl")
MAX_TEXT_BYTES = 256 * 2**20


def _read_bytes(stream: object, name: str, flag: str) -> bytes:
    data = stream.read(MAX_TEXT_BYTES + 1)  # type: ignore[attr-defined]
    if isinstance(data, str):  # a text-only stdin (an embedding application's): back to the bytes it holds
        data = data.encode("utf-8")
    if len(data) > MAX_TEXT_BYTES:
        raise InputError(f"{flag} {name}: larger than {MAX_TEXT_BYTES // 2**20} MiB; split it into smaller files")
    return data


def read_text(spec: str, flag: str) -> str:
    """The text of `spec`: `-` is standard input, anything else a readable path (regular file, FIFO,
    /dev/stdin, /dev/fd/N), decoded as UTF-8 with an optional byte-order mark."""
    spec = str(spec)
    if spec == STDIN:
        name = "(stdin)"
        data = _read_bytes(getattr(sys.stdin, "buffer", sys.stdin), name, flag)
    else:
        path, name = Path(spec).expanduser(), spec
        if path.is_dir():
            raise InputError(f"{flag} {spec} is a folder; give a file (or - for standard input)")
        try:
            with open(path, "rb") as stream:
                data = _read_bytes(stream, name, flag)
        except FileNotFoundError:
            raise InputError(f"{flag} {spec}: no such file (give a file, or - to read standard input)") from None
        except OSError as err:
            raise InputError(f"{flag} {spec}: cannot be read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{flag} {name} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def text_format(spec: str, given: Optional[str], flag: str, format_flag: str) -> str:
    """'txt' or 'jsonl': `given` (the --X-format flag) when set, else the file's ending; a name
    without one (`-`, /dev/stdin, <(...)) is txt."""
    if given:
        if given not in TEXT_FORMATS:
            raise InputError(f"{format_flag} must be txt or jsonl, got {given!r}")
        return given
    suffix = "" if str(spec) == STDIN else Path(str(spec)).suffix.lower().lstrip(".")
    if suffix in TEXT_FORMATS:
        return suffix
    if not suffix:
        return "txt"
    raise InputError(f"{flag} {spec} must end in .txt (one prompt per line) or .jsonl (one JSON object per line), "
                     f"or name its format with {format_flag} txt|jsonl")


def txt_lines(text: str) -> list[str]:
    """The lines of a .txt file: split on \\n, a trailing \\r dropped (\\r\\n), nothing else splits."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL file: split on \\n only (U+2028 and friends are legal inside JSON strings)."""
    return text.split("\n")


__all__ = ["MAX_TEXT_BYTES", "STDIN", "TEXT_FORMATS", "jsonl_lines", "read_text", "text_format", "txt_lines"]
