"""Kernel benchmarks against NumPy and PyTorch baselines, measured in the same run.

``run_kernel_benchmarks(sizes, repeats)`` returns one dict per (kernel, size, baseline) with
medians of ``repeats`` timings after a JIT warm-up; ``format_table(rows)`` renders them for the
CLI (``hpcfed bench kernels``); ``benchmarks/bench_kernels.py`` writes them as JSON.
Everything runs on one thread (``torch.set_num_threads(1)``); compare ratios, not absolute times
(benchmarks.md).
"""

from __future__ import annotations

import time

import numpy as np

from hpcfed import kernels as K


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: JIT compile and first-touch page faults stay out of the timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _entropy_per_symbol(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _row(kernel, n, ms, baseline, baseline_ms, **extra):
    row = {"kernel": kernel, "n": n, "ms": round(ms, 3), "baseline": baseline}
    row["baseline_ms"] = None if baseline_ms is None else round(baseline_ms, 3)
    row["speedup"] = None if not baseline_ms else round(baseline_ms / ms, 2)
    row.update(extra)
    return row


def _bench_topk(x, k, repeats):
    n = x.size
    rows = []
    ours = _median_ms(lambda: K.topk_abs(x, k), repeats)
    rows.append(
        _row(
            "topk_abs",
            n,
            ours,
            "np.argpartition",
            _median_ms(lambda: np.argpartition(np.abs(x), n - k)[n - k :], repeats),
            k=k,
        )
    )
    try:
        import torch
    except ImportError:
        return rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xt = torch.from_numpy(x)
        base = _median_ms(lambda: torch.topk(xt.abs(), k, sorted=False), repeats)
    finally:
        torch.set_num_threads(threads)
    rows.append(_row("topk_abs", n, ours, "torch.topk (1 thread)", base, k=k))
    return rows


def _bench_quantise(x, repeats):
    n = x.size
    scale = K.absmax(x)
    inv = np.float32(15 / (2 * scale))

    def numpy_quantise():
        return np.clip(np.floor((x + np.float32(scale)) * inv + np.float32(0.5)), 0, 15).astype(np.uint8)

    def numpy_pack4(q):
        return (q[0::2] | (q[1::2] << 4)).astype(np.uint8)

    q4 = K.quantize_uniform(x, 4, scale)
    q1 = K.quantize_sign(x)
    stream = _median_ms(lambda: K.absmax(x), repeats)
    rows = [
        _row(
            "quantize_uniform 4b",
            n,
            _median_ms(lambda: K.quantize_uniform(x, 4, scale), repeats),
            "numpy vectorised",
            _median_ms(numpy_quantise, repeats),
        ),
        _row(
            "quantize_uniform 4b stochastic",
            n,
            _median_ms(lambda: K.quantize_uniform(x, 4, scale, stochastic=True, seed=1), repeats),
            None,
            None,
        ),
        _row(
            "pack_bits 1b",
            n,
            _median_ms(lambda: K.pack_bits(q1, 1), repeats),
            "np.packbits",
            _median_ms(lambda: np.packbits(q1, bitorder="little"), repeats),
        ),
        _row(
            "pack_bits 4b",
            n,
            _median_ms(lambda: K.pack_bits(q4, 4), repeats),
            "numpy shifts",
            _median_ms(lambda: numpy_pack4(q4), repeats),
        ),
    ]
    two_step = _median_ms(lambda: K.pack_bits(K.quantize_uniform(x, 4, scale), 4), repeats)
    rows.append(
        _row(
            "quantize_pack_uniform 4b",
            n,
            _median_ms(lambda: K.quantize_pack_uniform(x, 4, scale), repeats),
            "quantize_uniform+pack_bits",
            two_step,
        )
    )
    fused = _median_ms(lambda: K.quantize_pack_uniform(x, 4, K.absmax(x)), repeats)
    both = _median_ms(lambda: K.pack_bits(K.quantize_uniform(x, 4, K.absmax(x)), 4), repeats)
    for label, ms in [("absmax+quantize+pack 4b", fused), ("absmax+quantize+pack 4b (two-step)", both)]:
        rows.append(_row(label, n, ms, "one streaming pass (absmax)", stream, passes=round(ms / stream, 2)))
    return rows


def _bench_entropy(x, repeats):
    """Bits per symbol of rANS (constriction), zstd and Rice against the empirical entropy."""
    from hpcfed.codecs import entropy

    rows = []
    n = x.size
    k = max(1, n // 100)
    idx, _ = K.topk_abs(x, k)
    gaps = K.gaps_encode(idx, n)
    r = K.rice_parameter(gaps)
    coded = K.rice_encode(gaps, r)
    h = _entropy_per_symbol(gaps)
    rows.append(
        _row(
            "rice gaps (s=0.99)",
            n,
            _median_ms(lambda: K.rice_encode(gaps, r), repeats),
            None,
            None,
            symbols=k,
            bits_per_symbol=round(8 * coded.size / k, 4),
            entropy=round(h, 4),
            overhead=round(8 * coded.size / k / h - 1, 4),
        )
    )
    ternary = (np.sign(x) * (np.abs(x) > 1.0) + 1).astype(np.uint8)  # P(0) ~ 0.68
    dense4 = K.quantize_uniform(x, 4, K.absmax(x))
    for name, sym, alphabet in [("ternary", ternary, 3), ("uniform 4b dense", dense4, 16)]:
        h = _entropy_per_symbol(sym)
        data = entropy.encode_symbols(sym, alphabet)
        rows.append(
            _row(
                f"rANS {name}",
                n,
                _median_ms(lambda s=sym, a=alphabet: entropy.encode_symbols(s, a), repeats),
                None,
                None,
                bits_per_symbol=round(8 * len(data) / sym.size, 4),
                entropy=round(h, 4),
                overhead=round(8 * len(data) / sym.size / h - 1, 4),
            )
        )
        try:
            import zstandard
        except ImportError:
            continue
        z = zstandard.ZstdCompressor(level=3)
        zlen = len(z.compress(sym.tobytes()))
        rows.append(
            _row(
                f"zstd-3 {name}",
                n,
                _median_ms(lambda s=sym, z=z: z.compress(s.tobytes()), repeats),
                None,
                None,
                bits_per_symbol=round(8 * zlen / sym.size, 4),
                entropy=round(h, 4),
                overhead=round(8 * zlen / sym.size / h - 1, 4),
            )
        )
    return rows


def run_kernel_benchmarks(sizes=(1_000_000, 10_000_000), repeats: int = 5, entropy_size: int = 1_000_000):
    """Rows (dicts) comparing every kernel with its NumPy/PyTorch baseline at each size."""
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        x = rng.standard_normal(n, dtype=np.float32)
        rows += _bench_topk(x, max(1, n // 100), repeats)
        rows += _bench_quantise(x, repeats)
    rows += _bench_entropy(rng.standard_normal(entropy_size, dtype=np.float32), repeats)
    return rows


def format_table(rows) -> str:
    """A plain-text table of benchmark rows."""
    head = ["kernel", "n", "ms", "baseline", "baseline ms", "speedup", "bits/sym", "entropy"]
    lines = [
        [
            r["kernel"],
            f"{r['n']:,}",
            f"{r['ms']:.2f}",
            r["baseline"] or "-",
            "-" if r["baseline_ms"] is None else f"{r['baseline_ms']:.2f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.1f}x",
            f"{r['bits_per_symbol']:.3f}" if "bits_per_symbol" in r else "-",
            f"{r['entropy']:.3f}" if "entropy" in r else "-",
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines]
    )
