"""OpenAI-compatible HTTP server for one loaded model (FastAPI + uvicorn).

    sparkinfer serve model.gguf --host 127.0.0.1 --port 8080

or from Python: `serve(sparkinfer.load(...), port=8080)`, or `create_app(llm)` for any ASGI
server. Endpoints: POST /v1/chat/completions, POST /v1/completions (both with SSE streaming),
GET /v1/models, GET /health. See `app.py` for scheduling and cancellation.
"""

from __future__ import annotations

from typing import Any


def create_app(llm: Any, *, model_name: str | None = None, queue_size: int = 16) -> Any:
    """The FastAPI application serving `llm` (see `sparkinfer.server.app.create_app`)."""
    from sparkinfer.server.app import create_app as _create_app

    return _create_app(llm, model_name=model_name, queue_size=queue_size)


def serve(llm: Any, host: str = "127.0.0.1", port: int = 8080, *, model_name: str | None = None,
          queue_size: int = 16, log_level: str = "info") -> None:
    """Serve `llm` until interrupted (blocking)."""
    import uvicorn

    app = create_app(llm, model_name=model_name, queue_size=queue_size)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Ctrl-C / SIGTERM: end the generations now, so open streams finish (with [DONE])
            # within uvicorn's graceful shutdown instead of being cut when it times out.
            app.state.worker.cancel_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    Server(config).run()


__all__ = ["create_app", "serve"]
