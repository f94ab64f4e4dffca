"""One module per ``chutes-attest`` subcommand (registered in :data:`agent.cli.COMMANDS`)."""
