"""The launcher: option resolution, command line and environment, backends tree, ports, real start/stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import (
    ADAPTER_DIR_ENV,
    BASE_MODEL_ENV,
    DEFAULT_MODEL_REPOSITORY,
    PROJECT_ROOT,
    ServerConfig,
    tritonserver_command,
    tritonserver_env,
)
from server.errors import LaunchError, ServerStartError
from server.launcher import (
    discover_adapter_ids,
    exit_status,
    format_banner,
    main,
    parse_config,
    split_passthrough,
)
from server.ports import ensure_ports_free, pick_free_ports, port_in_use
from server.process import ServerProcess, http_ready, start_server
from server.triton_install import (
    STUB_NAME,
    TRITON_HOME_ENV,
    TritonInstall,
    find_triton_install,
    prepare_backends,
    sync_file,
)

RUNNING_PYTHON = (sys.version_info.major, sys.version_info.minor)


@pytest.fixture(scope="module")
def install() -> TritonInstall:
    return find_triton_install()


@pytest.fixture
def base_model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def listener() -> Iterator[int]:
    """A port with a listening socket on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def make_config(tmp_path: Path, **overrides: object) -> ServerConfig:
    fields: dict[str, object] = {
        "model_repository": tmp_path,
        "http_port": 8000,
        "grpc_port": 8001,
        "metrics_port": 8002,
    }
    fields.update(overrides)
    return ServerConfig(**fields)  # type: ignore[arg-type]


# --- options ---------------------------------------------------------------------------------------------


def test_defaults_without_environment() -> None:
    config, args = parse_config([], environ={"BASE_MODEL": "", "ADAPTER_DIR": ""})
    assert config.model_repository == DEFAULT_MODEL_REPOSITORY
    assert config.ports == {"HTTP": 8000, "gRPC": 8001, "metrics": 8002}
    assert (config.base_model, config.adapter_dir) == (None, None)
    assert config.address == "127.0.0.1"
    assert config.extra_args == ()
    assert args.ready_timeout == 300.0


def test_environment_supplies_defaults() -> None:
    environ = {
        "HTTP_PORT": "9000",
        "GRPC_PORT": "9001",
        "METRICS_PORT": "9002",
        "BASE_MODEL": "models/base",
        "ADAPTER_DIR": "/srv/adapters",
    }
    config, _ = parse_config([], environ)
    assert config.ports == {"HTTP": 9000, "gRPC": 9001, "metrics": 9002}
    assert config.base_model == Path("models/base")
    assert config.adapter_dir == Path("/srv/adapters")


def test_command_line_overrides_environment() -> None:
    argv = ["--http-port", "7000", "--base-model", "cli/base", "--model-repository", "repo"]
    config, _ = parse_config(argv, {"HTTP_PORT": "9000", "BASE_MODEL": "env/base"})
    assert config.http_port == 7000
    assert config.base_model == Path("cli/base")
    assert config.model_repository == Path("repo")


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_bad_port_in_environment_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config([], {"GRPC_PORT": value})
    assert exited.value.code == 2
    assert "--grpc-port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "own", "passthrough"),
    [
        ([], [], []),
        (["--http-port", "1"], ["--http-port", "1"], []),
        (["--http-port", "1", "--", "--log-info=false"], ["--http-port", "1"], ["--log-info=false"]),
        (["--", "--x", "--", "y"], [], ["--x", "--", "y"]),
    ],
)
def test_split_passthrough(argv: list[str], own: list[str], passthrough: list[str]) -> None:
    assert split_passthrough(argv) == (own, passthrough)


def test_passthrough_arguments_reach_the_config() -> None:
    config, _ = parse_config(["--log-verbose", "--", "--disable-auto-complete-config"], {})
    assert config.extra_args == ("--disable-auto-complete-config",)
    assert config.log_verbose == 1


# --- validation ------------------------------------------------------------------------------------------


def test_validated_makes_paths_absolute(
    tmp_path: Path, base_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "adapters").mkdir()
    monkeypatch.chdir(tmp_path)
    config = make_config(
        Path("."), base_model=Path(base_model_dir.name), adapter_dir=Path("adapters")
    ).validated()
    assert config.model_repository == tmp_path.resolve()
    assert config.base_model == base_model_dir.resolve()
    assert config.adapter_dir == (tmp_path / "adapters").resolve()


