"""Task media fetched as an untrusted operation, against real sockets: a hostile HTTP server (threads on
127.0.0.1) trickles bytes, sends huge bodies, redirects to private addresses and to other origins, and
answers 307 to the token refresh; a stand-in for Label Studio's token rules decides which token works.

Nothing about the network is mocked. Two things are chosen by the test instead of the machine: the name
resolver (``resolver=``; hosts like ``media.test`` resolve to the addresses a test names, which is also how a
DNS-rebinding answer is staged) and, since every server here listens on loopback, which private networks are
allowed (``private_networks``), exactly as an operator would set ``SURGENET_ASSIST_MEDIA_PRIVATE_NETWORKS``.
The same routes against a real Label Studio: ``tests/integration/test_label_studio_media.py``.
"""

from __future__ import annotations

import base64
import json
import logging
import resource
import struct
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import jwt
import numpy as np
import pytest
from test_backend_interactive import body as click_body
from test_backend_interactive import keypoint

from surgenet_assist.backend import ls_api as ls_api_module
from surgenet_assist.backend.app import BackendSettings, create_app
from surgenet_assist.backend.labeling_configs import image_config
from surgenet_assist.backend.ls_api import LabelStudioAPI, LabelStudioToolError, TokenProblem
from surgenet_assist.backend.media import MediaError, MediaFetcher, MediaPolicy, load_image
from surgenet_assist.backend.media_download import MARKER, DownloadPolicy, refused_address
from surgenet_assist.core.errors import MediaTooLarge, UsageError
from surgenet_assist.core.media_limits import MediaLimits, check_media_file

LEGACY = "0123456789abcdef0123456789abcdef01234567"
SECRET = "a-test-secret-long-enough-for-hs256-keys"
H, W = 64, 96


# ---------------------------------------------------------------------------------------------------------
# a hostile server
# ---------------------------------------------------------------------------------------------------------
class Hostile:
    """A threaded HTTP/1.1 server on 127.0.0.1. ``routes[path](handler)`` answers (path without query);
    every request is recorded as ``(path, headers, body)``."""

    def __init__(self) -> None:
        self.routes: dict = {}
        self.seen: list[tuple[str, dict, bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                owner.seen.append((self.path, dict(self.headers), body))
                route = owner.routes.get(path)
                try:
                    if route is None:
                        send(self, 404, b"not found")
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = _any  # noqa: N815 - http.server's naming

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.seen]

    def auth_of(self, path: str) -> list[str | None]:
        return [h.get("Authorization") for p, h, _ in self.seen if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(h, status: int, body: bytes = b"", **headers) -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body)))
    for key, value in headers.items():
        h.send_header(key.replace("_", "-"), value)
    h.end_headers()
    h.wfile.write(body)


def serve(body: bytes, status: int = 200):
    return lambda h: send(h, status, body)


def redirect(location: str, status: int = 302):
    return lambda h: send(h, status, b"", Location=location)


@pytest.fixture
def hostile():
    server = Hostile()
    yield server
    server.close()


@pytest.fixture
def other():
    """A second origin (another port): where redirects try to carry credentials."""
    server = Hostile()
    yield server
    server.close()


def png(height: int = H, width: int = W, seed: int | None = 0) -> bytes:
    """A PNG of noise (``seed``), or of one flat colour (``seed=None``: the smallest file of that size)."""
    shape = (height, width, 3)
    rng = np.random.default_rng(seed)
    pixels = np.zeros(shape, np.uint8) if seed is None else rng.integers(0, 255, shape)
    ok, buf = cv2.imencode(".png", pixels.astype(np.uint8))
    assert ok
    return buf.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces ``width``×``height`` and whose pixel data is garbage: decoding it could only
    fail, so a refusal naming the size proves the header was read first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def resolver_of(table: dict[str, list[str]], calls: list | None = None):
    """Name resolution from a table (a name it lacks does not exist)."""

    def resolve(host: str, port: int, timeout: float) -> list[str]:
        if calls is not None:
            calls.append(host)
        from surgenet_assist.backend.media_download import DownloadError

        if host not in table:
            raise DownloadError(f"cannot resolve {host}")
        answer = table[host]
        return answer.pop(0) if answer and isinstance(answer[0], list) else answer

    return resolve


def fetcher(
    tmp_path: Path, api=None, resolver=None, cache_bytes=64 << 20, root=None, **download
) -> MediaFetcher:
    policy = MediaPolicy(
        download=DownloadPolicy(**{"deadline_s": 10.0, **download}),
        cache_dir=str(tmp_path / "cache"),
        cache_bytes=cache_bytes,
        local_files_root=str(root) if root else None,
    )
    return MediaFetcher(api, policy, resolver=resolver)


LOOPBACK = ("127.0.0.0/8",)  # the hostile servers' own network, allowed as an operator would


