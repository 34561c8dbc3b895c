"""The server with the lexicon beam search: hotwords in the start message, partials whose stable words are
never revised, finals at endpoints holding every word of the segment, and the protocol's hotword checks."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from test_recognizer import tiny_model, wave
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from streamssl.asr.lexicon import BeamSearchConfig
from streamssl.serve import ServeConfig, StreamingServer
from streamssl.serve.protocol import MAX_HOTWORDS, ProtocolError, parse_start
from streamssl.streaming.endpoint import EndpointConfig
from streamssl.streaming.engine import decoder_factory
from streamssl.streaming.recognizer import Recognizer

BEAM = BeamSearchConfig(lexicon_words=3000, beam_size=16)


def test_start_message_hotwords_are_normalised_and_checked():
    start = parse_start(json.dumps({"type": "start", "sample_rate": 16000, "hotwords": ["Zorblax", "New  York", ""]}))
    assert start.hotwords == (("ZORBLAX",), ("NEW", "YORK"))
    assert parse_start('{"type": "start", "sample_rate": 16000}').hotwords == ()
    for hotwords, words in [("ZORBLAX", "list of strings"), ([1], "list of strings"),
                            (["a"] * (MAX_HOTWORDS + 1), f"at most {MAX_HOTWORDS}"), (["Жук"], "hotwords: hotword line 1")]:
        with pytest.raises(ProtocolError, match=words):
            parse_start(json.dumps({"type": "start", "sample_rate": 16000, "hotwords": hotwords}))


def speech_with_pauses() -> np.ndarray:
    """Three stretches of the tiny model's 'speech' (noise it talks on) with 1 s of silence between."""
    silence = np.zeros(16000, dtype=np.float32)
    parts = [wave(0.6, seed).numpy().clip(-1, 1).astype(np.float32) for seed in range(3)]
    return np.concatenate([parts[0], silence, parts[1], silence, parts[2], silence])


async def stream(port: int, audio: np.ndarray, start: dict) -> list[dict]:
    messages = []
    async with connect(f"ws://127.0.0.1:{port}/asr", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "format": "float32", **start}))
        for begin in range(0, audio.size, 640):
            await ws.send(audio[begin:begin + 640].tobytes())
            await asyncio.sleep(0.01)  # four times real time: ticks of a chunk or two, as live
        await ws.send(json.dumps({"type": "stop"}))
        async for message in ws:
            messages.append(json.loads(message))
    return messages


def run_server(recognizer: Recognizer, audio: np.ndarray, start: dict) -> list[dict]:
    async def main() -> list[dict]:
        config = ServeConfig(endpoint=EndpointConfig(silence_ms=300))
        async with StreamingServer(recognizer, config, port=0, model_name="tiny") as server:
            return await stream(server.port, audio, start)

    return asyncio.run(main())


def test_lexicon_server_partials_finals_and_hotwords():
    torch.set_num_threads(1)
    recognizer = Recognizer(tiny_model("llsa"), chunk_ms=40.0, decoder=decoder_factory(tiny_model("llsa").vocab, BEAM))
    messages = run_server(recognizer, speech_with_pauses(), {"hotwords": ["Zorblax"]})
    ready, done = messages[0], messages[-1]
    assert (ready["type"], ready["model"], ready["decoder"], ready["hotwords"]) == ("ready", "tiny", "lexicon", 1)
    assert done["type"] == "done" and done["decoder_cpu_s"] > 0
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) >= 2 and [f["segment"] for f in finals] == list(range(len(finals)))
    # the finals hold every word of the transcript, once, in order, each with a confidence
    assert " ".join(f["text"] for f in finals if f["text"]) == done["text"] and done["text"]
    for final in finals:
        assert [w["text"] for w in final["words"]] == final["text"].split()
        assert all(0 < w["confidence"] <= 1 and w["delay_ms"] >= 0 for w in final["words"])
    # a partial's stable words are never revised: they lead the final of their segment
    partials = [m for m in messages if m["type"] == "partial"]
    assert any(p["unstable"] for p in partials)
    for partial in partials:
        final = next((f for f in finals if f["segment"] == partial["segment"]), {"text": ""})
        assert final["text"].split()[:len(partial["stable"].split())] == partial["stable"].split()
        assert partial["text"] == " ".join(filter(None, (partial["stable"], partial["unstable"])))


def test_greedy_server_refuses_hotwords_with_a_reason():
    async def main() -> tuple[list[dict], int]:
        async with StreamingServer(Recognizer(tiny_model("llsa"), chunk_ms=40.0), port=0) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/asr") as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "hotwords": ["Zorblax"]}))
                messages = []
                with pytest.raises(ConnectionClosedError):
                    while True:
                        messages.append(json.loads(await ws.recv()))
            return messages, ws.close_code

    messages, code = asyncio.run(main())
    assert code == 1008 and [m["type"] for m in messages] == ["error"]
    assert "hotwords need the lexicon decoder" in messages[0]["message"]
