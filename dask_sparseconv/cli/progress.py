"""Following a running graph's block tasks: a redrawn bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from .report import fmt_seconds


class ProgressReporter:
    """Block progress: a redrawn bar on a terminal, plain periodic lines otherwise.

    Written here rather than taken from tqdm or rich (issue #14 asked):
    the plain ``progress: K/N blocks (P%), ... elapsed, about ... left``
    lines are an interface (logs of batch jobs, benchmarks/bench_resume.py
    and the tests parse them) that neither library prints as such, so a
    library would only replace the ~10 lines of the terminal bar, at the
    cost of a dependency. dask's own ``distributed.progress`` counts every
    task of the graph (reads, writes, chain links), not row blocks.
    """

    def __init__(self, total: int, stream=None, tty: bool | None = None, interval: float = 2.0, width: int = 30):
        self.total = max(0, int(total))
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.width = width
        self.t0 = time.perf_counter()
        self._last_line = -math.inf
        self._last_pct = -1
        self.done = 0

    def _text(self) -> str:
        elapsed = time.perf_counter() - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = ""
        if 0 < self.done < self.total:
            eta = f", about {fmt_seconds(elapsed / self.done * (self.total - self.done))} left"
        return f"{self.done}/{self.total} blocks ({pct:.0f}%), {fmt_seconds(elapsed)} elapsed{eta}"

    def update(self, done: int) -> None:
        self.done = int(done)
        now = time.perf_counter()
        if self.tty:
            filled = int(round(self.width * self.done / self.total)) if self.total else self.width
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self._text()}\033[K")
            self.stream.flush()
            return
        pct10 = int(10 * self.done / self.total) if self.total else 10
        if self.done == self.total or now - self._last_line >= self.interval or pct10 > self._last_pct:
            self.stream.write(f"progress: {self._text()}\n")
            self.stream.flush()
            self._last_line, self._last_pct = now, pct10

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_graph(client, graph, n_blocks: int) -> Any:
    """Compute the pipeline's graph on ``client``, reporting block progress.

    The block tasks (:func:`dask_sparseconv.pipeline.graph.block_keys`) are computed alongside the
    final summary task so that each one's completion can be followed.
    """
    from distributed import as_completed

    from ..pipeline.graph import block_keys as graph_block_keys
    from ..pipeline.graph import key_blocks

    block_keys = graph_block_keys(graph)
    # one graph, all the keys wanted: computing each block as a collection of
    # its own merged the whole graph once per block (400 blocks: 0.4 s of
    # submission; this: 0.01 s)
    futures = client.get(graph.__dask_graph__(), [graph.key, *block_keys], sync=False)
    final, blocks = futures[0], futures[1:]
    # a resumed run's written blocks are one key per run of them
    weight = {k: key_blocks(k) for k in block_keys}
    progress = ProgressReporter(sum(weight.values()) or n_blocks)
    progress.update(0)
    done = 0
    try:
        for fut in as_completed(blocks):
            if fut.status == "error":
                fut.result()  # raises the task's exception
            done += weight[fut.key]
            progress.update(done)
        summary = final.result()
    finally:
        progress.close()
        for f in futures:
            f.release()
    return summary
