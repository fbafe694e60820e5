"""tests/slurm/start_cluster.sh on a machine with other Slurm daemons: each state folder its own ports, and a
port it cannot have named in one line (it was a bare "timed out after 180 s" with the ports fixed)."""

import os
import socket
import subprocess
import time

import pytest

from tests import slurm_cluster as sc

pytestmark = pytest.mark.slurm


def listener(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.bind(("", port))
    s.listen()
    return s


def start_script(state, **env):
    return subprocess.run([str(sc.START), str(state)], capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def ports_of(state):
    return [int(p) for p in (state / "ports").read_text().split()]


def test_two_clusters_in_two_state_dirs_run_side_by_side_and_ignore_a_taken_old_fixed_port(tmp_path):
    try:
        old = listener(16817)  # the controller port the script used to bind, held by "another daemon"
    except OSError:
        old = None  # something real holds it already: the point stands
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        env_a = sc.start(a)
        env_b = sc.start(b)
        assert set(ports_of(a)).isdisjoint(ports_of(b)) and 16817 not in ports_of(a) + ports_of(b)
        for env in (env_a, env_b):
            job = sc.sbatch(env, "--wrap", "echo hello from $SLURM_JOB_NODELIST", "--output", str(tmp_path / "%j.out"), cwd=tmp_path)
            info = sc.wait_done(env, job, timeout=300)
            assert info["JobState"] == "COMPLETED", info
            assert "hello from node" in (tmp_path / f"{job}.out").read_text()
    finally:
        sc.stop(a)
        sc.stop(b)
        if old is not None:
            old.close()


@pytest.mark.parametrize("which, what", [(0, "SlurmctldPort"), (1, "node1's Port")])
def test_a_taken_port_stops_the_start_with_one_line_naming_it(tmp_path, which, what):
    sc.require()
    busy = listener()
    taken = busy.getsockname()[1]
    try:
        free = [listener() for _ in range(2)]
        ports = [s.getsockname()[1] for s in free]
        for s in free:
            s.close()
        ports.insert(which, taken)
        started = time.monotonic()
        proc = start_script(tmp_path / "c", FASTAFD_SLURM_PORTS=" ".join(map(str, ports)))
        assert time.monotonic() - started < 60
    finally:
        busy.close()
        sc.stop(tmp_path / "c")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4 and len(lines) == 1, proc.stderr
    assert f"port {taken} ({what})" in lines[0] and "in use by another process" in lines[0], lines[0]
    assert not (tmp_path / "c" / "slurmctld.pid").exists()  # no daemon left behind
