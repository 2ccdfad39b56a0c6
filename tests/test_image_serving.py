"""Images through the real server (Hypercorn on loopback): a text-only model refuses them before fetching
anything; the hostile set (a lying header, loopback URLs direct and by redirect, 50 MB, not an image, 100
images) is answered 400 in bounded time, on a connection that goes on serving, with the server's memory
back where it was; a disconnect stops a fetch. The vision side is `tests.vision`'s tokenizer double (the
demo model seen as a vision model: see its docstring for what that does and does not show); a real tiny
vision-language model serves images end to end in `tests/test_vision_e2e.py`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.imageserver import BIG_BYTES, ImageServer, data_url, image_server, lying_png, png
from tests.servers import Served, demo_app, demo_runner, serve_on_loopback, server_process, with_sdk
from tests.vision import TOKENS_PER_IMAGE, ImageTokenizer, with_image_tokenizer
from trioserve.cli import build_app
from trioserve.config import Settings

pytestmark = pytest.mark.socket

BOUND_S = 60  # generous: what is tested is that each refusal comes, not how fast


@pytest.fixture
def images() -> Iterator[ImageServer]:
    with image_server("127.0.0.1") as served:
        yield served


@pytest.fixture
def redirector() -> Iterator[ImageServer]:
    """On 127.0.0.2, the one address the vision server may fetch from (``--allowed-image-networks``)."""
    with image_server("127.0.0.2") as served:
        yield served


def vision_app(**settings: Any) -> Any:
    options = Settings(
        hotload=True, prefill_chunk=64, max_concurrent=4, allowed_image_networks=["127.0.0.2/32"], **settings
    )
    return build_app(options, load=lambda: with_image_tokenizer(demo_runner()))


@pytest.fixture
async def vision() -> AsyncIterator[Served]:
    async with serve_on_loopback(vision_app(max_body_bytes=80 * 1024 * 1024)) as served:
        yield served


def tokenizer_of(served: Served) -> ImageTokenizer:
    runner = served.engine.runner
    assert runner is not None and isinstance(runner.tokenizer, ImageTokenizer)
    return runner.tokenizer


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat_body(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 3, "messages": list(messages)} | fields


async def expect_400(client: httpx.AsyncClient, url: str, body: dict[str, Any], param: str, code: str) -> str:
    with trio.fail_after(BOUND_S):
        reply = await client.post(url, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    assert error["message"].startswith(f"{param}: ")
    return str(error["message"])


async def still_serves(client: httpx.AsyncClient, url: str) -> None:
    reply = await client.post(url + "/v1/chat/completions", json=chat_body({"role": "user", "content": "hi"}))
    assert reply.status_code == 200, reply.text


# -- a text-only model ----------------------------------------------------------------------------------


async def test_a_text_only_model_refuses_images_before_fetching_them(images: ImageServer) -> None:
    async with serve_on_loopback(demo_app(allow_private_image_urls=True)) as served, httpx.AsyncClient() as client:
        body = chat_body(user(text("what is this?"), image(images.url + "/image.png")))
        message = await expect_400(
            client, served.url + "/v1/chat/completions", body, "messages[0].content[1]", "image_input_not_supported"
        )
        assert "this model does not take image input" in message
        responses = {"model": "m", "input": [user({"type": "input_image", "image_url": images.url + "/image.png"})]}
        await expect_400(
            client, served.url + "/v1/responses", responses, "input[0].content[0]", "image_input_not_supported"
        )
        assert images.requests == []  # decided before any fetch
        await still_serves(client, served.url)


async def test_tokenize_refuses_images(images: ImageServer) -> None:
    async with serve_on_loopback(demo_app()) as served, httpx.AsyncClient() as client:
        body = {"messages": [user(text("x"), image(data_url(png())))]}
        with trio.fail_after(BOUND_S):
            reply = await client.post(served.url + "/tokenize", json=body)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "messages[0].content[1]"


# -- the glue, with the tokenizer double ----------------------------------------------------------------


async def test_images_reach_the_tokenizer_decoded_in_order_and_count_in_usage(vision: Served) -> None:
    red, blue = data_url(png(4, 3, (255, 0, 0))), data_url(png(2, 2, (0, 0, 255)))
    messages = [
        user(text("first"), image(red)),
        {"role": "assistant", "content": "a red one"},
        user(image(blue), text("and this?")),
    ]
    completion = await with_sdk(vision, lambda c: c.chat.completions.create(model="m", messages=messages, max_tokens=3))
    tokenizer = tokenizer_of(vision)
    assert tokenizer.seen[-1] == [((4, 3), "RGB", (255, 0, 0)), ((2, 2), "RGB", (0, 0, 255))]
    text_only = [
        {"role": "user", "content": "first<image>"},
        {"role": "assistant", "content": "a red one"},
        {"role": "user", "content": "<image>and this?"},
    ]
    expected = len(tokenizer.encode(tokenizer.render_chat(text_only).replace("<image>", ""))) + 2 * TOKENS_PER_IMAGE
    assert completion.usage.prompt_tokens == expected
    chunks = await with_sdk(
        vision,
        lambda c: list(
            c.chat.completions.create(
                model="m", messages=messages, max_tokens=3, stream=True, stream_options={"include_usage": True}
            )
        ),
    )
    assert chunks[-1].usage.prompt_tokens == expected


async def test_responses_input_image_and_a_remote_image(vision: Served, redirector: ImageServer) -> None:
    content = [
        {"type": "input_text", "text": "compare"},
        {"type": "input_image", "image_url": data_url(png(5, 5, (0, 255, 0))), "detail": "low"},
        {"type": "input_image", "image_url": redirector.url + "/redirect?to=/image.png"},
    ]
    response = await with_sdk(
        vision,
        lambda c: c.responses.create(model="m", input=[{"role": "user", "content": content}], max_output_tokens=3),
    )
    assert response.status == "incomplete"  # cut by max_output_tokens: it ran
    assert tokenizer_of(vision).seen[-1] == [((5, 5), "RGB", (0, 255, 0)), ((8, 8), "RGB", (200, 30, 40))]
    assert redirector.requests == ["/redirect", "/image.png"]
    # The next turn carries the earlier turn's images, in order, before its own.
    await with_sdk(
        vision,
        lambda c: c.responses.create(
            model="m",
            previous_response_id=response.id,
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": data_url(png(1, 1))}]}],
            max_output_tokens=3,
        ),
    )
    assert [size for size, _, _ in tokenizer_of(vision).seen[-1]] == [(5, 5), (8, 8), (1, 1)]


# -- the hostile set ------------------------------------------------------------------------------------


def hostile_set(images: ImageServer, redirector: ImageServer) -> list[tuple[str, dict[str, Any], str, str, str]]:
    """(name, body, param, code, a phrase of the message) for each request of the issue's hostile set."""
    loopback = images.url + "/image.png"
    return [
        (
            "lying header",
            chat_body(user(text("x"), image(data_url(lying_png())))),
            "messages[0].content[1]",
            "image_too_large",
            "pixels",
        ),
        ("loopback URL", chat_body(user(image(loopback))), "messages[0].content[0]", "invalid_image_url", "loopback"),
        (
            "redirect to loopback",
            chat_body(user(image(f"{redirector.url}/redirect?to={loopback}"))),
            "messages[0].content[0]",
            "invalid_image_url",
            "127.0.0.1, a loopback address",
        ),
        (
            "50 MB data URL",
            chat_body(user(image(data_url(bytes(BIG_BYTES))))),
            "messages[0].content[0]",
            "image_too_large",
            "larger than",
        ),
        (
            "50 MB remote",
            chat_body(user(image(redirector.url + "/big?declared=no"))),
            "messages[0].content[0]",
            "image_too_large",
            "larger than",
        ),
        (
            "not an image",
            chat_body(user(image(data_url(b"%PDF-1.4 not an image")))),
            "messages[0].content[0]",
            "invalid_image",
            "not an image",
        ),
        (
            "truncated",
            chat_body(user(image(data_url(png(64, 64)[:70])))),
            "messages[0].content[0]",
            "invalid_image",
            "truncated",
        ),
        (
            "100 images",
            chat_body(user(*[image(data_url(png(1, 1)))] * 100)),
            "messages[0].content[16]",
            "too_many_images",
            "100",
        ),
        (
            "unsupported scheme",
            chat_body(user(image("file:///etc/passwd"))),
            "messages[0].content[0]",
            "invalid_image_url",
            "'file'",
        ),
    ]