def cached_files(f: MediaFetcher) -> list[str]:
    return sorted(p.name for p in f.cache.folder.iterdir() if not p.name.startswith(".") or p.name == MARKER)


# ---------------------------------------------------------------------------------------------------------
# time and size
# ---------------------------------------------------------------------------------------------------------
def _trickle_body(h) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    for _ in range(1000):
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(1.0)


def _trickle_headers(h) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Slow: " + b"y" * 1000:
        h.wfile.write(bytes([byte]))
        h.wfile.flush()
        time.sleep(1.0)


@pytest.mark.parametrize("route", [_trickle_body, _trickle_headers], ids=["body", "headers"])
def test_a_server_trickling_one_byte_a_second_is_cut_off_at_the_deadline(tmp_path, hostile, route):
    hostile.routes["/slow.png"] = route
    f = fetcher(tmp_path, deadline_s=2.0, read_timeout_s=30.0, private_networks=LOOPBACK)
    t0 = time.monotonic()
    with pytest.raises(MediaError) as err:
        f(hostile.url("/slow.png"))
    elapsed = time.monotonic() - t0
    assert "the deadline of 2 s passed" in err.value.message
    assert elapsed < 30, elapsed  # before: 2 minutes; a read timeout alone never fires at 1 byte/s
    assert cached_files(f) == [MARKER]  # no partial file, no temporary left behind
    assert not list(f.cache.folder.glob(".part-*"))


