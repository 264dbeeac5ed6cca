"""The command-line shell: logging flags before or after the command, version, missing command."""

import logging

import pytest

from rsmclip_geo import __version__
from rsmclip_geo.cli import build_parser, join_number_lists, main


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["models"], 0, False),
    (["-v", "models"], 1, False),
    (["models", "-vv"], 2, False),
    (["-q", "models"], 0, True),
    (["models", "--quiet"], 0, True),
])
def test_verbosity_flags_work_before_and_after_the_command(argv, verbose, quiet):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_quiet_logs_errors_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RSMCLIP_GEO_MODELS", str(tmp_path))
    assert main(["models", "-q"]) == 0
    assert logging.getLogger("rsmclip_geo").level == logging.ERROR


def test_version_and_missing_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("argv, expected", [
    (["search", "i.parquet", "q", "--aoi", "-9.2,38.6,-9.0,38.8"], ["search", "i.parquet", "q", "--aoi=-9.2,38.6,-9.0,38.8"]),
    (["search", "i.parquet", "q", "--aoi", "area.gpkg", "-v"], ["search", "i.parquet", "q", "--aoi", "area.gpkg", "-v"]),
    (["search", "i.parquet", "--aoi", "-180, -90, 180, 90"], ["search", "i.parquet", "--aoi=-180, -90, 180, 90"]),
    (["search", "i.parquet", "-q", "-1,2"], ["search", "i.parquet", "-q", "-1,2"]),
])
def test_bbox_values_starting_with_a_minus_are_read_as_values(argv, expected):
    assert join_number_lists(argv) == expected
    assert build_parser().parse_args(join_number_lists(["search", "i.parquet", "q", "--aoi", "-9,38,-8,39"])).aoi == "-9,38,-8,39"
