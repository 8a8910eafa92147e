"""Background batch assembly: the next batches are gathered in a thread while the model trains on the current one
(used by meanflow-train and the data benchmark)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


class Prefetcher:
    """Assemble the next batches in a background thread while the model trains on the current one."""

    def __init__(self, batches: Iterable[dict], depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(batches),), daemon=True)
        self._thread.start()

    def _fill(self, it: Iterator[dict]) -> None:
        try:
            for batch in it:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("batch", batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer thread
            self._queue.put(("error", exc))

    def __iter__(self) -> Iterator[dict]:
        while True:
            kind, item = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
