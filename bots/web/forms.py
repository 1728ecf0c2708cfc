"""Reading the playground's forms: typed options from text fields, and image uploads checked while they stream.

The upload is read in chunks and abandoned as soon as it is known to be bad: wrong magic bytes in the first
chunk, more than ``limits.max_image_bytes``, or a header that claims more pixels than allowed (checked as
soon as Pillow can read the header, before the rest arrives). The full checks of ``bots.images`` (the same
ones the bots use) then run on the complete file.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image

from bots.images import ALLOWED_FORMATS, ImageRejected, ValidatedImage, load_image, precheck_image
from bots.web.errors import body_deadline
from generator.params import PARAM, Limits, RequestError

CHUNK_BYTES = 64 * 1024
MAX_TEXT_FIELD_BYTES = 16 * 1024  # a prompt is at most a few KB of UTF-8
MAX_FIELDS = 40
FORM_OVERHEAD_BYTES = 256 * 1024  # text fields and multipart framing on top of the image
HEADER_PROBE_LIMIT = 1024 * 1024  # stop trying to read dimensions early after this much (JPEG EXIF can be big)
NO_TIMEOUT = 1e9

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


class FormRejected(Exception):
    """The request body cannot be used; ``status`` and a friendly ``message`` for the response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class JobForm:
    fields: dict[str, str] = field(default_factory=dict)
    image: ValidatedImage | None = None


def coerce_options(raw: dict[str, Any]) -> dict[str, Any]:
    """Form values (text, or JSON scalars) -> typed request options; empty values are left out.

    Only the request's user fields are accepted (prompt excluded: it travels as text with its flags).
    Range and choice checks stay in ``generator.request.validate``.
    """
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in PARAM:
            raise RequestError(name, f"Unknown option '{name}'.")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        kind = PARAM[name].kind
        label = PARAM[name].label
        if kind is bool:
            if isinstance(value, bool):
                out[name] = value
                continue
            text = str(value).strip().lower()
            if text not in _TRUE + _FALSE:
                raise RequestError(name, f"{label} must be on or off (got '{value}').")
            out[name] = text in _TRUE
        elif kind in (int, float):
            number = coerce_number(value, kind)
            if number is None:
                noun = "a whole number" if kind is int else "a number"
                raise RequestError(name, f"{label} must be {noun} (got '{value}').")
            out[name] = number
        else:
            out[name] = str(value).strip()
    return out


