"""``streamssl serve``: the websocket server and the microphone page (docs/serving.md)."""

from __future__ import annotations

import argparse
import errno
import math
from typing import TYPE_CHECKING

from streamssl.commands.common import (
    Subcommands, add_chunk_ms, add_decoder_arguments, add_model_arguments, add_threads, beam_config, load_recognizer)

if TYPE_CHECKING:
    from streamssl.serve.server import StreamingServer


def _max_segment(text: str) -> float | None:
    value = float(text)
    return None if math.isinf(value) or value == 0 else value


def listen_error(host: str, port: int, error: OSError) -> str:
    """One line on why the server cannot listen on ``host``:``port``, and what to do."""
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use; pick another with --port"
    if error.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges (ports below 1024 do); pick another with --port"
    return f"cannot listen on {host} port {port}: {error.strerror or error}; check --host and --port"


async def _serve(server: StreamingServer) -> None:
    """Serve until SIGTERM or SIGINT (Ctrl-C), then shut down cleanly: every stream gets its last final,
    ``done`` and a 1001 close (:meth:`StreamingServer.shutdown`). A second signal stops at once."""
    import asyncio
    import logging
    import signal

    try:
        await server.start()
    except OSError as error:
        await server.stop()
        raise ValueError(listen_error(server.host, server.port, error)) from None
    loop = asyncio.get_running_loop()
    received: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        for other in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(other)
        if not received.done():
            received.set_result(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    logger = logging.getLogger("streamssl.serve")
    try:
        print(f"streamssl serve: page http://{server.host}:{server.port}/  websocket "
              f"ws://{server.host}:{server.port}/asr  (declared latency {server.declared['declared_latency_ms']:g} ms, "
              f"{server.decoder} decoder)",
              flush=True)
        signum = await received
        streams = len(server.sessions)
        logger.info("%s: finishing %d streams (last finals, then close 1001); a second signal stops at once",
                    signal.Signals(signum).name, streams)
        await server.shutdown()
        logger.info("stopped after finishing %d streams", streams)
    finally:
        await server.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from streamssl.serve.server import ServeConfig, StreamingServer
    from streamssl.streaming.endpoint import EndpointConfig

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    endpoint = EndpointConfig(silence_ms=args.silence_ms, max_segment_ms=args.max_segment_ms)
    config = ServeConfig(max_streams=args.max_streams, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_message_bytes=args.max_message_bytes, endpoint=endpoint)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    beam = beam_config(args)
    recognizer = load_recognizer(args, beam=beam)
    server = StreamingServer(recognizer, config, host=args.host, port=args.port,
                             model_name=args.model or args.checkpoint)
    try:
        asyncio.run(_serve(server))
    except KeyboardInterrupt:
        pass
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    from streamssl.serve.server import ServeConfig
    from streamssl.streaming.endpoint import EndpointConfig

    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    add_chunk_ms(parser, export_default=True)
    add_threads(parser)
    add_decoder_arguments(parser, default="greedy")
    defaults = ServeConfig()
    group = parser.add_argument_group("batching and limits")
    group.add_argument("--max-streams", type=int, default=defaults.max_streams,
                       help=f"concurrent streams; more get an error message, then close code 1013 (default {defaults.max_streams})")
    group.add_argument("--max-batch", type=int, default=defaults.max_batch,
                       help=f"streams per model call (default {defaults.max_batch})")
    group.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                       help=f"how long a ready chunk waits for other streams to join its model call "
                            f"(default {defaults.max_wait_ms:g})")
    group.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes,
                       help=f"largest client message; larger ones close with 1009 (default {defaults.max_message_bytes})")
    endpoint = EndpointConfig()
    group = parser.add_argument_group("endpointing")
    group.add_argument("--silence-ms", type=float, default=endpoint.silence_ms,
                       help=f"non-speech after speech that ends a segment (default {endpoint.silence_ms:g})")
    group.add_argument("--max-segment-ms", type=_max_segment, default=endpoint.max_segment_ms,
                       help=f"longest segment; 0 or inf for no limit (default {endpoint.max_segment_ms:g})")
    parser.set_defaults(func=cmd_serve)


def add_commands(sub: Subcommands) -> None:
    sub.add_parser(
        "serve", arguments=_arguments, help="websocket server for live recognition, with a microphone page at /",
        description="Serve a fine-tuned CTC checkpoint (or its export, --model) over websockets (ws://HOST:PORT/asr) for many live "
                    "streams at once, with endpointing into segments, and a browser microphone page at "
                    "http://HOST:PORT/. The protocol is in docs/serving.md.")
