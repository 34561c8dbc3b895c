"""The ``streamssl serve`` websocket server: many live streams, one model call per tick, endpointing.

Threads and tasks. The asyncio loop owns the sockets: one handler task and one sender task per
connection, plus one batcher task. Every :class:`~streamssl.streaming.Recognizer` call (``accept`` and
``Stream.finish``) runs on a single worker thread, so model calls never overlap and never block the
loop; the worker also builds each session's outgoing messages and hands them back to the loop in
order (``call_soon_threadsafe`` is first in, first out), so a session's messages keep their order.

The batcher's tick: wait until some stream holds a whole chunk of 16 kHz audio, then up to
``max_wait_ms`` more for others (or until every stream or ``max_batch`` streams are ready), then give the
ready streams' audio to one ``Recognizer.accept`` call: the streaming core steps them in one model call
whatever their positions. While a tick computes, audio keeps arriving, so under load ticks grow to hold
more streams.

Emission delay is the streaming core's one clock (:class:`~streamssl.streaming.engine.ArrivalLog`): from
the moment the server *received* the client's audio message that completes a token's frame window (at
the client's sample rate, so resampling delay counts) to the moment the token was decoded; it includes
resampling, waiting for a chunk to fill, waiting for the batch, and compute. Words are built by the
core's one word builder at the vocabulary's word boundary (greedy CTC), or are the beam search's words,
whose delay runs to the moment the word became stable (final).

With the lexicon beam search, segments are still cut on the greedy tokens (the endpointer's silence and
length rules); at each cut the stream's search ends its sentence (:meth:`Stream.end_segment`), so every
word of the segment is final in its ``final`` message, and the next segment starts afresh.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import mimetypes
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import soxr
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamssl.serve.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    ProtocolError,
    StartMessage,
    decode_audio,
    error_json,
    parse_control,
    parse_start,
    token_json,
    word_json,
)
from streamssl.streaming.endpoint import EndpointConfig, Endpointer, Segment
from streamssl.streaming.engine import words_of
from streamssl.streaming.recognizer import MAX_TICK_S, Recognizer, Stream

logger = logging.getLogger(__name__)

WEBSOCKET_PATH = "/asr"


@dataclass(frozen=True)
class ServeConfig:
    """Server options. ``max_streams``: concurrent sessions (more are refused with close code 1013);
    ``max_batch``: streams per model call; ``max_wait_ms``: how long a ready chunk waits for others to join
    its tick; ``max_message_bytes``: largest client message (larger ones close with 1009);
    ``max_backlog_s``: unprocessed audio a session may hold before it is closed (a client sending far
    faster than real time); ``max_queued_messages``: outgoing messages a client may leave unread before
    it is closed (with 1008: the close frame waits behind what it left unread, ``close_timeout_s`` at
    most, then the connection is dropped); ``send_buffer_bytes``: the kernel send buffer of each
    connection and the high-water mark of its user-space write buffer (``None``: the kernel's auto-tuned
    buffer, which can grow to megabytes, and websockets' 32 KiB), so a stuck client pins a bounded amount
    of memory and is noticed soon; ``start_timeout_s``: time to send the start message;
    ``close_timeout_s``: time a closing handshake may take before the connection is dropped;
    ``shutdown_timeout_s``: time :meth:`StreamingServer.shutdown` gives the streams to finish (their
    last final and ``done``) before the rest are closed as they are."""

    max_streams: int = 64
    max_batch: int = 64
    max_wait_ms: float = 10.0
    max_message_bytes: int = 1 << 20
    max_backlog_s: float = 60.0
    max_queued_messages: int = 512
    send_buffer_bytes: int | None = 256 * 1024
    start_timeout_s: float = 10.0
    close_timeout_s: float = 2.0
    shutdown_timeout_s: float = 10.0
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_batch", "max_message_bytes", "max_queued_messages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.send_buffer_bytes is not None and (not isinstance(self.send_buffer_bytes, int)
                                                   or self.send_buffer_bytes < 1024):
            raise ValueError(f"send_buffer_bytes must be None or an integer >= 1024, got {self.send_buffer_bytes!r}")
        for name in ("max_backlog_s", "start_timeout_s", "close_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.max_wait_ms >= 0 or not math.isfinite(self.max_wait_ms):
            raise ValueError(f"max_wait_ms must be a non-negative number, got {self.max_wait_ms!r}")


def _percentile_ms(values_ms: list[float], q: float) -> float | None:
    return round(float(np.percentile(values_ms, q)), 2) if values_ms else None


class Session:
    """One connection's stream: resampler, recogniser stream, endpointer, delays, and outbox."""

    ids = itertools.count()

    def __init__(self, server: "StreamingServer", websocket: ServerConnection):
        self.id = next(Session.ids)
        self.server = server
        self.websocket = websocket
        self.start: StartMessage | None = None
        self.stream: Stream | None = None
        self.endpointer: Endpointer | None = None
        self.resampler: soxr.ResampleStream | None = None
        self.pending = np.zeros(0, dtype=np.float32)
        self.ready_since: float | None = None
        # stopping: no more audio is taken; flushing: the stream's end is on the worker, no more ticks.
        self.stopping = False
        self.flushing = False
        # closed: nothing more is queued for the client; lost: the connection is gone.
        self.closed = False
        self.lost = False
        # Set when a stopping stream has no whole chunk left for the ticks, or the session closed.
        self.drained = asyncio.Event()
        self.outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.sender: asyncio.Task | None = None
        # The stop (or the server's shutdown) in progress, shared by whoever waits for it.
        self.finishing: asyncio.Task | None = None
        # The close of a client that stopped reading.
        self.dropping: asyncio.Task | None = None
        self._received = 0
        self._tokens_seen = 0
        # Beam search: words of ``stream.words`` already sent in a final, and the last partial sent.
        self._words_final = 0
        self._last_partial: tuple[str, str] | None = None
        self.word_delays_ms: list[float] = []
        self.token_delays_ms: list[float] = []

    # ------------------------------------------------------------------ on the loop
    def begin(self, start: StartMessage) -> None:
        """Make the session's stream (on the worker: hotwords outside the lexicon rebuild its spelling trie)."""
        recognizer = self.server.recognizer
        self.start = start
        try:
            self.stream = recognizer.stream(arrival_rate=start.sample_rate, hotwords=start.hotwords)
        except ValueError as error:
            raise ProtocolError(str(error)) from None
        self.endpointer = Endpointer(self.server.config.endpoint, recognizer.hop_samples / recognizer.sample_rate,
                                     recognizer.word_boundary)
        if start.sample_rate != recognizer.sample_rate:
            self.resampler = soxr.ResampleStream(start.sample_rate, recognizer.sample_rate, 1, dtype="float32")

    def receive(self, samples: np.ndarray, now: float) -> bool:
        """Audio at the client's rate arrived at ``now``; resample it and queue it for the batcher.
        True when the session has just become ready (it holds a whole chunk)."""
        if samples.size == 0:
            return False
        self._received += samples.size
        # Appended here on the loop, read on the worker: one list append, an atomic step.
        self.stream.arrivals.record(self._received, now)
        if self.resampler is not None:
            samples = self.resampler.resample_chunk(samples)
        self.pending = np.concatenate([self.pending, samples])
        limit = self.server.config.max_backlog_s * self.server.recognizer.sample_rate
        if self.pending.size > limit:
            raise ProtocolError(f"{self.pending.size / self.server.recognizer.sample_rate:.1f} s of audio wait "
                                f"unprocessed (limit {self.server.config.max_backlog_s:g} s); send audio no faster "
                                "than real time")
        if self.ready_since is None and self.pending.size >= self.server.chunk_samples:
            self.ready_since = now
            return True
        return False

    def take_ready(self) -> np.ndarray:
        """Whole chunks of pending audio (at most the core's :data:`MAX_TICK_S` of a call) for this tick."""
        chunk = self.server.chunk_samples
        n = min(self.pending.size // chunk, max(1, int(MAX_TICK_S * self.server.recognizer.sample_rate) // chunk))
        taken, self.pending = self.pending[: n * chunk], self.pending[n * chunk:]
        self.ready_since = time.perf_counter() if self.pending.size >= chunk else None
        return taken

    def end_input(self) -> bool:
        """No more audio comes: the resampler's tail joins the pending audio. True when whole chunks are left
        for the ticks to work off (with the other streams, not in calls of their own)."""
        self.stopping = True
        if self.resampler is not None:
            self.pending = np.concatenate([self.pending,
                                           self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)])
        if self.pending.size < self.server.chunk_samples or self.closed:
            self.drained.set()
            return False
        if self.ready_since is None:
            self.ready_since = time.perf_counter()
        return True

    def take_rest(self) -> np.ndarray:
        """What is left, less than a chunk: the stream is ending."""
        rest, self.pending = self.pending, np.zeros(0, dtype=np.float32)
        self.ready_since = None
        return rest

    def mark_closed(self, lost: bool = False) -> None:
        """Nothing more is queued for the client (``lost``: its connection is gone)."""
        self.closed = True
        self.lost = self.lost or lost
        self.drained.set()

    def post(self, kind: str, payload: Any) -> None:
        """Queue an outgoing message (``"send"``, text) or the close (``"close"``, (code, reason))."""
        if self.closed:
            return
        if kind == "close":
            self.mark_closed()
        elif self.outbox.qsize() >= self.server.config.max_queued_messages:
            self.server.drop_unread(self)
            return
        self.outbox.put_nowait((kind, payload))

    # ------------------------------------------------------------------ on the worker thread
    def messages_after(self, ended: bool) -> list[str]:
        """JSON messages for what the stream emitted since the last call (tokens now in ``stream.tokens``)."""
        stream, endpointer = self.stream, self.endpointer
        new = stream.tokens[self._tokens_seen:]
        self._tokens_seen = len(stream.tokens)
        self.token_delays_ms += [1000 * token.delay_s for token in new]
        segments = endpointer.update(new, stream.frames_out)
        if ended:
            last = endpointer.finish(stream.frames_out)
            if last is not None:
                segments.append(last)
        out = [self._final_json(segment) for segment in segments]
        open_tokens = [t for t in endpointer.open_tokens if new and t.frame >= new[0].frame]
        stable, unstable = self._open_parts()
        changed = stream.decoder_finds_words and (stable or unstable) and (stable, unstable) != self._last_partial
        if not ended and (open_tokens or changed):
            self._last_partial = (stable, unstable)
            out.append(json.dumps({"type": "partial", "segment": endpointer.segments_done,
                                   "text": " ".join(filter(None, (stable, unstable))),
                                   "stable": stable, "unstable": unstable,
                                   "tokens": [token_json(t, 1000 * t.delay_s) for t in open_tokens]}))
        if ended:
            out.append(json.dumps({"type": "done", "text": stream.text, "segments": endpointer.segments_done,
                                   "decoder_cpu_s": (None if stream.decoder_cpu_s is None
                                                     else round(stream.decoder_cpu_s, 4)),
                                   "audio_s": round(stream.samples_in / self.server.recognizer.sample_rate, 4),
                                   "latency": self._latency_json()}))
        return out

    def _open_parts(self) -> tuple[str, str]:
        """The open segment's partial: its final words, and the tail that may still change."""
        stream = self.stream
        if stream.decoder_finds_words:
            return " ".join(w.text for w in stream.words[self._words_final:]), stream.unstable_text
        text, tail = self.endpointer.open_text(), stream.unstable_text
        return (text[:len(text) - len(tail)].strip() if tail and text.endswith(tail) else text), tail

    def _final_json(self, segment: Segment) -> str:
        stream = self.stream
        if stream.decoder_finds_words:
            if not stream.finished:
                stream.end_segment()
            words = stream.words[self._words_final:]
            self._words_final = len(stream.words)
            self._last_partial = None
            text = " ".join(word.text for word in words)
        else:
            words = words_of(segment.tokens, self.server.recognizer.word_boundary)
            text = segment.text
        self.word_delays_ms += [1000 * word.delay_s for word in words]
        return json.dumps({"type": "final", "segment": segment.index, "text": text, "reason": segment.reason,
                           "start_s": round(segment.start_s, 4), "end_s": round(segment.end_s, 4),
                           "words": [word_json(word, 1000 * word.delay_s) for word in words],
                           "latency": self._latency_json()})

    def _latency_json(self) -> dict[str, Any]:
        return {**self.server.declared,
                "word_delay_p50_ms": _percentile_ms(self.word_delays_ms, 50),
                "word_delay_p95_ms": _percentile_ms(self.word_delays_ms, 95),
                "token_delay_p50_ms": _percentile_ms(self.token_delays_ms, 50),
                "token_delay_p95_ms": _percentile_ms(self.token_delays_ms, 95),
                "words": len(self.word_delays_ms)}


class StreamingServer:
    """Serves ``recognizer`` over websockets at ``/asr`` and the microphone page at ``/``.

    Usage::

        async with StreamingServer(recognizer, ServeConfig()) as server:   # binds host:port
            print(server.port)
            await server.serve_forever()
    """

    def __init__(self, recognizer: Recognizer, config: ServeConfig | None = None, host: str = "127.0.0.1",
                 port: int = 8765, model_name: str = "model"):
        if recognizer.chunk_samples is None:
            raise ValueError("the server steps in fixed chunks; make the Recognizer with chunk_ms set")
        self.recognizer = recognizer
        self.config = config or ServeConfig()
        self.host = host
        self.port = port
        self.chunk_samples = recognizer.chunk_samples
        self.model_name = model_name
        self.decoder = "lexicon" if recognizer.stream().decoder_finds_words else "greedy"
        latency = recognizer.latency()
        lookahead_ms = latency.frontend_lookahead_ms + (latency.encoder_lookahead_ms or 0.0)
        self.declared = {"declared_latency_ms": round(lookahead_ms + recognizer.chunk_ms, 3),
                         "lookahead_ms": round(lookahead_ms, 3), "chunk_ms": recognizer.chunk_ms}
        self.sessions: dict[int, Session] = {}
        # Sessions holding a whole chunk, in the order they became ready: the batcher reads this rather
        # than scanning every session at every audio message, which at 128 streams cost more than a tick.
        self._ready_sessions: dict[Session, None] = {}
        self.ticks = 0
        # Streams per tick of the last ticks (bounded: a server runs for days), and the worker's CPU
        # seconds in the model call and in building the sessions' messages, summed over all ticks (CPU
        # time, not wall time: on a shared machine the thread is also preempted).
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self.model_cpu_s = 0.0
        self.messages_cpu_s = 0.0
        self.refused = 0
        self.dropped_unread = 0
        self.shutting_down = False
        self._wake = asyncio.Event()
        self._worker: ThreadPoolExecutor | None = None
        self._batcher: asyncio.Task | None = None
        self._server: Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamssl-model")
        self._batcher = asyncio.create_task(self._batch_loop(), name="streamssl-batcher")
        self._server = await serve(self._handle, self.host, self.port, process_request=self._process_request,
                                   max_size=self.config.max_message_bytes, close_timeout=self.config.close_timeout_s,
                                   write_limit=self.config.send_buffer_bytes or 2 ** 15,
                                   ping_interval=20, ping_timeout=20)
        self.port = self._server.sockets[0].getsockname()[1]

    async def shutdown(self) -> None:
        """Stop as a server should on SIGTERM or Ctrl-C: refuse new clients (1001), end every stream as its
        stop message would (the rest of its audio, the look-ahead flushed, its last ``final``, ``done``),
        close each with 1001, and stop. Streams not done within ``shutdown_timeout_s`` are closed as
        they are."""
        self.shutting_down = True
        sessions = list(self.sessions.values())
        ends = [asyncio.ensure_future(self._finish(s, CLOSE_GOING_AWAY, "server shutting down")) for s in sessions]
        if ends:
            done, late = await asyncio.wait(ends, timeout=self.config.shutdown_timeout_s)
            for task in late:
                task.cancel()
            if late:
                logger.warning("%d streams did not finish within %g s; closing them as they are",
                               len(late), self.config.shutdown_timeout_s)
            await asyncio.gather(*ends, return_exceptions=True)
        await self.stop()

    async def stop(self) -> None:
        """Close every connection at once (1001, no last final) and stop; :meth:`shutdown` finishes first."""
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def __aenter__(self) -> "StreamingServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def wake(self) -> None:
        self._wake.set()

    def drop_unread(self, session: Session) -> None:
        """``session``'s client left ``max_queued_messages`` unread: queue nothing more for it, forget what
        waits, and close it with 1008. The close frame waits behind its unread bytes, so it reaches a client
        that reads again; one that never does is dropped after ``close_timeout_s``."""
        logger.warning("session %d: client is not reading (%d messages unread); closing it",
                       session.id, session.outbox.qsize())
        self.dropped_unread += 1
        session.mark_closed()
        while not session.outbox.empty():
            session.outbox.get_nowait()
        session.dropping = asyncio.ensure_future(self._close_unread(session))

    async def _close_unread(self, session: Session) -> None:
        # The sender is blocked on the client's full buffer: stop it and close the connection from here.
        if session.sender is not None:
            session.sender.cancel()
            await asyncio.gather(session.sender, return_exceptions=True)
        websocket = session.websocket
        reason = f"client is not reading: {self.config.max_queued_messages} messages unread"
        try:
            await asyncio.wait_for(websocket.close(CLOSE_POLICY, reason), self.config.close_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            websocket.transport.abort()

    # ------------------------------------------------------------------ HTTP: the page and its files
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == WEBSOCKET_PATH:
            return None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return connection.respond(404, f"no websocket endpoint at {request.path}; use {WEBSOCKET_PATH}\n")
        name = request.path.split("?", 1)[0].lstrip("/") or "index.html"
        static = resources.files("streamssl.serve") / "static"
        if "/" in name or name.startswith(".") or not (static / name).is_file():
            return connection.respond(404, f"not found: {request.path}\n")
        body = (static / name).read_bytes()
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-store"), ("Connection", "close")])
        return Response(200, "OK", headers, body)

    # ------------------------------------------------------------------ one connection
    async def _refuse(self, websocket: ServerConnection, code: int, message: str) -> None:
        """An error message naming why, then the close (1013 at capacity, 1001 while shutting down)."""
        self.refused += 1
        try:
            await websocket.send(error_json(message))
            await websocket.close(code, message[:120])
        except ConnectionClosed:
            pass

    async def _handle(self, websocket: ServerConnection) -> None:
        if self.shutting_down:
            await self._refuse(websocket, CLOSE_GOING_AWAY, "server is shutting down")
            return
        if len(self.sessions) >= self.config.max_streams:
            await self._refuse(websocket, CLOSE_TRY_AGAIN,
                               f"server is at capacity ({self.config.max_streams} streams); try again later")
            return
        session = Session(self, websocket)
        self.sessions[session.id] = session
        if self.config.send_buffer_bytes is not None:
            sock = websocket.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        session.sender = asyncio.create_task(self._send_loop(session), name=f"streamssl-send-{session.id}")
        try:
            try:
                first = await asyncio.wait_for(websocket.recv(), self.config.start_timeout_s)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise ProtocolError(f"no start message within {self.config.start_timeout_s:g} s") from None
            await self._loop.run_in_executor(self._worker, session.begin, parse_start(first))
            session.post("send", json.dumps({
                "type": "ready", "session": session.id, "model": self.model_name,
                "decoder": self.decoder,
                "hotwords": len(session.start.hotwords), "sample_rate": session.start.sample_rate,
                "format": session.start.sample_format, "model_sample_rate": self.recognizer.sample_rate,
                "frame_ms": 1000 * self.recognizer.hop_samples / self.recognizer.sample_rate,
                **self.declared, "endpoint": self.config.endpoint.to_dict(),
                "max_message_bytes": self.config.max_message_bytes}))
            async for message in websocket:
                if session.closed:
                    break
                if isinstance(message, bytes):
                    samples = decode_audio(message, session.start.sample_format)
                    # Audio after the stop (or the shutdown) began is not part of the stream.
                    if not session.stopping and session.receive(samples, self.recognizer.clock()):
                        self._ready_sessions[session] = None
                        self._wake.set()
                else:
                    parse_control(message)
                    await self._finish(session)
                    break
        except ProtocolError as error:
            session.post("send", error_json(str(error)))
            session.post("close", (error.close_code, str(error)[:120]))
        except ConnectionClosed:
            session.mark_closed(lost=True)
        except Exception as error:
            logger.exception("session %d failed", session.id)
            session.post("send", error_json(f"internal error: {error}"))
            session.post("close", (CLOSE_INTERNAL, "internal error"))
        finally:
            session.stopping = True
            self.sessions.pop(session.id, None)
            self._ready_sessions.pop(session, None)
            if session.finishing is not None:
                # The shutdown may be finishing this stream: its last final goes out before the close.
                await asyncio.gather(session.finishing, return_exceptions=True)
            if session.lost:
                session.sender.cancel()
            elif not session.closed:
                session.post("close", (CLOSE_GOING_AWAY, "session ended"))
            if session.stream is not None and not session.stream.finished:
                # On the worker, after any tick already queued with this stream in it.
                await self._loop.run_in_executor(self._worker, self.recognizer.close, session.stream)
            await asyncio.gather(session.sender, *filter(None, [session.dropping]), return_exceptions=True)

    async def _send_loop(self, session: Session) -> None:
        websocket = session.websocket
        try:
            while True:
                kind, payload = await session.outbox.get()
                if kind == "send":
                    await websocket.send(payload)
                    continue
                await websocket.close(*payload)
                return
        except ConnectionClosed:
            session.mark_closed(lost=True)

    async def _finish(self, session: Session, code: int = CLOSE_NORMAL, reason: str = "done") -> None:
        """Stop message or shutdown: feed the rest, flush the look-ahead, send the last final and ``done``,
        close with ``code``. Runs once per session; a second caller waits for the first."""
        if session.finishing is None:
            session.finishing = asyncio.ensure_future(self._finish_once(session, code, reason))
        await asyncio.shield(session.finishing)

    async def _finish_once(self, session: Session, code: int, reason: str) -> None:
        if session.stream is None or session.closed:
            # Not started (or already closed): nothing to flush.
            session.post("close", (code, reason))
            return
        if session.end_input():
            self._ready_sessions[session] = None
            self._wake.set()
        await session.drained.wait()
        if session.closed:
            return
        session.flushing = True
        self._ready_sessions.pop(session, None)
        rest = session.take_rest()
        await self._loop.run_in_executor(self._worker, self._finish_on_worker, session, rest)
        session.post("close", (code, reason))

    def _finish_on_worker(self, session: Session, rest: np.ndarray) -> None:
        if rest.size:
            self.recognizer.accept({session.stream: rest})
        session.stream.finish()
        self._deliver(session, session.messages_after(ended=True))

    # ------------------------------------------------------------------ the batcher
    def _ready(self) -> list[Session]:
        """Sessions holding a whole chunk, in the order they became ready (stopping ones too: their last
        whole chunks are worked off in the ticks)."""
        return [s for s in self._ready_sessions if not s.flushing and not s.closed]

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._tick()
            if self._ready():
                self._wake.set()

    async def _tick(self) -> None:
        """One model call for the streams that are ready (a method, so no session outlives it in a frame)."""
        ready = self._ready()
        if not ready:
            return
        deadline = ready[0].ready_since + self.config.max_wait_ms / 1000
        while len(ready) < min(self.config.max_batch, len(self.sessions)):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
            self._wake.clear()
            ready = self._ready()
        # Again: a stream may have stopped or left during the wait, and a finished one cannot be fed.
        ready = sorted(self._ready(), key=lambda s: s.ready_since)
        # Taking the audio and submitting the call happen with no await between them, so a stop
        # message handled meanwhile finds this tick already queued ahead of its flush.
        feeds = {}
        for session in ready[: self.config.max_batch]:
            feeds[session] = session.take_ready()
            if session.ready_since is None:
                del self._ready_sessions[session]
                if session.stopping:
                    session.drained.set()
            else:  # still a whole chunk left: to the back, behind the streams that waited longer
                self._ready_sessions[session] = self._ready_sessions.pop(session)
        self.ticks += 1
        self.batch_sizes.append(len(feeds))
        await self._loop.run_in_executor(self._worker, self._tick_on_worker, feeds)

    def _tick_on_worker(self, feeds: dict[Session, np.ndarray]) -> None:
        started = time.thread_time()
        try:
            self.recognizer.accept({session.stream: audio for session, audio in feeds.items()})
        except Exception as error:
            logger.exception("model call failed")
            for session in feeds:
                self._deliver(session, [error_json(f"internal error in the model call: {error}")], close=True)
            return
        computed = time.thread_time()
        for session in feeds:
            self._deliver(session, session.messages_after(ended=False))
        self.model_cpu_s += computed - started
        self.messages_cpu_s += time.thread_time() - computed

    def _deliver(self, session: Session, messages: list[str], close: bool = False) -> None:
        def post() -> None:
            for message in messages:
                session.post("send", message)
            if close:
                session.post("close", (CLOSE_INTERNAL, "internal error"))
        self._loop.call_soon_threadsafe(post)
