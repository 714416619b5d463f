"""The public names of migrator.guest resolve, and the CLI registers its subcommands."""

import migrator.guest
from migrator.cli import build_parser


def test_public_names_resolve():
    for name in migrator.guest.__all__:
        assert getattr(migrator.guest, name) is not None, name


def test_cli_has_guest_and_verify():
    parser = build_parser()
    for cmd in (["guest"], ["verify", "image"]):
        assert callable(parser.parse_args(cmd).handler)


def test_scenarios_public_names_resolve():
    import migrator.scenarios

    for name in migrator.scenarios.__all__:
        assert getattr(migrator.scenarios, name) is not None, name
    assert callable(build_parser().parse_args(["scenario", "list"]).handler)