def test_validated_accepts_missing_model_paths(tmp_path: Path) -> None:
    config = make_config(tmp_path).validated()
    assert (config.base_model, config.adapter_dir) == (None, None)


def test_validated_lists_every_problem(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "no-repo",
        base_model=tmp_path,  # a directory, but without config.json
        adapter_dir=tmp_path / "no-adapters",
        grpc_port=8000,
        exit_timeout_secs=-1,
    )
    with pytest.raises(LaunchError) as raised:
        config.validated()
    message = str(raised.value)
    assert f"model repository {tmp_path / 'no-repo'} is not a directory" in message
    assert f"base model {tmp_path} has no config.json" in message
    assert f"adapter directory {tmp_path / 'no-adapters'} does not exist" in message
    assert "ports must differ" in message
    assert "exit timeout -1 s is negative" in message


# --- command line and environment ------------------------------------------------------------------------


def test_command_binds_loopback_and_passes_extras_last(install: TritonInstall, tmp_path: Path) -> None:
    config = make_config(tmp_path, http_port=1, grpc_port=2, metrics_port=3, extra_args=("--log-info=false",))
    command = tritonserver_command(install, Path("/tree/backends"), config)
    assert command == [
        str(install.binary),
        f"--model-repository={tmp_path}",
        "--backend-directory=/tree/backends",
        "--http-address=127.0.0.1",
        "--http-port=1",
        "--grpc-address=127.0.0.1",
        "--grpc-port=2",
        "--metrics-address=127.0.0.1",
        "--metrics-port=3",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
        "--log-info=false",
    ]


