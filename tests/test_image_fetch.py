"""Remote images fetched from a real HTTP server on loopback: limits, redirects, and the server-side request
forgery checks, hop by hop, against the addresses a name really resolves to."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator

import pytest
import trio
import trustme

from tests.imageserver import BIG_BYTES, ImageServer, image_server
from trioserve.api.imagefetch import FetchPolicy, refused_address
from trioserve.api.images import ImagePolicy, ImageRef, load_image
from trioserve.errors import InvalidRequest

pytestmark = pytest.mark.socket

WHERE = "messages[0].content[1]"
LOOPBACK_ONE = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with image_server("127.0.0.1") as served:
        yield served


@pytest.fixture
def other() -> Iterator[ImageServer]:
    """A second server on another loopback address, outside the network the tests allow."""
    with image_server("127.0.0.2") as served:
        yield served


def policy(**fetch: object) -> ImagePolicy:
    options: dict[str, object] = {"allowed_networks": LOOPBACK_ONE, "timeout": 30.0} | fetch
    return ImagePolicy(max_pixels=4096 * 4096, fetch=FetchPolicy(**options))  # type: ignore[arg-type]


async def refusal(url: str, images: ImagePolicy) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        await load_image(ImageRef(url, WHERE), images)
    assert caught.value.param == WHERE
    assert caught.value.message.startswith(f"{WHERE}: ")
    return caught.value


async def test_fetches_an_image_from_an_allowed_address(server: ImageServer) -> None:
    image = await load_image(ImageRef(server.url + "/image.png", WHERE), policy())
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (8, 8), (200, 30, 40))


async def test_https_goes_to_the_checked_address_and_verifies_the_name() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with image_server("127.0.0.1", ssl_context=server_context) as served:
        port = served.url.rsplit(":", 1)[1]
        # The connection goes to 127.0.0.1 (the checked address); TLS names localhost (SNI and the check).
        image = await load_image(
            ImageRef(f"https://localhost:{port}/image.png", WHERE), policy(ssl_context=client_context)
        )
        assert image.size == (8, 8)
        # The certificate names localhost only: by IP, the check fails, so it is made.
        error = await refusal(f"https://127.0.0.1:{port}/image.png", policy(ssl_context=client_context))
        assert "could not be fetched" in error.message
        assert "CERTIFICATE_VERIFY_FAILED" in error.message
        assert served.requests == ["/image.png"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0"])
async def test_loopback_is_refused_before_connecting(server: ImageServer, host: str) -> None:
    port = server.url.rsplit(":", 1)[1]
    error = await refusal(f"http://{host}:{port}/image.png", policy(allowed_networks=()))
    assert "refused" in error.message
    assert error.code == "invalid_image_url"
    assert server.requests == []


async def test_a_redirect_to_a_refused_address_is_refused_at_that_hop(server: ImageServer, other: ImageServer) -> None:
    # The first hop is allowed (127.0.0.1/32); the redirect goes to loopback outside it, where a real server
    # would answer with an image if the hop were not checked.
    error = await refusal(f"{server.url}/redirect?to={other.url}/image.png", policy())
    assert "127.0.0.2" in error.message
    assert "loopback" in error.message
    assert server.requests == ["/redirect"]
    assert other.requests == []


async def test_a_redirect_to_the_metadata_address_is_refused_even_with_private_addresses_allowed(
    server: ImageServer,
) -> None:
    error = await refusal(
        f"{server.url}/redirect?to=http://169.254.169.254/latest/meta-data/", policy(allow_private=True)
    )
    assert "metadata" in error.message


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_allowed_redirects_are_followed(server: ImageServer, status: int) -> None:
    image = await load_image(ImageRef(f"{server.url}/redirect?status={status}&to=/image.png", WHERE), policy())
    assert image.size == (8, 8)
    assert server.requests == ["/redirect", "/image.png"]


async def test_redirects_are_limited(server: ImageServer) -> None:
    error = await refusal(f"{server.url}/loop", policy())
    assert "redirected more than 3 times" in error.message
    assert server.requests == ["/loop"] * 4


async def test_a_redirect_to_another_scheme_is_refused(server: ImageServer) -> None:
    error = await refusal(f"{server.url}/redirect?to=file:///etc/passwd", policy())
    assert "scheme 'file'" in error.message


async def test_a_redirect_off_the_allowed_domains_is_refused(server: ImageServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    url = f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/image.png"
    error = await refusal(url, policy(allowed_domains=("localhost",), allow_private=True))
    assert "not in this server's allowed image domains" in error.message
    assert server.requests == ["/redirect"]


@pytest.mark.parametrize("declared", ["yes", "no"])
async def test_a_body_past_the_byte_limit_is_cut_off(server: ImageServer, declared: str) -> None:
    images = policy(max_bytes=1024 * 1024)
    error = await refusal(f"{server.url}/big?declared={declared}", images)
    assert error.code == "image_too_large"
    # The server could write into the socket's buffers before the client hung up, never the whole 50 MB.
    assert server.bytes_sent < BIG_BYTES // 2


async def test_a_slow_drip_body_hits_the_timeout(server: ImageServer) -> None:
    error = await refusal(f"{server.url}/drip", policy(timeout=0.5))
    assert "took longer than 0.5 s" in error.message


async def test_cancelling_a_fetch_closes_its_connection(server: ImageServer) -> None:
    with trio.move_on_after(0.5) as scope:
        await load_image(ImageRef(f"{server.url}/drip", WHERE), policy())
    assert scope.cancelled_caught
    # The server notices the closed connection at its next write (every 50 ms); a thread, not a task, so
    # polled (generous deadline: the assertion is that it ends, not how soon).
    with trio.fail_after(10):
        while server.active:  # noqa: ASYNC110 (the state changes in another thread)
            await trio.sleep(0.02)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/text", "not an image this server decodes"),
        ("/missing", "HTTP status 404"),
        ("/gzip", "content-encoding 'deflate'"),
    ],
)
async def test_bad_answers_are_refused(server: ImageServer, path: str, expected: str) -> None:
    error = await refusal(server.url + path, policy())
    assert expected in error.message


async def test_an_unreachable_host_is_a_400(server: ImageServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    with trio.socket.socket() as probe:  # a port nothing listens on: bound, never listening
        await probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
        error = await refusal(f"http://127.0.0.1:{closed}/image.png", policy())
    assert "could not be fetched" in error.message
    assert port != str(closed)


async def test_remote_images_off_refuses_every_url(server: ImageServer) -> None:
    error = await refusal(server.url + "/image.png", policy(enabled=False))
    assert "remote images are off" in error.message
    assert server.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "/relative.png", "gopher://x"])
async def test_unsupported_schemes_are_refused(url: str) -> None:
    error = await refusal(url, policy())
    assert "is not supported" in error.message


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12::1", "a private address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("100.64.0.1", "not a public address"),  # carrier-grade NAT
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a private address"),  # reserved, and Python counts it private too
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("::ffff:127.0.0.1", "a loopback address"),  # IPv4-mapped
        ("2002:7f00:1::", "a loopback address"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", "a private address"),  # NAT64 of 10.0.0.1
    ],
)
def test_the_address_policy(address: str, refused: str | None) -> None:
    assert refused_address(ipaddress.ip_address(address)) == refused


def test_allowing_private_addresses_never_allows_metadata() -> None:
    assert refused_address(ipaddress.ip_address("10.0.0.1"), allow_private=True) is None
    assert refused_address(ipaddress.ip_address("169.254.169.254"), allow_private=True) == "a cloud metadata address"
    networks = (ipaddress.ip_network("169.254.0.0/16"),)
    assert refused_address(ipaddress.ip_address("169.254.169.254"), allowed_networks=networks) is not None
