"""Run an export the way a deployment does, and report what came out: ``python runtime_client.py MODEL.onnx
AUDIO.wav``, with any Python that has the runtime install (``tests/test_runtime.py`` runs it in the test
environment and in a virtual environment without PyTorch).

It transcribes AUDIO with ``streamssl stream --model`` (greedy, and the lexicon decoder), then starts
``streamssl serve --model`` on a free port and streams AUDIO to it as PCM16 over the websocket protocol.
Prints one JSON object: the transcripts, whether torch was imported here, and whether it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

from streamssl.cli import main

LEXICON_WORDS = "2000"


def stream(model: str, audio: str, *flags: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["stream", "--model", model, audio, "--json", "--quiet", *flags])
    if code != 0:
        raise SystemExit(f"streamssl stream exited with {code}")
    return json.loads(out.getvalue())["files"][0]["transcript"]


async def serve_round_trip(port: int, audio: np.ndarray, rate: int) -> dict:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/asr", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "format": "pcm16"}))
        ready = json.loads(await ws.recv())
        pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2")
        block = rate // 50
        for start in range(0, pcm.size, block):
            await ws.send(pcm[start:start + block].tobytes())
        await ws.send(json.dumps({"type": "stop"}))
        done = None
        async for message in ws:
            done = json.loads(message)
        return {"ready": ready["type"], "done": done, "close_code": ws.close_code}


def serve(model: str, audio_path: str) -> dict:
    audio, rate = soundfile.read(audio_path, dtype="float32")
    command = [sys.executable, "-m", "streamssl", "serve", "--model", model, "--port", "0", "--silence-ms", "10000"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        line = server.stdout.readline()
        found = re.search(r"ws://[\d.]+:(\d+)/asr", line)
        if found is None:
            raise SystemExit(f"streamssl serve did not start: {line!r} {server.stderr.read()}")
        return asyncio.run(serve_round_trip(int(found.group(1)), audio, rate))
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(model: str, audio: str) -> dict:
    greedy = stream(model, audio)
    lexicon = stream(model, audio, "--decoder", "lexicon", "--lexicon-words", LEXICON_WORDS)
    served = serve(model, audio)
    return {"greedy": greedy, "lexicon": lexicon, "served": served["done"]["text"], "ready": served["ready"],
            "close_code": served["close_code"], "torch_imported": "torch" in sys.modules,
            "torch_installed": importlib.util.find_spec("torch") is not None, "python": sys.executable,
            "streamssl": str(Path(sys.modules["streamssl"].__file__).parent)}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2])))
