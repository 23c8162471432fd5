"""Prometheus metrics of the backend (``GET /metrics``, text exposition format).

Each app gets its own registry, so tests and several apps in one process do not collide. With
several worker processes set ``PROMETHEUS_MULTIPROC_DIR`` (the compose file does) and the counts of all
workers are merged on every scrape.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_mp

from surgenet_assist.core.label_studio_sync import LABEL_STUDIO_ACTIONS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 100.0)


class Metrics:
    """Counters and histograms for requests, latency, predictions by task, per-task failures and errors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "surgenet_backend_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "surgenet_backend_request_latency_seconds",
            "Request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "surgenet_backend_predictions",
            "Result regions emitted by task (segmentation, phase, cvs)",
            ["task"],
            registry=r,
        )
        self.tasks = Counter("surgenet_backend_tasks_predicted", "Label Studio tasks predicted", registry=r)
        self.prediction_failures = Counter(
            "surgenet_backend_prediction_failures",
            "Tasks given an empty prediction in a served batch, by reason (media: not fetchable/decodable)",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "surgenet_backend_errors", "Errors by route and kind", ["route", "kind"], registry=r
        )
        self.webhooks = Counter(
            "surgenet_backend_webhooks",
            "Authenticated webhook deliveries by action (Label Studio's actions; anything else is 'other')",
            ["action"],
            registry=r,
        )
        self.webhooks_refused = Counter(
            "surgenet_backend_webhooks_refused",
            "Webhook deliveries refused, by reason (unauthenticated, bad_webhook, not_connected, queue_full, "
            "no_store)",
            ["reason"],
            registry=r,
        )
        self.webhook_jobs = Counter(
            "surgenet_backend_webhook_jobs",
            "Queued webhook work by outcome (done, failed, retried)",
            ["outcome"],
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "surgenet_backend_webhook_backlog",
            "Webhook deliveries waiting for the worker",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.webhook_ids_ignored = Counter(
            "surgenet_backend_webhook_ids_ignored",
            "Ids beyond SURGENET_ASSIST_WEBHOOK_MAX_IDS in one delivery, not applied (ls sync repairs them)",
            registry=r,
        )
        self.model_loaded = Gauge(
            "surgenet_backend_model_loaded",
            "1 when a trained model is served",
            registry=r,
            multiprocess_mode="max",
        )

    def count_webhook(self, action: object) -> None:
        """Count a delivery under its action when Label Studio sends such an action, else under ``other``:
        the label set stays closed whatever callers put into ``action``."""
        self.webhooks.labels(webhook_action(action)).inc()

    def render(self) -> bytes:
        """The exposition text; merges all worker processes when multiprocess mode is configured."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            prom_mp.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


#: result ``type`` -> the model task it counts as
TASK_OF_TYPE = {"brushlabels": "segmentation", "polygonlabels": "segmentation", "timelinelabels": "phase"}


def webhook_action(action: object) -> str:
    """The metric label of a webhook ``action``: itself for Label Studio's actions, ``other`` otherwise."""
    return action if isinstance(action, str) and action in LABEL_STUDIO_ACTIONS else "other"