def coerce_number(value: Any, kind: type) -> int | float | None:
    """A JSON or text number as ``kind`` (int or float); None when it is not one."""
    if isinstance(value, bool):
        return None
    try:
        if kind is int:
            if isinstance(value, int):
                return value
            return int(value.strip(), 10) if isinstance(value, str) else None
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """Width and height if Pillow can already parse the header, else None (more bytes needed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # we compare against our own limits right after
            with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
                return img.size
    except Image.DecompressionBombError:
        # The header claims something absurd: read the claimed size so the refusal can name it.
        return _declared_size(data) or (2**31 - 1, 2**31 - 1)
    except Exception:
        return None


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """The size an image header declares, read by the format's own Pillow parser without Image.open's
    decompression-bomb check (that check raises before telling the dimensions). Nothing is decoded."""
    Image.init()
    for fmt in ALLOWED_FORMATS:
        factory, accept = Image.OPEN[fmt]
        try:
            result = accept(data[:16]) if accept is not None else True
            if isinstance(result, str) or not result:  # a str: "cannot read this format here"
                continue
            with factory(io.BytesIO(data), "") as img:
                return img.size
        except Exception:
            continue
    return None


def _check_magic(first: bytes) -> None:
    if first.startswith(_MAGIC) or (first[:4] == b"RIFF" and first[8:12] == b"WEBP"):
        return
    if len(first) < 12 and any(m.startswith(first) for m in _MAGIC):
        return  # too few bytes to tell yet
    raise ImageRejected("That file is not a PNG, JPEG or WebP image I can read.")


async def _read_image_part(part: BodyPartReader, limits: Limits, body_timeout: float) -> bytes:
    precheck_image(None, part.headers.get("Content-Type"), None, None, limits)
    buf = bytearray()
    size_known = False
    next_probe = 0
    while True:
        async with body_deadline(body_timeout):
            chunk = await part.read_chunk(CHUNK_BYTES)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limits.max_image_bytes:
            try:
                precheck_image(len(buf), None, None, None, limits)
            except ImageRejected as exc:  # always: the message names the limit
                raise FormRejected(413, "image_too_large", exc.message) from None
        if len(buf) - len(chunk) < 12:
            _check_magic(bytes(buf[:12]))
        if not size_known and next_probe <= len(buf) <= HEADER_PROBE_LIMIT:
            dims = _image_size_from_header(bytes(buf))
            if dims is not None:
                precheck_image(None, None, dims[0], dims[1], limits)
                size_known = True
            next_probe = len(buf) + CHUNK_BYTES
    return bytes(buf)


async def _read_text_part(part: BodyPartReader, body_timeout: float) -> str:
    data = bytearray()
    while True:
        async with body_deadline(body_timeout):
            chunk = await part.read_chunk(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_TEXT_FIELD_BYTES:
            raise FormRejected(413, "too_large", f"The field '{part.name}' is too long.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormRejected(400, "invalid", f"The field '{part.name}' is not valid UTF-8 text.") from None


async def _read_urlencoded(request: web.Request, body_timeout: float) -> JobForm:
    try:
        async with body_deadline(body_timeout):
            data = await request.post()  # bounded by the application's client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise FormRejected(413, "too_large", "The form is too large.") from None
    form = JobForm()
    for name in data:
        values = data.getall(name)
        if len(values) != 1 or not isinstance(values[0], str):
            raise FormRejected(400, "invalid", f"The field '{name}' must be sent once, as text.")
        form.fields[name] = values[0]
    return form


async def read_job_form(request: web.Request, limits: Limits, *, body_timeout: float = NO_TIMEOUT) -> JobForm:
    """Parse the playground's multipart form, validating the image (if any) as it streams in.
    A url-encoded form (curl -d) is accepted too, for text-only requests. A body that stalls for
    ``body_timeout`` seconds raises ``BodyTimeout``."""
    if request.content_type == "application/x-www-form-urlencoded":
        return await _read_urlencoded(request, body_timeout)
    if request.content_type != "multipart/form-data":
        raise FormRejected(415, "unsupported", "Send the form as multipart/form-data.")
    length = request.content_length
    if length is not None and length > limits.max_image_bytes + FORM_OVERHEAD_BYTES:
        try:
            precheck_image(length, None, None, None, limits)
        except ImageRejected as exc:
            raise FormRejected(413, "image_too_large", exc.message) from None
    form = JobForm()
    reader = await request.multipart()
    count = 0
    while True:
        async with body_deadline(body_timeout):
            part = await reader.next()
        if part is None:
            break
        count += 1
        if count > MAX_FIELDS or not isinstance(part, BodyPartReader) or not part.name:
            raise FormRejected(400, "invalid", "Unexpected form layout.")
        if part.name == "image":
            if part.filename is None:
                raise FormRejected(400, "invalid", "The image must be sent as a file.")
            if part.filename == "" and form.image is None:
                async with body_deadline(body_timeout):
                    await part.release()  # the browser's empty file input
                continue
            if form.image is not None:
                raise FormRejected(400, "invalid", "Send one image only.")
            try:
                data = await _read_image_part(part, limits, body_timeout)
                form.image = await asyncio.to_thread(load_image, data, limits)
            except ImageRejected as exc:
                raise FormRejected(400, "bad_image", exc.message) from None
        else:
            if part.name in form.fields:
                raise FormRejected(400, "invalid", f"The field '{part.name}' is sent twice.")
            form.fields[part.name] = await _read_text_part(part, body_timeout)
    return form

