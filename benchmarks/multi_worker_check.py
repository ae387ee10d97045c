"""`train.distribution: multi_worker`, checked on one machine: two workers on loopback ports.

    python -m benchmarks.multi_worker_check

Starts two processes, each running stages.train's `main` on the same tiny shards with its own
TF_CONFIG (index 0 and 1), exactly as two machines would with `python -m stages.train`. Passes
if both finish and end with the same weights (synchronous training keeps the replicas equal).
It checks the wiring (TF_CONFIG, MultiWorkerMirroredStrategy, the input pipeline's sharding,
the validation callback under the strategy), not speed: both workers share this machine's cores.

With Keras 3.15.1 / TensorFlow 2.21 it fails inside `model.fit` (Keras 3's TensorFlow trainer
cannot reduce MultiWorkerMirroredStrategy's per-replica values: keras-team/keras#20585,
tensorflow/tensorflow#72388); see docs/scaling.md. Re-run it after upgrading Keras.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_TRAIN, make_shards  # noqa: E402
from tests.fixtures import write_params  # noqa: E402

WORKER = ("import keras, sys; keras.config.disable_traceback_filtering()\n"
          "from stages import train; train.main(*sys.argv[1:])")


def free_ports(n: int) -> list[int]:
    """n loopback ports free right now (the kernel picks them)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def error_summary(log: str) -> str:
    """The traceback's frames and the error's first line (TF error messages dump whole tensors)."""
    trace = log[log.find("Traceback"):].splitlines()
    frames = [line for line in trace if line.startswith("  File ") and ("/keras/" in line or "stages/" in line)]
    error = next((line for line in reversed(trace) if "Error: " in line), trace[-1] if trace else "")
    return "\n".join(frames + [error[:300]])


def tf_config(workers: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def main() -> None:
    import keras

    with tempfile.TemporaryDirectory(prefix="multi-worker-") as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "augmented")
        params = write_params(tmp / "params.yaml",
                              train={**TINY_TRAIN, "distribution": "multi_worker", "epochs": 2})
        workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
        procs = []
        for index in range(len(workers)):
            out = tmp / f"worker{index}"
            env = {**os.environ, "TF_CONFIG": tf_config(workers, index), "TF_CPP_MIN_LOG_LEVEL": "2"}
            procs.append(subprocess.Popen(
                [sys.executable, "-c", WORKER, str(params), str(shards), str(out / "model.keras"),
                 str(out / "live")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True))
        try:
            logs = [proc.communicate(timeout=600)[0] for proc in procs]
        finally:  # a worker left waiting for its peer would wait forever
            for proc in procs:
                proc.kill()
        for index, (proc, log) in enumerate(zip(procs, logs)):
            if proc.returncode != 0:
                sys.exit(f"worker {index} failed:\n{error_summary(log)}")
        models = [keras.saving.load_model(tmp / f"worker{i}" / "model.keras") for i in range(2)]
        same = all(np.array_equal(a, b) for a, b in zip(*(m.get_weights() for m in models)))
        metrics = [json.loads((tmp / f"worker{i}" / "live" / "metrics.json").read_text()) for i in range(2)]
    print(f"workers: {workers}")
    print(f"both finished; identical weights: {same}; metrics: {metrics[0]} / {metrics[1]}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
