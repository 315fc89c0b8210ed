"""UI helpers: the real `nvfp4 serve` app with the page mounted at /ui."""

from __future__ import annotations

import uvicorn

from nvfp4.cli import mount_ui
from nvfp4.serve.app import build_app
from support.serve import LiveServer, free_port, tiny_engines


def live_on(app, port: int) -> LiveServer:
    """A LiveServer bound to a port chosen beforehand (the page must know its endpoint's URL)."""
    live = LiveServer(app)
    live.port, live.url = port, f"http://127.0.0.1:{port}"
    live.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    return live


def serve_with_ui(engines: dict, api_key: str | None = None) -> LiveServer:
    """What `nvfp4 serve OUT --ui` runs: build_app, then the page mounted at /ui (nvfp4.cli.mount_ui), on one port."""
    port = free_port()
    app = mount_ui(
        build_app(engines, api_key=api_key),
        f"http://127.0.0.1:{port}",
        "teacher" if "teacher" in engines else "student",
        "student",
        api_key,
    )
    return live_on(app, port)


def serve_tiny_with_ui(model_dir) -> LiveServer:
    return serve_with_ui(tiny_engines(model_dir))


def text_of(message: dict) -> str:
    """A Gradio 6 chatbot message's text (content is a list of parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
