"""The `engine` command line. Subcommands live one per module in this package."""
