"""``streamssl serve`` under abuse: SIGTERM and Ctrl-C finish every stream (its last final, ``done``, close
1001); clients that vanish, send faster than real time or stop reading, and 200 connection attempts at
once past ``max_streams``, leave the other streams' transcripts equal to offline decoding and the
server's memory back at its baseline."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_serve import RATE, START, Client, _settle, _task_count, offline_text, one_thread, pcm16, talk  # noqa: F401
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamssl.serve import ServeConfig, StreamingServer
from streamssl.serve.server import Session
from streamssl.streaming import Recognizer, Stream
from streamssl.streaming.endpoint import EndpointConfig

BLOCK = RATE // 50  # 20 ms messages
# Growth of the resident set allowed over a round of the same clients (MB), after a first round has made
# what is made once: the allocator keeps some of what it freed, so a round never ends exactly where it
# began (measured: 1.5 MB for the bad clients' round, 0.2 MB for 200 attempts); the client that stops
# reading alone sends some 5 MB of audio, which a leaked session would keep.
RSS_BOUND_MB = 4.0


@pytest.fixture(scope="module")
def recognizer(tone_checkpoint):
    return Recognizer.from_checkpoint(tone_checkpoint, chunk_ms=40)


def rss_mb() -> float:
    """This process's resident set size after a garbage collection, in MB (Linux ``/proc/self/statm``)."""
    gc.collect()
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


async def stream_until_closed(url: str, audio: np.ndarray) -> tuple[list[dict], int, str]:
    """Send ``audio`` at real-time pace until the server closes; returns its messages, close code and reason."""
    messages: list[dict] = []
    async with connect(url, max_size=None) as ws:
        await ws.send(START)

        async def read() -> None:
            async for message in ws:
                messages.append(json.loads(message))

        reader = asyncio.create_task(read())
        started = time.perf_counter()
        pcm = np.round(audio * 32767).astype("<i2")
        for start in range(0, pcm.size, BLOCK):
            await asyncio.sleep(max(0.0, started + (start + BLOCK) / RATE - time.perf_counter()))
            try:
                await ws.send(pcm[start:start + BLOCK].tobytes())
            except ConnectionClosed:
                break
        await asyncio.wait_for(reader, 30)
        return messages, ws.close_code, ws.close_reason


