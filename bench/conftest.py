"""Shared benchmark machinery: device, shapes by ``--bench-size``, providers, one timing helper, the speed-up table.

Every benchmark times one provider on one (op, mode, shape): ``eager`` (the pure-PyTorch reference in
``urda_fast/ops/reference.py``, i.e. the composite a user would write), ``compile`` (``torch.compile`` of that same
function, fullgraph, static shapes) and each urda_fast backend that runs on the device. At the end of the session a
table of ratios to eager and to compile is printed and added to ``--benchmark-json``.
"""

from __future__ import annotations

import functools
import glob
import os
import statistics
import time
from collections import defaultdict

import pytest
import torch

import urda_fast.ops as ops
from urda_fast.allocator import keep_freed_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32
# Timed work per benchmark (the number of rounds adapts to the cost of one call); at least MIN_ROUNDS rounds.
# URDA_FAST_BENCH_SECONDS shortens it where time is scarce (a lent GPU's minutes).
TARGET_SECONDS = float(os.environ.get("URDA_FAST_BENCH_SECONDS", "2.0"))
MIN_ROUNDS, MAX_ROUNDS = 10, 200

_RESULTS: list[dict] = []  # one entry per finished benchmark; read by the session-end table


def pytest_configure(config):
    # Every provider, eager twins included, runs with freed CPU memory kept (urda_fast/allocator.py), buffers over
    # 32 MiB too: no provider's time holds the page faults that otherwise swamp a step's buffers on this VM.
    keep_freed_memory(large_buffers=True)


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=("small", "large"), default=None,
                     help="shapes to benchmark: 'large' = every shape of the issue (default on a GPU); 'small' = the "
                          "ones a CPU runs in minutes (default on CPU)")


def bench_size(config) -> str:
    return config.getoption("--bench-size") or ("large" if DEVICE.type == "cuda" else "small")


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def our_backends() -> list[str]:
    """urda_fast backends that run tensors of DEVICE. Triton on CPU would be its interpreter, which is not a speed
    path, so it is never benchmarked there (even with TRITON_INTERPRET=1)."""
    runs_here = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}[DEVICE.type]
    return [name for name in ops.available_backends() if name in runs_here]


