"""Images in requests: the limits, ``data:`` URLs, and decoding to RGB off the event loop.

An image reaches the model as a decoded ``PIL.Image.Image`` in RGB. Getting there is where a hostile
request does its harm, so each step is bounded before it runs: the number of images (before anything is
fetched or decoded), the bytes (a ``data:`` URL's length before its base64 is decoded, a remote body
while it streams, `imagefetch`), and the pixels, read from the image's header before a single pixel is
decoded (a tiny file can claim 100,000 x 100,000 pixels: a decompression bomb). Only PNG, JPEG, WebP and
GIF (its first frame) are opened; truncated data is refused, never padded out. Decoding runs in a worker
thread; fetching and decoding run inside the request's own scope, so a disconnect or a deadline stops
them and drops what they held.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from PIL import Image, UnidentifiedImageError

from trioserve.api.imagefetch import FetchPolicy, fetch_image_bytes
from trioserve.api.messages import ChatMessage
from trioserve.config import Settings
from trioserve.errors import InvalidRequest
from trioserve.types import ImageInputs, Tokenizer

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Requests decoding and preprocessing images at once, server-wide (`ImageLoader`): enough to keep a few
# cores busy, few enough that decoded images stay a bounded part of memory.
DECODE_SLOTS = max(2, min(8, (os.cpu_count() or 2) // 2))
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.ASCII)
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """The limits on a request's images, from the settings.

    Args:
        max_images: images one request may carry (all its messages together).
        max_bytes: bytes of one image (decoded from base64, or fetched).
        max_pixels: width times height of one image, read from its header before decoding.
        fetch: how remote (``http(s)``) images are fetched, if at all.
    """

    max_images: int = 16
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        """The limits the server was configured with (``--max-images-per-request`` and the image flags)."""
        fetch = FetchPolicy(
            enabled=settings.remote_images,
            max_bytes=settings.max_image_bytes,
            timeout=settings.image_fetch_timeout,
            allowed_domains=tuple(settings.allowed_image_domains),
            allow_private=settings.allow_private_image_urls,
            allowed_networks=tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_image_networks),
        )
        return cls(settings.max_images_per_request, settings.max_image_bytes, settings.max_image_pixels, fetch)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image a request refers to: its URL (``data:`` or ``http(s)``) and the content part naming it."""

    url: str
    where: str  # messages[i].content[j] (input[i].content[j] on the Responses API)


def image_refs(messages: Sequence[ChatMessage]) -> list[ImageRef]:
    """Every image part of ``messages``, in order (earlier turns' images first)."""
    return [
        ImageRef(part.url, f"messages[{index}].content[{position}]")
        for index, message in enumerate(messages)
        for position, part in message.images()
    ]


def check_count(refs: Sequence[ImageRef], policy: ImagePolicy) -> None:
    """Raises:
    InvalidRequest: more than ``max_images`` images; ``param`` names the first one past the limit.
    """
    if len(refs) > policy.max_images:
        where = refs[policy.max_images].where
        raise InvalidRequest(
            f"{where}: too many images: this request has {len(refs)}, the limit is {policy.max_images} per request",
            param=where,
            code="too_many_images",
        )


class ImageLoader:
    """Reads a request's images and hands them to the model's processor, bounding what is decoded at once.

    A small PNG can decode to 48 MiB (4096 x 4096 RGB), and requests load their images before admission,
    so without a bound many requests of many such images would hold gigabytes at once. Reading (remote
    fetches, ``data:`` URLs as sent) has no bound beyond each image's bytes; decoding and the processor
    hold a slot: at most ``slots`` requests hold decoded images at a time, the others wait their turn.

    Args:
        policy: the limits on each request's images.
        slots: requests that may decode and preprocess at once.
    """

    def __init__(self, policy: ImagePolicy, slots: int = DECODE_SLOTS) -> None:
        self.policy = policy
        self._slots = slots
        self._limiter: trio.CapacityLimiter | None = None

    @property
    def limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:  # made on first use, inside the event loop that serves
            self._limiter = trio.CapacityLimiter(self._slots)
        return self._limiter

    async def encode(
        self, tokenizer: Tokenizer, prompt: str, refs: Sequence[ImageRef]
    ) -> tuple[list[int], ImageInputs]:
        """``prompt`` with its images' tokens, and the images as the model takes them (`Tokenizer.encode_images`,
        in a worker thread, as each decode). Only the processor's output outlives this call; a cancelled
        request stops waiting at once (a worker thread finishes its bounded work and its result is dropped).

        Raises:
            InvalidRequest: too many images, or one is refused (see `load_image`); ``param`` names its part.
        """
        check_count(refs, self.policy)
        sources = [await read_image(ref, self.policy) for ref in refs]
        async with self.limiter:
            pictures = [
                await trio.to_thread.run_sync(decode_source, source, ref, self.policy, abandon_on_cancel=True)
                for source, ref in zip(sources, refs, strict=True)
            ]
            del sources  # the undecoded bytes: no longer needed while the processor runs
            return await trio.to_thread.run_sync(tokenizer.encode_images, prompt, pictures, abandon_on_cancel=True)


