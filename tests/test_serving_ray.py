"""xar-serve on Ray Serve: ``xar-serve --ray --replicas 2`` of xar-digits on a local Ray instance (CPU).
Both replicas serve, each answer equals the single-process server's, and SIGTERM stops it all."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="xar-serve needs the serve extra: pip install 'xar_infer[serve]'")
pytest.importorskip("ray.serve", reason="xar-serve --ray needs the ray extra: pip install 'xar_infer[ray]'")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from xar_infer import XARPipeline  # noqa: E402
from xar_infer.serving.app import create_app  # noqa: E402
from xar_infer.serving.options import model_options  # noqa: E402
from xar_infer.serving.ray import app as ray_app, parse_options  # noqa: E402

from cpu_threads import subprocess_env  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_takes_xar_serve_options_by_name():
    args = parse_options({"model": "xar-digits", "replicas": "3", "max_rows": "16", "batching": "static",
                          "cuda_graphs": "false", "local_files_only": "true"})
    assert (args.model, args.replicas, args.max_rows, args.batching) == ("xar-digits", 3, 16, "static")
    assert args.cuda_graphs is False and args.local_files_only is True
    # Paths are made absolute for the replicas, which run in other working directories.
    options = model_options(parse_options({"checkpoint": "weights/model.safetensors", "vae": "kl16.ckpt"}))
    assert options["checkpoint"] == str(Path.cwd() / "weights" / "model.safetensors")
    assert options["vae"] == str(Path.cwd() / "kl16.ckpt") and options["model"] is None
    with pytest.raises(SystemExit):  # argparse's one-line error, as xar-serve gives
        parse_options({"max_rows": "many"})
    with pytest.raises(ValueError, match="--max-rows"):
        ray_app({"max_rows": "0"})


def test_two_replicas_both_serve_and_answer_as_the_single_process_server(tmp_path):
    port, log = free_port(), tmp_path / "ray.log"
    with open(log, "w") as out:
        # Ray's workers inherit the environment: one torch thread each, as the test server has.
        process = subprocess.Popen([sys.executable, "-m", "xar_infer.serving.cli", "--ray", "--replicas", "2",
                                    "--port", str(port), "--max-rows", "8", "--shutdown-timeout", "5"],
                                   stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        # Requests at once: Ray's proxy sends them to both replicas. Until both have answered, or a
        # bound: the proxy routes by load, so a rare run may need a second round.
        bodies = [{"class_label": i % 10, "seed": i, "num_inference_steps": 12} for i in range(8)]
        answers, served_by = {}, set()
        lock = threading.Lock()

        def ask(i):
            answer = httpx.post(url + "/v1/generate", json=bodies[i], timeout=120)
            with lock:
                answers[i] = answer
                served_by.add(answer.headers["x-served-by"])

        for _ in range(5):
            with ThreadPoolExecutor(len(bodies)) as pool:
                list(pool.map(ask, range(len(bodies))))
            if len(served_by) == 2:
                break
        assert len(served_by) == 2, served_by
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    pipe = XARPipeline.from_pretrained("xar-digits")
    with TestClient(create_app(pipe, max_rows=8)) as single:
        for i, body in enumerate(bodies):
            assert answers[i].status_code == 200
            assert answers[i].content == single.post("/v1/generate", json=body).content, body
