"""One downloader for media URLs that someone else chose, and the bounded cache it writes into.

A task's URL comes from whoever can create tasks, and a redirect from whoever runs the host it names. So a
download here is an untrusted operation, bounded in every direction:

* **time**: a connect timeout and a read timeout per socket operation, and one deadline for the whole
  download (name resolution, every redirect, headers and body): each socket read waits at most until the
  deadline, so a server that trickles one byte a second is cut off when it passes;
* **size**: a byte cap, checked against ``Content-Length`` and again while streaming (``Accept-Encoding:
  identity``: nothing is decompressed on the way in); the body streams to a temporary file in the cache
  folder, renamed into place only when complete;
* **where**: http(s) only, no user:password in the URL; outside Label Studio's origin the host must be on the
  allow-list (when one is set) and every address it resolves to must be public (not loopback, private,
  link-local, shared, reserved, multicast or unspecified, IPv4 and IPv6, IPv4 inside IPv6 included) unless it
  lies in a configured network. The name is resolved once per connection and the connection goes to the
  address that was checked (a second lookup could answer differently: DNS rebinding). Every redirect hop is
  checked again;
* **credentials**: the caller's headers go only to Label Studio's exact origin, and never again once a
  redirect has left it.

The connections are made by :class:`_GuardedBackend`, an ``httpcore`` network backend (httpx's own transport
layer), so the check and the connection are one step. Failures are :class:`DownloadError` with the full
reason, for the log; what the client is told is decided by the caller (``backend/media.py``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx

log = logging.getLogger("surgenet_assist.backend")

USER_AGENT = "surgenet-assist-media"
CHUNK = 64 * 1024
#: resolves ``(host, port, timeout_s)`` to IP address strings; the system resolver unless a test injects one
Resolver = Callable[[str, int, float], list[str]]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_DNS_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="media-dns")


class DownloadError(Exception):
    """A download that failed or was refused; ``reason`` is for the log (it may name addresses and ports)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class CredentialsRefused(DownloadError):
    """Label Studio answered 401 to a download that carried the backend's token."""


