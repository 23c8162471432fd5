"""Weights cache: download with SHA-256 verification (network mocked), offline errors, unsafe pickles."""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import pytest
import torch

from surgenet_assist.core import weights as weights_mod
from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.errors import ChecksumMismatchError, WeightsError, WeightsNotAvailableError
from surgenet_assist.core.zoo import REGISTRY, get_spec, list_backbones


class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def _spec_for(payload: bytes, **changes):
    from dataclasses import replace

    return replace(get_spec("surgenetxl"), sha256=hashlib.sha256(payload).hexdigest(), **changes)


def test_zoo_has_every_release():
    names = {s.name for s in list_backbones()}
    assert {
        "surgenetxl",
        "surgenet",
        "surgenet-small",
        "surgenet-cholec",
        "surgenet-ramie",
        "surgenet-rarp",
        "surgenet-public",
        "surgenet-convnextv2",
        "surgenet-pvtv2",
    } <= names
    for spec in REGISTRY.values():
        assert spec.url.startswith("https://huggingface.co/") and spec.file_name in spec.url
        assert "CC BY-NC-SA" in spec.licence and len(spec.mean) == 3
    assert get_spec("SurgeNet_XL") is REGISTRY["surgenetxl"]
    with pytest.raises(WeightsError, match="unknown backbone"):
        get_spec("resnet50")


def test_download_verifies_and_caches(monkeypatch, surgenetxl_test_checkpoint, capsys):
    payload = surgenetxl_test_checkpoint.read_bytes()
    spec = _spec_for(payload)
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(weights_mod.urllib.request, "urlopen", fake_urlopen)
    path = weights_mod.ensure_weights(spec, progress=False)
    assert calls == [spec.url]
    assert path == weights_mod.cached_path(spec) and path.read_bytes() == payload
    assert "CC BY-NC-SA" in capsys.readouterr().err  # licence printed on download
    assert weights_mod.ensure_weights(spec, allow_download=False) == path  # cached: no second download
    assert len(calls) == 1


def test_checksum_mismatch_leaves_nothing(monkeypatch):
    spec = _spec_for(b"expected bytes")
    monkeypatch.setattr(
        weights_mod.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"tampered")
    )
    with pytest.raises(ChecksumMismatchError, match="SHA-256"):
        weights_mod.download(spec, progress=False)
    cache = weights_mod.weights_cache_dir()
    assert not weights_mod.cached_path(spec).exists()
    assert [p for p in cache.iterdir()] == []  # no partial file left behind


def test_partial_published_digest_is_checked():
    spec = get_spec("surgenetxl")
    assert weights_mod.digest_matches(spec, "bd2709b0" + "0" * 49 + "47ffff8")
    assert not weights_mod.digest_matches(spec, "0" * 64)


def test_corrupted_cache_is_detected(monkeypatch, surgenetxl_test_checkpoint):
    payload = surgenetxl_test_checkpoint.read_bytes()
    spec = _spec_for(payload)
    monkeypatch.setattr(weights_mod.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload))
    path = weights_mod.ensure_weights(spec, progress=False)
    path.write_bytes(payload[:-10] + b"0123456789")
    with pytest.raises(ChecksumMismatchError, match="delete"):
        weights_mod.ensure_weights(spec)


def test_offline_error_names_url_and_path(monkeypatch):
    def offline(url, timeout):
        raise weights_mod.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(weights_mod.urllib.request, "urlopen", offline)
    with pytest.raises(WeightsNotAvailableError) as err:
        load_backbone("surgenetxl")
    spec = get_spec("surgenetxl")
    assert spec.url in str(err.value) and str(weights_mod.cached_path(spec)) in str(err.value)
    with pytest.raises(WeightsNotAvailableError, match="downloads are disabled"):
        load_backbone("surgenetxl", allow_download=False)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/surgenet-assist-pwned",))


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"stem.conv.weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(WeightsError, match="refused to load"):
        load_backbone("surgenetxl", weights=path)
    assert not os.path.exists("/tmp/surgenet-assist-pwned")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps([1, 2])[:5]])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError):
        load_backbone("surgenetxl", weights=path)
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("surgenetxl", weights=tmp_path / "missing.pth")


def test_truncated_checkpoint(tmp_path, surgenetxl_test_checkpoint):
    path = tmp_path / "truncated.pth"
    path.write_bytes(surgenetxl_test_checkpoint.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="truncated"):
        load_backbone("surgenetxl", weights=path)