def test_env_puts_interpreter_bin_and_wheel_libs_first(install: TritonInstall, tmp_path: Path) -> None:
    config = make_config(tmp_path, base_model=Path("/m/base"), adapter_dir=Path("/m/adapters"))
    env = tritonserver_env(
        install, config, {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/lib", "KEEP": "1"}
    )
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [str(install.libs_dir), "/opt/lib"]
    assert env[BASE_MODEL_ENV] == "/m/base"
    assert env[ADAPTER_DIR_ENV] == "/m/adapters"
    assert env["KEEP"] == "1"


def test_env_drops_stale_model_paths_and_adds_no_empty_search_entry(
    install: TritonInstall, tmp_path: Path
) -> None:
    stale = {"PATH": "/bin", BASE_MODEL_ENV: "/old", ADAPTER_DIR_ENV: "/old"}
    env = tritonserver_env(install, make_config(tmp_path), stale)
    assert BASE_MODEL_ENV not in env
    assert ADAPTER_DIR_ENV not in env
    # An empty entry would put the current directory on the library search path.
    assert env["LD_LIBRARY_PATH"] == str(install.libs_dir)


# --- the Triton install and the backends tree ------------------------------------------------------------


def test_install_has_server_and_libraries(install: TritonInstall) -> None:
    assert os.access(install.binary, os.X_OK)
    assert (install.python_backend / "libtriton_python.so").is_file()
    assert install.libs_dir.is_dir()


def test_stub_for_the_running_python(install: TritonInstall) -> None:
    stub = install.stub(RUNNING_PYTHON)
    assert stub == install.stubs_dir / f"{RUNNING_PYTHON[0]}.{RUNNING_PYTHON[1]}" / STUB_NAME
    assert "3.10" in install.stub_versions()
    assert "3.12" in install.stub_versions()


def test_stub_for_unsupported_python_names_the_available_ones(install: TritonInstall) -> None:
    with pytest.raises(
        LaunchError, match=r"no Triton Python backend stub for Python 2\.7 .*available: .*3\.11"
    ):
        install.stub((2, 7))


def test_prepare_backends_assembles_python_backend_with_stub(install: TritonInstall, tmp_path: Path) -> None:
    backends = prepare_backends(install, tmp_path)
    python_dir = backends / "python"
    assert backends == tmp_path / "backends"
    assert {path.name for path in python_dir.iterdir()} == {
        "libtriton_python.so",
        "triton_python_backend_utils.py",
        STUB_NAME,
    }
    stub = python_dir / STUB_NAME
    assert stub.read_bytes() == install.stub(RUNNING_PYTHON).read_bytes()
    assert os.access(stub, os.X_OK)


def test_prepare_backends_copies_only_what_changed(install: TritonInstall, tmp_path: Path) -> None:
    python_dir = prepare_backends(install, tmp_path) / "python"
    inodes = {path.name: path.stat().st_ino for path in python_dir.iterdir()}
    (python_dir / "triton_python_backend_utils.py").write_text("# damaged\n")

    prepare_backends(install, tmp_path)

    utils = python_dir / "triton_python_backend_utils.py"
    assert utils.read_bytes() == (install.python_backend / utils.name).read_bytes()
    assert (python_dir / STUB_NAME).stat().st_ino == inodes[STUB_NAME]
    assert (python_dir / "libtriton_python.so").stat().st_ino == inodes["libtriton_python.so"]


def fake_install(root: Path, wheel_stub: bytes | None) -> TritonInstall:
    """A wheel tree with stubs for 3.10 and the running Python, and optionally a stub in backends/python/
    (PyTriton leaves the one for the Python that ran it there)."""
    install = TritonInstall(root=root / "tritonserver", libs_dir=root / "libs")
    install.python_backend.mkdir(parents=True)
    (install.python_backend / "libtriton_python.so").write_bytes(b"backend")
    (install.python_backend / "triton_python_backend_utils.py").write_text("# utils\n")
    if wheel_stub is not None:
        (install.python_backend / STUB_NAME).write_bytes(wheel_stub)
    for version in ("3.10", f"{RUNNING_PYTHON[0]}.{RUNNING_PYTHON[1]}"):
        (install.stubs_dir / version).mkdir(parents=True)
        (install.stubs_dir / version / STUB_NAME).write_bytes(f"stub for {version}".encode())
    return install


def test_a_stub_in_the_wheels_backend_is_never_copied_over_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install = fake_install(tmp_path / "wheel", wheel_stub=b"a foreign stub, for another Python")
    python_dir = prepare_backends(install, tmp_path / "build") / "python"
    stub = python_dir / STUB_NAME
    assert stub.read_bytes() == install.stub(RUNNING_PYTHON).read_bytes()
    copied: list[str] = []

    def recording_sync(source: Path, target: Path) -> bool:
        done = sync_file(source, target)
        if done:
            copied.append(str(source.relative_to(tmp_path)))
        return done

    monkeypatch.setattr("server.triton_install.sync_file", recording_sync)
    prepare_backends(install, tmp_path / "build")

    assert stub.read_bytes() == install.stub(RUNNING_PYTHON).read_bytes()
    assert copied == []


def test_prepare_backends_switches_stub_with_python_version(install: TritonInstall, tmp_path: Path) -> None:
    stub = prepare_backends(install, tmp_path, python_version=(3, 10)) / "python" / STUB_NAME
    assert stub.read_bytes() == install.stub((3, 10)).read_bytes()
    prepare_backends(install, tmp_path, python_version=(3, 12))
    assert stub.read_bytes() == install.stub((3, 12)).read_bytes()


def test_sync_file_reports_whether_it_copied(tmp_path: Path) -> None:
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_text("one")
    assert sync_file(source, target) is True
    assert sync_file(source, target) is False
    assert target.read_text() == "one"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


# --- ports -----------------------------------------------------------------------------------------------


def test_port_in_use_sees_a_listener(listener: int) -> None:
    assert port_in_use(listener, "127.0.0.1")


def test_port_in_use_after_listener_closed() -> None:
    (port,) = pick_free_ports(1, "127.0.0.1")
    assert not port_in_use(port, "127.0.0.1")


def test_ensure_ports_free_names_the_busy_port(listener: int) -> None:
    (free,) = pick_free_ports(1, "127.0.0.1")
    with pytest.raises(LaunchError, match=rf"^gRPC port {listener} already in use on 127\.0\.0\.1"):
        ensure_ports_free({"HTTP": free, "gRPC": listener}, "127.0.0.1")


def test_pick_free_ports_gives_distinct_ports() -> None:
    ports = pick_free_ports(3, "127.0.0.1")
    assert len(set(ports)) == 3


# --- banner and exit status ------------------------------------------------------------------------------


def test_discover_adapter_ids_sorted_and_only_real_adapters(tmp_path: Path) -> None:
    for name in ("beta", "alpha"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    assert discover_adapter_ids(tmp_path) == ["alpha", "beta"]
    assert discover_adapter_ids(tmp_path / "missing") == []
    assert discover_adapter_ids(None) == []


def test_banner_shows_urls_and_a_client_command(tmp_path: Path) -> None:
    config = make_config(tmp_path, address="0.0.0.0", adapter_dir=tmp_path)
    banner = format_banner(config, ["alpha", "beta"])
    assert "READY" in banner
    assert "http://127.0.0.1:8000" in banner
    assert "127.0.0.1:8001" in banner
    assert "http://127.0.0.1:8002/metrics" in banner
    assert "python -m client generate --adapter alpha hello" in banner


def test_banner_without_adapters_suggests_the_base_model(tmp_path: Path) -> None:
    banner = format_banner(make_config(tmp_path), [])
    assert "python -m client generate --adapter '' hello" in banner


@pytest.mark.parametrize(
    ("returncode", "status"), [(0, 0), (3, 3), (-signal.SIGINT, 130), (-signal.SIGKILL, 137)]
)
def test_exit_status(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


# --- the real tritonserver -------------------------------------------------------------------------------

PROBE_MODEL = """
import json
import os


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        seen = {name: os.environ.get(name) for name in ("PATH", "{base}", "{adapters}")}
        with open(config["parameters"]["out"]["string_value"], "w") as out:
            json.dump(seen, out)

    def execute(self, requests):
        return []
"""


def write_probe_repository(root: Path, out_file: Path) -> Path:
    """A repository with one Python model that records the environment its stub sees."""
    model_dir = root / "env_probe"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "IN", data_type: TYPE_FP32, dims: [1] }]\n'
        'output [{ name: "OUT", data_type: TYPE_FP32, dims: [1] }]\n'
        "instance_group [{ kind: KIND_CPU, count: 1 }]\n"
        f'parameters {{ key: "out" value {{ string_value: "{out_file}" }} }}\n'
    )
    source = PROBE_MODEL.replace("{base}", BASE_MODEL_ENV).replace("{adapters}", ADAPTER_DIR_ENV)
    (model_dir / "1" / "model.py").write_text(source)
    return root


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, Path]]:
    """A real server on the probe repository: (server, base model dir, file the probe model wrote)."""
    root = tmp_path_factory.mktemp("probe")
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (root / "adapters").mkdir()
    seen = root / "seen.json"
    repository = write_probe_repository(root / "repo", seen)
    with start_server(
        repository, base, root / "adapters", log_path=root / "triton.log", ready_timeout_s=120
    ) as server:
        yield server, base, seen