async def test_the_hostile_set_is_refused_on_a_connection_that_goes_on(
    vision: Served, images: ImageServer, redirector: ImageServer
) -> None:
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        for name, body, param, code, phrase in hostile_set(images, redirector):
            message = await expect_400(client, vision.url + "/v1/chat/completions", body, param, code)
            assert phrase in message, (name, message)
            await still_serves(client, vision.url)
    assert images.requests == []  # neither directly nor by redirect
    assert tokenizer_of(vision).seen == []  # nothing reached the processor


async def test_a_disconnect_stops_a_fetch(vision: Served, redirector: ImageServer) -> None:
    body = chat_body(user(image(redirector.url + "/drip")))
    async with httpx.AsyncClient(timeout=1.0) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(vision.url + "/v1/chat/completions", json=body)
    assert redirector.requests == ["/drip"]
    with trio.fail_after(BOUND_S):  # the server's fetch ends (its connection closes) once the client is gone
        while redirector.active:  # noqa: ASYNC110 (the state changes in the image server's thread)
            await trio.sleep(0.05)


async def test_the_deadline_covers_image_fetching(vision: Served, redirector: ImageServer) -> None:
    body = chat_body(user(image(redirector.url + "/drip")))  # fetch timeout 10 s, request deadline 1 s
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        reply = await client.post(vision.url + "/v1/chat/completions", json=body, headers={"X-Request-Timeout": "1"})
        assert reply.status_code == 504, reply.text
        assert "image" in reply.json()["error"]["message"]
        with trio.fail_after(BOUND_S):
            while redirector.active:  # noqa: ASYNC110 (the state changes in the image server's thread)
                await trio.sleep(0.05)
        await still_serves(client, vision.url)


