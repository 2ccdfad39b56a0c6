"""Remote images: ``http(s)`` URLs fetched for a request, with the server-side request forgery checks.

A URL in a request makes the server open a connection on the client's behalf, from inside the network
the server sits in. So each hop of a fetch (the URL, then every redirect, followed here one by one, never
by the client library) is checked before anything is sent:

1. the scheme is ``http`` or ``https``; the host is on the allow list, if there is one;
2. the host is resolved (in a worker thread, trio's resolver) and *every* address it resolves to is
   checked: loopback, private, link-local, carrier-grade NAT, multicast, reserved and unspecified
   addresses are refused unless private addresses are allowed, and cloud metadata addresses always are
   (an IPv4 address inside IPv6 — mapped, 6to4, NAT64 — is checked as the IPv4 address it carries);
3. the connection goes to the address that was checked, not to the name again (which a second lookup
   could answer differently: DNS rebinding): the URL names the IP, the ``Host`` header the name, and for
   ``https`` the ``sni_hostname`` extension makes TLS send and verify the name.

The body is streamed and reading stops past the byte limit; the whole fetch, redirects included, runs
under one timeout. A fetch runs in the request's own scope, so a disconnect or deadline cancels it and
the client (one per fetch, no pool shared between requests) closes its connection on the way out.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio

from trioserve.errors import InvalidRequest

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS over IPv6; Alibaba, in the
# carrier-grade NAT range; Oracle): refused even where private addresses are allowed, since they hand out
# the machine's cloud credentials.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """What a remote image fetch may do.

    Args:
        enabled: remote URLs are fetched at all (off: only ``data:`` URLs are taken).
        max_bytes: the largest body read; reading stops past it.
        timeout: seconds the whole fetch may take, redirects included.
        allowed_domains: hosts that may be fetched (a name also allows its subdomains); empty: any host
            whose addresses pass the address check.
        allow_private: loopback, private, link-local and other non-public addresses may be fetched
            (cloud metadata addresses never are).
        allowed_networks: networks whose addresses may be fetched although they are not public (an
            internal image store), cloud metadata addresses still excepted.
        ssl_context: the certificates ``https`` servers are checked against (None: certifi's, as httpx).
    """

    enabled: bool = True
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0
    allowed_domains: tuple[str, ...] = ()
    allow_private: bool = False
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ssl_context: ssl.SSLContext | None = None


def refused_address(
    address: IPAddress,
    *,
    allow_private: bool = False,
    allowed_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str | None:
    """Why ``address`` may not be fetched from, or None if it may."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private or any(address in network for network in allowed_networks):
        return None
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return refused_address(embedded, allow_private=False)
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),  # carrier-grade NAT, documentation ranges...
    )
    return next((reason for refused, reason in checks if refused), None)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches (mapped, 6to4, NAT64), if it carries one."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def host_allowed(host: str, allowed_domains: Sequence[str]) -> bool:
    """Whether ``host`` is on the allow list (an entry allows itself and its subdomains; empty: any)."""
    if not allowed_domains:
        return True
    host = host.lower().rstrip(".")
    return any(host == entry or host.endswith("." + entry) for entry in (d.lower().strip(".") for d in allowed_domains))


async def fetch_image_bytes(url: str, policy: FetchPolicy, where: str) -> bytes:
    """The body of the image at ``url``, after the checks in the module docstring, hop by hop.

    Args:
        url: an ``http`` or ``https`` URL from the request.
        policy: the limits and the address policy.
        where: the content part the URL came from (``messages[0].content[1]``), for errors.

    Raises:
        InvalidRequest: remote fetching is off; the URL is malformed, not allowed or resolves to a refused
            address; the server is unreachable, answers an error status, redirects too often, sends more
            than ``max_bytes``, or takes longer than ``timeout``. ``param`` is ``where``.
    """
    if not policy.enabled:
        raise _refusal(
            where, "image URLs are not fetched by this server (remote images are off); send the image as a data: URL"
        )
    try:
        current = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _refusal(where, f"the image URL is not valid: {exc}") from None
    with trio.move_on_after(policy.timeout):
        async with httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=policy.timeout, verify=policy.ssl_context or _default_tls()
        ) as client:
            for _ in range(MAX_REDIRECTS + 1):
                requests = await _checked_requests(client, current, policy, where)
                try:
                    async with _streamed(client, requests) as response:
                        if response.status_code in _REDIRECTS and "location" in response.headers:
                            current = _redirect_target(current, response.headers["location"], where)
                            continue
                        if response.status_code != 200:
                            raise _refusal(where, f"fetching the image URL returned HTTP status {response.status_code}")
                        return await _read_limited(response, policy.max_bytes, where)
                except httpx.HTTPError as exc:
                    raise _refusal(where, f"the image URL could not be fetched ({_reason(exc)})") from None
            raise _refusal(where, f"the image URL redirected more than {MAX_REDIRECTS} times")
    raise _refusal(where, f"fetching the image URL took longer than {policy.timeout:g} s")


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """certifi's certificates, loaded once: a client made with ``verify=True`` loads them again, 50 ms on
    the event loop per fetch."""
    return httpx.create_ssl_context()


