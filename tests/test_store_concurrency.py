"""Concurrent writers (threads and spawned processes) while a reader builds the training set."""
# ruff: noqa: F811  (fixtures imported from store_helpers are parameters of the tests below)

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
from store_helpers import store_url  # noqa: F401 - fixture

from surgenet_assist.core.store import LabelStore

WRITES = 15


def _write(url: str, worker: int, video_id: int) -> int:
    """One writer: its own labels, plus the SAME Label Studio annotation every writer delivers."""
    store = LabelStore(url)
    created = 0
    try:
        for i in range(WRITES):
            store.record_annotation(
                video_id, worker * 1000 + i, "cvs", [i % 2, 1, 0], source="napari", author=f"w{worker}"
            )
            shared = store.record_annotation(
                video_id,
                5,
                "phase",
                "Preparation",
                source="label-studio",
                ls_annotation_id=42,
                updated_at="2024-06-01T00:00:00Z",
            )
            created += shared.created
    finally:
        store.close()
    return created


def _read_until(url: str, stop: threading.Event, seen: list[int], errors: list[BaseException]) -> None:
    store = LabelStore(url)
    try:
        while not stop.is_set():
            seen.append(len(store.training_labels("cvs")))
    except BaseException as exc:  # noqa: BLE001 - reported to the test thread
        errors.append(exc)
    finally:
        store.close()


def _check(url: str, video_id: int, writers: int) -> None:
    store = LabelStore(url)
    labels = store.training_labels("cvs")
    assert len(labels) == writers * WRITES
    assert {(r.frame_start, r.author) for r in labels} == {
        (w * 1000 + i, f"w{w}") for w in range(writers) for i in range(WRITES)
    }
    shared = store.training_labels("phase")
    assert len(shared) == 1 and len(store.history(shared[0].annotation_id)) == 1
    store.close()


def test_threads_write_while_reader_reads(store_url):
    setup = LabelStore(store_url, migrate=True)
    vid = setup.add_video("video01", 25, 10_000)
    setup.close()
    stop, seen, read_errors = threading.Event(), [], []
    reader = threading.Thread(target=_read_until, args=(store_url, stop, seen, read_errors))
    reader.start()
    results, errors = [], []

    def run(worker: int) -> None:
        try:
            results.append(_write(store_url, worker, vid))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert errors == [] and read_errors == []
    assert sum(results) == 1  # the shared annotation was created exactly once
    assert seen and seen == sorted(seen)  # the reader saw consistent, growing snapshots
    _check(store_url, vid, 4)


@pytest.mark.slow
def test_processes_write_while_reader_reads(store_url):
    setup = LabelStore(store_url, migrate=True)
    vid = setup.add_video("video01", 25, 10_000)
    setup.close()
    stop, seen, read_errors = threading.Event(), [], []
    reader = threading.Thread(target=_read_until, args=(store_url, stop, seen, read_errors))
    reader.start()
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        created = pool.starmap(_write, [(store_url, w, vid) for w in range(3)])
    stop.set()
    reader.join()
    assert read_errors == []
    assert sum(created) == 1
    _check(store_url, vid, 3)
