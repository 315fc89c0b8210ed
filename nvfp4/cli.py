"""`nvfp4` click group: each subcommand lives in its package; this file only stitches them."""

import importlib

import click

from converter.errors import UserError

# name -> "module:attribute"; imported lazily so `nvfp4 --help` stays fast.
SUBCOMMANDS = {
    "convert": "qad.convert:convert",
    "verify": "converter.cli:verify",
    "eval": "qad.cli:eval_command",
    "serve": "serve.cli:serve",
    "ui": "ui.cli:ui",
}
HELP = {
    "convert": "Quantize a model to NVFP4 (PTQ + QAD) and export for TensorRT-LLM, vLLM, llama.cpp.",
    "verify": "Reload every exported target through an independent reader and compare logits.",
    "eval": "Compare students with the teacher on held-out chat and text (KL, top-1, PPL).",
    "serve": "OpenAI-compatible server for the student and its teacher, with Prometheus metrics.",
    "ui": "Gradio page chatting with teacher and student side by side.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attribute = SUBCOMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in SUBCOMMANDS])


@click.group(cls=LazyGroup)
@click.version_option(package_name="nvfp4")
def cli() -> None:
    """NVFP4 toolchain: QAD, export and serving."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