async def load_image(ref: ImageRef, policy: ImagePolicy) -> Image.Image:
    """One image, read (`read_image`) and decoded to RGB in a worker thread (`decode_source`).

    Raises:
        InvalidRequest: as `read_image` and `decode_source`.
    """
    source = await read_image(ref, policy)
    return await trio.to_thread.run_sync(decode_source, source, ref, policy, abandon_on_cancel=True)


async def read_image(ref: ImageRef, policy: ImagePolicy) -> str | bytes:
    """An image's undecoded form: a ``data:`` URL as it is (decoded with the image), a remote one's body.

    Raises:
        InvalidRequest: an unsupported URL scheme, or a refused or failed fetch (`imagefetch`).
    """
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
    if scheme == "data":
        return ref.url
    if scheme in ("http", "https"):
        return await fetch_image_bytes(ref.url, policy.fetch, ref.where)
    raise InvalidRequest(
        f"{ref.where}: image URL scheme {scheme or ref.url[:16]!r} is not supported (data:, http and https are)",
        param=ref.where,
        code="invalid_image_url",
    )


def decode_source(source: str | bytes, ref: ImageRef, policy: ImagePolicy) -> Image.Image:
    """What `read_image` gave, decoded to RGB (`decode_data_url` or `decode_image`). CPU-heavy.

    Raises:
        InvalidRequest: a malformed data URL, too many bytes, not an image (or not PNG/JPEG/WebP/GIF),
            truncated data, or too many pixels.
    """
    if isinstance(source, str):
        return decode_data_url(source, policy, ref.where)
    return decode_image(source, policy.max_pixels, ref.where)


def decode_data_url(url: str, policy: ImagePolicy, where: str) -> Image.Image:
    """A ``data:`` URL's image (base64 only), refused by its length before the base64 is decoded.

    Raises:
        InvalidRequest: not a base64 data URL, bad base64, too many bytes, or as `decode_image`.
    """
    match = _DATA_URL.match(url)
    if match is None or "base64" not in (p.strip().lower() for p in match["params"].split(";")):
        raise InvalidRequest(
            f"{where}: a data: URL must be base64-encoded (data:image/png;base64,...)",
            param=where,
            code="invalid_image",
        )
    if (len(url) - match.end()) // 4 * 3 > policy.max_bytes + 2:  # the decoded size, to within padding; no copy
        raise InvalidRequest(
            f"{where}: the image is larger than {policy.max_bytes} bytes", param=where, code="image_too_large"
        )
    payload = url[match.end() :]
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        try:  # some clients wrap base64 in lines
            data = base64.b64decode(_WHITESPACE.sub(b"", payload.encode("ascii")), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise InvalidRequest(
                f"{where}: the data: URL is not valid base64", param=where, code="invalid_image"
            ) from None
    if len(data) > policy.max_bytes:
        raise InvalidRequest(
            f"{where}: the image is larger than {policy.max_bytes} bytes", param=where, code="image_too_large"
        )
    return decode_image(data, policy.max_pixels, where)


def decode_image(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """``data`` as an RGB image (a GIF's first frame; transparency over white). CPU-heavy: call it in a
    worker thread.

    Raises:
        InvalidRequest: not a PNG, JPEG, WebP or GIF image, truncated or corrupt data, or more than
            ``max_pixels`` pixels (checked from the header, before decoding).
    """
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size  # from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise _too_many_pixels(where, width, height, max_pixels)
            image.load()
            return _rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own bomb check, in Image.open, fires before ours for sizes past its limit.
        raise InvalidRequest(
            f"{where}: the image has more pixels than this server takes ({max_pixels})",
            param=where,
            code="image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest(
            f"{where}: the data is not an image this server decodes ({', '.join(FORMATS)})",
            param=where,
            code="invalid_image",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow's errors for truncated and corrupt data ("image file is truncated", broken chunks).
        raise InvalidRequest(
            f"{where}: the image data is truncated or corrupt ({exc})", param=where, code="invalid_image"
        ) from None


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Converting straight to RGB would put transparent pixels on black (and Pillow warns for palettes).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _too_many_pixels(where: str, width: int, height: int, max_pixels: int) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: the image is {width} x {height} pixels; this server takes at most {max_pixels} pixels per image",
        param=where,
        code="image_too_large",
    )