def test_server_is_ready_on_loopback(probe: tuple[ServerProcess, Path, Path]) -> None:
    server, _, _ = probe
    assert server.http_url.startswith("127.0.0.1:")
    assert http_ready(server.http_url)
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=5) as response:
        assert b"nv_inference_count" in response.read()
    assert server.log_path is not None
    assert "Started GRPCInferenceService at " + server.grpc_url in server.log_path.read_text()


def test_stub_sees_venv_python_and_model_paths(probe: tuple[ServerProcess, Path, Path]) -> None:
    server, base, seen_file = probe
    seen = json.loads(seen_file.read_text())
    assert seen["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert seen[BASE_MODEL_ENV] == str(base.resolve())
    assert seen[ADAPTER_DIR_ENV] == str(server.config.adapter_dir)


def test_a_system_triton_install_is_used_in_place(install: TritonInstall, tmp_path: Path) -> None:
    """$MULTIADAPTER_TRITON_HOME (NGC's /opt/tritonserver in the image) is run as it is: its binary, its
    backends tree, no library path of ours. Here the install is assembled from the wheel's files (the
    binary behind a script that finds the wheel's libraries, as the image's loader config does)."""
    home = tmp_path / "opt-tritonserver"
    (home / "bin").mkdir(parents=True)
    binary = home / "bin" / "tritonserver"
    binary.write_text(
        f'#!/bin/sh\necho ran > "{home}/ran"\n'
        f'LD_LIBRARY_PATH="{install.libs_dir}:$LD_LIBRARY_PATH" exec "{install.binary}" "$@"\n'
    )
    binary.chmod(0o755)
    shutil.copytree(
        prepare_backends(install, tmp_path / "wheel-build") / "python", home / "backends" / "python"
    )
    env = {**os.environ, TRITON_HOME_ENV: str(home)}
    system = find_triton_install(env)
    assert system.system and system.binary == binary
    assert prepare_backends(system, tmp_path / "unused") == home / "backends"
    assert not (tmp_path / "unused").exists()
    config = make_config(tmp_path)
    assert tritonserver_command(system, home / "backends", config)[:1] == [str(binary)]
    assert str(install.libs_dir) not in tritonserver_env(system, config, env).get("LD_LIBRARY_PATH", "")
    root = tmp_path / "probe"
    (root / "base").mkdir(parents=True)
    (root / "base" / "config.json").write_text("{}")
    repository = write_probe_repository(root / "repo", root / "seen.json")
    with start_server(repository, root / "base", log_path=root / "triton.log", base_env=env) as server:
        assert http_ready(server.http_url)
        assert json.loads((root / "seen.json").read_text())[BASE_MODEL_ENV] == str((root / "base").resolve())
    assert (home / "ran").is_file()  # the system install's binary is what ran


@pytest.mark.parametrize(
    ("layout", "message"), [("empty", "no executable bin/tritonserver"), ("no-stub", "no Python backend")]
)
def test_a_broken_system_install_is_refused(tmp_path: Path, layout: str, message: str) -> None:
    if layout == "no-stub":
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "tritonserver").write_text("#!/bin/sh\n")
        (tmp_path / "bin" / "tritonserver").chmod(0o755)
    with pytest.raises(LaunchError, match=message):
        find_triton_install({TRITON_HOME_ENV: str(tmp_path)})