async def test_truncate_cannot_cut_through_images(vision: Served) -> None:
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        body = chat_body(user(image(data_url(png()))), truncate=4)
        reply = await client.post(vision.url + "/v1/chat/completions", json=body)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "truncate"


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match[1]) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_the_hostile_set_leaves_the_servers_memory_where_it_was(
    tmp_path: Path, images: ImageServer, redirector: ImageServer
) -> None:
    """The real CLI in a subprocess: the hostile set twice (allocators warm: 446 -> 455 MiB here, then flat
    to within 0.1 MiB over six more rounds), its resident memory read, the set four more times, read again.
    Anything a refusal kept (the 50 MB body, a decoded bomb) would add at least 50 MB a round: keeping the
    data URLs alone measured 222 MiB over three rounds."""
    env = {"MAX_BODY_BYTES": str(80 * 1024 * 1024), "ALLOWED_IMAGE_NETWORKS": "127.0.0.2/32"}
    with server_process(tmp_path, "tests.vision", **env) as server, httpx.Client(timeout=BOUND_S) as client:
        requests = hostile_set(images, redirector)

        def one_round() -> None:
            for name, body, param, _, _ in requests:
                reply = client.post(server.url + "/v1/chat/completions", json=body)
                assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (name, reply.text)
            assert client.post(server.url + "/v1/chat/completions", json=chat_body(user(text("hi")))).status_code == 200

        for _ in range(2):  # resident memory levels off after two rounds (allocator arenas, caches)
            one_round()
        before = rss_bytes(server.process.pid)
        for _ in range(4):
            one_round()
        after = rss_bytes(server.process.pid)
    assert after - before < 32 * 1024 * 1024, f"resident memory grew by {(after - before) / 2**20:.0f} MiB"


# -- Anthropic's Messages API ----------------------------------------------------------------------------


def anthropic_image(source: dict[str, Any]) -> dict[str, Any]:
    return {"type": "image", "source": source}


async def test_anthropic_image_blocks(vision: Served, redirector: ImageServer) -> None:
    encoded = data_url(png(3, 3, (9, 9, 9))).split(",", 1)[1]
    body = {
        "model": "m",
        "max_tokens": 3,
        "system": "be brief",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "these"},
                    anthropic_image({"type": "base64", "media_type": "image/png", "data": encoded}),
                    anthropic_image({"type": "url", "url": redirector.url + "/image.png"}),
                ],
            }
        ],
    }
    async with httpx.AsyncClient(timeout=BOUND_S) as client:
        reply = await client.post(vision.url + "/v1/messages", json=body)
        assert reply.status_code == 200, reply.text
        assert tokenizer_of(vision).seen[-1] == [((3, 3), "RGB", (9, 9, 9)), ((8, 8), "RGB", (200, 30, 40))]
        # A refused image is named by its block, though the system prompt moved the chat messages by one.
        body["messages"][0]["content"][2] = anthropic_image({"type": "url", "url": "http://127.0.0.1:1/x.png"})
        reply = await client.post(vision.url + "/v1/messages", json=body)
        assert reply.status_code == 400
        assert reply.json()["error"]["message"].startswith("messages.0.content.2: "), reply.text
        body["messages"][0]["content"][2] = anthropic_image({"type": "file", "file_id": "file_1"})
        reply = await client.post(vision.url + "/v1/messages", json=body)
        assert reply.status_code == 400
        assert "messages.0.content.2.source" in reply.json()["error"]["message"]