def _endless(h) -> None:
    """A body without a length, close-delimited, that never ends on its own."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    block = b"\0" * 65536
    while True:
        h.wfile.write(block)


def test_huge_bodies_are_refused_by_the_byte_cap(tmp_path, hostile):
    hostile.routes["/announced.png"] = _announce_50mb
    hostile.routes["/endless.png"] = _endless
    f = fetcher(tmp_path, max_bytes=1 << 20, private_networks=LOOPBACK)
    with pytest.raises(MediaError) as err:
        f(hostile.url("/announced.png"))
    assert "52428800 bytes announced, over the cap of 1048576" in err.value.message
    with pytest.raises(MediaError) as err:
        f(hostile.url("/endless.png"))
    assert "more than the cap of 1048576 bytes" in err.value.message
    assert cached_files(f) == [MARKER]


def _announce_50mb(h) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(50 << 20))
    h.end_headers()
    h.wfile.write(b"\0" * 65536)  # the rest never comes: the client must not wait for it


def test_three_50_mb_responses_stream_to_disk_in_bounded_memory(tmp_path, hostile):
    block = b"\1" * (1 << 20)

    def fifty_mb(h) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(50 << 20))
        h.end_headers()
        for _ in range(50):
            h.wfile.write(block)

    for i in range(3):
        hostile.routes[f"/big{i}.bin"] = fifty_mb
    f = fetcher(tmp_path, cache_bytes=120 << 20, max_bytes=60 << 20, private_networks=LOOPBACK)
    tracemalloc.start()
    try:
        paths = [f(hostile.url(f"/big{i}.bin")) for i in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # before: each body whole in memory (50 MB each)
    assert paths[-1].stat().st_size == 50 << 20
    assert f.cache.total_bytes() <= 120 << 20  # the oldest was evicted to keep the bound


# ---------------------------------------------------------------------------------------------------------
# where: the allow-list, private addresses, redirects, DNS
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "not a public"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("2002:7f00:1::", "loopback"),  # 6to4 carrying 127.0.0.1
        ("ff02::1", "multicast"),
    ],
)
def test_private_and_special_addresses_are_refused(address, why):
    import ipaddress

    reason = refused_address(ipaddress.ip_address(address))
    assert reason is not None and why in reason
    assert refused_address(ipaddress.ip_address(address), [ipaddress.ip_network("0.0.0.0/0")]) in (
        None,
        reason,
    )


def test_public_addresses_pass_and_allowed_networks_open_private_ones():
    import ipaddress

    for public in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"):
        assert refused_address(ipaddress.ip_address(public)) is None
    assert refused_address(ipaddress.ip_address("10.1.2.3"), [ipaddress.ip_network("10.1.0.0/16")]) is None
    assert refused_address(ipaddress.ip_address("10.2.2.3"), [ipaddress.ip_network("10.1.0.0/16")])


def test_loopback_media_is_refused_by_default_and_never_contacted(tmp_path, hostile):
    hostile.routes["/a.png"] = serve(png())
    f = fetcher(tmp_path)
    for url in (hostile.url("/a.png"), hostile.url("/a.png", host="localhost")):
        with pytest.raises(MediaError) as err:
            f(url)
        assert "loopback address" in err.value.message
    assert hostile.seen == []


def test_each_redirect_hop_is_checked_again(tmp_path, hostile):
    table = {"media.test": ["127.0.0.1"], "intranet.test": ["10.0.0.5"]}
    hostile.routes["/to-metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    hostile.routes["/to-v6-loopback"] = redirect(f"http://[::1]:{hostile.port}/a.png")
    hostile.routes["/to-intranet"] = redirect(f"http://intranet.test:{hostile.port}/a.png")
    hostile.routes["/to-file"] = redirect("file:///etc/passwd")
    hostile.routes["/loop"] = redirect("/loop")
    f = fetcher(tmp_path, resolver=resolver_of(table), private_networks=("127.0.0.1/32",))
    expected = {
        "/to-metadata": "link-local address",
        "/to-v6-loopback": "loopback address",
        "/to-intranet": "10.0.0.5 is a private address",
        "/to-file": "scheme 'file' is not http or https",
        "/loop": "more than 5 redirects",
    }
    for path, reason in expected.items():
        with pytest.raises(MediaError) as err:
            f(f"http://media.test:{hostile.port}{path}")
        assert reason in err.value.message, (path, err.value.message)
    assert hostile.paths().count("/loop") == 6  # the first request and five redirects, then no more


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to(tmp_path, hostile):
    """DNS rebinding: the first answer is checked, the second would name the metadata service. ``cdn.test``
    exists only in this resolver, so a second lookup anywhere (the system's) could not have connected."""
    hostile.routes["/a.png"] = serve(png())
    calls: list[str] = []
    table = {"cdn.test": [["127.0.0.1"], ["169.254.169.254"]]}
    f = fetcher(tmp_path, resolver=resolver_of(table, calls), private_networks=("127.0.0.1/32",))
    path = f(f"http://cdn.test:{hostile.port}/a.png")
    assert path.read_bytes() == png()
    assert calls == ["cdn.test"]
    assert hostile.seen[0][1]["Host"] == f"cdn.test:{hostile.port}"  # the name, sent to the checked address


def test_a_name_with_any_forbidden_address_is_refused(tmp_path, hostile):
    table = {"mixed.test": ["127.0.0.1", "10.9.9.9"]}
    f = fetcher(tmp_path, resolver=resolver_of(table), private_networks=("127.0.0.1/32",))
    with pytest.raises(MediaError) as err:
        f(f"http://mixed.test:{hostile.port}/a.png")
    assert "10.9.9.9 is a private address" in err.value.message
    assert hostile.seen == []


def test_the_host_allow_list(tmp_path, hostile):
    hostile.routes["/a.png"] = serve(png())
    table = {"media.test": ["127.0.0.1"], "a.cdn.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]}
    f = fetcher(
        tmp_path,
        resolver=resolver_of(table),
        private_networks=LOOPBACK,
        hosts=("media.test", "*.cdn.test"),
    )
    assert f(f"http://media.test:{hostile.port}/a.png").is_file()
    assert f(f"http://a.cdn.test:{hostile.port}/a.png?x=1").is_file()
    with pytest.raises(MediaError) as err:
        f(f"http://evil.test:{hostile.port}/a.png")
    assert "not on SURGENET_ASSIST_MEDIA_HOSTS" in err.value.message
    hostile.routes["/bounce"] = redirect(f"http://evil.test:{hostile.port}/a.png")
    with pytest.raises(MediaError):
        f(f"http://media.test:{hostile.port}/bounce")  # a redirect off the list is refused too


def test_refusals_and_failures_tell_the_client_the_same_thing(tmp_path, hostile):
    """Error answers must not map the network: a closed port, an open one that answers 404 and a refused
    private address read alike to the client; the log (``message``) keeps the reason."""
    hostile.routes["/a.png"] = serve(b"", status=404)
    closed = Hostile()
    closed_port = closed.port
    closed.close()
    table = {"open.test": ["127.0.0.1"], "closed.test": ["127.0.0.1"], "private.test": ["10.0.0.1"]}
    f = fetcher(tmp_path, resolver=resolver_of(table), private_networks=("127.0.0.1/32",))
    urls = {
        "open": f"http://open.test:{hostile.port}/a.png",
        "closed": f"http://closed.test:{closed_port}/a.png",
        "private": f"http://private.test:{hostile.port}/a.png",
    }
    errors = {}
    for name, url in urls.items():
        with pytest.raises(MediaError) as err:
            f(url)
        errors[name] = err.value
    publics = {e.public.replace(urls[n], "URL") for n, e in errors.items()}
    assert len(publics) == 1, publics
    assert "HTTP 404" in errors["open"].message and "ConnectError" in errors["closed"].message
    assert "private address" in errors["private"].message
    for e in errors.values():
        assert "127.0.0.1" not in e.public and str(closed_port) not in e.public.replace(urls["closed"], "")


# ---------------------------------------------------------------------------------------------------------
# credentials
# ---------------------------------------------------------------------------------------------------------
def _needs_token(token: str, body: bytes):
    def route(h) -> None:
        if h.headers.get("Authorization") == token:
            send(h, 200, body)
        else:
            send(h, 401, b'{"detail": "Authentication credentials were not provided."}')

    return route


def test_credentials_go_only_to_label_studio_s_exact_origin(tmp_path, hostile, other):
    image = png()
    hostile.routes["/data/upload/1/a.png"] = _needs_token(f"Token {LEGACY}", image)
    hostile.routes["/data/upload/1/moved.png"] = redirect("/data/upload/1/a.png")
    hostile.routes["/data/upload/1/away.png"] = redirect(other.url("/bucket/a.png?X-Amz-Signature=s3cr3t"))
    other.routes["/bucket/a.png"] = serve(image)
    api = LabelStudioAPI(hostile.url(""), LEGACY)
    f = fetcher(tmp_path, api=api, private_networks=LOOPBACK)

    assert f("/data/upload/1/a.png", 1).read_bytes() == image  # Label Studio's own path: the token
    assert f("/data/upload/1/moved.png", 1).read_bytes() == image  # a redirect within the origin keeps it
    assert f("/data/upload/1/away.png", 1).read_bytes() == image  # a redirect elsewhere drops it
    assert hostile.auth_of("/data/upload/1/away.png") == [f"Token {LEGACY}"]
    assert other.auth_of("/bucket/a.png?X-Amz-Signature=s3cr3t") == [None]

    # the same host under another name, or another scheme, is another origin: no token
    with pytest.raises(MediaError) as err:
        f(hostile.url("/data/upload/1/a.png", host="localhost"))
    assert "HTTP 401" in err.value.message
    assert hostile.auth_of("/data/upload/1/a.png")[-1] is None
    table = {"ls.test": ["127.0.0.1"]}
    https_ls = LabelStudioAPI(f"https://ls.test:{hostile.port}", LEGACY)
    g = fetcher(tmp_path / "g", api=https_ls, resolver=resolver_of(table), private_networks=LOOPBACK)
    with pytest.raises(MediaError):
        g(f"http://ls.test:{hostile.port}/data/upload/1/a.png")
    assert hostile.auth_of("/data/upload/1/a.png")[-1] is None  # http:// on the host of an https:// LS


def test_the_setup_host_is_trusted_with_private_addresses_only_behind_basic_auth(tmp_path, hostile):
    """Without Basic Auth anyone can call /setup and name a host: it then gets no exemption from the
    private-address rule (its own token still goes to it). With Basic Auth the caller is Label Studio."""
    hostile.routes["/data/upload/1/a.png"] = _needs_token(f"Token {LEGACY}", png())
    open_setup = fetcher(tmp_path / "open")
    open_setup.remember_setup(hostile.url(""), LEGACY)
    with pytest.raises(MediaError, match="loopback address"):
        open_setup("/data/upload/1/a.png", 1)
    assert hostile.seen == []
    guarded = MediaFetcher(None, MediaPolicy(cache_dir=str(tmp_path / "guarded"), setup_host_private_ok=True))
    guarded.remember_setup(hostile.url(""), LEGACY)
    assert guarded("/data/upload/1/a.png", 1).is_file()
    assert hostile.auth_of("/data/upload/1/a.png") == [f"Token {LEGACY}"]
    s = BackendSettings(basic_auth_user="u", basic_auth_pass="p")
    assert MediaPolicy.from_settings(s).setup_host_private_ok
    assert not MediaPolicy.from_settings(BackendSettings()).setup_host_private_ok


def test_api_calls_and_the_token_refresh_never_follow_redirects(hostile, other):
    pat = jwt.encode({"token_type": "refresh", "exp": int(time.time() + 3600)}, SECRET)
    hostile.routes["/api/token/refresh/"] = redirect(other.url("/api/token/refresh/"), status=307)
    hostile.routes["/api/annotations/1/"] = redirect(other.url("/api/annotations/1/"))
    with pytest.raises(TokenProblem) as err:
        LabelStudioAPI(hostile.url(""), pat).annotation(1)
    assert "redirect (HTTP 307 to http://127.0.0.1:" in err.value.message and pat not in str(err.value)
    with pytest.raises(LabelStudioToolError) as err:
        LabelStudioAPI(hostile.url(""), LEGACY).annotation(1)
    assert "redirect" in err.value.message and "not followed" in err.value.message
    assert other.seen == []  # neither the personal access token nor the legacy token reached it
    with pytest.raises(LabelStudioToolError, match="not Label Studio's origin"):
        LabelStudioAPI(hostile.url(""), LEGACY).request("GET", other.url("/api/x"), what="read")
    assert other.seen == []


def test_a_cloud_uri_goes_through_label_studio_s_presign_route(tmp_path, hostile, other, caplog):
    image = png(seed=3)
    uri = "s3://bucket/case01/frame 7.png"

    def presign(h) -> None:
        fileuri = h.path.split("fileuri=")[1]
        assert base64.urlsafe_b64decode(fileuri).decode() == uri
        if h.headers.get("Authorization") != f"Token {LEGACY}":
            return send(h, 401, b"")
        send(h, 303, b"", Location=other.url("/bucket/case01/frame%207.png?X-Amz-Signature=s3cr3t"))

    hostile.routes["/tasks/7/presign/"] = presign
    other.routes["/bucket/case01/frame%207.png"] = serve(image)
    f = fetcher(tmp_path, api=LabelStudioAPI(hostile.url(""), LEGACY), private_networks=LOOPBACK)
    assert f(uri, 7).read_bytes() == image
    assert other.auth_of("/bucket/case01/frame%207.png?X-Amz-Signature=s3cr3t") == [None]
    with pytest.raises(MediaError, match="needs the task id"):
        f(uri, None)
    other.routes["/bucket/case01/frame%207.png"] = serve(b"", status=403)
    with caplog.at_level(logging.INFO), pytest.raises(MediaError) as err:
        f("s3://bucket/case01/other.png", 8)  # no such task at the stand-in: 404
    assert "s3cr3t" not in err.value.message + caplog.text


def test_a_video_behind_a_label_studio_route_keeps_its_extension(tmp_path, hostile):
    """Video readers go by the extension: the cached file of ``/data/local-files/?d=videos/clip.mp4`` (fetched
    from Label Studio when the backend has no document root) must still end in ``.mp4``."""
    from surgenet_assist.core.synthetic import generate_clip
    from surgenet_assist.core.video import open_video

    clip = generate_clip(2, 6, H, W).write_video(tmp_path / "clip.mp4", fps=10)
    hostile.routes["/data/local-files/"] = _needs_token(f"Token {LEGACY}", clip.read_bytes())
    f = fetcher(tmp_path, api=LabelStudioAPI(hostile.url(""), LEGACY))
    path = f("/data/local-files/?d=videos/clip.mp4", 4)
    assert path.suffix == ".mp4"
    with open_video(path) as video:
        assert video.frame_count == 6


def test_local_files_come_from_the_document_root_and_never_from_outside(tmp_path):
    root = tmp_path / "root"
    (root / "case").mkdir(parents=True)
    frame = root / "case" / "0.png"
    frame.write_bytes(png())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(seed=9))
    (root / "case" / "link.png").symlink_to(outside)
    f = fetcher(tmp_path, root=root)
    assert f("/data/local-files/?d=case/0.png") == frame  # read in place, not copied
    assert f("/data/local-files/?d=case%2F0.png") == frame
    for bad in ("../secret.png", "case/../../secret.png", "case/link.png"):
        with pytest.raises(MediaError) as err:
            f(f"/data/local-files/?d={bad}")
        assert "leaves LOCAL_FILES_DOCUMENT_ROOT" in err.value.message
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL is not set"):
        f("/data/local-files/?d=case/missing.png")  # not on disk: Label Studio would be asked
    with pytest.raises(MediaError, match="not a Label Studio media path"):
        f("/api/projects/")
    with pytest.raises(MediaError, match="'file' is not http or https"):
        f("file:///etc/passwd")
    assert outside.exists() and frame.exists()


# ---------------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------------
def test_the_cache_stays_under_its_byte_bound_and_evicts_the_least_recently_used(tmp_path, hostile):
    image = png()
    for i in range(5):
        hostile.routes[f"/f{i}.png"] = serve(image)
    size = len(image)
    f = fetcher(tmp_path, cache_bytes=int(3.5 * size), private_networks=LOOPBACK)
    paths = {}
    for i in (0, 1, 2):
        paths[i] = f(hostile.url(f"/f{i}.png"))
        time.sleep(0.02)  # distinct modification times
        assert f.cache.total_bytes() <= 3.5 * size
    assert f(hostile.url("/f0.png")) == paths[0]  # a hit: f0 is now the most recently used
    time.sleep(0.02)
    paths[3] = f(hostile.url("/f3.png"))
    assert f.cache.total_bytes() <= 3.5 * size
    assert not paths[1].exists() and paths[0].exists() and paths[2].exists() and paths[3].exists()
    assert hostile.paths().count("/f0.png") == 1  # served from the cache the second time


def test_a_file_that_fails_to_decode_leaves_the_cache(tmp_path, hostile):
    hostile.routes["/frame.png"] = serve(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    f = fetcher(tmp_path, private_networks=LOOPBACK)
    url = hostile.url("/frame.png")
    path = f(url)
    with pytest.raises(MediaError, match="cannot decode image"):
        load_image(path, url)
    assert not path.exists()
    hostile.routes["/frame.png"] = serve(png())  # fixed at the source: fetched again, not refused from cache
    image = load_image(f(url), url)
    assert image.shape == (H, W, 3) and hostile.paths().count("/frame.png") == 2


# ---------------------------------------------------------------------------------------------------------
# pixel and aspect caps, from the header
# ---------------------------------------------------------------------------------------------------------
def test_oversized_images_are_refused_from_the_header_without_decoding(tmp_path, hostile):
    strip = png(4000, 1, seed=None)  # a real 1×4000 PNG, under 100 bytes
    assert len(strip) < 100
    hostile.routes["/strip.png"] = serve(strip)
    hostile.routes["/bomb.png"] = serve(png_header_only(40000, 40000))
    hostile.routes["/big.png"] = serve(png_header_only(5000, 5000))
    f = fetcher(tmp_path, private_networks=LOOPBACK)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = {
        "/strip.png": "1×4000 pixels: an aspect ratio of 4000.0:1, over the cap of 8:1",
        "/bomb.png": "more than 178,956,970 pixels",
        "/big.png": "5000×5000 pixels (25,000,000), over the cap of 16,777,216 pixels",
    }
    for path, reason in expected.items():
        with pytest.raises(MediaError) as err:
            f(hostile.url(path))
        assert reason in err.value.message, err.value.message
        assert "SURGENET_ASSIST_MEDIA_MAX_PIXELS" in err.value.hint
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 100 * 1024  # a decoded 40000×40000 frame alone would be 4.8 GB
    assert cached_files(f) == [MARKER]  # refused files leave the cache
    # a caller-supplied fetch skips the fetcher's check; the decoder still refuses the bomb without decoding
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40000, 40000))
    with pytest.raises(MediaError, match="more than 178,956,970 pixels"):
        load_image(bomb, "bomb.png")


