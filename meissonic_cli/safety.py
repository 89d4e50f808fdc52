"""Limits and checks that keep hostile or careless input from doing harm.

One place for what every stage must refuse:
- images bigger than one pixel limit (decompression bombs): `MEISSONIC_MAX_IMAGE_PIXELS`,
  default 178,956,970 (PIL's own hard limit); `configure_pil` hands it to PIL too;
- sizes asked for on the command line above `MAX_RESOLUTION` pixels a side;
- output names that would leave their output folder (`../x`, `/abs/path`);
- URL schemes other than http/https (`file://`, `ftp://`, ...) unless asked for;
- tar members bigger than `MEISSONIC_MAX_MEMBER_BYTES` (default 256 MiB) and compressed tar
  streams (a small gzip can expand to gigabytes) unless `MEISSONIC_ALLOW_COMPRESSED_TARS=1`;
- seeds outside what the random generators take (0 <= seed < 2**63).

Each check raises an `InputError` or `ConfigError` whose message names the file or flag and the way
out; nothing here imports torch or PIL at module level.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional
from urllib.parse import urlsplit

from meissonic_cli.errors import ConfigError, InputError

PIXELS_ENV = "MEISSONIC_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
MAX_RESOLUTION = 8192
MEMBER_ENV = "MEISSONIC_MAX_MEMBER_BYTES"
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
COMPRESSED_ENV = "MEISSONIC_ALLOW_COMPRESSED_TARS"
DEFAULT_URL_SCHEMES = ("http", "https")
# Seeds go to torch / numpy / random: 0 ..= MAX_SEED everywhere (config.MAX_SEED); derived seeds
# (seed + index) wrap around inside that range (`derive_seed`).
MAX_SEED = 2**63 - 1
PARAMETERS_ENV = "MEISSONIC_MAX_PARAMETERS"
DEFAULT_MAX_PARAMETERS = 20_000_000_000  # 20x the released 1B model: 80 GB of fp32 weights


def _env_int(name: str, default: int, low: int = 1) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = low - 1
    if value < low:
        raise ConfigError(f"environment variable {name}={text!r} must be a whole number >= {low}")
    return value


# ----------------------------------------------------------------------------------------------
# Images


def max_image_pixels() -> int:
    """The largest image (width x height) any stage opens: `MEISSONIC_MAX_IMAGE_PIXELS` or the default."""
    return _env_int(PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS)


def configure_pil() -> int:
    """Give PIL the pixel limit (its own check stops bombs in formats we do not size first); returns it."""
    from PIL import Image

    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit
    return limit


def too_many_pixels(what: str, width: int, height: int, limit: Optional[int] = None) -> InputError:
    limit = max_image_pixels() if limit is None else limit
    return InputError(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}; "
                      f"set {PIXELS_ENV} to a larger number if the image is trusted")


def check_pixels(image: Any, what: str) -> Any:
    """`image` (an opened, not yet decoded PIL image) unless it is over the pixel limit."""
    width, height = image.size
    limit = max_image_pixels()
    if width * height > limit:
        raise too_many_pixels(what, width, height, limit)
    return image


@contextlib.contextmanager
def image_errors(what: str) -> Iterator[None]:
    """Turn PIL's decompression-bomb error inside the block into one `InputError` (and silence its warning)."""
    import warnings

    from PIL import Image

    configure_pil()
    try:
        with warnings.catch_warnings():
            # PIL warns above the limit and raises above twice it; `check_pixels` (right after
            # `Image.open`) refuses above the limit with the image's size in the message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as err:
        raise InputError(f"{what}: {_bomb_text(err)}; set {PIXELS_ENV} to a larger number if the image is "
                         "trusted") from None


def _bomb_text(err: BaseException) -> str:
    m = re.search(r"\((\d+) pixels\)", str(err))
    return f"{int(m.group(1)):,} pixels, over the limit of {max_image_pixels():,}" if m else \
        f"too many pixels (limit {max_image_pixels():,})"


def open_image(source: str | os.PathLike | bytes, what: str) -> Any:
    """Open and decode an image as RGB-capable PIL image, refusing bombs and unreadable files with
    an `InputError` naming `what`."""
    import io

    from PIL import Image, UnidentifiedImageError

    with image_errors(what):
        try:
            handle = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            check_pixels(handle, what)
            handle.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise InputError(f"{what} is not a readable image ({err})") from None
    return handle


def check_resolution(width: int, height: int, flag: str = "--resolution") -> None:
    """A requested image size must be positive and at most `MAX_RESOLUTION` a side, and its pixels
    under the image limit."""
    if width <= 0 or height <= 0:
        raise InputError(f"{flag} {width}x{height} must be positive")
    if max(width, height) > MAX_RESOLUTION:
        raise InputError(f"{flag} {width}x{height} is over the largest supported side of {MAX_RESOLUTION} pixels")
    if width * height > max_image_pixels():
        raise too_many_pixels(f"{flag} {width}x{height}", width, height)


# ----------------------------------------------------------------------------------------------
# Names, paths and numbers


_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


def safe_output_name(name: Any, where: str) -> str:
    """`name` when it is a plain file name (no folders, not hidden, not `.`/`..`, no control
    characters), so `out / f"{name}.png"` stays inside `out`; else `InputError` naming `where`."""
    text = str(name)
    if (not text.strip() or _BAD_NAME.search(text) or text.startswith(".") or os.path.isabs(text)
            or len(text.encode("utf-8", "surrogatepass")) > 200):
        raise InputError(f"{where}: name {text!r} must be a plain file name (no '/', '\\', leading '.', or control "
                         "characters; at most 200 bytes), so the output stays inside --out")
    return text


