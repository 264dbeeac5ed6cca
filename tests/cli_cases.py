"""Helpers for the hostile-input corpus: run the CLI, check its one error line and what it left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rsmclip_geo.cli import main

ERROR_PREFIX = "rsmclip-geo: error: "


@dataclass(frozen=True)
class CliResult:
    """Exit code and captured streams of one CLI run."""

    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The single `rsmclip-geo: error:` line (fails the test if there is none or more than one)."""
        lines = [line for line in self.err.splitlines() if line.startswith(ERROR_PREFIX)]
        assert len(lines) == 1, f"expected one error line, got:\n{self.err}"
        assert "Traceback" not in self.err, self.err
        return lines[0][len(ERROR_PREFIX):]


def run_cli(capsys, *args) -> CliResult:
    """Run `rsmclip-geo ARGS` in-process (capsys captures its streams)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


def run_cli_process(*args, env: dict[str, str] | None = None, cwd: Path | None = None,
                    timeout: float = 600) -> CliResult:
    """Run `python -m rsmclip_geo ARGS` in a child process (for signals, concurrency and environments)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "rsmclip_geo", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def start_cli_process(*args, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `python -m rsmclip_geo ARGS` in a child process and return at once (to signal it or run
    another command beside it); `communicate()` collects its streams."""
    return subprocess.Popen([sys.executable, "-m", "rsmclip_geo", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=cwd)


def assert_fails_cleanly(result: CliResult, *fragments: str) -> str:
    """A non-zero exit with one error line (no traceback) containing every fragment; returns the line."""
    assert result.code != 0, f"expected a failure, got exit 0:\n{result.out}\n{result.err}"
    line = result.error_line()
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def leftovers(directory: Path, output_name: str) -> list[str]:
    """Files next to an output that a failed run must not leave: the output itself, temporaries, resume state."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.name == output_name or p.name.startswith(f".{output_name}.")
                  or p.name.startswith(f"{output_name}.partial") or p.name == f"{output_name}.lock")
