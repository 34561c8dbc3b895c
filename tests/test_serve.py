"""``streamssl serve``: endpointing loses and duplicates nothing, the server's transcripts equal offline
decoding (also resampled, also many streams at once), bad clients are refused or dropped without
touching the others or leaking, the page and its files are served, and a real headless Chromium
microphone page shows what the offline decoder gives."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_corpus import tone_audio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamssl.asr.ctc import greedy_decode
from streamssl.cli import main
from streamssl.serve import ServeConfig, StreamingServer
from streamssl.serve.server import Session
from streamssl.streaming import Recognizer, Stream, Token
from streamssl.streaming.endpoint import EndpointConfig, Endpointer

RATE = 16000
FRAME_S = 0.02
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------------------------------ endpointer alone
def _tokens(spec: list[tuple[int, str]]) -> list[Token]:
    return [Token(text, 0, frame, frame * FRAME_S, frame * FRAME_S + 0.025, 0.0) for frame, text in spec]


@st.composite
def token_runs(draw):
    """Frame-ordered tokens: speech characters and word boundaries with gaps of 0-60 frames."""
    frame, spec = 0, []
    for _ in range(draw(st.integers(0, 40))):
        frame += draw(st.integers(1, 60))
        spec.append((frame, draw(st.sampled_from(["a", "b", " "]))))
    return spec, frame + draw(st.integers(1, 80))


@settings(max_examples=150, deadline=None)
@given(token_runs(), st.lists(st.integers(0, 100), max_size=8), st.sampled_from([100.0, 300.0]),
       st.sampled_from([None, 500.0, 2000.0]))
def test_endpointer_is_independent_of_update_boundaries_and_keeps_every_token(run, splits, silence_ms, max_ms):
    spec, total_frames = run
    tokens = _tokens(spec)
    config = EndpointConfig(silence_ms=silence_ms, max_segment_ms=max_ms)

    def segment(points: list[int]):
        endpointer, segments = Endpointer(config, FRAME_S), []
        for end in sorted({min(p, total_frames) for p in points} | {total_frames}):
            new = [t for t in tokens if endpointer._frames_seen <= t.frame < end]
            segments += endpointer.update(new, end)
        last = endpointer.finish(total_frames)
        return segments + ([last] if last else []), endpointer

    whole, _ = segment([])
    pieces, _ = segment(splits)
    assert [(s.text, s.cut_frame, s.reason) for s in pieces] == [(s.text, s.cut_frame, s.reason) for s in whole]
    kept = [t for s in whole for t in s.tokens]
    assert kept == tokens[: len(kept)] and all(t.text == " " for t in tokens[len(kept):])
    silence_frames = round(silence_ms / 1000 / FRAME_S)
    for s, following in zip(whole, whole[1:] + [None]):
        speech = [t for t in s.tokens if t.text != " "]
        assert speech, "a segment always holds speech"
        if s.reason == "silence":
            assert s.cut_frame == speech[-1].frame + 1 + silence_frames
            later = [t for t in tokens if t.frame >= s.cut_frame - silence_frames and t.text != " "]
            assert not later or later[0].frame >= s.cut_frame, "cut with speech inside the silence"
        if s.reason == "max_length":
            assert s.cut_frame - speech[0].frame == round(max_ms / 1000 / FRAME_S)
        if max_ms is not None:
            assert speech[-1].frame - speech[0].frame < round(max_ms / 1000 / FRAME_S)


def test_endpointer_rejects_bad_rules_and_out_of_order_input():
    with pytest.raises(ValueError, match="silence_ms.*-5"):
        EndpointConfig(silence_ms=-5)
    with pytest.raises(ValueError, match="max_segment_ms.*0"):
        EndpointConfig(max_segment_ms=0)
    with pytest.raises(ValueError, match="frame_s"):
        Endpointer(EndpointConfig(), 0.0)
    endpointer = Endpointer(EndpointConfig(), FRAME_S)
    endpointer.update(_tokens([(5, "a")]), 10)
    with pytest.raises(ValueError, match="frame 3"):
        endpointer.update(_tokens([(3, "b")]), 12)
    with pytest.raises(ValueError, match="frames_out=8"):
        endpointer.update([], 8)


# ------------------------------------------------------------------------------------------ a model that talks
UTTERANCES = ["CAT DOG", "SUN RED TREE", "GO ON A BLUE CAT"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine more threads only spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tone_checkpoint):
    return tone_checkpoint


@pytest.fixture(scope="module")
def recognizer(checkpoint):
    return Recognizer.from_checkpoint(checkpoint, chunk_ms=40)


def talk(texts: list[str], gap_s: float = 1.0, lead_s: float = 0.3, seed: int = 0) -> np.ndarray:
    """Tone speech of ``texts`` separated by ``gap_s`` of low noise (float32, 16 kHz)."""
    rng = np.random.default_rng(seed)
    parts = [0.01 * rng.standard_normal(int(lead_s * RATE))]
    for text in texts:
        parts += [tone_audio(text, rng), 0.01 * rng.standard_normal(int(gap_s * RATE))]
    return np.concatenate(parts).astype(np.float32)


def offline_text(recognizer: Recognizer, audio: np.ndarray) -> str:
    with torch.no_grad():
        log_probs, lengths = recognizer.model(torch.from_numpy(audio)[None])
    return greedy_decode(log_probs, lengths, recognizer.model.vocab)[0]


@pytest.fixture(scope="module")
def speech(recognizer):
    """Three utterances with 1 s gaps, and the offline transcript; checks the model really talks."""
    audio = talk(UTTERANCES)
    text = offline_text(recognizer, audio)
    assert len(text.split()) >= 6, f"the test model does not talk enough: {text!r}"
    return audio, text


# ------------------------------------------------------------------------------------------ endpointing on real decoding
@pytest.mark.slow
@pytest.mark.parametrize("chunk_samples", [640, 1234, 16000])
def test_silence_cuts_give_the_offline_words_and_the_stream_goes_on(recognizer, speech, chunk_samples):
    audio, offline = speech
    stream = recognizer.stream()
    endpointer = Endpointer(EndpointConfig(silence_ms=500, max_segment_ms=None),
                            recognizer.hop_samples / recognizer.sample_rate)
    finals, seen = [], 0
    for start in range(0, audio.size, chunk_samples):
        stream.accept(audio[start:start + chunk_samples])
        finals += endpointer.update(stream.tokens[seen:], stream.frames_out)
        seen = len(stream.tokens)
    stream.finish()
    finals += endpointer.update(stream.tokens[seen:], stream.frames_out)
    last = endpointer.finish(stream.frames_out)
    finals += [last] if last else []
    assert stream.text == offline
    assert " ".join(f.text for f in finals).split() == offline.split()
    assert len(finals) == len(UTTERANCES), [f.text for f in finals]
    assert [f.reason for f in finals[:-1]] == ["silence"] * (len(UTTERANCES) - 1)


@pytest.mark.slow
def test_max_length_cuts_split_words_but_lose_and_duplicate_no_character(recognizer, speech):
    audio, offline = speech
    stream = recognizer.stream()
    stream.accept(audio)
    stream.finish()
    endpointer = Endpointer(EndpointConfig(silence_ms=500, max_segment_ms=150),
                            recognizer.hop_samples / recognizer.sample_rate)
    finals = endpointer.update(stream.tokens, stream.frames_out)
    last = endpointer.finish(stream.frames_out)
    finals += [last] if last else []
    assert "max_length" in [f.reason for f in finals]
    assert "".join(t.text for f in finals for t in f.tokens).replace(" ", "") == offline.replace(" ", "")


# ------------------------------------------------------------------------------------------ server helpers
class Client:
    """A test client: sends a start message, audio, stop; collects every message."""

    def __init__(self, port: int):
        self.url = f"ws://127.0.0.1:{port}/asr"
        self.messages: list[dict] = []

    async def run(self, audio: np.ndarray, rate: int = RATE, fmt: str = "pcm16", block_s: float = 0.02,
                  pace: float = 0.0) -> dict:
        """Stream ``audio``; ``pace`` 1 is real time, 0 as fast as possible. Returns the done message."""
        async with connect(self.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": rate, "format": fmt}))
            self.messages.append(json.loads(await ws.recv()))
            assert self.messages[-1]["type"] == "ready", self.messages[-1]
            reader = asyncio.create_task(self._read(ws))
            block = max(1, int(block_s * rate))
            started = time.perf_counter()
            for start in range(0, audio.size, block):
                piece = audio[start:start + block]
                if pace:
                    await asyncio.sleep(max(0.0, started + pace * (start + piece.size) / rate - time.perf_counter()))
                data = (np.round(piece * 32767).astype("<i2") if fmt == "pcm16" else piece.astype("<f4")).tobytes()
                await ws.send(data)
            await ws.send(json.dumps({"type": "stop"}))
            await reader
            self.close_code = ws.close_code
        return self.messages[-1]

    async def _read(self, ws) -> None:
        async for message in ws:
            self.messages.append(json.loads(message))

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]


def pcm16(audio: np.ndarray) -> np.ndarray:
    """The audio as the server sees it after PCM16 quantisation (float32)."""
    return (np.round(audio * 32767).astype(np.int16) / 32768.0).astype(np.float32)


# ------------------------------------------------------------------------------------------ server: transcripts
@pytest.mark.slow
def test_server_transcript_finals_and_latency_equal_offline(recognizer, speech):
    audio, _ = speech

    async def scenario():
        async with StreamingServer(recognizer, ServeConfig(endpoint=EndpointConfig(silence_ms=500)), port=0) as server:
            pcm, f32 = Client(server.port), Client(server.port)
            resampled = soxr.resample(audio, RATE, 48000).astype(np.float32).clip(-1, 1)
            await asyncio.gather(pcm.run(audio), f32.run(resampled, rate=48000, fmt="float32"))
            return server, pcm, f32

    server, pcm, f32 = asyncio.run(scenario())
    expected = offline_text(recognizer, pcm16(audio))
    for client in (pcm, f32):
        ready, done = client.of("ready")[0], client.of("done")[0]
        assert client.close_code == 1000
        assert done["text"] == expected
        finals = client.of("final")
        assert " ".join(f["text"] for f in finals).split() == expected.split()
        assert [f["segment"] for f in finals] == list(range(len(UTTERANCES)))
        assert [w["text"] for f in finals for w in f["words"]] == expected.split()
        assert all(w["delay_ms"] > 0 for f in finals for w in f["words"])
        frames = [t["frame"] for m in client.of("partial") for t in m["tokens"]]
        assert frames == sorted(frames) and len(set(frames)) == len(frames)
        latency = recognizer.latency()
        assert ready["declared_latency_ms"] == pytest.approx(
            latency.frontend_lookahead_ms + latency.encoder_lookahead_ms + 40)
        assert done["latency"]["words"] == len(expected.split())
    assert f32.of("ready")[0]["sample_rate"] == 48000
    assert server.ticks > 0 and not server.sessions


class Python310Timeout(Exception):
    """What ``asyncio.wait_for`` raises before Python 3.11: ``asyncio.TimeoutError``, not the builtin."""


def test_batcher_survives_the_wait_timeouts_of_python_3_10(recognizer, speech, monkeypatch):
    """Before 3.11 ``asyncio.wait_for`` raises ``asyncio.TimeoutError``, which the builtin ``TimeoutError``
    does not catch; the server's asyncio is made to behave so. A tick that waits in vain for a silent
    second client must time out and go on, or the batcher dies and the speaking client never finishes."""
    import types

    import streamssl.serve.server as server_module

    async def wait_for(awaitable, timeout):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise Python310Timeout() from None

    old_asyncio = types.SimpleNamespace(**vars(asyncio))
    old_asyncio.wait_for, old_asyncio.TimeoutError = wait_for, Python310Timeout
    monkeypatch.setattr(server_module, "asyncio", old_asyncio)
    audio, _ = speech
    clip = audio[: 2 * RATE]

    async def scenario():
        async with StreamingServer(recognizer, ServeConfig(max_wait_ms=30, start_timeout_s=0.5), port=0) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/asr") as silent:
                await silent.send(json.dumps({"type": "start", "sample_rate": RATE, "format": "pcm16"}))
                speaker = Client(server.port)
                done = await asyncio.wait_for(speaker.run(clip), 60)
            async with connect(f"ws://127.0.0.1:{server.port}/asr") as mute:
                await asyncio.wait_for(mute.wait_closed(), 10)
            return done, mute.close_code, mute.close_reason

    done, code, reason = asyncio.run(scenario())
    assert done["type"] == "done" and done["text"] == offline_text(recognizer, pcm16(clip))
    assert code == 1008 and "no start message within 0.5 s" in reason


@pytest.mark.slow
def test_server_on_the_onnx_backend_gives_the_offline_transcript(checkpoint, recognizer, speech):
    audio, _ = speech
    onnx = Recognizer.from_checkpoint(checkpoint, chunk_ms=40, backend="onnx")

    async def scenario():
        async with StreamingServer(onnx, ServeConfig(endpoint=EndpointConfig(silence_ms=500)), port=0) as server:
            clients = [Client(server.port) for _ in range(2)]
            await asyncio.gather(clients[0].run(audio), clients[1].run(audio[RATE // 3:]))
            return clients

    clients = asyncio.run(scenario())
    for client, clip in zip(clients, (audio, audio[RATE // 3:])):
        assert client.close_code == 1000
        assert client.of("done")[0]["text"] == offline_text(recognizer, pcm16(clip))


@pytest.mark.slow
def test_many_streams_at_once_each_equal_offline_and_share_ticks(recognizer):
    clips = [talk(UTTERANCES[i % 3:i % 3 + 1], gap_s=0.7, seed=i) for i in range(8)]

    async def scenario():
        async with StreamingServer(recognizer, ServeConfig(max_wait_ms=20), port=0) as server:
            clients = [Client(server.port) for _ in clips]
            dones = await asyncio.gather(*(c.run(clip, pace=0.5) for c, clip in zip(clients, clips)))
            return server, dones

    server, dones = asyncio.run(scenario())
    assert [d["text"] for d in dones] == [offline_text(recognizer, pcm16(clip)) for clip in clips]
    assert max(server.batch_sizes) > 1, "ticks never held more than one stream"


# ------------------------------------------------------------------------------------------ server: bad clients
async def _expect_refusal(url: str, send: list, code: int, words: str) -> None:
    async with connect(url, max_size=None) as ws:
        for item in send:
            try:
                await ws.send(item)
            except ConnectionClosed:
                break
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(await asyncio.wait_for(ws.recv(), 10))
        assert ws.close_code == code, (ws.close_code, ws.close_reason, messages)
        errors = [json.loads(m)["message"] for m in messages if json.loads(m)["type"] == "error"]
        assert any(words in e for e in errors) or words in (ws.close_reason or ""), (errors, ws.close_reason)


START = json.dumps({"type": "start", "sample_rate": RATE, "format": "pcm16"})
START_F32 = json.dumps({"type": "start", "sample_rate": RATE, "format": "float32"})


def _task_count() -> int:
    return len(asyncio.all_tasks())


async def _settle(server: StreamingServer) -> None:
    """Wait (at most 5 s) until no session is open and the number of tasks has stopped changing."""
    previous = -1
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not server.sessions and _task_count() == previous:
            return
        previous = _task_count()


@pytest.mark.slow
def test_bad_clients_get_clear_errors_others_unaffected_and_nothing_leaks(recognizer, speech, caplog):
    audio, _ = speech
    config = ServeConfig(max_streams=3, max_message_bytes=64 * 1024, max_queued_messages=8, send_buffer_bytes=4096,
                         max_backlog_s=100.0, start_timeout_s=1.0, endpoint=EndpointConfig(silence_ms=500))

    async def scenario():
        async with StreamingServer(recognizer, config, port=0) as server:
            url = f"ws://127.0.0.1:{server.port}/asr"
            # Warm up (first model calls, imports, allocator pools), then take the baselines.
            await Client(server.port).run(audio[: RATE // 2])
            await _settle(server)
            gc.collect()
            tasks_before = _task_count()

            good = Client(server.port)
            good_run = asyncio.create_task(good.run(audio, pace=1.0))
            await asyncio.sleep(0.3)
            await _expect_refusal(url, ["{not json"], 1008, "not JSON")
            await _expect_refusal(url, [json.dumps({"type": "start", "sample_rate": 1000})], 1008, "1000")
            await _expect_refusal(url, [json.dumps({"type": "start", "sample_rate": RATE, "format": "mp3"})],
                                  1008, "'mp3'")
            await _expect_refusal(url, [b"\x00\x01" * 100], 1003, "binary")
            await _expect_refusal(url, [START, b"\x01\x02\x03"], 1003, "3 bytes")
            await _expect_refusal(url, [START_F32, np.full(64, np.nan, "<f4").tobytes()], 1003, "NaN")
            await _expect_refusal(url, [START_F32, np.full(64, 7.5, "<f4").tobytes()], 1003, "7.5")
            await _expect_refusal(url, [START, b"\x00" * (64 * 1024 + 2)], 1009, "")
            await _expect_refusal(url, [START, json.dumps({"type": "pause"})], 1008, "pause")
            await _expect_refusal(url, [], 1008, "no start message within 1 s")
            second = np.zeros(RATE, "<i2").tobytes()
            await _expect_refusal(url, [START] + [second] * 150, 1008, "no faster than real time")
            # Garbage that is valid PCM16 is just noise: recognised, not refused.
            garbage = Client(server.port)
            rng = np.random.default_rng(1)
            await garbage.run(rng.uniform(-1, 1, RATE // 2).astype(np.float32))
            assert garbage.close_code == 1000
            # More clients than the cap (3): with the good stream and idle ones filling it, one more is refused.
            holders = []
            while len(server.sessions) < config.max_streams:
                holders.append(await connect(url))
                await asyncio.sleep(0.02)
            await _expect_refusal(url, [], 1013, "capacity (3 streams)")
            for holder in holders:
                await holder.close()
            # Abrupt disconnects: one mid-audio, one before the start message.
            for first in ([START, np.zeros(3200, "<i2").tobytes()], []):
                ws = await connect(url)
                for item in first:
                    await ws.send(item)
                await asyncio.sleep(0.1)
                ws.transport.abort()
            # A client that stops reading while it keeps sending audio.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.connect(("127.0.0.1", server.port))
            silent = await connect(url, sock=sock, max_size=None)
            await silent.send(START_F32)
            loud = np.tile(talk(["CAT DOG SUN RED TREE BLUE"], gap_s=0.0, lead_s=0.0), 40)
            silent.transport.pause_reading()
            for start in range(0, loud.size, RATE // 2):
                try:
                    await asyncio.wait_for(silent.send(loud[start:start + RATE // 2].tobytes()), 5)
                except (ConnectionClosed, ConnectionError, TimeoutError):
                    break
                await asyncio.sleep(0.05)
                if "client is not reading" in caplog.text:
                    break
            silent.transport.abort()
            del loud, second, silent, sock, holders, ws  # the test's own buffers are not the server's memory
            await good_run
            await _settle(server)
            gc.collect()
            assert "client is not reading" in caplog.text, "a client that read nothing was never dropped"
            assert not server.sessions
            alive = [o for o in gc.get_objects() if type(o) in (Session, Stream)]
            assert not alive, f"{len(alive)} sessions/streams still alive after their clients left"
            assert _task_count() == tasks_before
            return good

    caplog.set_level(logging.WARNING, logger="streamssl.serve.server")
    good = asyncio.run(scenario())
    assert good.close_code == 1000
    assert good.of("done")[0]["text"] == offline_text(recognizer, pcm16(audio))


# ------------------------------------------------------------------------------------------ HTTP and CLI
@pytest.mark.slow
def test_page_and_static_files_are_served_and_unknown_paths_are_404(recognizer):
    async def scenario():
        async with StreamingServer(recognizer, port=0) as server:
            def get(path):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}") as response:
                        return response.status, response.headers["Content-Type"], response.read().decode()
                except urllib.error.HTTPError as error:
                    return error.code, error.headers["Content-Type"], error.read().decode()
            results = [await asyncio.to_thread(get, p) for p in
                       ["/", "/?autostart=1", "/app.js", "/capture-worklet.js", "/nope.js", "/../server.py"]]
            with pytest.raises(Exception, match="404"):
                await connect(f"ws://127.0.0.1:{server.port}/other")
            return results

    index, query, app, worklet, missing, escape = asyncio.run(scenario())
    assert index[0] == 200 and index[1].startswith("text/html")
    assert 'id="finals"' in index[2] and query[2] == index[2]
    assert app[0] == 200 and "javascript" in app[1] and "getUserMedia" in app[2]
    assert worklet[0] == 200 and "registerProcessor" in worklet[2]
    assert missing[0] == 404 and escape[0] == 404


def test_serve_command_rejects_bad_options(capsys, tmp_path):
    code = main(["serve", "--checkpoint", str(tmp_path / "missing"), "--max-streams", "0"])
    assert code == 2 and "max_streams must be a positive integer, got 0" in capsys.readouterr().err
    code = main(["serve", "--checkpoint", str(tmp_path), "--silence-ms", "-1"])
    assert code == 2 and "silence_ms" in capsys.readouterr().err
    code = main(["serve", "--checkpoint", str(tmp_path), "--port", "70000"])
    assert code == 2 and "70000" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_serves_the_page_and_streams(checkpoint, speech):
    audio, _ = speech
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "streamssl", "serve", "--checkpoint", str(checkpoint),
                                "--port", "0", "--silence-ms", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "streamssl serve: page http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as response:
            assert response.status == 200
        client = Client(port)
        done = asyncio.run(client.run(audio[: 3 * RATE]))
        recognizer = Recognizer.from_checkpoint(checkpoint, chunk_ms=40)
        assert done["text"] == offline_text(recognizer, pcm16(audio[: 3 * RATE]))
        assert client.of("ready")[0]["endpoint"]["silence_ms"] == 400
    finally:
        process.terminate()
        process.wait(10)


# ------------------------------------------------------------------------------------------ the page in Chromium
async def _devtools_page(process: asyncio.subprocess.Process) -> str:
    """The page target's DevTools websocket URL, once Chromium says where it listens."""
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        if not line:
            raise AssertionError("chromium exited before opening DevTools")
        if "DevTools listening on ws://" in line:
            port = line.split("ws://127.0.0.1:")[1].split("/")[0]
            break
    for _ in range(50):
        targets = json.loads(await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read()))
        pages = [t for t in targets if t["type"] == "page" and "/?autostart" in t["url"]]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        await asyncio.sleep(0.1)
    raise AssertionError("no page target in chromium")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def piece_similarities(captured: np.ndarray, played: np.ndarray, piece: int) -> np.ndarray:
    """For each ``piece``-sample stretch of ``captured``, its best normalised correlation with any stretch of
    ``played`` looped (the fake microphone loops the file and starts anywhere in it)."""
    looped = np.concatenate([played, played[:piece]]).astype(np.float64)
    energy = np.concatenate([[0.0], np.cumsum(looped ** 2)])
    stretch_norms = np.sqrt(np.maximum(energy[piece:] - energy[:-piece], 1e-30))[: played.size]
    n = 1 << int(np.ceil(np.log2(looped.size + piece)))
    spectrum = np.fft.rfft(looped, n)
    best = []
    for start in range(0, captured.size - piece + 1, piece):
        x = captured[start:start + piece].astype(np.float64)
        correlation = np.fft.irfft(np.conj(np.fft.rfft(x, n)) * spectrum, n)[: played.size]
        best.append(float(np.max(correlation / stretch_norms)) / max(float(np.linalg.norm(x)), 1e-30))
    return np.array(best)