def is_inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path` (symlinks resolved) lies inside `root` (symlinks resolved)."""
    root_r = Path(root).resolve()
    try:
        Path(path).resolve().relative_to(root_r)
    except ValueError:
        return False
    return True


def check_seed(seed: Any, where: str, count: int = 1) -> int:
    """`seed` as an int when it is in the one seed range 0 ..= MAX_SEED (the seeds derived from it for
    `count` items wrap around inside the range: `derive_seed`)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"{where}: seed must be a whole number, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"{where}: seed {seed} is out of range; use 0 to {MAX_SEED}")
    return seed


def derive_seed(seed: int, offset: int) -> int:
    """The seed of item `offset` of a run seeded `seed`: seed + offset, wrapped into 0 ..= MAX_SEED."""
    return (int(seed) + int(offset)) % (MAX_SEED + 1)


def max_parameters() -> int:
    """The largest model (parameters) a config may describe: `MEISSONIC_MAX_PARAMETERS` or 20 billion."""
    return _env_int(PARAMETERS_ENV, DEFAULT_MAX_PARAMETERS)


def check_parameter_count(count: int, what: str) -> int:
    """Refuse (`ModelFormatError`) a model whose estimated parameter count is over `max_parameters()`,
    before anything is allocated."""
    from meissonic_cli.errors import ModelFormatError

    limit = max_parameters()
    if count > limit:
        raise ModelFormatError(f"{what} describes about {count:.3g} parameters ({count * 4 / 1e9:.3g} GB in fp32), "
                               f"over the limit of {limit:,}; set {PARAMETERS_ENV} to a larger number if the model "
                               "is real")
    return count


def finite(value: Any, where: str) -> float:
    """`value` as a finite float, else `InputError` (NaN, inf and 1e999 are not settings)."""
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise InputError(f"{where} must be a finite number, got {value!r}")
    return out


# ----------------------------------------------------------------------------------------------
# URLs


def url_scheme(url: Any) -> str:
    """The lower-case scheme of `url` ('' when it has none or is not text)."""
    if not isinstance(url, str):
        return ""
    try:
        return urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return ""


def parse_schemes(schemes: Any) -> tuple[str, ...]:
    """'http,https,file' or a list -> ('http', 'https', 'file') (lower case, order kept)."""
    parts = schemes.split(",") if isinstance(schemes, str) else list(schemes or [])
    out: list[str] = []
    for part in parts:
        for name in str(part).split(","):
            name = name.strip().lower().removesuffix("://")
            if name and name not in out:
                if not re.fullmatch(r"[a-z][a-z0-9+.-]*", name):
                    raise ConfigError(f"--allow-schemes: {name!r} is not a URL scheme (e.g. http, https, file)")
                out.append(name)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Tars


# Magic numbers of compressed streams tarfile would open transparently in "r|*" mode.
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
                     b"\x5d\x00\x00": "lzma"}


def max_member_bytes() -> int:
    """The largest tar member read into memory: `MEISSONIC_MAX_MEMBER_BYTES` or 256 MiB."""
    return _env_int(MEMBER_ENV, DEFAULT_MAX_MEMBER_BYTES)


def compressed_tars_allowed() -> bool:
    return os.environ.get(COMPRESSED_ENV, "").strip().lower() in ("1", "true", "yes")


def compression_of(path: str | os.PathLike) -> Optional[str]:
    """'gzip', 'bzip2', ... when the file starts like a compressed stream, else None."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def open_tar_stream(path: str | os.PathLike, allow_compressed: Optional[bool] = None) -> tarfile.TarFile:
    """A streaming reader of the tar at `path`; a compressed tar is refused (`InputError`) unless
    `allow_compressed` (default: `MEISSONIC_ALLOW_COMPRESSED_TARS`)."""
    allow = compressed_tars_allowed() if allow_compressed is None else allow_compressed
    kind = compression_of(path)
    if kind is not None and not allow:
        raise InputError(f"{path} is a {kind}-compressed tar; shards must be plain tars (a small compressed file can "
                         f"expand to gigabytes). Decompress it, or set {COMPRESSED_ENV}=1 if it is trusted")
    return tarfile.open(str(path), mode="r|*" if allow else "r|")


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Any, limit: Optional[int] = None) -> bytes:
    """The bytes of `member`, refusing (`InputError`) one over `limit` (default `max_member_bytes()`)."""
    limit = max_member_bytes() if limit is None else limit
    if member.size > limit:
        raise InputError(f"{path}: member {member.name!r} is {member.size:,} bytes, over the limit of {limit:,}; "
                         f"set {MEMBER_ENV} to a larger number if the file is trusted")
    f: Optional[BinaryIO] = tar.extractfile(member)  # type: ignore[assignment]
    return f.read(limit + 1) if f is not None else b""


__all__ = ["DEFAULT_URL_SCHEMES", "MAX_RESOLUTION", "MAX_SEED", "check_parameter_count", "derive_seed", "check_pixels", "check_resolution", "check_seed",
           "compression_of", "configure_pil", "finite", "image_errors", "is_inside", "max_image_pixels",
           "max_member_bytes", "open_image", "open_tar_stream", "parse_schemes", "read_member", "safe_output_name",
           "url_scheme"]