@pytest.hookimpl(trylast=True)  # after the parametrize marks, so ids read test_pgd_step[linf-64x3x224x224-cpu]
def pytest_generate_tests(metafunc):
    """``shape`` comes from the module's ``SHAPES[size]``; ``provider`` from the device (plus ``<backend>_inplace``
    for modules with ``INPLACE = True``)."""
    if "shape" in metafunc.fixturenames:
        shapes = metafunc.module.SHAPES[bench_size(metafunc.config)]
        metafunc.parametrize("shape", shapes, ids=[shape_id(s) for s in shapes])
    if "provider" in metafunc.fixturenames:
        providers = ["eager", "compile"]
        for name in our_backends():
            providers += [name, f"{name}_inplace"] if getattr(metafunc.module, "INPLACE", False) else [name]
        metafunc.parametrize("provider", providers)


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def last_level_cache_bytes() -> int:
    """The CPU's largest cache, from sysfs (Python's os.sysconf has no cache names); 0 where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


FLUSH_MIN, FLUSH_MAX = 64 * 2**20, 128 * 2**20


@functools.cache
def _flush_buffer() -> torch.Tensor:
    # Twice the last-level cache, between 64 and 128 MiB (CPU), or triton.testing.do_bench's 256 MB (GPU): every
    # round starts cold, as the tensors of a real training step do, and the small shapes cannot be timed out of
    # cache. The cap: a cloud VM reports its host's whole L3 (480 MiB here, shared by every core of the socket), and
    # zeroing 2x that before each of thousands of rounds would take longer than the benchmarks (256 MiB doubled the
    # CPU suite's time to 14 minutes, against its 15-minute budget).
    if DEVICE.type == "cuda":
        nbytes = 256 * 2**20
    else:
        nbytes = min(FLUSH_MAX, max(FLUSH_MIN, 2 * last_level_cache_bytes()))
    return torch.empty(nbytes // 4, dtype=torch.int32, device=DEVICE)


def flush_cache() -> None:
    _flush_buffer().zero_()
    synchronize()


def _median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        flush_cache()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.cache
def copy_seconds(numel: int, dtype: torch.dtype) -> float:
    """Median time of ``dst.copy_(src)`` for one tensor of ``numel`` elements: the memory-bound limit of this device
    for that size (reads + writes 2 * numel * itemsize bytes), timed like the benchmarks (cold cache)."""
    src = torch.rand(numel, dtype=dtype, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages happens here, not in the timed rounds
    est = _median_seconds(lambda: dst.copy_(src), 3)
    return _median_seconds(lambda: dst.copy_(src), _rounds(est))


def _rounds(seconds_per_call: float) -> int:
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_SECONDS / max(seconds_per_call, 1e-9))))


def peak_memory_bytes(fn) -> int:
    """Peak bytes of tensor storage allocated during ``fn()`` above what was allocated before it.

    GPU: the caching allocator's ``max_memory_allocated``. CPU: torch has no allocator statistics, so replay the
    allocation/free events that ``torch.profiler(profile_memory=True)`` records from c10's CPU allocator (every tensor
    storage, including those of inductor code and of our C++ kernels); process RSS would be dominated by malloc's
    caching and page reuse."""
    if DEVICE.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated(DEVICE) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


class Bench:
    """What a benchmark needs: the device and dtype, the function of a provider, and ``run`` (time + record)."""

    device, dtype = DEVICE, DTYPE

    def __init__(self, benchmark):
        self.benchmark = benchmark

    @staticmethod
    def provider_fn(provider: str, reference_fn, our_fn, our_inplace_fn=None):
        if provider == "eager":
            return reference_fn
        if provider == "compile":
            # A fresh dynamo cache per benchmark: otherwise the second shape of a function makes dynamo recompile it
            # with dynamic shapes, and later shapes would time slower, generic kernels.
            torch._dynamo.reset()
            return torch.compile(reference_fn, fullgraph=True, dynamic=False)
        if provider.endswith("_inplace"):
            return functools.partial(our_inplace_fn, backend=provider.removesuffix("_inplace"))
        return functools.partial(our_fn, backend=provider)

    def run(self, fn, *, op, mode, shape, provider, bytes_moved=None, copy_numel=None, images=None, variant="",
            setup=None, memory=False, paired=None, rounds=None):
        """Time ``fn`` (cold cache, CUDA synchronized inside the timed function) and record its numbers.

        ``bytes_moved``: the compulsory traffic (inputs read once, outputs written once), the same for every provider,
        so GB/s compares providers and ``copy_numel`` elements copied give the memory-bound limit to compare with.
        Both only for the memory-bound ops; a training step gives ``images`` per call instead (images/s).

        ``paired``: the eager twin's call. One untimed-by-pytest-benchmark round of it runs just before every round of
        ``fn``, from a cold cache like that round, and is timed here; the median of the per-pair ratios is
        ``paired_vs_eager``. This VM's neighbours slow a 2-thread run by up to 10x for seconds at a time, so
        benchmarks minutes apart do not compare; pairs do.
        ``rounds``: a fixed round count instead of one sized to TARGET_SECONDS (the twin then warms up in the warm-up
        round)."""
        for _ in range(2):  # outside the timed region: torch.compile compiles (forward and backward), Triton JITs
            fn()
        synchronize()

        def timed():
            fn()
            synchronize()

        paired_seconds = []

        def before_round():
            if paired is not None:
                flush_cache()  # the twin from a cold cache too, as the timed round: otherwise it inherits a warm one
                begin = time.perf_counter()
                paired()
                synchronize()
                paired_seconds.append(time.perf_counter() - begin)
            if setup is not None:
                setup()
            flush_cache()

        if rounds is None:
            est = _median_seconds(timed, 1)
            if paired is not None:  # a round costs both calls: budget the pair (this also warms the twin up)
                est += _median_seconds(paired, 1)
            rounds = _rounds(est)
        self.benchmark.pedantic(timed, setup=before_round, rounds=rounds, warmup_rounds=1, iterations=1)
        # a benchmark's own dtype label ("bfloat16 autocast" for the attacks' AMP path) is kept
        dtype_label = self.benchmark.extra_info.get("dtype") or str(self.dtype).removeprefix("torch.")
        info = {"device": device_name(), "dtype": dtype_label, "op": op, "variant": variant,
                "mode": mode, "shape": shape_id(shape), "provider": provider}
        if copy_numel is not None:
            copy_s = copy_seconds(copy_numel, self.dtype)
            info.update(copy_bytes=2 * copy_numel * _itemsize(self.dtype), copy_ms=copy_s * 1e3)
            info["copy_gbs"] = info["copy_bytes"] / copy_s / 1e9
        if memory:
            info["peak_mem_mb"] = peak_memory_bytes(fn) / 2**20
        stats = self.benchmark.stats  # None under --benchmark-disable
        if stats is not None:
            median = stats.stats.median
            info["median_ms"] = median * 1e3
            if bytes_moved is not None:
                info.update(bytes_moved=bytes_moved, gbs=bytes_moved / median / 1e9)
            if images is not None:
                info["images_per_s"] = images / median
            if paired is not None:
                # round i's twin ran in the setup just before it; the warm-up round had one too (the first), and
                # --benchmark-cprofile calls setup once more after the rounds: pair from the start, past the warm-up
                rounds = stats.stats.data
                eager = paired_seconds[1:1 + len(rounds)]
                assert len(eager) == len(rounds), (len(paired_seconds), len(rounds))
                info["paired_eager_ms"] = statistics.median(eager) * 1e3
                info["paired_vs_eager"] = statistics.median(e / t for e, t in zip(eager, rounds))
            _RESULTS.append(info)
        self.benchmark.extra_info.update(info)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@pytest.fixture
def bench(benchmark):
    torch.manual_seed(0)
    return Bench(benchmark)


def summary_rows(results: list[dict]) -> list[dict]:
    """One row per (op, variant, mode, shape, our provider): its time, eager's and compile's, and the speed-ups
    (> 1 means ours is faster)."""
    groups = defaultdict(dict)
    for r in results:
        groups[(r["op"], r["variant"], r["mode"], r["shape"])][r["provider"]] = r
    rows = []
    for (op, variant, mode, shape), by_provider in groups.items():
        eager, compiled = by_provider.get("eager"), by_provider.get("compile")
        for provider, ours in by_provider.items():
            if provider in ("eager", "compile"):
                continue
            row = {"op": f"{op} {variant}".strip(), "mode": mode, "shape": shape, "provider": provider,
                   "ours_ms": ours["median_ms"], "gbs": ours.get("gbs"), "copy_gbs": ours.get("copy_gbs"),
                   "peak_mb": ours.get("peak_mem_mb")}
            for name, base in (("eager", eager), ("compile", compiled)):
                row[f"{name}_ms"] = base["median_ms"] if base else None
                row[f"vs_{name}"] = base["median_ms"] / ours["median_ms"] if base else None
                row[f"{name}_peak_mb"] = base.get("peak_mem_mb") if base else None
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (printed at session end, pasted into bench/README.md)."""
    def mem(row):
        values = (row["eager_peak_mb"], row["compile_peak_mb"], row["peak_mb"])
        return "" if row["peak_mb"] is None else " / ".join("-" if v is None else f"{v:.2f}" for v in values)

    def num(value, fmt, suffix=""):
        return "-" if value is None else format(value, fmt) + suffix

    lines = ["| op | mode | shape | ours | eager ms | compile ms | ours ms | vs eager | vs compile | ours GB/s | "
             "copy GB/s | peak MB eager / compile / ours |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {r['provider']} | {num(r['eager_ms'], '.3f')} | "
                     f"{num(r['compile_ms'], '.3f')} | {r['ours_ms']:.3f} | {num(r['vs_eager'], '.2f', 'x')} | "
                     f"{num(r['vs_compile'], '.2f', 'x')} | {num(r['gbs'], '.1f')} | {num(r['copy_gbs'], '.1f')} | "
                     f"{mem(r)} |")
    return "\n".join(lines)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    terminalreporter.write_sep("-", f"urda_fast speed-ups on {device_name()}, {DTYPE} (> 1x: ours faster)")
    terminalreporter.write_line(format_table(summary_rows(_RESULTS)))


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["urda_fast_summary"] = {"device": device_name(), "dtype": str(DTYPE), "rows": summary_rows(_RESULTS)}


def autocast_bf16(fn):
    """``fn`` run under CUDA bf16 autocast (the backward then runs outside it, as in the training loop)."""

    def wrapped():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn()

    return wrapped
