"""`--ray`: the same bytes as a run in one process, on a local multi-node Ray cluster (2 nodes of one CPU
each, on loopback), a worker killed mid-task, a driver killed mid-run, and the errors a user sees."""

from __future__ import annotations

import filecmp
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need rotgraph[ray] (CI installs it)")

from ray.cluster_utils import Cluster  # noqa: E402

from rotgraph import weights  # noqa: E402
from rotgraph.errors import RotgraphError  # noqa: E402
from rotgraph.execution import Execution, running  # noqa: E402
from rotgraph.options import QuantOptions  # noqa: E402
from rotgraph.passes.quantization import quantize_weights  # noqa: E402
from rotgraph.pipeline import RotateOptions, rotate  # noqa: E402
from rotgraph.quantize import quantize  # noqa: E402
from rotgraph.synthetic import SyntheticConfig, write_model  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = SyntheticConfig(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=512, seed=3)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray cluster of two nodes of one CPU each on this machine; this process is its driver."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="error", log_to_driver=False)
    try:
        yield c.address
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(CONFIG, tmp_path_factory.mktemp("synthetic") / "m")


@pytest.fixture
def many_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small units of work, so that a tiny model makes many tasks over both nodes: a group of rewritten
    weights per 4 kB, 16 output channels per quantizer task, 100 rows of the embedding or lm_head."""
    monkeypatch.setattr(weights, "GROUP_BYTES", 4096)
    monkeypatch.setattr(quantize_weights, "TASK_ROWS", 16)
    monkeypatch.setattr(quantize_weights, "TABLE_ROWS", 100)


def same_files(a: Path, b: Path) -> list[str]:
    """The files of folder `a` that differ from (or are missing in) folder `b`; both hold the same names."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    return [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]


def test_rotate_on_ray_writes_the_same_bytes(cluster: str, model: Path, tmp_path: Path, many_tasks: None) -> None:
    rotate(model, tmp_path / "one" / "r.onnx", RotateOptions(seed=1))
    rotate(model, tmp_path / "ray" / "r.onnx", RotateOptions(seed=1), execution=Execution(ray=True, address=cluster))
    assert same_files(tmp_path / "one", tmp_path / "ray") == []


