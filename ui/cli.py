"""`nvfp4 ui --url URL`: the side-by-side Gradio page for a running OpenAI-compatible endpoint."""

from __future__ import annotations

import secrets

import click

from nvfp4.errors import UserError, require
from nvfp4.exposure import check_key

UI_FLAGS = {"api_key": "--api-key (or NVFP4_API_KEY)"}  # check_key's field -> the flag, as errors name it


@click.command()
@click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="The OpenAI-compatible endpoint (root or .../v1)."
)
@click.option("--teacher-model", default="teacher", show_default=True, help="Model id shown in the left pane.")
@click.option("--student-model", default="student", show_default=True, help="Model id shown in the right pane.")
@click.option("--api-key", envvar="NVFP4_API_KEY", default=None, help="Bearer key for the endpoint (or NVFP4_API_KEY).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface the page binds (0.0.0.0 exposes it).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--published-on",
    envvar="NVFP4_PUBLISHED_ON",
    default=None,
    help="In a container: the host interface its port is published on. A key is required unless the page is reachable from this machine only.",
)
def ui(
    url: str,
    teacher_model: str,
    student_model: str,
    api_key: str | None,
    host: str,
    port: int,
    published_on: str | None,
) -> None:
    """Chat with the teacher and the NVFP4 student of one endpoint side by side."""
    try:  # serve's rule: the page holds the endpoint's key, so whoever reaches the page uses the models
        check_key(api_key, host, published_on)
    except UserError as error:
        raise UserError(error.worded(UI_FLAGS)) from error
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--url must start with http:// or https:// (got {url!r})")
    if teacher_model == student_model:
        raise UserError(f"--teacher-model and --student-model are both `{teacher_model}`: choose two models")
    require("ui", "gradio", "openai")
    from nvfp4.ui.app import build_ui

    # the page's server side holds the key: with one, the page asks its visitors for it (any user name)
    auth = (lambda _user, password: secrets.compare_digest(password.encode(), api_key.encode())) if api_key else None
    build_ui(url, teacher_model, student_model, api_key).queue().launch(
        server_name=host, server_port=port, show_error=True, auth=auth
    )
