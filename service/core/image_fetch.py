"""Image URLs fetched by the gateway, only from the hosts `--image-url-allow` names.

Off by default: a gateway that fetches any URL a caller names is a server-side request
forgery tool (cloud metadata at 169.254.169.254, admin ports on loopback, the cluster's
private services). So, for every URL and every redirect hop:

- http and https only; the host must match the allow list (an entry `img.example.com`
  names that host, `.example.com` matches example.com and any host under it);
- the host's addresses are resolved here and each is checked: private, loopback,
  link-local, multicast, reserved and unspecified addresses are refused unless the host
  is named exactly in the list (an operator who writes `127.0.0.1` or `minio.internal`
  means it; a suffix or a DNS answer does not);
- the connection goes to the addresses that were checked (a resolver pinned to them), so
  a second DNS answer cannot swap in another address between check and connect (DNS
  rebinding);
- redirects are followed by hand, each hop checked as above, at most `max_redirects`;
- the body is read as sent (`Accept-Encoding: identity`, nothing inflated here) in chunks
  and refused the moment it passes `max_bytes`, each chunk
  taken from the caller's request-byte budget (`take`) as it arrives;
- connect and total timeouts, the total within what the caller has left.

aiohttp does the HTTP (async: the event loop serves others while a fetch waits).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from service.errors import InvalidInput, RequestTooLarge

#: Redirect hops followed for one URL (browsers allow 20; an image needs one or two).
MAX_REDIRECTS = 5
#: Read size; the cap is checked per chunk, so at most one chunk past it is read.
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def host_allowed(host: str, allow: tuple[str, ...]) -> tuple[bool, bool]:
    """(allowed, named exactly) for `host` under the allow list's entries."""
    host = host.lower().rstrip(".")
    named = any(entry.lower().rstrip(".") == host for entry in allow if not entry.startswith("."))
    if named:
        return True, True
    suffixes = [e.lower().rstrip(".") for e in allow if e.startswith(".")]
    return any(host.endswith(s) or host == s[1:] for s in suffixes), False


def public_address(address: str) -> bool:
    """Whether `address` is a routable public one (not private, loopback, link-local, ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


class _PinnedResolver(AbstractResolver):
    """Answers aiohttp with the addresses `ImageFetcher` checked, never asks DNS again."""

    def __init__(self) -> None:
        self.pinned: dict[str, list[ResolveResult]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            return self.pinned[host]
        except KeyError:  # a host this fetch did not check: never connect to it
            raise OSError(f"{host} was not checked against --image-url-allow") from None

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class FetchOptions:
    """`--image-url-allow`, `--max-image-bytes`, `--image-url-timeout-s`."""

    allow: tuple[str, ...]
    max_bytes: int
    timeout_s: float
    max_redirects: int = MAX_REDIRECTS


class ImageFetcher:
    """Fetches image URLs under `FetchOptions`; every refusal is a 400 (413 past the cap)
    naming the input and what to do instead."""

    def __init__(self, options: FetchOptions) -> None:
        self.options = options

    @property
    def enabled(self) -> bool:
        return bool(self.options.allow)

    async def fetch(
        self,
        url: str,
        take: Callable[[int], None],
        *,
        field: str,
        index: int | None,
        timeout_s: float | None = None,
    ) -> bytes:
        """The body at `url` (redirects followed within the rules), each chunk passed to
        `take` (the request-byte budget) before it is kept. `timeout_s`: what the caller
        has left; the fetch gets the lesser of it and `--image-url-timeout-s`."""

        def refuse(why: str) -> InvalidInput:
            return InvalidInput(why, field=field, index=index)

        if not self.enabled:
            raise refuse(
                "image URLs are not fetched by this server: start it with --image-url-allow "
                "HOSTS (CLIP_IMAGE_URL_ALLOW) to allow some, or send the image's bytes "
                '(a data:image/...;base64, URI, {"image": "<base64>"})'
            )
        limit = (
            self.options.timeout_s if timeout_s is None else min(timeout_s, self.options.timeout_s)
        )
        resolver = _PinnedResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=1)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(limit, 5.0))
        try:
            async with (
                # Bodies as sent: a gzip body is not inflated here (a small bomb would
                # pass the byte cap only after it was inflated in one piece).
                aiohttp.ClientSession(
                    connector=connector,
                    timeout=timeout,
                    auto_decompress=False,
                    headers={"Accept-Encoding": "identity"},
                ) as session,
                asyncio.timeout(limit),
            ):
                return await self._follow(session, resolver, url, take, refuse)
        except TimeoutError:
            raise refuse(
                f"fetching {_short(url)} did not finish within {limit:g} s "
                "(--image-url-timeout-s, or the call's deadline); send the image's bytes"
            ) from None
        except aiohttp.ClientError as exc:
            raise refuse(f"fetching {_short(url)} failed: {exc}"[:300]) from None

    async def _follow(
        self,
        session: aiohttp.ClientSession,
        resolver: _PinnedResolver,
        url: str,
        take: Callable[[int], None],
        refuse: Callable[[str], InvalidInput],
    ) -> bytes:
        for _hop in range(self.options.max_redirects + 1):
            await self._check(url, resolver, refuse)
            async with session.get(url, allow_redirects=False) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise refuse(f"{_short(url)} redirected without a Location")
                    url = str(response.url.join(URL(location)))
                    continue
                if response.status != 200:
                    raise refuse(f"fetching {_short(url)} answered HTTP {response.status}")
                return await self._read(response, url, take)
        raise refuse(
            f"{_short(url)} redirected more than {self.options.max_redirects} times; "
            "send the final URL or the bytes"
        )

    async def _check(
        self, url: str, resolver: _PinnedResolver, refuse: Callable[[str], InvalidInput]
    ) -> None:
        """Refuse `url` unless its scheme, host and every address of the host pass; pin
        the checked addresses for the connection."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise refuse(f"{_short(url)} is not an http(s) URL")
        host = parts.hostname
        allowed, named = host_allowed(host, self.options.allow)
        if not allowed:
            raise refuse(
                f"host {host[:100]!r} is not in --image-url-allow "
                f"({', '.join(self.options.allow)}); send the image's bytes instead"
            )
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        if literal:
            addresses = [host]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                raise refuse(f"host {host[:100]!r} does not resolve: {exc}") from None
            addresses = [str(info[4][0]) for info in infos]
            resolver.pinned[host] = [
                ResolveResult(
                    hostname=host,
                    host=str(info[4][0]),
                    port=port,
                    family=info[0],
                    proto=info[2],
                    flags=socket.AI_NUMERICHOST,
                )
                for info in infos
            ]
        if not named:
            for address in addresses:
                if not public_address(address):
                    raise refuse(
                        f"host {host[:100]!r} is at {address}, a private, loopback or "
                        "link-local address; such a host is fetched only when "
                        "--image-url-allow names it exactly"
                    )

    async def _read(
        self, response: aiohttp.ClientResponse, url: str, take: Callable[[int], None]
    ) -> bytes:
        cap = self.options.max_bytes
        too_large = RequestTooLarge(
            f"the image at {_short(url)} is over the limit of {cap} bytes (--max-image-bytes)"
        )
        if response.content_length is not None and response.content_length > cap:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise too_large
            take(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)


def _short(url: str) -> str:
    return repr(url[:120] + ("..." if len(url) > 120 else ""))
