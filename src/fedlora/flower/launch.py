"""Running fedlora on Flower from the command line: the Flower app folder, the processes, the run.

``write_app`` writes a Flower app (a ``pyproject.toml`` whose components are
:mod:`fedlora.flower.apps` and whose run config carries the resolved fedlora config).
``run_simulation`` runs it on Flower's simulation engine: it starts a SuperLink in simulation
mode on a free local port, submits the app with ``flwr run`` and stops the SuperLink by its
process id. Flower's own files go under ``FLWR_HOME`` inside the run folder, never the home
directory; runtime dependency installation is disabled, so Flower never replaces torch.
:class:`Processes` starts and stops SuperLinks and SuperNodes; ``run_deployment`` runs a whole
local deployment with them (a SuperLink and a SuperNode per client, as ``fedlora bench flower``
measures it). Where clients train: :func:`simulation_options` (the simulation engine's client
resources, GPUs included) and :func:`deployment_devices` (a local deployment's node devices).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import psutil

from fedlora import __version__
from fedlora.config import RunConfig, to_dict
from fedlora.devices import affinity_cores, cuda_count, names_host, round_robin
from fedlora.errors import ConfigError, FedloraError
from fedlora.flower import CONFIG_KEY, OUT_KEY, RESUME_KEY
from fedlora.flower.strategy import check_flower

CONNECTION = "fedlora"
"""The name of the SuperLink connection fedlora writes into ``FLWR_HOME/config.toml``."""


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string with ASCII escapes is a valid TOML basic string


def write_app(cfg: RunConfig, folder: Path, out: Path, resume: bool = False) -> Path:
    """Write the Flower app for ``cfg`` into ``folder``; the server writes its run folder to
    ``out`` (an absolute path on the SuperLink's host), continuing its checkpoint if
    ``resume``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.dumps(to_dict(cfg), sort_keys=True)
    text = f"""# A Flower app written by fedlora {__version__}: `flwr run` this folder.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedlora-run"
version = "1.0.0"
description = "fedlora {cfg.label} on Flower"
license = "Apache-2.0"
dependencies = []  # fedlora and torch are installed on every host already

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.flower.apps:server_app"
clientapp = "fedlora.flower.client:client_app"

[tool.flwr.app.config]
{CONFIG_KEY} = {_toml_string(config)}
{OUT_KEY} = {_toml_string(str(out.resolve()))}
{RESUME_KEY} = {"true" if resume else "false"}
"""
    (folder / "pyproject.toml").write_text(text)
    return folder


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower's processes: ``FLWR_HOME`` in the run folder, no telemetry
    or update checks, this Python's scripts first on the PATH."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home.resolve()),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def write_connection(
    home: Path, address: str, root_certificates: Path | None = None, name: str = CONNECTION
) -> None:
    """``FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default)."""
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {_toml_string(str(root_certificates.resolve()))}"
        if root_certificates
        else "insecure = true"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "{address}"\n{security}\n'
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (see :func:`free_ports`)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1, all bound at once while they are chosen
    (so each is free and none repeats), below the ephemeral range (so no outgoing connection of
    this host can take one between now and the bind of the process it is for)."""
    held: list[socket.socket] = []
    try:
        for port in range(20000 + os.getpid() % 5000, 32000, 7):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == count:
                return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()
    raise FedloraError(f"no {count} free TCP ports on 127.0.0.1 in 20000 … 32000")


@dataclass
class Processes:
    """SuperLinks and SuperNodes started as separate processes, each in its own process group,
    all stopped on exit with everything they started: their process groups, then every other
    process of the run (:func:`run_processes`; Flower's SuperExec starts a run's simulation or
    ServerApp process outside the SuperLink's group, and if the SuperLink dies first that
    process is nobody's child and would go on writing the run folder)."""

    home: Path
    logs: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _files: list[TextIO] = field(default_factory=list)

    def __enter__(self) -> Processes:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("w")
        self._files.append(log)
        proc = subprocess.Popen(
            list(argv),
            env=flower_env(self.home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    def superlink(
        self,
        port: int,
        simulation: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
        node_auth: bool = False,
    ) -> str:
        """Start a SuperLink on 127.0.0.1:``port``; wait until it answers; its address.
        ``tls``: (CA certificate, server certificate, server key)."""
        argv = [
            "flower-superlink",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if simulation:
            argv.append("--simulation")
        if tls:
            ca, cert, key = tls
            argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert)]
            argv += ["--ssl-keyfile", str(key)]
        else:
            argv.append("--insecure")
        if node_auth:
            argv.append("--enable-supernode-auth")
        proc = self.start("superlink", argv)
        wait_healthy(port, proc, self.logs / "superlink.log", tls[0] if tls else None)
        return f"127.0.0.1:{port}"

    def supernode(
        self,
        index: int,
        superlink: str,
        node_config: Mapping[str, Any],
        port: int,
        root_certificates: Path | None = None,
        auth_keys: tuple[Path, Path] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a SuperNode that connects to ``superlink`` with ``node_config``."""
        argv = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
        argv += ["--node-config", node_config_arg(node_config)]
        if root_certificates:
            argv += ["--root-certificates", str(root_certificates)]
        else:
            argv.append("--insecure")
        if auth_keys:
            private, public = auth_keys
            argv += ["--auth-supernode-private-key", str(private)]
            argv += ["--auth-supernode-public-key", str(public)]
        return self.start(f"supernode-{index}", argv)

    def stop(self) -> None:
        for proc in reversed(self.started):
            _stop_group(proc)
        self.started.clear()
        _stop_all(run_processes(self.home))
        for f in self._files:
            f.close()
        self._files.clear()


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to the process group of ``proc``, SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_processes(home: Path) -> list[psutil.Process]:
    """The running processes whose ``FLWR_HOME`` is ``home`` (every process of this run's
    Flower, wherever it is in the process tree: :func:`flower_env` gives each its run's home),
    this process excepted."""
    want = str(home.resolve())
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:  # another user's process, or one that ended since the listing
            if proc.environ().get("FLWR_HOME") == want:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _stop_all(procs: Sequence[psutil.Process], grace_s: float = 10.0) -> None:
    """SIGTERM to each of ``procs``, SIGKILL to those alive after ``grace_s``."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def node_config_arg(values: Mapping[str, Any]) -> str:
    """``--node-config`` (or ``--federation-config``) text: space-separated ``key=value`` with
    TOML values."""
    parts = []
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, str) else str(value).lower()
        if isinstance(value, int | float) and not isinstance(value, bool):
            text = str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def wait_healthy(
    port: int, proc: subprocess.Popen[bytes], log: Path, ca: Path | None, timeout_s: float = 60
) -> None:
    """Wait until the SuperLink on ``port`` answers ``/health`` (or fail with its log)."""
    import ssl

    scheme = "https" if ca else "http"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedloraError(
                f"the SuperLink exited with code {proc.returncode}; see {log}:\n" + _tail(log)
            )
        try:
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=context
            ) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise FedloraError(f"the SuperLink did not answer on port {port} within {timeout_s:.0f} s")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def flwr_run(
    app: Path,
    home: Path,
    connection: str = CONNECTION,
    federation_config: str | None = None,
    log: TextIO | None = None,
    timeout_s: float | None = None,
    run_config: str | None = None,
) -> str:
    """``flwr run APP CONNECTION --stream`` (``run_config``: its ``--run-config`` overrides);
    the run's final status from ``flwr ls`` (``flwr run --stream`` exits 0 even when the run
    failed)."""
    argv = ["flwr", "run", str(app), connection, "--stream"]
    if federation_config:
        argv += ["--federation-config", federation_config]
    if run_config:
        argv += ["--run-config", run_config]
    env = flower_env(home)
    try:
        subprocess.run(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=True
        )
    except subprocess.CalledProcessError as exc:
        raise FedloraError(f"`flwr run` failed with exit code {exc.returncode}") from None
    except subprocess.TimeoutExpired:
        raise FedloraError(f"`flwr run` did not finish within {timeout_s:.0f} s") from None
    listed = subprocess.run(
        ["flwr", "ls", connection, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(listed.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        raise FedloraError(f"cannot read the run status from `flwr ls`: {listed.stdout}") from None
    latest = max(runs, key=lambda r: str(r.get("pending-at", "")))
    return str(latest.get("status", "unknown"))


def submit(
    cfg: RunConfig,
    out: Path,
    superlink: str,
    root_certificates: Path | None = None,
    federation_config: str | None = None,
    echo: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` on the SuperLink at ``superlink`` (``HOST:PORT``; TLS with
    ``root_certificates``, else insecure) and wait for it; the ServerApp writes the run folder
    ``out`` on the SuperLink's host (Flower's files here go to ``out/flower``), continuing its
    checkpoint if ``resume``. The summary."""
    check_flower(cfg, resume)
    out = out.resolve()
    home = out / "flower"
    app = write_app(cfg, home / "app", out, resume)
    write_connection(home, superlink, root_certificates)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with (home / "logs" / "run.log").open("w") as log:
        status = flwr_run(app, home, federation_config=federation_config, log=None if echo else log)
    if status != "finished:completed":
        raise FedloraError(
            f"the Flower run ended with status {status!r}; see the SuperLink's logs"
            + ("" if echo else f" and {home / 'logs' / 'run.log'}")
        )
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise FedloraError(
            f"the run completed but {summary_path} does not exist: the ServerApp writes the run "
            "folder on the SuperLink's host"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


FLOWER_DEFAULT_CPUS = 2
"""The CPU cores Flower's simulation engine gives a ClientApp unless told otherwise."""


def simulation_options(
    cfg: RunConfig, n: int, cuda_devices: int, host_cpus: int | None = None
) -> dict[str, int | float]:
    """What the simulation engine is told (``flwr run --federation-config``, Flower 1.42's
    keys): ``n`` SuperNodes and each ClientApp's CPU cores and GPUs (``[flower]``
    ``client_cpus``, ``client_gpus``, ``clients_per_gpu``) on a machine with ``cuda_devices``
    CUDA devices and ``host_cpus`` cores (default: this machine's). Default GPUs: ``1 /
    clients_per_gpu`` with CUDA, unless ``model.device`` is the CPU; 0 without. Default cores:
    Flower's 2, at most ``host_cpus`` (Ray never places a ClientApp that asks for more).
    More GPUs per client than the machine has is a :class:`ConfigError` naming the key."""
    f = cfg.flower
    gpus = f.client_gpus
    if gpus is None:
        gpus = 1.0 / f.clients_per_gpu if cuda_devices and not names_host(cfg.model.device) else 0.0
    if gpus > cuda_devices:
        raise ConfigError(
            f"flower.client_gpus = {gpus:g} GPUs per client, but this machine has "
            f"{cuda_devices} CUDA device(s); lower it (a fraction shares one GPU) or set it to 0"
        )
    cpus = f.client_cpus
    if cpus is None:
        cpus = min(FLOWER_DEFAULT_CPUS, host_cpus or os.cpu_count() or 1)
    return {
        "num-supernodes": n,
        "client-resources-num-cpus": int(cpus),
        "client-resources-num-gpus": float(gpus),
    }


def deployment_devices(cfg: RunConfig, n: int, cuda_devices: int) -> list[str]:
    """The device of each of a local deployment's ``n`` SuperNodes (node config ``device``):
    with ``model.device = "auto"``, the machine's ``cuda_devices`` GPUs round-robin (node k on
    ``cuda:k mod cuda_devices``), the CPU without; any other ``model.device`` for every node."""
    if cfg.model.device != "auto":
        return [cfg.model.device] * n
    return round_robin(n, cuda_devices)


def deployment_threads(n: int, cpus: int | None = None) -> int:
    """The CPU threads each of a local deployment's ``n`` SuperNodes computes with (node config
    ``threads``): the machine's ``cpus`` cores (default: those this process may run on) shared
    out, at least one. Nodes train at the same time; each on every core would oversubscribe
    them."""
    if cpus is None:
        cpus = affinity_cores() or os.cpu_count()
    return max(1, (cpus or 1) // n)


def run_deployment(
    cfg: RunConfig,
    out: Path,
    echo: bool = True,
    keep_model: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` on a local deployment: an insecure SuperLink and one SuperNode per client
    (``partition-id`` k, its rank from ``cfg``, its ``device`` from :func:`deployment_devices`),
    each a separate process on this machine, every message handled by a new ClientApp process
    (Flower's ``subprocess`` isolation); with ``keep_model`` each node's ClientApps hand their
    messages to the node's model keeper (:mod:`fedlora.flower.node`). Each node computes with
    ``threads`` CPU threads (default: :func:`deployment_threads`). All stopped afterwards. The
    summary."""
    check_flower(cfg)
    home = out.resolve() / "flower"
    n = cfg.clients.num_clients
    devices = deployment_devices(cfg, n, cuda_count())
    threads = threads or deployment_threads(n)
    with Processes(home, home / "logs") as procs:
        link, *ports = free_ports(1 + n)
        address = procs.superlink(link)
        for k in range(n):
            node: dict[str, Any] = {
                "partition-id": k,
                "device": devices[k],
                "threads": threads,
                "trust-server": True,
            }
            if keep_model:
                node["keep-model"] = True
            procs.supernode(k, address, node, ports[k])
        return submit(cfg, out, address, echo=echo)


def run_simulation(
    cfg: RunConfig,
    out: Path,
    supernodes: int | None = None,
    echo: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation engine with one SuperNode per client (a SuperLink in
    simulation mode on a free local port, stopped afterwards), each ClientApp given the CPU
    cores and GPUs of :func:`simulation_options`; the summary. ``resume``: continue ``out``
    from its checkpoint."""
    check_flower(cfg, resume)
    n = supernodes or cfg.clients.num_clients
    options = node_config_arg(simulation_options(cfg, n, cuda_count()))
    home = out.resolve() / "flower"
    with Processes(home, home / "logs") as procs:
        address = procs.superlink(free_port(), simulation=True)
        return submit(cfg, out, address, federation_config=options, echo=echo, resume=resume)