async def _checked_requests(
    client: httpx.AsyncClient, url: httpx.URL, policy: FetchPolicy, where: str
) -> list[httpx.Request]:
    """A GET to each checked address of ``url``'s host (tried in order), naming the host in ``Host`` and TLS."""
    if url.scheme not in ("http", "https"):
        raise _refusal(where, f"image URL scheme {url.scheme!r} is not supported (http, https and data are)")
    host = url.host
    if not host:
        raise _refusal(where, "the image URL has no host")
    if not host_allowed(host, policy.allowed_domains):
        raise _refusal(where, f"image host {host!r} is not in this server's allowed image domains")
    port = url.port or (443 if url.scheme == "https" else 80)
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": host} if url.scheme == "https" and not _is_ip(host) else {}
    return [
        client.build_request("GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions)
        for address in await _resolve(host, port, policy, where)
    ]


async def _resolve(host: str, port: int, policy: FetchPolicy, where: str) -> list[IPAddress]:
    """The addresses to connect to, in the resolver's order, once every one of them has passed the check
    (a name that also resolves to a refused address is refused: which one answers is not ours to choose)."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _refusal(where, f"the image host {host!r} could not be resolved ({exc})") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise _refusal(where, f"the image host {host!r} has no address")
    for address in addresses:
        reason = refused_address(address, allow_private=policy.allow_private, allowed_networks=policy.allowed_networks)
        if reason is not None:
            raise _refusal(where, f"the image URL's host {host!r} resolves to {address}, {reason}: refused")
    return list(dict.fromkeys(addresses))


@asynccontextmanager
async def _streamed(client: httpx.AsyncClient, requests: Sequence[httpx.Request]) -> AsyncIterator[httpx.Response]:
    """The response of the first request whose address takes the connection (an IPv6 address of a host
    whose IPv6 is down, then its IPv4 one), closed on the way out."""
    for request in requests[:-1]:
        try:
            response = await client.send(request, stream=True)
            break
        except httpx.ConnectError:
            continue
    else:
        response = await client.send(requests[-1], stream=True)
    try:
        yield response
    finally:
        await response.aclose()


def _redirect_target(current: httpx.URL, location: str, where: str) -> httpx.URL:
    try:
        return current.join(location)
    except httpx.InvalidURL as exc:
        raise _refusal(where, f"the image URL redirected to an invalid URL: {exc}") from None


async def _read_limited(response: httpx.Response, max_bytes: int, where: str) -> bytes:
    """The body, raw: ``identity`` was asked for, so a compressed body (which could expand a thousandfold
    past the limit within one chunk) is refused rather than decoded."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _refusal(where, f"the image URL answered with content-encoding {encoding!r}; identity was asked for")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(where, max_bytes)
    body = bytearray()
    async for piece in response.aiter_raw():
        body += piece
        if len(body) > max_bytes:
            raise _too_large(where, max_bytes)
    return bytes(body)


def _reason(exc: BaseException) -> str:
    """What went wrong, for the client: httpx's trio backend can leave its own message empty (a failed TLS
    check), so the first message down the chain of causes says it."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or str(cause):
            break
        cause = cause.__cause__ or cause.__context__
    detail = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else ""
    return f"{type(exc).__name__} ({detail})" if detail and cause is not exc else detail or type(exc).__name__


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _too_large(where: str, max_bytes: int) -> InvalidRequest:
    return InvalidRequest(f"{where}: the image is larger than {max_bytes} bytes", param=where, code="image_too_large")


def _refusal(where: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {message}", param=where, code="invalid_image_url")
