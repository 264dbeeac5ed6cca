"""Library errors name parameters (`overlap=0.97`), never command-line flags; each shell words them its own way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rsmclip_geo
from cli_cases import ERROR_PREFIX, run_cli
from rsmclip_geo.api import SearchParams, TilingParams, check_outputs, read_labels
from rsmclip_geo.cli import option_name
from rsmclip_geo.errors import QueryError, RsmclipError

LIBRARY = Path(rsmclip_geo.__file__).parent
LOG_LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def is_error_call(call: ast.Call) -> bool:
    """`SomethingError(...)`, `errors.SomethingError(...)`."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name.endswith("Error")


def is_log_call(call: ast.Call) -> bool:
    """`log.warning(...)`, `logger.info(...)` and the like."""
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr in LOG_LEVELS and isinstance(func.value, ast.Name)
            and func.value.id in {"log", "logger", "logging"})


def flag_texts(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: text` for every string constant or f-string part containing `--` in the arguments of an
    error constructor (raised, returned or built) or a logging call."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call) and (is_error_call(node) or is_log_call(node)):
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for part in ast.walk(arg):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str) and "--" in part.value:
                        found.append(f"{filename}:{part.lineno}: {part.value}")
    return found


def library_sources() -> list[Path]:
    """Every module of the library but the command line's own."""
    return sorted(p for p in LIBRARY.rglob("*.py") if LIBRARY / "cli" not in p.parents)


def test_the_scan_finds_flags_in_errors_and_log_calls():
    source = ('def f(n):\n    log.warning("rerun with --nodata 0")\n'
              '    raise errors.QueryError(f"--top-k {n}: give a positive number")\n'
              '    return TileIndexError("rebuild it" + " or search with --exact")\n'
              '    print("--not-a-message")\n')
    assert [text.split(": ", 1)[1] for text in flag_texts(source)] == [
        "rerun with --nodata 0", "--top-k ", " or search with --exact"]


def test_no_library_message_names_a_command_line_flag():
    sources = library_sources()
    assert LIBRARY / "tiling.py" in sources and not any("cli" in p.relative_to(LIBRARY).parts for p in sources)
    found = [text for path in sources for text in flag_texts(path.read_text(encoding="utf-8"), str(path))]
    assert found == [], "\n".join(found)


def test_an_error_carries_its_parameter_and_value():
    with pytest.raises(RsmclipError) as info:
        TilingParams(overlap=0.97)
    assert (info.value.param, info.value.value) == ("overlap", 0.97)
    assert str(info.value).startswith("overlap=0.97: ")
    assert info.value.worded(option_name).startswith("--overlap 0.97: ")


def test_the_cli_words_the_parameter_as_its_flag(capsys, tmp_path):
    result = run_cli(capsys, "index", tmp_path / "scene.tif", "-o", tmp_path / "tiles.parquet", "--overlap", "0.97")
    assert result.code == 2
    assert result.err.startswith(f"{ERROR_PREFIX}--overlap 0.97: give a fraction of the tile"), result.err
    assert result.err.count("\n") == 1


@pytest.mark.parametrize("make_error, flag", [
    (lambda tmp: SearchParams(nms_overlap=1.5).check(), "--nms 1.5: "),
    (lambda tmp: SearchParams(top_k=0).check(), "--top-k 0: "),
    (lambda tmp: check_outputs(hits=tmp / "hits.txt"), "-o "),
    (lambda tmp: read_labels(["only-one"], None), "--labels: give at least two labels"),
])
def test_flags_that_differ_from_the_parameter_name(make_error, flag, tmp_path):
    with pytest.raises(RsmclipError) as info:
        make_error(tmp_path)
    assert info.value.param is not None and "--" not in str(info.value)
    assert info.value.worded(option_name).startswith(flag)


def test_worded_leaves_the_message_alone_without_a_word():
    error = QueryError("top_k=0: give a positive number of hits", param="top_k", value=0)
    assert error.worded(lambda param: None) == str(error)
    assert error.worded({"threshold": "Score ≥"}.get) == str(error)  # a shell with no field for top_k
    assert error.worded({"top_k": "Top"}.get) == "Top 0: give a positive number of hits"
    positional = RsmclipError("scenes: give one or more", param="scenes")
    assert option_name("scenes") is None and positional.worded(option_name) == str(positional)
    elsewhere = RsmclipError("the tiles of top_k=3 overlap", param="top_k", value=3)  # the prefix only is worded
    assert elsewhere.worded(option_name) == str(elsewhere)
    assert RsmclipError("no parameter at fault").worded(option_name) == "no parameter at fault"