def test_early_exit_raises_with_log_tail(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="exited with code 1 before it was ready") as raised:
        start_server(tmp_path, extra_args=["--model-control-mode=bogus"], ready_timeout_s=60)
    assert "invalid argument for --model-control-mode" in str(raised.value)  # from tritonserver's log


def test_busy_port_fails_before_starting(tmp_path: Path, listener: int) -> None:
    with pytest.raises(LaunchError, match=f"HTTP port {listener} already in use"):
        start_server(tmp_path, http_port=listener)


def test_cli_forwards_sigint_and_exits_with_tritons_status(tmp_path: Path) -> None:
    http, grpc, metrics = pick_free_ports(3, "127.0.0.1")
    command = [sys.executable, "-m", "server", "--model-repository", str(tmp_path), "--exit-timeout-secs=1"]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout: list[str] = []
    banner_seen = threading.Event()

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            stdout.append(line)
            if "Triton is READY" in line:
                banner_seen.set()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        assert banner_seen.wait(timeout=60), "no READY banner:\n" + "".join(stdout[-20:])
        assert http_ready(f"127.0.0.1:{http}")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    assert "Signal (2) received.\n" in stdout  # tritonserver's own log line, streamed through
    assert not port_in_use(http, "127.0.0.1")


def test_cli_reports_launch_errors_without_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--model-repository", str(tmp_path / "missing")], environ={})
    assert status == 2
    assert f"model repository {tmp_path / 'missing'} is not a directory" in capsys.readouterr().err


def test_running_server_ports_count_as_busy(probe: tuple[ServerProcess, Path, Path]) -> None:
    server, _, _ = probe
    for port in server.config.ports.values():
        assert port_in_use(port, "127.0.0.1")  # gRPC listens on an IPv4-mapped IPv6 socket


# --- merged-weight variants --------------------------------------------------------------------------------


def test_merged_ids_come_from_the_command_line_or_the_environment() -> None:
    _, args = parse_config(["--merged", "upper, rot13,upper"], {})
    assert args.merged == ("upper", "rot13")
    _, args = parse_config([], {"MERGED": "reverse"})
    assert args.merged == ("reverse",)
    _, args = parse_config([], {})
    assert args.merged == ()


def test_a_merged_id_that_is_not_a_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(["--merged", "upper,../etc"], {})
    assert exited.value.code == 2
    assert "invalid adapter_id '../etc'" in capsys.readouterr().err


def test_every_extra_repository_is_served_and_validated(install: TritonInstall, tmp_path: Path) -> None:
    extra = tmp_path / "merged" / "repository"
    extra.mkdir(parents=True)
    config = make_config(tmp_path, extra_repositories=(extra,))
    command = tritonserver_command(install, Path("/tree/backends"), config)
    assert command[1:3] == [f"--model-repository={tmp_path}", f"--model-repository={extra}"]
    with pytest.raises(LaunchError, match="missing is not a directory"):
        make_config(tmp_path, extra_repositories=(tmp_path / "missing",)).validated()


def test_banner_names_the_merged_variants_and_the_compare_command(tmp_path: Path) -> None:
    banner = format_banner(make_config(tmp_path), ["upper"], merged=("upper", "rot13"))
    assert "merged    generate_merged_upper, generate_merged_rot13" in banner
    assert "python -m client compare --adapter upper" in banner


