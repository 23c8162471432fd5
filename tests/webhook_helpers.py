"""Delivering a webhook in a test: the backend answers 202 and does the work on its webhook queue, so a test
that wants the result waits for the queue and reads the job's outcome."""

from __future__ import annotations

import json
from typing import Any


def deliver(client: Any, body: dict[str, Any], headers: dict[str, str] | None = None, *, status: int = 202):
    """POST ``body`` to ``/webhook``, check the status, wait for the webhook worker, and return what the job
    did (for a queued delivery) or the JSON answer (for any other status)."""
    r = client.post("/webhook", data=json.dumps(body), content_type="application/json", headers=headers or {})
    assert r.status_code == status, r.get_json()
    handler = client.application.extensions["surgenet"].webhooks
    assert handler.queue.wait_idle(60), "the webhook queue did not drain"
    return handler.queue.outcome(r.get_json()["job"]) if status == 202 else r.get_json()
