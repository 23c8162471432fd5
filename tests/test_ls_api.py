"""LabelStudioAPI's tokens against a local stand-in for Label Studio's auth (the real server is exercised in
tests/integration/test_label_studio_deploy.py): a personal access token is exchanged for an access token,
refreshed before it expires and again after a 401; legacy tokens go as they are; no token is ever shown."""

from __future__ import annotations

import threading
import time

import jwt
import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from surgenet_assist.backend.ls_api import LabelStudioAPI, LabelStudioToolError

SECRET = "a-test-secret-long-enough-for-hs256-keys"
LEGACY = "0123456789abcdef0123456789abcdef01234567"


def _pat(exp_in: float = 3600) -> str:
    return jwt.encode({"token_type": "refresh", "exp": int(time.time() + exp_in), "user_id": 1}, SECRET)


@pytest.fixture
def fake_ls():
    """Label Studio's token rules: /api/token/refresh/ trades a refresh JWT for an access JWT; the API
    accepts `Token <legacy>` or `Bearer <access>` (not the refresh token itself)."""
    app = Flask("fake-ls")
    state = {"refreshes": 0, "revoked": set(), "access_ttl": 300, "seen": []}

    @app.post("/api/token/refresh/")
    def refresh():
        try:
            claims = jwt.decode(request.get_json()["refresh"], SECRET, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return jsonify({"detail": "Token is invalid or expired"}), 401
        assert claims["token_type"] == "refresh"
        state["refreshes"] += 1
        access = jwt.encode(
            {"token_type": "access", "exp": int(time.time() + state["access_ttl"]), "n": state["refreshes"]},
            SECRET,
        )
        return jsonify({"access": access})

    @app.get("/api/annotations/<int:aid>/")
    def annotation(aid):
        header = request.headers.get("Authorization", "")
        state["seen"].append(header.split(" ")[0])
        ok = header == f"Token {LEGACY}"
        if header.startswith("Bearer "):
            token = header[7:]
            try:
                ok = jwt.decode(token, SECRET, algorithms=["HS256"])["token_type"] == "access"
            except jwt.InvalidTokenError:
                ok = False
            ok = ok and token not in state["revoked"]
        if not ok:
            return jsonify({"detail": "Authentication credentials were not provided."}), 401
        if aid == 404:
            return jsonify({"detail": "Not found."}), 404
        return jsonify({"id": aid, "result": []})

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}", "state": state}
    finally:
        server.shutdown()


def test_personal_access_token_is_exchanged_once_and_refreshed_before_expiry(fake_ls):
    now = [time.time()]
    api = LabelStudioAPI(fake_ls["url"], _pat(), clock=lambda: now[0])
    assert api.personal_access_token
    assert api.annotation(7) == {"id": 7, "result": []}
    assert api.annotation(8)["id"] == 8
    assert fake_ls["state"]["refreshes"] == 1 and set(fake_ls["state"]["seen"]) == {"Bearer"}
    now[0] += 290  # within 30 s of the access token's expiry: refreshed before Label Studio would refuse it
    assert api.annotation(9)["id"] == 9
    assert fake_ls["state"]["refreshes"] == 2
    assert api.annotation(404) is None  # gone


def test_a_refused_access_token_is_refreshed_once(fake_ls):
    api = LabelStudioAPI(fake_ls["url"], _pat())
    api.annotation(1)
    fake_ls["state"]["revoked"].add(api.access_token())  # e.g. Label Studio restarted with a shorter TTL
    assert api.annotation(2)["id"] == 2
    assert fake_ls["state"]["refreshes"] == 2


def test_legacy_token_goes_as_it_is(fake_ls):
    api = LabelStudioAPI(fake_ls["url"], LEGACY)
    assert not api.personal_access_token and api.annotation(3)["id"] == 3
    assert fake_ls["state"]["refreshes"] == 0 and fake_ls["state"]["seen"] == ["Token"]


def test_bad_tokens_fail_clearly_without_showing_them(fake_ls):
    expired = _pat(exp_in=-10)
    with pytest.raises(LabelStudioToolError) as err:
        LabelStudioAPI(fake_ls["url"], expired).annotation(1)
    assert "personal access token" in err.value.message and expired not in str(err.value)
    wrong = "f" * 40
    with pytest.raises(LabelStudioToolError) as err:
        LabelStudioAPI(fake_ls["url"], wrong).annotation(1)
    assert "HTTP 401" in err.value.message and wrong not in str(err.value) and err.value.hint
    api = LabelStudioAPI(fake_ls["url"], _pat())
    assert "eyJ" not in repr(api)
    with pytest.raises(LabelStudioToolError) as err:
        LabelStudioAPI("http://127.0.0.1:9", LEGACY).annotation(1)
    assert "no answer from Label Studio at http://127.0.0.1:9" in err.value.message
