"""The ``streamssl`` subcommands by feature area; each module's ``add_commands(subparsers)`` adds its own."""
