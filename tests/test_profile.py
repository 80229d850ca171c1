"""`urda-fast profile dart|hpt` writes a loadable trace with the loop's phases; NVTX ranges on or off change no
result."""

import json

import pytest
import torch

from urda_fast.cli import main
from urda_fast.dart.config import RobustifyConfig
from urda_fast.dart.robustify import DartTask
from urda_fast.models import ModelSpec
from urda_fast.profiling import enable_nvtx


def test_profile_command_writes_a_chrome_trace(tmp_path, capsys):
    assert main(["profile", "dart", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--attack-steps", "2",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"step 0", "step 1", "data", "teacher", "attack", "student", "loss", "backward", "optimizer"} <= names
    phases = json.loads((tmp_path / "phases.json").read_text())["phases"]
    for phase in ("data", "teacher", "attack", "student", "loss", "backward", "optimizer"):
        assert phases[phase]["calls"] == 2 and phases[phase]["cpu_ms"] > 0, phase
    assert "Self CPU" in (tmp_path / "top_ops.txt").read_text()
    assert "ms/step" in capsys.readouterr().out


def test_profile_hpt_writes_a_trace_with_the_hpt_phases(tmp_path, capsys):
    assert main(["profile", "hpt", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--attack-steps", "1",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"step 0", "step 1", "data", "text", "attack", "target forward", "proxy forward", "anchor forward",
            "backward", "optimizer"} <= names
    phases = json.loads((tmp_path / "phases.json").read_text())["phases"]
    for phase in ("attack", "target forward", "proxy forward", "anchor forward", "loss"):
        assert phases[phase]["calls"] == 2 and phases[phase]["cpu_ms"] > 0, phase
    assert "ms/step" in capsys.readouterr().out


def test_profile_runs_on_a_torch_build_without_nvtx(tmp_path, monkeypatch):
    """A CPU-only torch wheel's torch.cuda.nvtx functions raise: the ranges then go to the profiler alone."""
    import urda_fast.profiling as profiling

    def no_nvtx(*args):
        raise RuntimeError("NVTX functions not installed. Are you sure you have a CUDA build?")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", no_nvtx)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", no_nvtx)
    profiling._nvtx_available.cache_clear()
    try:
        assert main(["profile", "dart", "--steps", "1", "--warmup", "0", "--batch-size", "4", "--attack-steps", "1",
                     "--out", str(tmp_path), "--device", "cpu"]) == 0
    finally:
        profiling._nvtx_available.cache_clear()
    assert json.loads((tmp_path / "phases.json").read_text())["phases"]["attack"]["calls"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--warmup", "-1"], "warmup must be >= 0, got -1"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--out", "{file}"], "is a file; give a folder"),
])
def test_profile_names_bad_arguments_before_building_models(tmp_path, monkeypatch, flags, message):
    import urda_fast.profile as profile

    monkeypatch.setattr(profile, "dart_step_fn", lambda **kw: pytest.fail("built the models first"))
    (tmp_path / "afile").write_text("")
    flags = [f.format(file=tmp_path / "afile") for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=message):
        main(["profile", "dart", "--device", "cpu", *out, *flags])


def test_profile_hpt_rejects_a_bad_model_argument(tmp_path, monkeypatch):
    # The command line prints the library's message without a traceback (and with one when asked to).
    with pytest.raises(SystemExit, match="urda-fast profile hpt: error: .*ARCH:CHECKPOINT") as exit_info:
        main(["profile", "hpt", "--target", "no-colon", "--out", str(tmp_path), "--device", "cpu"])
    assert isinstance(exit_info.value.__cause__, ValueError) and "URDA_FAST_TRACEBACK=1" in str(exit_info.value)
    with pytest.raises(SystemExit, match="not found"):
        main(["profile", "hpt", "--proxy", f"urda-tiny-rn:{tmp_path / 'missing.pt'}", "--out", str(tmp_path),
              "--device", "cpu"])
    monkeypatch.setenv("URDA_FAST_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="not found"):
        main(["profile", "hpt", "--proxy", f"urda-tiny-rn:{tmp_path / 'missing.pt'}", "--out", str(tmp_path),
              "--device", "cpu"])


def test_profile_dart_says_compile_is_an_hpt_option(tmp_path):
    with pytest.raises(SystemExit, match="--compile is an hpt option"):
        main(["profile", "dart", "--compile", "--out", str(tmp_path), "--device", "cpu"])


def _one_step_loss(nvtx: bool):
    enable_nvtx(nvtx)
    try:
        torch.manual_seed(0)
        teacher = ModelSpec(backbone="digits_cnn", num_classes=10, bottleneck_dim=16).build().eval()
        student = ModelSpec(backbone="digits_cnn", num_classes=10, bottleneck_dim=16).build()
        x = torch.rand(6, 1, 16, 16)
        task = DartTask(RobustifyConfig(attack_steps=2), teacher, student, iter([(x,)]), None)
        loss = task.training_step()["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]
    finally:
        enable_nvtx(False)


def test_nvtx_on_or_off_gives_identical_results():
    loss_off, grads_off = _one_step_loss(False)
    loss_on, grads_on = _one_step_loss(True)
    assert torch.equal(loss_off, loss_on)
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads_on))


def test_ctrl_c_ends_a_command_with_status_130_and_no_traceback(tmp_path, monkeypatch):
    import urda_fast.profile as profile

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile, "profile_steps", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["profile", "dart", "--steps", "1", "--batch-size", "4", "--out", str(tmp_path), "--device", "cpu"])
    assert stop.value.code == 130 and stop.value.__cause__ is None
    monkeypatch.setenv("URDA_FAST_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        main(["profile", "dart", "--steps", "1", "--batch-size", "4", "--out", str(tmp_path), "--device", "cpu"])


def test_a_run_with_nvtx_leaves_the_ranges_as_they_were(tmp_path):
    """--nvtx is the run's: a library caller's next loop is not marked unasked."""
    from urda_fast.dart import PretrainConfig, pretrain
    from urda_fast.profiling import nvtx_enabled

    pretrain(PretrainConfig(data="digits", method="source-only", out=str(tmp_path), iterations=1, batch_size=8,
                            eval_every=100, progress=False, device="cpu", nvtx=True, tensorboard=False))
    assert not nvtx_enabled()
