"""Images decoded from request bytes with real encoders' output: formats, transparency, and what is refused
(a header that lies about its size, truncated data, not an image, too many bytes or images); and image
parts on the wire (where they may stand, what the chat template sees)."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from PIL import Image

from tests.imageserver import data_url, encoded, lying_png, png
from trioserve.api.images import (
    ImageLoader,
    ImagePolicy,
    ImageRef,
    check_count,
    decode_data_url,
    decode_image,
    image_refs,
)
from trioserve.api.protocol import ChatCompletionRequest
from trioserve.api.validation import parse
from trioserve.errors import InvalidRequest
from trioserve.types import ImageInputs

WHERE = "messages[2].content[0]"


def refusal(data: bytes, max_pixels: int = 4096 * 4096) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        decode_image(data, max_pixels, WHERE)
    assert caught.value.param == WHERE
    assert caught.value.message.startswith(f"{WHERE}: ")
    return caught.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(encoded(Image.new("RGB", (6, 4), (0, 128, 255)), fmt), 100, WHERE)
    assert (image.mode, image.size) == ("RGB", (6, 4))
    assert all(abs(a - b) <= 8 for a, b in zip(image.getpixel((2, 2)), (0, 128, 255), strict=True))  # lossy


def test_a_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue(), 100, WHERE).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_goes_over_white(mode: str) -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0)).convert(mode) if mode != "P" else Image.new("P", (4, 4), 0)
    if mode == "P":
        image.info["transparency"] = 0
    assert decode_image(encoded(image, "PNG"), 100, WHERE).getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (5000, 5000), (17_000_000, 1)])
def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(width: int, height: int) -> None:
    error = refusal(lying_png(width, height))
    assert error.code == "image_too_large"
    assert "pixels" in error.message


def test_the_pixel_limit_is_the_settings() -> None:
    assert decode_image(png(64, 64), 64 * 64, WHERE).size == (64, 64)
    assert "64 x 65 pixels" in refusal(png(64, 65), max_pixels=64 * 64).message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "not an image"),
        (b"this is not an image", "not an image"),
        (b"%PDF-1.4\n", "not an image"),
        (encoded(Image.new("RGB", (4, 4)), "BMP"), "not an image"),  # a format this server does not open
        (png(64, 64)[:70], "truncated or corrupt"),
        (encoded(Image.new("RGB", (64, 64)), "JPEG")[:300], "truncated or corrupt"),
    ],
)
def test_bad_data_is_refused(data: bytes, expected: str) -> None:
    error = refusal(data)
    assert expected in error.message
    assert error.code == "invalid_image"


def test_data_urls() -> None:
    images = ImagePolicy()
    assert decode_data_url(data_url(png(3, 2)), images, WHERE).size == (3, 2)
    wrapped = data_url(png(3, 2)).replace("base64,", "base64,\n", 1)  # some clients wrap the base64
    assert decode_data_url(wrapped, images, WHERE).size == (3, 2)
    assert decode_data_url(data_url(png(3, 2), media_type="application/octet-stream"), images, WHERE).size == (3, 2)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64,!!!not base64!!!", "not valid base64"),
        ("data:image/png;base64", "must be base64-encoded"),
        (data_url(b"plain text"), "not an image"),
    ],
)
def test_bad_data_urls(url: str, expected: str) -> None:
    with pytest.raises(InvalidRequest, match=expected) as caught:
        decode_data_url(url, ImagePolicy(), WHERE)
    assert caught.value.param == WHERE


def test_a_data_url_past_the_byte_limit_is_refused_by_its_length() -> None:
    image = png(64, 64)
    assert decode_data_url(data_url(image), ImagePolicy(max_bytes=len(image)), WHERE).size == (64, 64)
    with pytest.raises(InvalidRequest, match=f"larger than {len(image) - 3} bytes") as caught:
        decode_data_url(data_url(image), ImagePolicy(max_bytes=len(image) - 3), WHERE)
    assert caught.value.code == "image_too_large"


def test_too_many_images_names_the_first_past_the_limit() -> None:
    refs = [ImageRef("data:,", f"messages[{i}].content[0]") for i in range(5)]
    check_count(refs[:3], ImagePolicy(max_images=3))
    with pytest.raises(InvalidRequest, match="this request has 5, the limit is 3") as caught:
        check_count(refs, ImagePolicy(max_images=3))
    assert (caught.value.param, caught.value.code) == ("messages[3].content[0]", "too_many_images")


def chat_body(*messages: dict[str, object]) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, {"model": "m", "messages": list(messages)})


def test_image_parts_in_order_with_their_places() -> None:
    body = chat_body(
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:a", "detail": "low"}},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": "https://example.com/b.png"},  # the string form
            ],
        },
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "now"}, {"type": "image_url", "image_url": {"url": "c"}}],
        },
    )
    assert image_refs(body.messages) == [
        ImageRef("data:a", "messages[1].content[0]"),
        ImageRef("https://example.com/b.png", "messages[1].content[2]"),
        ImageRef("c", "messages[3].content[1]"),
    ]
    templated = [message.for_template() for message in body.messages]
    assert templated[0]["content"] == "be brief"  # text-only messages keep their string
    assert templated[1]["content"] == [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]
    assert body.messages[1].text() == "and"


@pytest.mark.parametrize("role", ["system", "developer", "assistant"])
def test_images_only_in_user_messages(role: str) -> None:
    with pytest.raises(InvalidRequest, match="only taken in user messages") as caught:
        chat_body(
            {"role": "user", "content": "hi"},
            {"role": role, "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": "u"}]},
        )
    assert caught.value.param == "messages[1].content[1]"


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": "u", "detail": "huge"}}, "messages.0.content.0.image_url.detail"),
        ({"type": "image_url", "image_url": {"detail": "low"}}, "messages.0.content.0.image_url.url"),
        ({"type": "image_url"}, "messages.0.content.0.image_url"),
        ({"type": "input_audio", "input_audio": {}}, "messages.0.content.0.type"),
    ],
)
def test_malformed_image_parts_name_the_field(part: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_body({"role": "user", "content": [part]})
    assert caught.value.param == param


class BlockingProcessor:
    """Stands in for a vision tokenizer's `encode_images` (the one method `ImageLoader` calls): holds each
    call until released, and counts how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def encode_images(self, prompt: str, images: Sequence[Image.Image]) -> tuple[list[int], ImageInputs]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(timeout=60)
        with self.lock:
            self.running -= 1
        return [1, 2, 3], ImageInputs(features={}, digests=(), spans=())


async def test_requests_decode_their_images_a_slot_at_a_time() -> None:
    loader = ImageLoader(ImagePolicy(), slots=1)
    processor = BlockingProcessor()
    refs = [ImageRef(data_url(png(4, 4)), "messages[0].content[0]")]
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(loader.encode, processor, "<image>", refs)
        with trio.fail_after(60):  # the first request's processor call starts (in a worker thread)
            while processor.running == 0:  # noqa: ASYNC110 (set by a worker thread)
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert loader.limiter.statistics().tasks_waiting == 2  # the others wait for the slot, nothing decoded
        processor.release.set()
    assert processor.most == 1
