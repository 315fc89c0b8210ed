"""The `verify` subcommand (mapped in nvfp4/cli.py)."""

import os
from pathlib import Path

import click


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Chat prompt whose logits are compared (default: a fixed question).")
@click.option("--tolerance", type=float, default=None,
              help="Max |logit diff| relative to max |student logit|, for every target (default: per reader).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
def verify(out: Path, prompt: str | None, tolerance: float | None, json_path: Path | None) -> None:
    """Reload each target in OUT through an independent reader and compare its logits with the student's."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nvfp4.converter import verify as checks

    rows = checks.verify(out, prompt or checks.DEFAULT_PROMPT, tolerance)
    click.echo(checks.render(rows))
    if json_path is not None:
        checks.write_json(rows, json_path)
    failed = [r.target for r in rows if not r.ok]
    if failed:
        click.echo(f"verify: {', '.join(failed)} differ from the student beyond tolerance", err=True)
        raise SystemExit(1)
