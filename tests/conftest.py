"""Test-session settings: one intra-op thread per test process.

The tiny models gain nothing from a second thread, and on a 2-core machine several
processes (CPU DDP ranks, CLI subprocesses, other jobs) each starting a full thread pool
oversubscribe the cores and slow everything down. Subprocesses inherit the variable.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
