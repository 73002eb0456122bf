"""Request batching for the server: requests queue up, a worker thread decodes them in batches.

Each :class:`Request` carries token ids and its own sampling settings; the worker takes up to ``max_batch``
waiting requests, decodes them together with a :class:`~moekit.serving.batch.BatchDecoder`, and hands each
request its text as it grows (``on_text(delta)``, then ``on_done(finish_reason, completion_tokens)``). Requests
that arrive while a batch runs wait for the next batch (static batching). Stop strings end a request's row and
are cut from its text; while streaming, the last characters that could begin a stop string are held back.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ..models import LanguageModel
from .batch import BatchDecoder

__all__ = ["Batcher", "Request"]


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[str], None] = lambda text: None
    on_done: Callable[[str, int], None] = lambda reason, tokens: None
    on_error: Callable[[str], None] = lambda message: None


class _Row:
    def __init__(self, request: Request, decode: Callable[[list[int]], str]) -> None:
        self.request, self.decode = request, decode
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.hold = max((len(s) for s in request.stop), default=1) - 1

    def add(self, token: int) -> bool:
        """Append a token and emit new text; True when a stop string ended the row."""
        self.ids.append(token)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.request.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._emit(text[:cut], final=True)
            return True
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            return False
        self._emit(text, final=False)
        return False

    def _emit(self, text: str, final: bool) -> None:
        upto = len(text) if final else max(self.sent, len(text) - self.hold)
        if upto > self.sent:
            self.request.on_text(text[self.sent:upto])
            self.sent = upto

    def close(self) -> None:
        text = self.decode(self.ids)
        self._emit(text, final=True)


class Batcher:
    """A worker thread that decodes queued requests in batches of up to ``max_batch``.

    Args:
        model: the language model (resident or offloaded).
        decode: token ids -> text.
        max_batch: requests decoded together.
    """

    def __init__(self, model: LanguageModel, decode: Callable[[list[int]], str], max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        self.model, self.decode, self.max_batch = model, decode, max_batch
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.batches = 0  # batches run (for tests and statistics)
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="moekit-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 -- a failed batch fails its requests, never the server
                traceback.print_exc()
                for r in batch:
                    r.on_error(f"generation failed: {type(e).__name__}: {e}")

    def _run(self, batch: list[Request]) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        rows = [_Row(r, self.decode) for r in batch]
        decoder = BatchDecoder(self.model, [r.prompt_ids for r in batch], [r.max_tokens for r in batch],
                               temperature=[r.temperature for r in batch], top_p=[r.top_p for r in batch],
                               seed=[r.seed for r in batch])
        reasons = ["length"] * len(batch)
        for r in batch:
            if r.max_tokens == 0:
                r.on_done("length", 0)
        while not decoder.finished:
            for b, token in enumerate(decoder.step()):
                if token is None:
                    continue
                if rows[b].add(token):
                    reasons[b] = "stop"
                    decoder.finish(b)
                if decoder.done[b]:
                    if reasons[b] == "length":
                        rows[b].close()
                    batch[b].on_done(reasons[b], len(rows[b].ids))
