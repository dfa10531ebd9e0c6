"""Explore, process and face description through a real Dask cluster (a LocalCluster of 2 worker
processes started here): the same rows as the local pool, even when a worker is killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import PROJECT, finished_items, read_csv, run

COPIES = 4  # the sample 4 times over (links): enough chunks for a kill to land mid-run


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local,
        distributed.Client(local) as client,
    ):
        yield local.scheduler_address, client


@pytest.fixture(scope="module")
def larger_sample(sample, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask") / "data"
    for copy in range(COPIES):
        (folder / f"copy{copy}").mkdir(parents=True)
        for image in sample.iterdir():
            (folder / f"copy{copy}" / image.name).symlink_to(image)
    return folder


def run_and_kill_a_worker(script: str, overrides: list[str], journal, client, after: int = 300) -> str:
    """Run a script on the cluster and SIGKILL one Dask worker once the journal (a file, or a folder of
    part files) records `after` items; the script must still finish with exit code 0. Returns its output."""
    command = [sys.executable, script] + [a for o in overrides for a in ("--set", o)]
    child = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and finished_items(journal) < after:
        time.sleep(0.02)
    assert child.poll() is None, "the run ended before a worker could be killed"
    victim = next(iter(client.run(os.getpid).values()))
    os.kill(victim, signal.SIGKILL)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert victim not in client.run(os.getpid).values()  # the nanny started a new worker
    return out


@pytest.mark.slow
def test_explore_and_process_on_dask_give_the_local_rows_despite_a_killed_worker(cluster, larger_sample, tmp_path):
    address, client = cluster
    local, remote = tmp_path / "local", tmp_path / "dask"
    run("explore_images.py", f"dataset_dir={larger_sample}", f"output_csv={local}/m.csv", f"summary_csv={local}/s.csv")
    engine = [f"scheduler={address}", "chunk_files=40"]
    out = run_and_kill_a_worker(
        "explore_images.py",
        [f"dataset_dir={larger_sample}", f"output_csv={remote}/m.csv", f"summary_csv={remote}/s.csv", *engine],
        remote / "m.csv.parts",
        client,
    )
    assert "Dask cluster" in out
    pd.testing.assert_frame_equal(read_csv(local / "m.csv"), read_csv(remote / "m.csv"))
    assert (local / "s.csv").read_bytes() == (remote / "s.csv").read_bytes()

    run("process_images.py", f"input_csv={local}/m.csv", f"output_dir={local}/out", f"output_csv={local}/p.csv")
    run_and_kill_a_worker(
        "process_images.py",
        [f"input_csv={remote}/m.csv", f"output_dir={remote}/out", f"output_csv={remote}/p.csv", *engine],
        remote / "p.csv.parts",
        client,
    )
    # the same rows, each naming its own run's folder
    mine, theirs = (
        read_csv(folder / "p.csv").map(lambda v, run=str(folder): v.replace(run, "<run>") if isinstance(v, str) else v)
        for folder in (local, remote)
    )
    pd.testing.assert_frame_equal(mine, theirs)
    written = sorted(p.relative_to(remote / "out") for p in (remote / "out").rglob("*.jpg"))
    assert written == sorted(p.relative_to(local / "out") for p in (local / "out").rglob("*.jpg")) and written


def test_an_unreachable_scheduler_is_one_line(sample, tmp_path):
    result = run(
        "explore_images.py",
        f"dataset_dir={sample}",
        f"output_csv={tmp_path}/m.csv",
        f"summary_csv={tmp_path}/s.csv",
        "scheduler=tcp://127.0.0.1:9",
        "scheduler_timeout_seconds=2",
        check=False,
    )
    assert result.returncode != 0 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("address", ["my-cluster", "foo://host:1", "tcp://", "tcp://host", "inproc://x", "tls://h:1"])
def test_a_scheduler_address_agepipe_cannot_use_is_a_config_error(address):
    from agepipe.config.data_stages import ExploreConfig
    from agepipe.config.loading import CONFIG_DIR, load_config
    from agepipe.errors import ConfigError

    with pytest.raises(ConfigError, match="scheduler: expected 'local' or a Dask scheduler address"):
        load_config(ExploreConfig, CONFIG_DIR / "explore_images.yaml", [f"scheduler={address}"])


def explore_on(address: str, sample, tmp_path) -> str:
    """Explore on the scheduler at `address` (2 s to answer, 2 s for a worker); its line of error."""
    result = run(
        "explore_images.py",
        f"dataset_dir={sample}",
        f"output_csv={tmp_path}/m.csv",
        f"summary_csv={tmp_path}/s.csv",
        f"scheduler={address}",
        "scheduler_timeout_seconds=2",
        check=False,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("answer", [None, b"\xff" * 64], ids=["silent", "garbage"])
def test_a_server_that_never_answers_or_answers_garbage_is_one_line_within_the_deadline(sample, tmp_path, answer):
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            connection, _ = server.accept()
            accepted.append(connection)
            if answer:
                connection.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    start = time.time()
    line = explore_on(f"tcp://127.0.0.1:{server.getsockname()[1]}", sample, tmp_path)
    assert "cannot reach the Dask scheduler" in line and time.time() - start < 60
    server.close()


def test_a_scheduler_without_workers_or_with_workers_that_cannot_import_agepipe_is_one_line(sample, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=0, dashboard_address=None) as empty:
        assert "has no worker" in explore_on(empty.scheduler_address, sample, tmp_path)
        # a worker started outside the project: it cannot unpickle agepipe's tasks
        worker = subprocess.Popen(
            [str(PROJECT / ".venv" / "bin" / "dask"), "worker", empty.scheduler_address, "--nworkers", "1"],
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with distributed.Client(empty.scheduler_address) as client:
                client.wait_for_workers(1, timeout=60)
            assert "cannot run agepipe's tasks" in explore_on(empty.scheduler_address, sample, tmp_path)
        finally:
            worker.kill()
            worker.wait()


def descriptor_rows(cache) -> dict[str, dict]:
    """The descriptor cache's rows by content hash (the last row of a key wins, as the cache reads it)."""
    lines = cache.read_text().splitlines()[1:]
    return {row["_key"]: row for row in map(json.loads, lines)}


@pytest.mark.slow
def test_describing_faces_on_dask_gives_the_local_descriptors_despite_a_killed_worker(
    cluster, sample, manifest, tmp_path
):
    """The label check describes every face through the `scheduler` setting, as training and prediction
    do; a worker killed mid-run costs no row, and the descriptors are those of the local pool."""
    address, client = cluster
    faces = manifest[manifest["broken"].isna() & manifest["age"].notna()].head(160)
    faces.assign(path=[str(sample / f) for f in faces["file"]])[["file", "path", "age"]].to_csv(
        tmp_path / "faces.csv", index=False
    )
    common = [f"input_csv={tmp_path}/faces.csv", "folds=2", "training.epochs=1"]
    run("check_labels.py", *common, f"output_csv={tmp_path}/local.csv", f"descriptor_cache={tmp_path}/local.jsonl")
    run_and_kill_a_worker(
        "check_labels.py",
        [
            *common,
            f"output_csv={tmp_path}/dask.csv",
            f"descriptor_cache={tmp_path}/dask.jsonl",
            f"scheduler={address}",
            "chunk_files=10",
        ],
        tmp_path / "dask.jsonl",
        client,
        after=40,
    )
    local, remote = descriptor_rows(tmp_path / "local.jsonl"), descriptor_rows(tmp_path / "dask.jsonl")
    assert len(local) >= 150 and local == remote