@dataclass(frozen=True)
class DownloadPolicy:
    """The bounds of one download and the address rule (see the module docstring)."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    deadline_s: float = 30.0
    max_bytes: int = 1 << 30
    hosts: tuple[str, ...] = ()  # allow-list (exact names, or "*.example.org"); empty: any host
    private_networks: tuple[str, ...] = ()  # CIDRs allowed although private/reserved
    max_redirects: int = 5
    networks: tuple[_Net, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.private_networks)
        object.__setattr__(self, "networks", nets)

    def host_allowed(self, host: str) -> bool:
        """Whether the allow-list admits ``host`` (always, without one)."""
        if not self.hosts:
            return True
        host = host.lower().rstrip(".")
        for entry in self.hosts:
            entry = entry.lower().rstrip(".")
            if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
                return True
        return False


def refused_address(ip: _IP, allowed: Iterable[_Net] = ()) -> str | None:
    """Why the backend must not connect to ``ip`` for a media host, or None when it may: only public unicast
    addresses pass, unless ``ip`` lies in one of the ``allowed`` networks. IPv4 carried inside IPv6
    (IPv4-mapped, 6to4, Teredo) is judged as the IPv4 address it carries."""
    inner: list[_IP] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = [ip.ipv4_mapped]
        elif ip.sixtofour is not None:
            inner.append(ip.sixtofour)
        elif ip.teredo is not None:
            inner.extend(ip.teredo)
    for addr in inner:
        if any(addr in net for net in allowed):
            continue
        for what in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(addr, f"is_{what}"):
                return f"{addr} is a {what.replace('_', '-')} address"
        if not addr.is_global:
            return f"{addr} is not a public address"
    return None


def system_resolver(host: str, port: int, timeout_s: float) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order, within ``timeout_s`` (the system call has
    no timeout of its own, so it runs on a small pool of its own threads)."""
    future = _DNS_POOL.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(timeout_s, 0.01))
    except FutureTimeout:
        raise DownloadError(f"resolving {host} took longer than {timeout_s:.1f} s") from None
    except OSError as exc:
        raise DownloadError(f"cannot resolve {host}: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# ---------------------------------------------------------------------------------------------------------
# connections: resolve once, check, connect to the checked address; every read bounded by the deadline
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Attempt:
    """What the connections of one download may do (held in a thread-local while it runs)."""

    deadline: float
    exempt: bool  # Label Studio's own origin: its address is not checked
    policy: DownloadPolicy

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def clip(self, timeout: float | None) -> float:
        """``timeout`` shortened to the time left; a passed deadline raises a read timeout."""
        left = self.remaining()
        if left <= 0:
            raise httpcore.ReadTimeout("the download's deadline passed")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the download's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, attempt: Callable[[], _Attempt]) -> None:
        self._inner = inner
        self._attempt = attempt

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._attempt().clip(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._attempt().clip(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, self._attempt().clip(timeout))
        return _DeadlineStream(tls, self._attempt)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, except that ``connect_tcp`` resolves the name itself, refuses addresses the
    rule forbids, and connects to the address it checked."""

    def __init__(self, resolver: Resolver, attempt: Callable[[], _Attempt]) -> None:
        self._inner = httpcore.SyncBackend()
        self._resolver = resolver
        self._attempt = attempt

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        attempt = self._attempt()
        try:
            addresses = [str(ipaddress.ip_address(host))]  # a literal address: nothing to resolve
        except ValueError:
            addresses = self._resolver(host, port, attempt.clip(timeout))
        if not addresses:
            raise DownloadError(f"{host} resolves to no address")
        if not attempt.exempt:
            for address in addresses:
                reason = refused_address(ipaddress.ip_address(address), attempt.policy.networks)
                if reason:
                    raise DownloadError(f"refused {host}: {reason}, not in the allowed private networks")
        last: Exception | None = None
        for address in addresses:
            try:
                stream = self._inner.connect_tcp(
                    address, port, attempt.clip(timeout), local_address, socket_options
                )
                return _DeadlineStream(stream, self._attempt)
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise DownloadError("unix sockets are not media hosts")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Downloader:
    """``download(url, target)``: one bounded download into ``target`` (atomic), following checked redirects.

    Thread-safe; connections are pooled per origin (a pooled connection goes to the address checked when it
    was opened)."""

    def __init__(self, policy: DownloadPolicy, resolver: Resolver | None = None) -> None:
        self.policy = policy
        self._local = threading.local()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=64,
            max_keepalive_connections=8,
            keepalive_expiry=30.0,
            network_backend=_GuardedBackend(resolver or system_resolver, self._attempt),
        )

    def _attempt(self) -> _Attempt:
        attempt = getattr(self._local, "attempt", None)
        if attempt is None:  # a connection outside download(): a programming error, never a user's
            raise RuntimeError("media connection opened outside Downloader.download")
        return attempt

    @contextlib.contextmanager
    def _during(self, attempt: _Attempt) -> Iterator[None]:
        self._local.attempt = attempt
        try:
            yield
        finally:
            self._local.attempt = None

    def download(
        self,
        url: str,
        target: Path,
        *,
        label_studio: Any = None,
        label_studio_private_ok: bool = True,
    ) -> None:
        """Fetch ``url`` into ``target``. ``label_studio`` (a ``LabelStudioAPI``) is the one origin that gets
        its ``headers()`` (only while every hop so far stayed on it) and whose address is not checked
        (``label_studio_private_ok``). Raises :class:`DownloadError` (:class:`CredentialsRefused` for a 401
        from Label Studio to a request carrying its token) or whatever ``headers()`` raises."""
        p = self.policy
        deadline = time.monotonic() + p.deadline_s
        credentials = label_studio is not None and label_studio.owns(url)
        current = url
        for _hop in range(p.max_redirects + 1):
            at_ls = label_studio is not None and label_studio.owns(current)
            credentials = credentials and at_ls  # once a redirect leaves Label Studio, never again
            u = _checked_url(current)
            if not at_ls and not p.host_allowed(u.host):
                raise DownloadError(f"refused {u.host}: not on SURGENET_ASSIST_MEDIA_HOSTS")
            headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
            if credentials:
                headers.update(label_studio.headers())
            attempt = _Attempt(deadline, exempt=at_ls and label_studio_private_ok, policy=p)
            location = self._get(u, headers, attempt, target, credentials)
            if location is None:
                return
            current = str(u.join(location))
        raise DownloadError(f"more than {p.max_redirects} redirects")

    def _get(
        self, u: httpx.URL, headers: dict[str, str], attempt: _Attempt, target: Path, credentials: bool
    ) -> str | None:
        """One hop: None when ``target`` was written, else the redirect's ``Location``."""
        p = self.policy
        left = attempt.remaining()
        if left <= 0:
            raise DownloadError(f"the deadline of {p.deadline_s:g} s passed")
        timeouts = {
            "connect": min(p.connect_timeout_s, left),
            "read": min(p.read_timeout_s, left),
            "write": min(p.read_timeout_s, left),
            "pool": min(p.connect_timeout_s, left),
        }
        core_url = httpcore.URL(scheme=u.raw_scheme, host=u.raw_host, port=u.port, target=u.raw_path)
        written = 0
        with self._during(attempt):
            try:
                with self._pool.stream(
                    "GET", core_url, headers=headers, extensions={"timeout": timeouts}
                ) as resp:
                    status = resp.status
                    if status in (301, 302, 303, 307, 308):
                        location = _header(resp.headers, b"location")
                        if not location:
                            raise DownloadError(f"HTTP {status} without a Location", status)
                        return location
                    if status == 401 and credentials:
                        raise CredentialsRefused("HTTP 401 with the backend's token", status)
                    if status != 200:
                        raise DownloadError(f"HTTP {status}", status)
                    declared = _header(resp.headers, b"content-length")
                    if declared and declared.isdigit() and int(declared) > p.max_bytes:
                        raise DownloadError(f"{declared} bytes announced, over the cap of {p.max_bytes}")
                    with _atomic_file(target) as out:
                        for chunk in resp.iter_stream():
                            written += len(chunk)
                            if written > p.max_bytes:
                                raise DownloadError(f"more than the cap of {p.max_bytes} bytes")
                            out.write(chunk)
                    return None
            except httpcore.TimeoutException as exc:
                if attempt.remaining() <= 0:
                    raise DownloadError(
                        f"the deadline of {p.deadline_s:g} s passed ({written} bytes received)"
                    ) from None
                raise DownloadError(f"{type(exc).__name__} after {written} bytes") from None
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
                raise DownloadError(f"{type(exc).__name__}: {exc}"[:300]) from None


def _checked_url(url: str) -> httpx.URL:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise DownloadError(f"not a URL: {exc}") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise DownloadError(f"scheme {u.scheme!r} is not http or https")
    if u.userinfo:
        raise DownloadError("a user name or password inside the URL is refused")
    return u


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[Any]:
    """A temporary file beside ``target``, renamed onto it when the block completes, removed when it fails:
    a reader never sees half a file, and a failed download leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------------
MARKER = ".surgenet-media-cache"
STALE_PART_S = 3600.0


class MediaCache:
    """Downloaded media in one folder, bounded by bytes: after each new file the least recently used files
    (by modification time, touched on every hit) are deleted until the folder is within ``max_bytes``.

    Several processes (the server's workers) may share the folder: files appear by atomic rename, and a file
    another process deleted is simply fetched again."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MARKER).touch()

    def entry(self, key: str, suffix: str = "") -> Path:
        """Where the file for ``key`` lives (a hash of the key: no caller's text reaches the file system)."""
        import hashlib

        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        clean = "".join(ch for ch in suffix.lower() if ch.isalnum())[:8]
        return self.folder / (f"{digest}.{clean}" if clean else digest)

    def hit(self, path: Path) -> bool:
        """Whether ``path`` is cached; marks it as used now."""
        try:
            os.utime(path)
        except OSError:
            return False
        return path.is_file()

    def entries(self) -> list[os.DirEntry]:
        with os.scandir(self.folder) as it:
            return [e for e in it if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]

    def total_bytes(self) -> int:
        total = 0
        for e in self.entries():
            with contextlib.suppress(OSError):
                total += e.stat(follow_symlinks=False).st_size
        return total

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used files (never ``keep``) until the folder holds at most ``max_bytes``;
        also temporary files of downloads that died an hour ago. Returns the bytes freed."""
        freed = 0
        with self._lock:
            sized = []
            for e in self.entries():
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    sized.append((st.st_mtime, st.st_size, Path(e.path)))
            total = sum(size for _, size, _ in sized)
            for _mtime, size, path in sorted(sized, key=lambda item: item[0]):
                if total <= self.max_bytes:
                    break
                if keep is not None and path == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    freed += size
                total -= size
            now = time.time()
            with os.scandir(self.folder) as it:
                for e in it:
                    if e.name.startswith(".part-"):
                        with contextlib.suppress(OSError):
                            if now - e.stat(follow_symlinks=False).st_mtime > STALE_PART_S:
                                os.unlink(e.path)
        return freed


def discard_if_cached(path: Path) -> bool:
    """Delete ``path`` when it is a file of a media cache (a file that failed to decode or was refused must
    not be served again); files anywhere else (local storage, a user's folder) are never touched."""
    path = Path(path)
    if not (path.parent / MARKER).is_file() or path.name.startswith("."):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False
