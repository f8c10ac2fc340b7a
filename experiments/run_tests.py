"""Run the test suite and keep its summary as evidence:

    python -m experiments.run_tests [--output FILE] [pytest args...]

Writes a Markdown file (date, device, versions, command, pass/fail counts,
failures) under experiments/results/ and exits with pytest's status.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from experiments.report import RESULTS, environment


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path)
    args, pytest_args = parser.parse_known_args(argv)
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", *pytest_args]
    result = subprocess.run(command, capture_output=True, text=True)
    print(result.stdout[-20000:], result.stderr[-5000:])
    env = environment()
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    output = args.output or RESULTS / f"tests-{env['date']}-{env['device'].replace(' ', '_')}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Test suite on {env['device']} ({'interpreted' if env['interpreted'] else 'compiled'})", "",
             *(f"- {k}: {v}" for k, v in env.items()),
             f"- command: `{' '.join(['python -m pytest', '-q', *pytest_args])}`", "",
             "## Result", "", *(summary[-1:] or ["(no summary line)"]), "",
             *(["## Failures", "", *failures[:50]] if failures else [])]
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
