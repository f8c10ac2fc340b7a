"""The chunked scan's forward + backward rows (``experiments.bench_ssd``'s
``--backward`` mode) as a module of its own, for ``experiments.compare``'s
main job (op ``chunked_scan_backward``)."""

from experiments.bench_ssd import backward_rows


def run(quick: bool) -> list[dict]:
    return backward_rows(quick)