def matching_share(captured: np.ndarray, played: np.ndarray) -> float:
    """The share of ``captured``'s inner 100 ms pieces that are ``played``'s audio (similarity above 0.9).

    The first and last pieces are left out: the fake microphone starts and stops on a timer, so those two
    hold a partial buffer. Clean captures score about 0.96 on noise-only pieces (resampling trims the noise
    floor's top octave) and above 0.99 on speech; a page that zeroes a third of every buffer scores about
    0.8 on every piece, and one that sends another rate far less."""
    similarities = piece_similarities(captured, played, RATE // 10)[1:-1]
    return float(np.mean(similarities > 0.9))


def test_piece_similarities_tell_a_skip_in_the_capture_from_a_page_that_mangles_audio():
    played = talk(["CAT DOG SUN"], gap_s=1.5, lead_s=0.5, seed=3)
    rotated = np.roll(played, 12345)
    skipped = np.concatenate([rotated[:20000], rotated[20480:], rotated[:480]])
    zeroed = rotated.copy()
    for start in range(0, zeroed.size, 3 * 128):
        zeroed[start:start + 128] = 0.0
    assert matching_share(rotated, played) == 1.0
    assert matching_share(skipped, played) >= 0.9
    assert matching_share(zeroed, played) == 0.0
    # A page that reports 44.1 kHz for 48 kHz audio: everything 9 % slower and lower.
    mislabelled = soxr.resample(rotated, 44100, 48000)
    assert matching_share(mislabelled, played) < 0.2


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium); "
                                              "the browser microphone page is not tested")