def test_the_caps_are_configurable_and_local_files_are_refused_but_kept(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "wide.png").write_bytes(png(10, 200))
    strict = MediaPolicy(limits=MediaLimits(max_pixels=10_000, max_aspect=30), local_files_root=str(root))
    f = MediaFetcher(None, strict)
    assert f("/data/local-files/?d=wide.png").is_file()  # 2000 pixels, 20:1
    tight = MediaFetcher(None, MediaPolicy(limits=MediaLimits(max_aspect=10), local_files_root=str(root)))
    with pytest.raises(MediaError, match="aspect ratio of 20.0:1"):
        tight("/data/local-files/?d=wide.png")
    assert (root / "wide.png").exists()  # never deleted: not a cache file


def test_a_video_is_refused_from_its_container_header(tmp_path):
    path = tmp_path / "wide.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 16))
    for _ in range(3):
        writer.write(np.zeros((16, 320, 3), np.uint8))
    writer.release()
    with pytest.raises(MediaTooLarge, match="video wide.mp4 is 320×16 pixels: an aspect ratio of 20.0:1"):
        check_media_file(path, MediaLimits())
    header = check_media_file(path, MediaLimits(max_aspect=25))
    assert (header.kind, header.width, header.height) == ("video", 320, 16)


def test_settings_read_the_media_variables_and_refuse_unusable_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("SURGENET_ASSIST_MEDIA_MAX_PIXELS", "1000000")
    monkeypatch.setenv("SURGENET_ASSIST_MEDIA_HOSTS", "media.example.org, *.cdn.example.org")
    monkeypatch.setenv("SURGENET_ASSIST_MEDIA_PRIVATE_NETWORKS", "10.20.0.0/16")
    monkeypatch.setenv("SURGENET_ASSIST_MEDIA_DEADLINE_S", "12.5")
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    s = BackendSettings.from_env()
    s.check()
    policy = MediaPolicy.from_settings(s)
    assert policy.limits.max_pixels == 1_000_000 and policy.download.deadline_s == 12.5
    assert policy.download.hosts == ("media.example.org", "*.cdn.example.org")
    assert policy.local_files_root == str(tmp_path)
    bad = {
        "SURGENET_ASSIST_MEDIA_MAX_PIXELS": ("lots", "is not a whole number"),
        "SURGENET_ASSIST_MEDIA_PRIVATE_NETWORKS": ("intranet", "is not a network"),
        "SURGENET_ASSIST_MEDIA_MAX_BYTES": (str(8 << 30), "larger than the media cache"),
        "SURGENET_ASSIST_MEDIA_DEADLINE_S": ("0", "must be a positive number"),
        "LOCAL_FILES_DOCUMENT_ROOT": ("/", "every file of the machine"),
    }
    for name, (value, says) in bad.items():
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(UsageError) as err:
                BackendSettings.from_env().check()
            assert name in err.value.message + err.value.hint and says in err.value.message


