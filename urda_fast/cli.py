"""The ``urda-fast`` command line: a thin layer over library functions.

    urda-fast info [--json]          versions and the backends usable here
    urda-fast demo [--size small]    run every fused op on every backend against the reference, with timings
    urda-fast dart demo|pretrain|robustify|eval ...   robust domain adaptation (see `urda-fast dart -h`)
    urda-fast hpt demo|proxy-check|train|eval ...     robustness transfer between CLIPs (see `urda-fast hpt -h`)
    urda-fast profile dart|hpt --steps N              a short loop under torch.profiler: trace + top-ops table
    urda-fast bench report RESULTS.json [--out DIR]   pytest-benchmark JSON -> Markdown tables + PNG plots
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time

import torch

import urda_fast
from urda_fast import allocator, ops


def environment_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "urda_fast": urda_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        "backends": ops.available_backends(),
        "keep_freed_memory": allocator.applied(),
    }


def cmd_info(args) -> int:
    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {', '.join(value) if isinstance(value, list) else value}")
    return 0


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def demo_cases(size: str, device: torch.device):
    """(name, fn(backend) -> tensor) pairs: one PGD step, a distillation KL forward+backward, the feature losses."""
    big = size == "large"
    shape = (32, 3, 224, 224) if big else (64, 3, 32, 32)
    x_orig = torch.rand(shape, device=device)
    x_adv = (x_orig + (torch.rand_like(x_orig) - 0.5) * 0.06).clamp(0, 1)
    grad = torch.randn_like(x_orig)
    rows, classes = (4096, 1000) if big else (512, 100)
    student = torch.randn(rows, classes, device=device)
    teacher = torch.randn(rows, classes, device=device)
    weight = torch.rand(rows, device=device)
    feats = torch.randn(rows, 256, device=device), torch.randn(rows, 256, device=device)

    def kl_fwd_bwd(backend):
        s = student.clone().requires_grad_()
        loss = ops.kd_kl_loss(s, teacher, temperature=2.0, weight=weight, backend=backend)
        (grad_s,) = torch.autograd.grad(loss, s)
        return grad_s

    def step(norm):
        eps = 8 / 255 if norm == "linf" else 0.5
        return lambda backend: ops.pgd_step(x_adv, grad, x_orig, step_size=2 / 255, eps=eps, norm=norm,
                                            backend=backend)

    return [
        (f"pgd_step linf {tuple(shape)}", step("linf")),
        (f"pgd_step l2 {tuple(shape)}", step("l2")),
        (f"kd_kl_loss fwd+bwd ({rows}, {classes})", kl_fwd_bwd),
        (f"feature_mse_loss ({rows}, 256)", lambda b: ops.feature_mse_loss(*feats, backend=b)),
        (f"feature_cosine_loss ({rows}, 256)", lambda b: ops.feature_cosine_loss(*feats, backend=b)),
    ]


def cmd_demo(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # the backends that take this device's tensors (the cpu kernels refuse CUDA tensors; Triton on CPU is interpreted)
    runs_here = {"cuda", "triton"} if device.type == "cuda" else {"cpu"}
    fast = [b for b in ops.available_backends() if b in runs_here]
    print(f"urda_fast {urda_fast.__version__} on {device} ({torch.get_num_threads()} CPU threads); "
          f"backends: {', '.join(fast) or 'none built'}")
    print(f"{'op':<44} {'backend':<8} {'ms':>9} {'eager ms':>9} {'speed-up':>9} {'max |ours - reference|':>24}")
    for name, fn in demo_cases(args.size, device):
        want = fn("reference")
        eager_ms = _median_ms(lambda: fn("reference"), args.repeats)
        for backend in fast:
            got = fn(backend)
            error = (got.double() - want.double()).abs().max().item()
            ms = _median_ms(lambda: fn(backend), args.repeats)
            print(f"{name:<44} {backend:<8} {ms:>9.3f} {eager_ms:>9.3f} {eager_ms / ms:>8.2f}x {error:>24.3e}")
    return 0


def _load_config(args, cls):
    from urda_fast.config import flags_to_overrides, load_config

    return load_config(cls, args.config, flags_to_overrides(args, cls))


def cmd_dart(args) -> int:
    from urda_fast import dart

    if args.dart_command == "demo":
        dart.demo(args.out, scale=args.scale, device=args.device, seed=args.seed)
    elif args.dart_command == "pretrain":
        cfg = _load_config(args, dart.PretrainConfig)
        _print_on_rank_0(json.dumps(dart.pretrain(cfg)["best"]))
    elif args.dart_command == "robustify":
        cfg = _load_config(args, dart.RobustifyConfig)
        _print_on_rank_0(json.dumps(dart.robustify(cfg)["best"]))
    elif args.dart_command == "summary":
        from urda_fast.dart.summary import summarize, to_markdown

        print(to_markdown(summarize(args.reports, out=args.out)))
    else:
        data_flags = {k: getattr(args, k) for k in ("data", "root", "source", "target")}
        report = dart.evaluate_runs(args.runs, attacks=tuple(args.attacks.split(",")),
                                    eps=args.eps, data_flags=data_flags, labels=_run_labels(args.label, args.runs),
                                    out=args.out, device=args.device, batch_size=args.batch_size,
                                    num_workers=args.num_workers, max_batches=args.max_batches,
                                    attack_space=args.attack_space)
        from urda_fast.dart.report import to_markdown

        print(to_markdown(report))
    return 0


def _run_labels(given, runs) -> dict:
    """`--label RUN=NAME` flags as {run: name}; RUN must be one of the runs as given."""
    labels = {}
    for item in given or ():
        run, sep, name = item.rpartition("=")
        if not sep or not run or not name.strip():
            raise ValueError(f"dart eval: --label takes RUN=NAME (e.g. runs/A2W-cdan=cdan), got {item!r}")
        if run not in runs:
            raise ValueError(f"dart eval: --label {item!r} names {run!r}, which is not one of the runs given "
                             f"({', '.join(runs)}); write it as on the command line")
        if run in labels and labels[run] != name.strip():
            raise ValueError(f"dart eval: --label names {run!r} twice ({labels[run]!r}, {name.strip()!r}); give one")
        labels[run] = name.strip()
    return labels  # two runs named alike: evaluate_runs refuses them before any evaluation


def _add_dart(sub) -> None:
    from urda_fast.config import add_dataclass_flags
    from urda_fast.dart.config import ATTACK_SPACES, PretrainConfig, RobustifyConfig

    dart = sub.add_parser("dart", help="DART: robust unsupervised domain adaptation")
    dart.set_defaults(run=cmd_dart)
    commands = dart.add_subparsers(dest="dart_command", required=True)
    demo = commands.add_parser("demo", help="source-only, DANN, DANN+VAT and DART on the embedded digits")
    demo.add_argument("--out", default="runs/dart-demo",
                      help="folder of the four runs and the report; runs already there are started over")
    demo.add_argument("--scale", type=_positive_float, default=1.0,
                      help="multiply every iteration count (quick tries)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, default=0, help="seed of every run (other seeds: the spread of the table)")
    for name, cls, text in (("pretrain", PretrainConfig, "step 1: a UDA model (--vat: the UDA+VAT baseline)"),
                            ("robustify", RobustifyConfig, "step 2: DART post-training from --teacher")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("--config", help="YAML file of options (flags override it)")
        add_dataclass_flags(cmd, cls)
        cmd.add_argument("-s", dest="source", help="source domain (short for --source)")
        cmd.add_argument("-t", dest="target", help="target domain (short for --target)")
    ev = commands.add_parser("eval", help="clean / FGSM / PGD target accuracy of runs, as report.md/json/png")
    ev.add_argument("runs", nargs="+", help="run folders (their best.pt) or checkpoint files")
    ev.add_argument("--attacks", default="clean,fgsm,pgd20", help="comma-separated: clean, fgsm, pgdK, autoattack")
    ev.add_argument("--eps", default="8/255", type=_budget_list,
                    help="comma-separated L-inf budgets in [0, 1] pixel units, e.g. 8/255,0.1")
    ev.add_argument("--data", default=None, help="default: the data the first run was trained on")
    ev.add_argument("--root", default="", help="default: the first run's (give it when the dataset moved)")
    ev.add_argument("-s", "--source", default="", help="unused by eval (only the target's test split is read)")
    ev.add_argument("-t", "--target", default="", help="default: the first run's target domain")
    ev.add_argument("--out", default=None, help="folder for report.md/json/png")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--num-workers", type=int, default=4, help="image-decoding processes (none for in-memory data)")
    ev.add_argument("--max-batches", type=int, default=0,
                    help="score a fixed random sample of N x --batch-size test images (0 = all)")
    ev.add_argument("--attack-space", default="pixel", choices=ATTACK_SPACES,
                    help="pixel: --eps in [0, 1] units; normalized / code: in normalised units, as `dart robustify "
                         "--attack-space` attacks (code: the authors' clip of normalised images to [0, 1]; e.g. "
                         "--eps 0.1)")
    ev.add_argument("--label", action="append", metavar="RUN=NAME",
                    help="the row's name for RUN (default: source-only / uda / uda+vat / dart); repeatable")
    summary = commands.add_parser("summary", help="per task and mean over tasks, from `dart eval` reports")
    summary.add_argument("reports", nargs="+", help="`dart eval --out` folders or their report.json, one per task")
    summary.add_argument("--out", default=None, help="folder for summary.md/json")


def cmd_hpt(args) -> int:
    from urda_fast import hpt

    if args.hpt_command == "demo":
        hpt.demo(args.out, scale=args.scale, device=args.device, world_dir=args.world, seed=args.seed)
        return 0
    cls = {"proxy-check": hpt.ProxyCheckConfig, "train": hpt.TrainConfig, "eval": hpt.EvalConfig}[args.hpt_command]
    cfg = _load_config(args, cls)
    names = ",".join(str(getattr(cfg, k, "")) for k in ("data", "datasets", "val_data")).lower()
    uses_world = getattr(cfg, "train_data", "") == "world" or "world:" in names
    world = hpt.open_world(cfg.world) if uses_world else None
    if args.hpt_command == "proxy-check":
        result = hpt.proxy_check(cfg, world)
        print(json.dumps(result, indent=2))
        if cfg.out:
            from urda_fast.files import atomic_write_json

            atomic_write_json(os.path.join(cfg.out, "proxy_check.json"), result)
    elif args.hpt_command == "train":
        _print_on_rank_0(json.dumps(hpt.train(cfg)["best"]))
    else:
        models = [hpt.run_model(path) for path in args.runs]
        if cfg.target:
            models.insert(0, ("zero-shot", cfg.target))
        report = hpt.evaluate_models(models, cfg, world)
        if cfg.out:
            hpt.write_report(report, cfg.out)
        print(hpt.to_markdown(report))
    return 0


def _add_hpt(sub) -> None:
    from urda_fast.config import add_dataclass_flags
    from urda_fast.hpt.config import EvalConfig, ProxyCheckConfig, TrainConfig

    hpt = sub.add_parser("hpt", help="HPT-GPD: robustness transfer between CLIP models")
    hpt.set_defaults(run=cmd_hpt)
    commands = hpt.add_subparsers(dest="hpt_command", required=True)
    demo = commands.add_parser("demo", help="proxy check, TeCoA/PMG-AFT/HPT/HPT-GPD and zero-shot evaluation on the "
                                            "embedded world (offline, CPU)")
    demo.add_argument("--out", default="runs/hpt-demo",
                      help="folder of the runs and the report; runs already there are resumed")
    demo.add_argument("--scale", type=_positive_float, default=1.0,
                      help="multiply the world's sizes and every iteration count")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--world", default="", help="folder of the world (default: a cache folder)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning runs (other seeds: the spread of "
                      "the table; in another --out, as a demo resumes the runs it finds)")
    for name, cls, text in (
            ("proxy-check", ProxyCheckConfig, "the target's white-box PGD accuracy vs. the proxy's on those images"),
            ("train", TrainConfig, "robust fine-tuning: tecoa | pmg-aft | hpt | hpt-gpd"),
            ("eval", EvalConfig, "zero-shot clean / robust accuracy of runs (and --target) over datasets")):
        cmd = commands.add_parser(name, help=text)
        if name == "eval":
            cmd.add_argument("runs", nargs="*", help="`hpt train` run folders (their best.pt) or checkpoints")
        cmd.add_argument("--config", help="YAML file of options (flags override it)")
        add_dataclass_flags(cmd, cls)


def cmd_profile(args) -> int:
    from urda_fast.profile import check_profile_args, dart_step_fn, hpt_step_fn, profile_steps

    attack_steps = {"hpt": 5, "dart": 10}[args.loop] if args.attack_steps is None else args.attack_steps
    check_profile_args(args.steps, args.warmup, args.batch_size, args.image_size, attack_steps, args.out)
    if args.loop == "hpt":
        step, device = hpt_step_fn(target_arch=args.target_arch, proxy_arch=args.proxy_arch, target=args.target,
                                   proxy=args.proxy, batch_size=args.batch_size, image_size=args.image_size,
                                   device=args.device, attack_steps=attack_steps, compile=args.compile)
    else:
        if args.compile:
            raise SystemExit("urda-fast profile: --compile is an hpt option (hpt train --compile); the DART step has "
                             "none")
        step, device = dart_step_fn(backbone=args.backbone, batch_size=args.batch_size, image_size=args.image_size,
                                    teacher=args.teacher, device=args.device, attack_steps=attack_steps)
    result = profile_steps(step, args.steps, args.out, device, warmup=args.warmup)
    print(result["table"])
    print(f"{result['ms_per_step']:.1f} ms/step on {device}; per phase (ms, all steps): "
          + ", ".join(f"{k} {v['cpu_ms']:.1f}" for k, v in result["phases"].items()))
    print(f"trace: {result['trace']} (chrome://tracing or https://ui.perfetto.dev)")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)  # argparse turns its ValueError into "invalid _positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    from urda_fast.config import parse_float

    try:
        value = parse_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}") from None
    if not 0 < value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _budget_list(text: str) -> tuple:
    """``--eps 8/255,0.1`` as floats; argparse names the flag when one is not a number."""
    from urda_fast.config import parse_float

    try:
        return tuple(parse_float(e) for e in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers or fractions "
                                         "(e.g. 8/255,16/255)") from None


def _add_profile(sub) -> None:
    prof = sub.add_parser("profile", help="a few training steps under torch.profiler (trace + top-ops table)")
    prof.add_argument("loop", choices=("dart", "hpt"), help="which training loop")
    prof.add_argument("--steps", type=int, default=5)
    prof.add_argument("--warmup", type=int, default=2)
    prof.add_argument("--out", default="runs/profile")
    prof.add_argument("--device", default="auto")
    prof.add_argument("--backbone", default="digits_cnn", help="dart: random-init teacher/student (no --teacher)")
    prof.add_argument("--teacher", default="", help="dart: a `dart pretrain` checkpoint instead of a random model")
    prof.add_argument("--target-arch", default="urda-tiny-vit", help="hpt: random-init target CLIP (no --target)")
    prof.add_argument("--proxy-arch", default="urda-tiny-rn", help="hpt: random-init proxy CLIP (no --proxy)")
    prof.add_argument("--target", default="", help="hpt: ARCH:CHECKPOINT of the target instead of a random one")
    prof.add_argument("--proxy", default="", help="hpt: ARCH:CHECKPOINT of the proxy instead of a random one")
    prof.add_argument("--batch-size", type=int, default=64)
    prof.add_argument("--image-size", type=int, default=0,
                      help="default: dart 16 for digits_cnn, 224 for ResNets; hpt the target's input size")
    prof.add_argument("--attack-steps", type=int, default=None, help="default: dart 10, hpt 5 (the methods' values)")
    prof.add_argument("--compile", action="store_true",
                      help="hpt: the image towers through torch.compile, as `hpt train --compile` (warm-up steps "
                           "compile; raise --warmup if the first profiled steps still do)")
    prof.set_defaults(run=cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="urda-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and available backends")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)
    demo = sub.add_parser("demo", help="run the fused ops against the reference on built-in data")
    demo.add_argument("--size", choices=("small", "large"), default="small")
    demo.add_argument("--repeats", type=_positive_int, default=5)
    demo.set_defaults(run=cmd_demo)
    _add_dart(sub)
    _add_hpt(sub)
    _add_profile(sub)
    from urda_fast.bench_report import add_bench_parser

    add_bench_parser(sub)
    return parser


# What the library raises for bad input (a missing file, a wrong flag value, an unavailable backend): the command
# line prints its message, not a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               ImportError, FloatingPointError)
TRACEBACK_ENV = "URDA_FAST_TRACEBACK"


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, USER_ERRORS) or (isinstance(exc, RuntimeError) and str(exc).startswith("urda_fast:"))


NEGATIVE_FRACTION = re.compile(r"-\d*\.?\d+/\d*\.?\d+")


def _attach_negative_fractions(argv: list) -> list:
    """``--eps -8/255`` as ``--eps=-8/255``: argparse takes a negative fraction for an option and says only "expected
    one argument"; attached, the value reaches its check, which says what is wrong with it."""
    out = []
    for word in argv:
        if NEGATIVE_FRACTION.fullmatch(word) and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={word}"
        else:
            out.append(word)
    return out


