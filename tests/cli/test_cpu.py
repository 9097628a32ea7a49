"""The bf16-on-a-CPU-without-bf16 warning (celldiff/cli/cpu.py)."""

from __future__ import annotations

from celldiff.cli import cpu
from celldiff.cli.cpu import bf16_is_native, cpu_flags, slow_bf16_warning

AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n"
AMX = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_flags_read_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(AVX2)
    assert cpu_flags(path) == {"fpu", "sse2", "avx", "avx2", "fma"}
    path.write_text(ARM)
    assert "bf16" in cpu_flags(path)
    assert cpu_flags(tmp_path / "missing") is None


def test_bf16_is_native_by_architecture(tmp_path):
    assert bf16_is_native({"avx2"}, "x86_64") is False
    assert bf16_is_native({"avx512_bf16"}, "x86_64") is True and bf16_is_native({"amx_bf16"}, "x86_64") is True
    assert bf16_is_native({"bf16"}, "aarch64") is True and bf16_is_native({"asimd"}, "aarch64") is False
    assert bf16_is_native(None, "x86_64") is None and bf16_is_native({"x"}, "riscv64") is None


def test_slow_bf16_warning_only_for_bf16_on_a_cpu_without_it():
    line = slow_bf16_warning("bf16-mixed", True, {"avx2"}, "x86_64")
    assert line.startswith("celldiff: warning: --trainer.precision bf16-mixed") and "32-true" in line
    assert "avx512_bf16 or amx_bf16" in line and "\n" not in line
    assert slow_bf16_warning("bf16-true", True, {"avx2"}, "x86_64")
    assert slow_bf16_warning("32-true", True, {"avx2"}, "x86_64") is None
    assert slow_bf16_warning("bf16-mixed", False, {"avx2"}, "x86_64") is None  # on a GPU
    assert slow_bf16_warning("bf16-mixed", True, {"amx_bf16"}, "x86_64") is None
    assert slow_bf16_warning("bf16-mixed", True, {"asimd"}, "aarch64").count("no bf16 in") == 1


def test_the_cli_warns_once_before_a_slow_bf16_run(tmp_path, monkeypatch, capsys):
    """celldiff fit on a (faked) AVX2-only CPU in bf16-mixed says so, and the run goes on."""
    from tests.cli.helpers import run_cli
    from tests.conftest import REPO, SAMPLE, TINY_MODEL_ARGS

    monkeypatch.setattr(cpu, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2"})
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    argv = ["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", str(SAMPLE), "--run_dir",
            str(tmp_path / "run"), "--trainer.max_steps", "1", "--trainer.callbacks", "[]", "--trainer.precision",
            "bf16-mixed", "--trainer.enable_progress_bar", "false", *TINY_MODEL_ARGS]  # fmt: skip
    run_cli(argv, tmp_path)
    err = capsys.readouterr().err
    assert err.count("on a CPU without bf16 instructions") == 1
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