# ---------------------------------------------------------------------------------------------------------
# the routes: per-task isolation, and a token problem as one clear state
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    """The served model: random weights (what it predicts does not matter here, only that it predicts)."""
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    net = SurgeNetAssistModel.create(random_init=True)
    return Predictor(net, batch_size=4, short_side=64, model_version="media-1", device="cpu")


@pytest.fixture(scope="module")
def click_engine():
    """A real click-to-mask engine on a random-init backbone."""
    from surgenet_assist.core.backbone import load_backbone
    from surgenet_assist.core.interactive import ClickSegmenter

    return ClickSegmenter(load_backbone(random_init=True), short_side=128)


class FakeLabelStudio:
    """Label Studio's token rules on a hostile server: ``/api/token/refresh/`` trades the personal access
    token for an access token (unless ``revoked``); uploads need ``Bearer <access>``."""

    def __init__(self, server: Hostile, image: bytes) -> None:
        self.server, self.revoked, self.refreshes = server, False, 0
        self.access_secret = SECRET + "-access"  # a restart with a new key invalidates issued access tokens
        self.pat = jwt.encode({"token_type": "refresh", "exp": int(time.time() + 86400)}, SECRET)
        server.routes["/api/token/refresh/"] = self._refresh
        for name in ("a.png", "b.png"):
            server.routes[f"/data/upload/1/{name}"] = self._upload(image)

    def _refresh(self, h) -> None:
        self.refreshes += 1
        if self.revoked:
            return send(h, 401, b'{"detail": "Token is blacklisted"}')
        access = jwt.encode({"token_type": "access", "exp": int(time.time() + 300)}, self.access_secret)
        send(h, 200, json.dumps({"access": access}).encode())

    def _upload(self, image: bytes):
        def route(h) -> None:
            auth = h.headers.get("Authorization", "")
            try:
                claims = jwt.decode(auth.removeprefix("Bearer "), self.access_secret, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                claims = {}
            ok = claims.get("token_type") == "access" and not self.revoked
            send(h, *((200, image) if ok else (401, b"")))

        return route


def _predict(client, urls):
    tasks = [{"id": i + 1, "data": {"image": u}} for i, u in enumerate(urls)]
    body = {"tasks": tasks, "label_config": image_config(), "project": "1.1"}
    return client.post("/predict", data=json.dumps(body), content_type="application/json")


@pytest.fixture
def local_root(tmp_path):
    root = tmp_path / "local"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    (root / "strip.png").write_bytes(png(4000, 1, seed=None))
    return root


def _app(tmp_path, local_root, model, api=None, **settings):
    s = BackendSettings(
        media_cache_dir=str(tmp_path / "cache"),
        local_files_document_root=str(local_root),
        extra={"open_store": False},
        preannotate_held_out=True,  # every task is predicted (none left empty as a test video's)
        **settings,
    )
    return create_app(s, predictor=model, ls_api=api).test_client()


def test_an_oversized_task_gets_an_empty_prediction_and_the_batch_is_served(tmp_path, local_root, model):
    client = _app(tmp_path, local_root, model)
    r = _predict(client, ["/data/local-files/?d=ok.png", "/data/local-files/?d=strip.png"])
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["results"][0]["result"] and body["results"][1]["result"] == []
    assert body["failed"] == [{"task": 2, "reason": "media", "url": "/data/local-files/?d=strip.png"}]


def test_a_refused_token_is_one_clear_state_and_local_media_is_still_predicted(
    tmp_path,
    local_root,
    model,
    hostile,
):
    ls = FakeLabelStudio(hostile, png())
    now = [time.time()]
    api = LabelStudioAPI(hostile.url(""), ls.pat, clock=lambda: now[0])
    client = _app(tmp_path, local_root, model, api=api)
    assert _predict(client, ["/data/upload/1/a.png"]).status_code == 200
    assert client.get("/health").get_json()["status"] == "UP"

    ls.revoked = True  # revoked in Label Studio; the access token expires a few minutes later
    now[0] += 400
    r = _predict(client, ["/data/local-files/?d=ok.png", "/data/upload/1/a.png", "/data/upload/1/b.png"])
    assert r.status_code == 503
    err = r.get_json()
    assert err["error"] == "label_studio_token"
    assert "refused the personal access token" in err["detail"] and "revoked" in err["detail"]
    assert "Personal Access Token" in err["hint"] and ls.pat not in json.dumps(err)
    health = client.get("/health").get_json()
    assert health["status"] == "DEGRADED"
    assert health["label_studio_token"]["problem"] == err["detail"] and health["label_studio_token"]["fix"]
    refreshes = ls.refreshes
    assert _predict(client, ["/data/upload/1/b.png"] * 4).status_code == 503
    assert ls.refreshes == refreshes  # fails fast: Label Studio is not asked once per task
    local = _predict(client, ["/data/local-files/?d=ok.png"])  # no token needed: served
    assert local.status_code == 200 and local.get_json()["results"][0]["result"]
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "task": {"id": 1}}
    hook = client.post("/webhook", json=event)
    assert hook.status_code == 503 and hook.get_json()["error"] == "label_studio_token"  # not a 422

    ls.revoked = False  # a new token in Label Studio's terms: the state clears by itself
    now[0] += ls_api_module.TOKEN_RETRY_S + 1
    deadline = time.time() + 20
    while client.get("/health").get_json()["status"] != "UP":
        assert time.time() < deadline, "the background re-check did not clear the token state"
        time.sleep(0.1)
    assert _predict(client, ["/data/upload/1/b.png"]).status_code == 200


