"""The typer command-line interface: one module per subcommand, each a thin layer over the library."""
