"""``streamssl serve``: a websocket server for live streaming recognition and its microphone page."""

from streamssl.serve.server import ServeConfig, StreamingServer

__all__ = ["ServeConfig", "StreamingServer"]