def test_label_studio_unreachable_for_the_refresh_is_a_503_and_local_media_is_predicted(
    tmp_path,
    local_root,
    model,
):
    gone = Hostile()
    url = gone.url("")
    gone.close()
    pat = jwt.encode({"token_type": "refresh", "exp": int(time.time() + 3600)}, SECRET)
    client = _app(tmp_path, local_root, model, label_studio_url=url, label_studio_api_key=pat)
    r = _predict(client, ["/data/upload/1/a.png"])
    assert r.status_code == 503 and "did not answer the token refresh" in r.get_json()["detail"]
    assert "LABEL_STUDIO_URL" in r.get_json()["hint"] and url not in r.get_json()["detail"]
    assert client.get("/health").get_json()["status"] == "DEGRADED"
    ok = _predict(client, ["/data/local-files/?d=ok.png", "/data/local-files/?d=strip.png"])
    assert ok.status_code == 200 and ok.get_json()["results"][0]["result"]
    assert [f["task"] for f in ok.get_json()["failed"]] == [2]


def test_a_refused_legacy_token_on_media_is_the_same_state(tmp_path, local_root, model, hostile):
    accepted = {"token": f"Token {LEGACY}"}

    def needs_token(h) -> None:
        ok = h.headers.get("Authorization") == accepted["token"]
        send(h, *((200, png()) if ok else (401, b"")))

    hostile.routes["/data/upload/1/a.png"] = needs_token
    hostile.routes["/api/current-user/whoami"] = needs_token  # what the re-check of a legacy token asks
    now = [time.time()]
    api = LabelStudioAPI(hostile.url(""), "f" * 40, clock=lambda: now[0])
    client = _app(tmp_path, local_root, model, api=api)
    r = _predict(client, ["/data/upload/1/a.png"])
    assert (
        r.status_code == 503
        and "refused the legacy token (media download: HTTP 401)" in r.get_json()["detail"]
    )
    health = client.get("/health").get_json()
    assert health["status"] == "DEGRADED" and "/data/upload" not in json.dumps(health)
    accepted["token"] = "Token " + "f" * 40  # e.g. the organisation's legacy tokens switched back on
    now[0] += ls_api_module.TOKEN_RETRY_S + 1
    deadline = time.time() + 20
    while client.get("/health").get_json()["status"] != "UP":
        assert time.time() < deadline, "the background re-check did not clear the token state"
        time.sleep(0.1)
    assert "/api/current-user/whoami" in hostile.paths()
    assert _predict(client, ["/data/upload/1/a.png"]).status_code == 200


