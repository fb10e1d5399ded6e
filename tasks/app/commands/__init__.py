"""The `rpcwatch` subcommands, one module per group; each module's `register` adds its parsers.
`tasks.app.cli` builds the parser from them and runs the chosen command."""