# The commands that train data-parallel under torchrun; every other one would do its whole work once per process.
DATA_PARALLEL = {("dart", "pretrain"), ("dart", "robustify"), ("hpt", "train")}


def _refuse_torchrun_unless_training(args) -> None:
    from urda_fast import distributed

    command = (args.command, getattr(args, "dart_command", None) or getattr(args, "hpt_command", None))
    try:
        world = distributed.context().world_size
    except RuntimeError:  # WORLD_SIZE without RANK: a scheduler's variable, not torchrun (training names it)
        return
    if world > 1 and command not in DATA_PARALLEL:
        raise ValueError(f"it runs in one process, not under torchrun (WORLD_SIZE={world}), where each process "
                         "would do the whole work and write the same files; data-parallel commands: "
                         + ", ".join(f"`{a} {b}`" for a, b in sorted(DATA_PARALLEL)))


def _print_on_rank_0(text: str) -> None:
    from urda_fast import distributed

    if distributed.context().is_main:
        print(text)


def main(argv=None) -> int:
    argv = _attach_negative_fractions(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    allocator.keep_freed_memory()  # CPU steps stop page-faulting their buffers (urda_fast/allocator.py)
    try:
        _refuse_torchrun_unless_training(args)
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: the training loop has said where it stopped and saved; no traceback
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as exc:
        if not _is_user_error(exc) or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        words = [args.command] + [getattr(args, name, None) for name in ("dart_command", "hpt_command", "loop",
                                                                        "bench_command")]
        command = " ".join(word for word in words if word)
        raise SystemExit(f"urda-fast {command}: error: {exc}\n({TRACEBACK_ENV}=1 shows the traceback)") from exc


if __name__ == "__main__":
    sys.exit(main())