@pytest.mark.parametrize("fmt", ["qdq", "ort", "genai"])
@pytest.mark.parametrize("scheme", ["w4a8", "w4a4kv4"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_on_ray_writes_the_same_bytes(
    cluster: str, model: Path, tmp_path: Path, many_tasks: None, method: str, scheme: str, fmt: str
) -> None:
    options = QuantOptions(
        scheme=scheme, weights=method, fmt=fmt, calibration_windows=2, calibration_seq_len=64, group=32
    )
    name = "out" if fmt == "genai" else "q.onnx"
    quantize(model, tmp_path / "one" / name, options, validate=False)
    quantize(model, tmp_path / "ray" / name, options, validate=False, execution=Execution(ray=True, address=cluster))
    where = (
        (tmp_path / "one" / name, tmp_path / "ray" / name) if fmt == "genai" else (tmp_path / "one", tmp_path / "ray")
    )
    assert same_files(*where) == []


@pytest.mark.parametrize("sequential", [False, True])
def test_block_by_block_calibration_on_ray_writes_the_same_bytes(
    cluster: str, model: Path, tmp_path: Path, many_tasks: None, monkeypatch: pytest.MonkeyPatch, sequential: bool
) -> None:
    """Every model runs block by block (as an 8B one does): each block's calibration runs on the cluster,
    its windows split between the workers."""
    from rotgraph import probe

    monkeypatch.setattr(probe, "BLOCKWISE_BYTES", 0)
    options = QuantOptions(
        scheme="w4a4kv4",
        weights="gptq",
        fmt="ort",
        calibration_windows=3,
        calibration_seq_len=64,
        gptq_sequential=sequential,
    )
    quantize(model, tmp_path / "one" / "q.onnx", options, validate=False)
    quantize(
        model, tmp_path / "ray" / "q.onnx", options, validate=False, execution=Execution(ray=True, address=cluster)
    )
    assert same_files(tmp_path / "one", tmp_path / "ray") == []


def _dies_once(marker: str, work: Callable[..., object], *args: object) -> object:
    """A task that kills its own worker process the first time it runs (the marker file does not exist
    yet), and does `work` when Ray runs it again."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return work(*args)


def test_a_killed_worker_is_retried_and_the_output_is_the_same(
    cluster: str, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = QuantOptions(scheme="w4a8", weights="gptq", fmt="ort", calibration_windows=2, calibration_seq_len=64)
    quantize(model, tmp_path / "one" / "q.onnx", options, validate=False)
    rotate_marker, quant_marker = tmp_path / "rotate-died", tmp_path / "quant-died"
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    try:
        monkeypatch.setattr(
            weights, "_evaluate_into", functools.partial(_dies_once, str(rotate_marker), weights._evaluate_into)
        )
        monkeypatch.setattr(
            quantize_weights,
            "quantize_rows",
            functools.partial(_dies_once, str(quant_marker), quantize_weights.quantize_rows),
        )
        quantize(model, tmp_path / "ray" / "q.onnx", options, validate=False, execution=Execution(True, cluster))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert rotate_marker.exists() and quant_marker.exists()  # a worker did die in each kind of task
    assert same_files(tmp_path / "one", tmp_path / "ray") == []


def test_a_killed_driver_leaves_nothing_and_a_rerun_succeeds(cluster: str, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "q.onnx"
    command = [
        sys.executable,
        "-m",
        "rotgraph.cli",
        "quantize",
        str(model),
        "-o",
        str(out),
        "--recipe",
        "int4",
        "--set",
        "calibration.windows=2",
        "--no-validate",
        "--ray",
        cluster,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # Killed once its staging folder holds work of the cluster's (a block's folder or the rewritten weights).
    while time.monotonic() < deadline and driver.poll() is None:
        if any(p.name.startswith(("block-", "weights-")) for p in out.parent.rglob("*")):
            break
        time.sleep(0.05)
    assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not out.exists() and not out.with_name(out.name + ".data").exists()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "q.onnx",
        "q.onnx.data",
        "q.rotgraph.json",
        "tokenizer.json",
    ]


def test_a_failed_task_is_one_line_naming_its_weight(cluster: str, tmp_path: Path) -> None:
    config = SyntheticConfig(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=512)
    path = write_model(config, tmp_path / "m")
    import onnx_ir as ir

    m = ir.load(path)
    name = next(n for n, v in m.graph.initializers.items() if v.const_value is not None and v.const_value.size > 1000)
    data = m.graph.initializers[name].const_value
    assert isinstance(data, ir.ExternalTensor)
    with open(data.path, "r+b") as f:  # one NaN in that weight's bytes
        f.seek(data.offset or 0)
        f.write(np.array([np.nan], dtype=data.dtype.numpy()).tobytes())
    with pytest.raises(RotgraphError) as error:
        rotate(path, tmp_path / "r.onnx", execution=Execution(ray=True, address=cluster))
    message = str(error.value)
    assert "\n" not in message and "weights: weight" in message and "non-finite" in message
    assert not (tmp_path / "r.onnx").exists()


def test_a_folder_a_node_does_not_see_is_refused(cluster: str, model: Path, tmp_path: Path) -> None:
    with (
        pytest.raises(RotgraphError, match=r"does not see .*shared file system"),
        running(Execution(ray=True, address=cluster), [tmp_path / "not-mounted"]),
    ):
        pass


def test_ray_settings_are_checked() -> None:
    from rotgraph.cli import parser
    from rotgraph.commands import execution_of

    def parsed(*flags: str) -> Execution:
        return execution_of(parser().parse_args(["rotate", "in.onnx", "-o", "out.onnx", *flags]))

    assert parsed() == Execution()
    assert parsed("--ray") == Execution(ray=True)
    assert parsed("--ray", "3") == Execution(ray=True, workers=3)
    assert parsed("--ray", "10.0.0.1:6379") == Execution(ray=True, address="10.0.0.1:6379")
    assert parsed("--ray", "auto") == Execution(ray=True, address="auto")
    with pytest.raises(RotgraphError, match="need ray=True"):
        Execution(workers=2)
    with pytest.raises(RotgraphError, match="at least one"):
        parsed("--ray", "0")
    with pytest.raises(RotgraphError, match="neither a number of local workers nor a cluster address"):
        parsed("--ray", "model.onnx")
