"""`destein serve`: load a steering checkpoint once and serve it over HTTP with uvicorn."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVE_EXTRA = "pip install 'destein-pl[serve]'  (fastapi and uvicorn)"


def serve(
    ckpt_path: str = "checkpoints/smollm2-135m-paradetox.ckpt",
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    alpha: float | None = None,
    max_alpha: float | None = None,
    dtype: str | None = None,
    max_batch_rows: int = 16,
    batch_wait_ms: float = 20.0,
    timeout_s: float = 120.0,
    max_body_bytes: int = 1_000_000,
    max_queued: int = 256,
) -> None:
    """Serve a steered model behind OpenAI's `/v1/completions` and `/v1/chat/completions`, with the steering
    strength chosen per request (`"destein": {"alpha": A}` in the body) and concurrent requests decoded in one
    batch whatever alphas they ask for. Runs until interrupted (Ctrl-C). See docs/serving.md.

    Args:
        ckpt_path: steering checkpoint (.ckpt or .safetensors, gated or not); its base model is loaded once.
        host: address to bind; the default answers this machine only (give 0.0.0.0 to serve the network).
        port: TCP port; 0 picks a free one (the line printed at start names it).
        model_name: the model id clients send as `model` (default: the checkpoint's file name without suffix).
        alpha: the strength of requests that give none (default: the checkpoint's).
        max_alpha: the largest alpha a request may ask for (default: twice the default alpha, at least 1).
        dtype: load the base model in this dtype (default: the checkpoint's), e.g. bfloat16.
        max_batch_rows: most rows (a request brings one per choice) decoded together.
        batch_wait_ms: how long a request waits for others to join its batch.
        timeout_s: each request's deadline in seconds, from arrival to last token (then 504).
        max_body_bytes: largest request body accepted (then 413).
        max_queued: most requests waiting for a batch (then 503).
    """
    try:
        import uvicorn

        from destein_pl.serving.app import ServeSettings, create_app
    except ImportError as error:
        raise ImportError(f"destein serve needs {error.name}: {SERVE_EXTRA}") from None
    from destein_pl.steering.model import SteeredCausalLM

    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port; give 0 to 65535 (0: a free one)")
    if alpha is not None and not 0 <= alpha < float("inf"):
        raise ValueError(f"--alpha {alpha} is out of range; give a finite number >= 0")
    # Bind before loading the model: a port in use is refused at once, not after a minute of loading.
    listener = bound_socket(host, port)
    try:
        steered = SteeredCausalLM.from_checkpoint(ckpt_path, alpha=alpha, dtype=dtype)
        default = float(f"{steered.alpha:.6g}")
        settings = ServeSettings(model_name=model_name or Path(ckpt_path).stem,
                                 max_alpha=max(2 * default, 1.0) if max_alpha is None else max_alpha,
                                 max_batch_rows=max_batch_rows, batch_wait_ms=batch_wait_ms, timeout_s=timeout_s,
                                 max_body_bytes=max_body_bytes, max_queued=max_queued)
        if default > settings.max_alpha:
            raise ValueError(f"--max_alpha {settings.max_alpha:g} is below the default alpha {default:g}; give at "
                             f"least {default:g}")
        app = create_app(steered, settings)
    except BaseException:
        listener.close()
        raise
    bound_host, bound_port = listener.getsockname()[:2]
    print(f"destein serve: {settings.model_name} (alpha {default:g}, requests may ask 0 to {settings.max_alpha:g}, "
          f"gate {steered.gate.mode}) on http://{bound_host}:{bound_port}/v1", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[listener])


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); a clear error when the address cannot be bound."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        raise OSError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); give a free "
                      f"port, or 0 for any") from None
    listener.listen(2048)
    return listener


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `app` (from `destein_pl.serving.app.create_app`) with uvicorn on a thread of this process, for as long
    as the block runs: for notebooks, tests and benchmarks. Yields its base URL (`http://HOST:PORT`; port 0 picks a
    free one)."""
    import uvicorn

    listener = bound_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="destein-serve", daemon=True)
    thread.start()
    try:
        waited = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > waited:
                raise RuntimeError(f"the server on {host}:{port} did not start")
            time.sleep(0.02)
        bound_host, bound_port = listener.getsockname()[:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