def test_merged_without_adapters_stops_before_launching(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status = main(["--merged", "upper", "--model-repository", str(tmp_path)], {})
    assert status == 2
    assert "--merged needs --base-model and --adapter-dir" in capsys.readouterr().err


def test_merged_variants_are_built_and_added_as_repositories(tiny_model, tmp_path: Path) -> None:
    from server.launcher import with_merged_variants

    adapter_id = tiny_model.adapter_ids[0]
    config = make_config(tmp_path, base_model=tiny_model.base_model, adapter_dir=tiny_model.adapter_dir)
    served = with_merged_variants(config, (adapter_id,), out=tmp_path / "merged")
    repository = tmp_path / "merged" / adapter_id / "repository"
    assert served.extra_repositories == (repository,)
    assert sorted(p.name for p in repository.iterdir()) == [
        f"generate_merged_{adapter_id}",
        f"merged_{adapter_id}",
    ]
    assert with_merged_variants(config, ()) is config


# --- the adapter cache and tenants -----------------------------------------------------------------------


def test_cache_and_tenant_flags_come_from_the_command_line_or_the_environment(tmp_path: Path) -> None:
    environ = {
        "ADAPTER_DEVICE_BYTES": "256MiB",
        "PRELOAD": "",
        "TENANTS": "/etc/tenants.json",
        "QUANTIZE": "nf4",
    }
    config, _ = parse_config(["--adapter-host-bytes", "1GiB", "--pin", "a,b"], environ)
    assert config.engine_settings() == {
        "adapter_device_bytes": "256MiB",
        "adapter_host_bytes": "1GiB",
        "preload_adapters": "",  # PRELOAD= empty: preload none
        "pinned_adapters": "a,b",
        "tenant_policy": "/etc/tenants.json",
        "quantization": "nf4",
    }
    config, _ = parse_config(["--quantize", "int8"], environ)
    assert config.engine_settings()["quantization"] == "int8"
    with pytest.raises(SystemExit):  # argparse names the choices
        parse_config(["--quantize", "fp8"], {})
    config, _ = parse_config([], {})
    assert set(config.engine_settings().values()) == {None}  # the model's config.pbtxt stays in force


def test_cache_settings_reach_the_models_environment_and_stale_ones_are_dropped(
    install: TritonInstall, tmp_path: Path
) -> None:
    from multiadapter.config import EngineConfig

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    policy = tmp_path / "tenants.json"
    policy.write_text(json.dumps({"tenants": {"acme": {"default": "", "allow": []}}}))
    config = make_config(
        tmp_path,
        base_model=tmp_path / "base",
        adapter_device_bytes="64KiB",
        preload_adapters="",
        pinned_adapters="x",
        tenant_policy=policy,
        quantization="nf4",
        admin_token="abc123",
    ).validated()
    stale = {"PATH": "/bin", "MULTIADAPTER_ADAPTER_HOST_BYTES": "1"}
    env = tritonserver_env(install, config, stale)
    assert "MULTIADAPTER_ADAPTER_HOST_BYTES" not in env
    assert env["MULTIADAPTER_PRELOAD_ADAPTERS"] == ""
    # The model reads them back as the launcher meant them.
    engine = EngineConfig.from_parameters({"adapter_host_bytes": "3MiB", "preload_adapters": "*"}, env)
    assert engine.adapter_device_bytes == 64 << 10
    assert engine.adapter_host_bytes == 3 << 20  # not overridden: config.pbtxt's value
    assert engine.preload_adapters == ()
    assert engine.pinned_adapters == ("x",)
    assert engine.tenant_policy == policy
    assert engine.canary_tenant == "canary-abc123"
    assert engine.quantization == "nf4"


def test_bad_cache_and_tenant_settings_are_refused_before_starting(tmp_path: Path) -> None:
    (tmp_path / "tenants.json").write_text('{"tenants": {"a": {"default": "b", "allow": []}}}')
    config = make_config(
        tmp_path,
        adapter_device_bytes="lots",
        adapter_host_bytes="0",
        pinned_adapters="../etc",
        tenant_policy=tmp_path / "tenants.json",
        quantization="fp8",
    )
    with pytest.raises(LaunchError) as error:
        config.validated()
    message = str(error.value)
    problems = (
        "'lots' is not a size",
        "host budget must be at least 1 byte",
        "--pin",
        "not in its",
        "--quantize",
    )
    for problem in problems:
        assert problem in message, message
