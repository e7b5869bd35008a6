"""Serving a steered model over HTTP: OpenAI's completions and chat completions, with the steering strength per
request and concurrent requests decoded in one batch (`destein serve`). The HTTP parts need the `serve` extra
(fastapi and uvicorn) and are imported only when the server starts."""

from destein_pl.serving.server import serve

__all__ = ["serve"]
