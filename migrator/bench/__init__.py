"""Benchmarks: `python -m migrator.bench SUBCOMMAND`.  One module per subcommand, each with
register(subparsers) setting handler= (like migrator.cli)."""

BENCHES = ["wire"]
