"""Device discovery and the environment that carries a replica's share (no GPU needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.worker.assignment import consumer_name
from services.worker.device import Device, DeviceError, discover, mps_running, nvml_gpu_count, share_env
from services.worker.process import ReplicaProcess


def test_gpu_child_gets_its_gpu_and_mps_share_before_cuda_starts() -> None:
    env = share_env(Device("gpu", 1), 30, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # NVML's numbering
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "1"
    assert Device("gpu", 1).torch_device == "cuda"  # the only visible GPU is cuda:0 in the child


def test_cpu_child_gets_threads_and_no_gpu() -> None:
    env = share_env(Device("cpu", 0), 3, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50", "OMP_NUM_THREADS": "16"})
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env


@pytest.mark.parametrize(("device", "share"), [(Device("gpu", 0), 0), (Device("gpu", 0), 101), (Device("cpu", 0), 0)])
def test_impossible_shares_are_refused(device: Device, share: int) -> None:
    with pytest.raises(DeviceError):
        share_env(device, share, {})


def test_replica_command_line_names_its_device_model_and_share() -> None:
    assert consumer_name("gpu1", "resnet18", 3) == "gpu1-resnet18-3"  # a slot: device, model, index
    argv = ReplicaProcess("agent/5", Device("gpu", 1), "resnet18", 40, {}, python="py", metrics_port=9100).argv()
    assert argv[:3] == ["py", "-m", "services.worker.replica"]
    assert dict(zip(argv[3::2], argv[4::2], strict=True)) == {
        "--name": "agent/5", "--device": "gpu1", "--model": "resnet18", "--share": "40", "--metrics-port": "9100"}


def test_discovery_degrades_to_cpu_without_gpus() -> None:
    d = discover("auto", gpu_count=0)
    assert [x.name for x in d.devices] == ["cpu0"] and d.gpu_count == 0 and not d.mps
    assert [x.name for x in discover("cpu", gpu_count=2).devices] == ["cpu0"]
    with pytest.raises(DeviceError, match="no GPU"):
        discover("cuda", gpu_count=0)


def test_discovery_on_a_gpu_host(tmp_path: Path) -> None:
    no_daemon = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    d = discover("auto", gpu_count=2, env=no_daemon)
    assert [x.name for x in d.devices] == ["gpu0", "gpu1"] and not d.mps
    (tmp_path / "control").touch()  # the MPS control daemon's pipe
    assert mps_running(no_daemon)
    assert discover("gpu1", gpu_count=2, env=no_daemon).devices == (Device("gpu", 1),)
    with pytest.raises(DeviceError, match="not on this host"):
        discover("gpu0,gpu2", gpu_count=2)
    with pytest.raises(DeviceError, match="twice"):
        discover("gpu0,gpu0", gpu_count=2)
    with pytest.raises(DeviceError, match="form"):
        discover("tpu0", gpu_count=2)


def test_nvml_probe_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    count, note = nvml_gpu_count()  # no driver on this host: a note, not an exception
    assert count >= 0 and note
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    assert nvml_gpu_count() == (0, "pynvml is not installed")


def test_host_qualified_names_keep_the_local_index() -> None:
    d = Device.parse("gpu-host-1/gpu1")
    assert d == Device("gpu", 1, "gpu-host-1") and d.name == "gpu-host-1/gpu1" and d.local_name == "gpu1"
    assert Device.parse("gpu1") == Device("gpu", 1) and Device("gpu", 1).name == "gpu1"  # as before
    assert Device.parse("a/cpu0").name == "a/cpu0" and not Device.parse("a/cpu0").is_gpu
    for bad in ("a/tpu0", "/gpu0", "a/b/gpu0", "bad node/gpu0", "-a/gpu0", "a:b/gpu0", "a/"):
        with pytest.raises(DeviceError, match="form"):
            Device.parse(bad)
    # the part after the slash is what the host knows: CUDA index 1, whatever the node
    env = share_env(d, 30, {})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert consumer_name(d.name, "resnet18", 3) == "gpu-host-1/gpu1-resnet18-3"
    argv = ReplicaProcess("x/0", d, "resnet18", 40, {}, python="py").argv()
    assert argv[argv.index("--device") + 1] == "gpu-host-1/gpu1"


def test_discovery_names_devices_on_the_node(tmp_path: Path) -> None:
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    assert [x.name for x in discover("auto", gpu_count=2, env=env, node="a").devices] == ["a/gpu0", "a/gpu1"]
    assert [x.name for x in discover("auto", gpu_count=0, node="a").devices] == ["a/cpu0"]
    assert [x.name for x in discover("cpu", gpu_count=0, node="a").devices] == ["a/cpu0"]
    # a list may name the devices plainly or on this node, never on another one
    assert discover("gpu1,a/gpu0", gpu_count=2, env=env, node="a").devices == (Device("gpu", 1, "a"),
                                                                               Device("gpu", 0, "a"))
    with pytest.raises(DeviceError, match="on node 'b'"):
        discover("b/gpu0", gpu_count=2, node="a")
    with pytest.raises(DeviceError, match="on node 'a'"):
        discover("a/gpu0", gpu_count=2)  # GRAFT_NODE empty
    with pytest.raises(DeviceError, match="not on this host"):
        discover("a/gpu2", gpu_count=2, node="a")
    with pytest.raises(DeviceError, match="twice"):
        discover("gpu0,a/gpu0", gpu_count=2, node="a")
    with pytest.raises(DeviceError, match="node name"):
        discover("auto", gpu_count=1, node="a/b")
