"""What every experiment's record shares: where results go, the environment
they were measured in, Markdown tables, and a progress line on stderr."""

from __future__ import annotations

import datetime
import platform as host_platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    """Date, device, whether kernels ran interpreted, and library versions."""
    import jax
    import numpy as np
    import torch

    import torch_impl  # before triton: picks interpreter mode on CPU
    import triton

    device = torch_impl.platform.default_device()
    return dict(date=datetime.date.today().isoformat(),
                device=torch_impl.platform.device_name(device),
                interpreted=not torch_impl.platform.ON_GPU,
                torch=torch.__version__, triton=triton.__version__, jax=jax.__version__,
                jaxlib=getattr(jax.lib, "__version__", jax.__version__),
                cuda=torch.version.cuda, numpy=np.__version__, python=host_platform.python_version())


def default_output(kind: str, env: dict, suffix: str, quick: bool = False) -> Path:
    """experiments/results/<kind>-<date>-<device>[-quick]<suffix>."""
    device = env["device"].replace(" ", "_")
    return RESULTS / f"{kind}-{env['date']}-{device}{'-quick' if quick else ''}{suffix}"


def format_value(value, spec: str | None = None) -> str:
    """A table cell: ``spec`` if given, else errors in e-notation and other
    floats to three significant digits."""
    if value is None:
        return ""
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.1e}" if abs(value) < 1e-2 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str | None]]) -> str:
    """``columns``: (row key, header, format spec or None); missing keys are blank."""
    numeric = [isinstance(next((r[k] for r in rows if r.get(k) is not None), ""), (int, float))
               for k, _, _ in columns]
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(key), spec)
                                       for key, _, spec in columns) + " |")
    return "\n".join(lines)


class Progress:
    """``label [ 3/12]    40 s  what`` on stderr at each step: one line
    rewritten in place on a terminal, one line per step in a log."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = time.perf_counter()
        self.in_place = sys.stderr.isatty()

    def _write(self, text: str) -> None:
        sys.stderr.write(f"\r\x1b[K{text}" if self.in_place else f"{text}\n")
        sys.stderr.flush()

    def step(self, what: str) -> None:
        """Announce the step now starting."""
        self.done += 1
        self._write(f"{self.label} [{self.done:>{len(str(self.total))}}/{self.total}] "
                    f"{time.perf_counter() - self.start:5.0f} s  {what}")

    def finish(self) -> None:
        self._write(f"{self.label}: {self.done} steps in {time.perf_counter() - self.start:.0f} s")
        if self.in_place:
            sys.stderr.write("\n")
