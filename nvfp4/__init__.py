"""The `nvfp4` command: a click group that only stitches the packages' subcommands together."""