# ------------------------------------------------------------------------------------------ signals
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_every_stream_with_its_last_final_then_closes_with_1001(tone_checkpoint, recognizer,
                                                                                  signum):
    # Speech from 0.3 s to about 2 s, then silence: the signal comes in the middle of a word.
    clips = [talk(["CAT DOG SUN RED TREE BLUE"], gap_s=1.0, seed=seed) for seed in range(3)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "streamssl", "serve", "--checkpoint", str(tone_checkpoint),
                                "--port", "0", "--silence-ms", "400"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "streamssl serve: page http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() else "")
        url = f"ws://127.0.0.1:{int(line.split('http://127.0.0.1:')[1].split('/')[0])}/asr"

        async def scenario():
            clients = [asyncio.create_task(stream_until_closed(url, clip)) for clip in clips]
            await asyncio.sleep(1.2)
            process.send_signal(signum)
            return await asyncio.gather(*clients)

        results = asyncio.run(scenario())
        assert process.wait(20) == 0
        log = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert f"{signal.Signals(signum).name}: finishing 3 streams" in log, log
    for clip, (messages, code, reason) in zip(clips, results):
        assert (code, reason) == (1001, "server shutting down"), (code, reason, messages[-3:])
        done = messages[-1]
        assert done["type"] == "done", messages[-3:]
        # The stream ended where the server stopped taking its audio: a whole number of 20 ms messages.
        samples = BLOCK * round(done["audio_s"] * RATE / BLOCK)
        assert 0.5 * RATE < samples < clip.size
        expected = offline_text(recognizer, pcm16(clip[:samples]))
        assert expected and done["text"] == expected
        finals = [m for m in messages if m["type"] == "final"]
        assert " ".join(f["text"] for f in finals).split() == expected.split(), "a word never reached a final"
        assert finals[-1]["reason"] == "end_of_stream"


# ------------------------------------------------------------------------------------------ bad clients
async def vanish(url: str, audio: np.ndarray, after_s: float) -> None:
    """Stream ``audio`` as fast as possible for ``after_s`` of it, then drop the TCP connection (no close frame)."""
    ws = await connect(url)
    await ws.send(START)
    await ws.send(np.round(audio[: int(after_s * RATE)] * 32767).astype("<i2").tobytes())
    await asyncio.sleep(0.2)
    ws.transport.abort()


async def stop_reading(url: str, audio: np.ndarray, log: pytest.LogCaptureFixture) -> tuple[int, str]:
    """Send audio ten times faster than real time without reading, until the server gives up on this client;
    then read again: the close frame waits behind the unread messages. Returns the close code and reason."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", int(url.split(":")[2].split("/")[0])))
    ws = await connect(url, sock=sock, max_size=None)
    await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "format": "float32"}))
    ws.transport.pause_reading()
    for start in range(0, audio.size, RATE // 2):
        if "client is not reading" in log.text:
            break
        try:
            await asyncio.wait_for(ws.send(audio[start:start + RATE // 2].tobytes()), 5)
        except (ConnectionClosed, ConnectionError, asyncio.TimeoutError):
            break
        await asyncio.sleep(0.05)
    ws.transport.resume_reading()
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason


@pytest.mark.slow
def test_vanishing_fast_and_unread_clients_leave_the_others_exact_and_memory_at_baseline(recognizer, caplog):
    config = ServeConfig(max_streams=8, max_queued_messages=8, send_buffer_bytes=4096, max_backlog_s=100.0,
                         endpoint=EndpointConfig(silence_ms=400))
    good = [talk(["CAT DOG", "SUN RED TREE"], gap_s=0.7, seed=seed) for seed in range(3)]
    fast = talk(["GO ON A BLUE CAT", "IT'S A DOG"] * 3, gap_s=0.7, seed=7)
    loud = np.tile(talk(["CAT DOG SUN RED TREE BLUE"], gap_s=0.0, lead_s=0.0), 40)

    async def round_of_clients(url: str):
        clients = [Client(int(url.split(":")[2].split("/")[0])) for _ in range(len(good) + 1)]
        runs = [asyncio.create_task(c.run(clip, pace=1.0)) for c, clip in zip(clients, good)]
        runs.append(asyncio.create_task(clients[-1].run(fast, pace=0.0)))  # as fast as it can
        await asyncio.sleep(0.3)
        await asyncio.gather(vanish(url, good[0], 0.5), vanish(url, fast, 3.0))
        unread = await stop_reading(url, loud, caplog)
        await asyncio.gather(*runs)
        return clients, unread

    async def scenario():
        async with StreamingServer(recognizer, config, port=0) as server:
            url = f"ws://127.0.0.1:{server.port}/asr"
            # A first round warms up what is made once (model calls, imports, allocator pools, sockets).
            await round_of_clients(url)
            await _settle(server)
            caplog.clear()
            baseline_mb, tasks_before = rss_mb(), _task_count()
            clients, unread = await round_of_clients(url)
            await _settle(server)
            grown_mb = rss_mb() - baseline_mb
            alive = [o for o in gc.get_objects() if type(o) in (Session, Stream)]
            return clients, unread, grown_mb, alive, _task_count() - tasks_before, server.dropped_unread

    caplog.set_level(logging.WARNING, logger="streamssl.serve.server")
    clients, unread, grown_mb, alive, extra_tasks, dropped = asyncio.run(scenario())
    for client, clip in zip(clients, good + [fast]):
        assert client.close_code == 1000
        assert client.of("done")[0]["text"] == offline_text(recognizer, pcm16(clip))
    assert unread[0] == 1008 and "client is not reading: 8 messages unread" in unread[1], unread
    assert dropped == 2, "one client that stopped reading per round"
    assert not alive, f"{len(alive)} sessions/streams still alive after their clients left"
    assert extra_tasks == 0
    assert grown_mb < RSS_BOUND_MB, f"the server's memory grew by {grown_mb:.1f} MB over a round of clients"


def test_a_stop_behind_a_backlog_is_worked_off_in_the_ticks_not_in_one_call(recognizer):
    """A client that sends seconds at once and stops: its backlog goes through the ticks (at most
    ``MAX_TICK_S`` of it per call, batched with the others), not into one call that makes every stream wait."""
    from streamssl.streaming.recognizer import MAX_TICK_S

    backlog = talk(["CAT DOG SUN", "RED TREE", "GO ON A BLUE CAT"], gap_s=0.5, seed=3)
    assert backlog.size > 3 * MAX_TICK_S * RATE
    fed: list[int] = []
    accept = recognizer.accept

    def recording_accept(feeds):
        fed.extend(len(samples) for samples in feeds.values())
        return accept(feeds)

    async def scenario():
        async with StreamingServer(recognizer, ServeConfig(), port=0) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/asr", max_size=None) as ws:
                await ws.send(START)
                await ws.recv()
                await ws.send(np.round(backlog * 32767).astype("<i2").tobytes())
                await ws.send(json.dumps({"type": "stop"}))
                messages = [json.loads(m) async for m in ws]
            return messages

    recognizer.accept = recording_accept
    try:
        messages = asyncio.run(scenario())
    finally:
        del recognizer.accept
    assert messages[-1]["type"] == "done" and messages[-1]["text"] == offline_text(recognizer, pcm16(backlog))
    assert sum(fed) == backlog.size and max(fed) <= MAX_TICK_S * RATE, fed


async def attempt(port: int, clip: np.ndarray) -> tuple[dict, int, str]:
    """One client: its first message (``ready``, or the refusal's ``error``), then, when admitted, ``clip`` at
    real-time pace and the stop; returns its last message, close code and reason."""
    messages: list[dict] = []
    async with connect(f"ws://127.0.0.1:{port}/asr", max_size=None, open_timeout=60) as ws:
        try:
            await ws.send(START)
        except ConnectionClosed:  # refused before it could send: the error message still waits to be read
            pass
        try:
            messages.append(json.loads(await ws.recv()))
            if messages[0]["type"] == "ready":
                started, pcm = time.perf_counter(), np.round(clip * 32767).astype("<i2")
                for start in range(0, pcm.size, BLOCK):
                    await asyncio.sleep(max(0.0, started + (start + BLOCK) / RATE - time.perf_counter()))
                    await ws.send(pcm[start:start + BLOCK].tobytes())
                await ws.send(json.dumps({"type": "stop"}))
            while True:
                messages.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
    return messages[-1], ws.close_code, ws.close_reason


@pytest.mark.slow
def test_200_connection_attempts_at_once_the_cap_is_served_the_rest_refused_with_1013(recognizer):
    max_streams, attempts = 16, 200
    clips = [talk(["CAT DOG"], gap_s=0.3, seed=seed) for seed in range(4)]
    expected = [offline_text(recognizer, pcm16(clip)) for clip in clips]
    config = ServeConfig(max_streams=max_streams, endpoint=EndpointConfig(silence_ms=300))

    async def scenario():
        async with StreamingServer(recognizer, config, port=0) as server:
            rounds = []
            # The first round warms up what is made once (allocator pools for 200 connections among them).
            for _ in range(2):
                refused_before = server.refused
                rounds.append(await asyncio.gather(*(attempt(server.port, clips[i % len(clips)])
                                                     for i in range(attempts))))
                await _settle(server)
                rounds.append(rss_mb())
            return rounds[2], rounds[3] - rounds[1], server.refused - refused_before

    results, grown_mb, refused = asyncio.run(scenario())
    served = [(i, last) for i, (last, code, _) in enumerate(results) if last["type"] == "done" and code == 1000]
    refusals = [(last, code, reason) for last, code, reason in results if last["type"] == "error"]
    # Every admitted stream stays open for its whole clip (> 1 s), far longer than the attempts take to arrive.
    assert len(served) == max_streams and len(refusals) == attempts - max_streams == refused
    assert all(last["text"] == expected[i % len(clips)] for i, last in served)
    message = f"server is at capacity ({max_streams} streams); try again later"
    assert all(last["message"] == message and (code, reason) == (1013, message) for last, code, reason in refusals)
    assert grown_mb < RSS_BOUND_MB, f"the server's memory grew by {grown_mb:.1f} MB over 200 connection attempts"
