"""`nvfp4` click group: each subcommand lives in its package; this file only stitches them."""

import importlib

import click

from nvfp4.errors import UserError, require

# name -> "module:attribute" (a command, or a function building one); imported lazily so `nvfp4 --help` stays fast.
SUBCOMMANDS = {
    "convert": "nvfp4.converter.cli:convert_command",
    "verify": "nvfp4.converter.cli:verify",
    "eval": "nvfp4.converter.cli:eval_command",
    "serve": "nvfp4.serve.cli:serve",
    "ui": "nvfp4.ui.cli:ui",
}
PLUGINS = ("nvfp4.qad.cli",)  # QAD: training stages and their `convert` flags
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
        for plugin in PLUGINS:  # registers its stages and flags with the converter before a command is built
            importlib.import_module(plugin)
        module, attribute = SUBCOMMANDS[name].split(":")
        command = getattr(importlib.import_module(module), attribute)
        return command if isinstance(command, click.Command) else command()

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in SUBCOMMANDS])


def mount_ui(app, base_url: str, teacher_model: str, student_model: str, api_key: str | None):
    """`nvfp4 serve OUT --ui`: the ui package's page mounted at /ui on the serve package's app, which
    reaches the models over HTTP like any client; neither package imports the other."""
    require("ui", "gradio", "openai")
    from nvfp4.ui.app import mount_page

    return mount_page(app, base_url, teacher_model, student_model, api_key)


@click.group(cls=LazyGroup)
@click.version_option(package_name="nvfp4")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """NVFP4 toolchain: QAD, export and serving."""
    ctx.obj = {"mount_ui": mount_ui}


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
