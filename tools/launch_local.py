"""Runs one jaxlm run as N processes on this machine, as N hosts would run it.

    python tools/launch_local.py --processes=2 --devices_per_process=4 -- \\
        python -m jaxlm.main --config=configs/gpt_shakespeare_char.py --workdir=/tmp/two_hosts

Process i gets JAXLM_COORDINATOR=127.0.0.1:PORT, JAXLM_NUM_PROCESSES=N, JAXLM_PROCESS_ID=i and
`--devices_per_process` CPU devices (JAX_PLATFORMS=cpu unless set). Their output comes line by
line prefixed `[p0] `, `[p1] `, ... (stdout to stdout, stderr to stderr). When one process fails
or `--timeout` passes, all the others are stopped (SIGTERM, then SIGKILL after `--grace`
seconds); the exit status is the first failing process's (124 on timeout, 0 when all succeed).
Unlike the other tools it parses its options with argparse: everything after `--` is another
program's command line, which absl would try to parse as its own flags.
"""

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

TIMEOUT_STATUS = 124  # as coreutils `timeout` exits
# Looked up now: a child between fork and exec must not call dlsym (another thread may hold its lock).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, command): the command is everything after `--`."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise SystemExit("usage: launch_local.py [options] -- COMMAND ...  (a command is required)")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes in the run")
    parser.add_argument("--devices_per_process", type=int, default=1, help="CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds before all are stopped (0: none)")
    parser.add_argument("--grace", type=float, default=10, help="seconds between SIGTERM and SIGKILL")
    options = parser.parse_args(argv[:split])
    if options.processes < 1 or options.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be positive")
    return options, argv[split + 1:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, processes: int, port: int, devices: int) -> dict:
    """`base` with the run's settings for one process; any inherited device count is replaced."""
    env = dict(base, JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES=str(processes),
               JAXLM_PROCESS_ID=str(process_id), JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", base.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def _die_with_parent() -> None:
    """In the child: the kernel kills it if the launcher dies, even by SIGKILL (no orphans)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def start(command: list[str], env: dict) -> subprocess.Popen:
    # A session of its own: stopping a process also stops whatever it started.
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True,
                            preexec_fn=_die_with_parent)


def pump(stream, prefix: str, out, lock: threading.Lock) -> threading.Thread:
    """Copies `stream` to `out` line by line with `prefix`, on a thread."""

    def copy():
        for line in stream:
            with lock:
                out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
                out.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def exit_status(returncode: int) -> int:
    """A shell-style status: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def wait_all(procs: list[subprocess.Popen], deadline: float | None) -> int:
    """Waits until all succeed (0), one fails (its status) or the deadline passes (124)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = next((c for c in codes if c not in (None, 0)), None)
        if failed is not None:
            return exit_status(failed)
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            return TIMEOUT_STATUS
        time.sleep(0.1)


def stop_all(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to every process group still running, SIGKILL to those alive after `grace`."""
    _signal_running(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_running(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def _signal_running(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def launch(options: argparse.Namespace, command: list[str]) -> int:
    port = options.port or free_port()
    deadline = time.monotonic() + options.timeout if options.timeout > 0 else None
    lock, procs, pumps = threading.Lock(), [], []
    try:
        for i in range(options.processes):
            env = process_env(os.environ, i, options.processes, port, options.devices_per_process)
            procs.append(start(command, env))
            pumps += [pump(procs[-1].stdout, f"[p{i}] ", sys.stdout, lock),
                      pump(procs[-1].stderr, f"[p{i}] ", sys.stderr, lock)]
        status = wait_all(procs, deadline)
        if status == TIMEOUT_STATUS and any(p.poll() is None for p in procs):
            print(f"launch_local: --timeout={options.timeout:g}s passed; stopping all processes",
                  file=sys.stderr, flush=True)
        elif status:
            failed = next(i for i, p in enumerate(procs) if p.poll() not in (None, 0))
            print(f"launch_local: process {failed} exited with status {status}; stopping the others",
                  file=sys.stderr, flush=True)
        return status
    finally:  # also on Ctrl-C or SIGTERM of the launcher
        stop_all(procs, options.grace)
        for thread in pumps:
            thread.join(timeout=5)


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    options, command = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    return launch(options, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
