"""The `sd-engine` subcommands, one module each; every module has ``add_command(subparsers)``."""
