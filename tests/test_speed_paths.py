"""The loop's speed paths that a CPU can check: threads on a shared CPU, the --compile switch,
the progress bar's loss. (Their timings are measured by benchmarks/, never by a test.)"""
import torch

from sslnb import cpu
from sslnb.__main__ import _parser
from sslnb.train import _LossForDisplay, default_config, train


def test_free_threads_leaves_the_cores_other_processes_use():
    assert cpu.free_threads(0.0, cpus=2, most=2) == 2
    assert cpu.free_threads(1.0, cpus=2, most=2) == 1  # one busy process on a 2-core machine
    assert cpu.free_threads(0.67, cpus=2, most=2) == 1  # ... which our threads squeezed to 2/3 of a core
    assert cpu.free_threads(0.2, cpus=2, most=2) == 2  # occasional work elsewhere: keep both
    assert cpu.free_threads(2.0, cpus=2, most=2) == 1  # never fewer than one
    assert cpu.free_threads(3.0, cpus=16, most=8) == 8  # never more than the run started with


class _Clock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_shared_cpu_threads_follow_the_other_processes_load(monkeypatch):
    hz = cpu.os.sysconf("SC_CLK_TCK")
    clock, readings = _Clock(), iter([
        (0, 0, 2),  # busy jiffies of the machine, of this process, CPUs: at the start
        (2 * hz, 1 * hz, 2),  # 1 s later: both cores busy, only one of them ours
        (3 * hz, 2 * hz, 2),  # 1 s later: one core busy, ours
    ])
    monkeypatch.setattr(cpu, "time", clock)
    monkeypatch.setattr(cpu, "_read_cpu_times", lambda: next(readings))
    monkeypatch.setattr(cpu, "_sees_whole_machine", lambda cpus: True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        share = cpu.SharedCpuThreads(torch.device("cpu"), interval_s=1.0)
        assert share.enabled and share.most == 2
        clock.now += 0.5
        share.update()  # too soon: nothing read, nothing changed
        assert torch.get_num_threads() == 2
        clock.now += 0.5
        share.update()
        assert torch.get_num_threads() == 1  # another process took a core
        clock.now += 1.0
        share.update()
        assert torch.get_num_threads() == 2  # it is gone
        torch.set_num_threads(1)
        share.restore()
        assert torch.get_num_threads() == 2
        assert not cpu.SharedCpuThreads(torch.device("meta")).enabled  # only a CPU run is governed
        assert not cpu.SharedCpuThreads(torch.device("cpu"), enabled=False).enabled  # --compile

        def gone():
            raise OSError("no /proc")

        monkeypatch.setattr(cpu, "_read_cpu_times", gone)
        torch.set_num_threads(1)
        clock.now += 1.0
        share.update()  # a failed read stops the adapting, restores the threads, never raises
        assert not share.enabled and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_thread_is_left_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert not cpu.SharedCpuThreads(torch.device("cpu")).enabled
    finally:
        torch.set_num_threads(before)


def test_compile_switch_compiles_the_training_forward_only(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module  # compiling for real takes minutes on a CPU; the switch's wiring is what is tested

    monkeypatch.setattr(torch, "compile", fake_compile)
    run = train(default_config("simclr", quick=True, epochs=1), tmp_path / "run", device="cpu", progress=False,
                compile_model=True)
    assert run.finished and len(compiled) == 1 and compiled[0].__class__.__name__ == "SimCLR"
    assert _parser().parse_args(["pretrain", "--method", "simclr", "--compile"]).compile
    assert not _parser().parse_args(["pretrain", "--method", "simclr"]).compile


def test_progress_loss_on_a_cpu_is_the_current_loss():
    assert _LossForDisplay(torch.device("cpu")).swap(torch.tensor(1.5)) == 1.5