def test_an_access_token_refused_once_is_refreshed_and_the_download_retried(tmp_path, hostile):
    ls = FakeLabelStudio(hostile, png())
    api = LabelStudioAPI(hostile.url(""), ls.pat)
    f = fetcher(tmp_path, api=api)
    assert f("/data/upload/1/a.png", 1).is_file()
    ls.access_secret += "-restarted"  # Label Studio restarted: the access token it issued is refused
    assert f("/data/upload/1/b.png", 1).is_file()  # 401, refresh, retry
    assert ls.refreshes == 2 and api.token_problem is None
    assert [a.split(" ")[0] for a in hostile.auth_of("/data/upload/1/b.png")] == ["Bearer", "Bearer"]


def test_interactive_refusals_are_4xx_with_generic_details(tmp_path, local_root, click_engine, hostile):
    s = BackendSettings(
        media_cache_dir=str(tmp_path / "cache"),
        local_files_document_root=str(local_root),
        extra={"open_store": False},
    )
    client = create_app(s, click_segmenter=click_engine).test_client()

    def click(url):
        data = click_body([keypoint(10, 10)], url=url)
        return client.post("/predict", data=json.dumps(data), content_type="application/json")

    r = click("/data/local-files/?d=strip.png")
    assert r.status_code == 422 and "aspect ratio of 4000.0:1" in r.get_json()["detail"]
    hostile.routes["/a.png"] = serve(png())
    details = []
    for url in (hostile.url("/a.png"), hostile.url("/missing.png", host="localhost")):
        r = click(url)
        assert r.status_code == 422 and r.get_json()["error"] == "media_unavailable"
        details.append(r.get_json()["detail"].replace(url, "URL"))
    assert details[0] == details[1] and "loopback" not in details[0]
    assert click("/data/local-files/?d=ok.png").status_code == 200
