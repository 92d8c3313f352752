"""Wall time and peak memory of a whole process tree (mpirun and its ranks, Ray and its workers)."""

from __future__ import annotations

import subprocess
import threading
import time


def run_tree(
    cmd: list[str], env: dict, interval: float = 0.02
) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``cmd``; return (wall seconds from launch to exit, peak of the summed resident memory of
    the process and all its descendants in bytes, sampled every ``interval`` s, the process)."""
    import psutil  # the [bench] extra

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass  # exited between the listing and the reading
            peak = max(peak, total)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    return wall, peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)