def test_microphone_page_in_headless_chromium_shows_the_offline_transcript(checkpoint, tmp_path):
    # The fake microphone loops the file from wherever it is when capture begins, and the
    # tiny tone model is phase-sensitive: trained on tones that all start on one phase of its 20 ms
    # frame grid, it hears "ET G SD ISUN" for "CAT DOG SUN" started 10 ms off. So the reference is the
    # offline transcript of the audio the server fed its model, and that audio must be the file's.
    # A recogniser of its own, because the test records what it is fed.
    recognizer = Recognizer.from_checkpoint(checkpoint, chunk_ms=40)
    fed: list[np.ndarray] = []
    accept = recognizer.accept

    def recording_accept(feeds):
        fed.extend(np.asarray(samples, dtype=np.float32) for samples in feeds.values())
        return accept(feeds)

    recognizer.accept = recording_accept
    audio = talk(["CAT DOG SUN"], gap_s=1.5, lead_s=0.5, seed=3)
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, audio, RATE, subtype="PCM_16")
    played = soundfile.read(wav, dtype="float32")[0]
    duration_s = audio.size / RATE
    script = ("JSON.stringify({status: document.getElementById('status').textContent,"
              " finals: [...document.querySelectorAll('#finals li .text')].map(e => e.textContent),"
              " latency: document.getElementById('latency').textContent})")

    async def scenario():
        async with StreamingServer(recognizer, ServeConfig(endpoint=EndpointConfig(silence_ms=600)), port=0) as server:
            # The fake capture device loops the file, so the page stops itself after one pass.
            url = f"http://127.0.0.1:{server.port}/?autostart=1&seconds={duration_s:.3f}"
            profile = tempfile.mkdtemp(dir=tmp_path)
            process = await asyncio.create_subprocess_exec(
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
                "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--remote-debugging-port=0", url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            drain = None
            try:
                page = await _devtools_page(process)
                drain = asyncio.create_task(_drain(process.stderr))
                state = {}
                async with connect(page, max_size=None) as devtools:
                    deadline = time.monotonic() + duration_s + 30
                    for request in range(10 ** 6):
                        await devtools.send(json.dumps({"id": request, "method": "Runtime.evaluate",
                                                        "params": {"expression": script, "returnByValue": True}}))
                        while (reply := json.loads(await devtools.recv())).get("id") != request:
                            pass
                        value = reply["result"]["result"].get("value")  # absent until the page has loaded
                        state = json.loads(value) if value else state
                        if state.get("status") == "done" or state.get("status", "").startswith(("error", "closed")) \
                                or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.2)
                return state
            finally:
                process.terminate()
                await process.wait()
                if drain is not None:
                    drain.cancel()
                shutil.rmtree(profile, ignore_errors=True)

    state = asyncio.run(scenario())
    assert state["status"] == "done", state
    captured = np.concatenate(fed)
    assert abs(captured.size - played.size) <= RATE // 100, (captured.size, played.size)
    # The file after Chromium's and the server's resampling, piece by piece: Chromium's file-backed fake
    # microphone runs on a timer and, on a loaded machine, once skipped part of the file (global similarity
    # 0.58 with the sizes equal), so one alignment for the whole capture cannot be required. A page that drops
    # or zeroes buffers, or sends another rate, fails nearly every 100 ms piece.
    matching = matching_share(captured, played)
    assert matching >= 0.9, f"the page sent audio that is not the file's: {matching:.0%} of 100 ms pieces " \
                            f"match it (similarities {np.round(piece_similarities(captured, played, RATE // 10), 3).tolist()})"
    expected = offline_text(recognizer, captured).strip()
    assert expected, "the test model says nothing for the page's audio"
    assert " ".join(state["finals"]).split() == expected.split(), (state, expected)
    latency = recognizer.latency()
    declared_ms = latency.frontend_lookahead_ms + latency.encoder_lookahead_ms + recognizer.chunk_ms
    assert f"declared {declared_ms:.0f} ms" in state["latency"] and "server word delay p50" in state["latency"], state
