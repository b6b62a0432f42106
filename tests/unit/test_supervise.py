"""deploy.supervise without a supervisord: the config it writes (read back by supervisor's own parser) and
restart counting from supervisord's log."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions, UnhosedConfigParser

from deploy import supervise

STATE = Path("/srv/kiln-state")


def _program(name: str = "worker-0", **env: str) -> supervise.Program:
    # Log paths directly under "/": supervisor's parser checks that a log's directory exists.
    return supervise.Program(name=name, argv=["/venv/bin/python", "-m", "services.worker.main"],
                             env={"HOME": "/root", **env}, log_path=Path(f"/{name}.log"),
                             pid_path=STATE / "pids" / f"{name}.pid")


def _parsed(text: str, name: str):  # type: ignore[no-untyped-def]
    parser = UnhosedConfigParser()
    parser.read_string(text)
    [config] = ServerOptions().processes_from_section(parser, f"program:{name}", name)
    return parser, config


def test_the_config_restarts_every_program_and_puts_socket_pid_and_logs_in_the_state_dir() -> None:
    paths = supervise.Paths.of(STATE)
    text = supervise.config_text(paths, [_program("gateway"), _program("worker-0")], directory=Path("/repo"),
                                 base_env={"HOME": "/root"})
    parser, config = _parsed(text, "worker-0")
    assert parser.get("unix_http_server", "file") == str(STATE / "supervisor.sock")
    assert parser.get("unix_http_server", "chmod") == "0700"
    assert parser.get("supervisord", "pidfile") == str(STATE / "pids" / "supervisord.pid")
    assert parser.get("supervisord", "logfile") == str(STATE / "logs" / "supervisord.log")
    assert parser.has_section("program:gateway")
    assert config.autorestart is RestartUnconditionally  # whatever the exit code
    assert config.startsecs == supervise.START_SECS <= 2
    assert config.startretries == supervise.START_RETRIES >= 10
    assert config.stdout_logfile == "/worker-0.log"
    assert config.redirect_stderr is True
    assert config.killasgroup is True
    assert config.directory == "/repo"


def test_a_program_records_its_own_pid_then_becomes_the_program() -> None:
    program = _program()
    _, config = _parsed(supervise.config_text(supervise.Paths.of(STATE), [program], directory=Path("/repo"),
                                              base_env={"HOME": "/root"}), "worker-0")
    sh, flag, script = shlex.split(config.command)
    assert (sh, flag) == ("/bin/sh", "-c")
    assert script == f"echo $$ > {program.pid_path} && exec /venv/bin/python -m services.worker.main"


@pytest.mark.parametrize("value", ["plain", "a,b c", 'x%y,"quoted" z', "it's", "", "100%", "nats://u:p@h:1/x?y=z"])
def test_environment_values_survive_supervisor_s_parser(value: str) -> None:
    text = supervise.config_text(supervise.Paths.of(STATE), [_program(KILN_X=value)], directory=Path("/repo"),
                                 base_env={"HOME": "/root"})
    _, config = _parsed(text, "worker-0")
    assert config.environment == {"KILN_X": value}


def test_only_what_differs_from_supervisord_s_own_environment_is_written_and_dropped_variables_are_unset() -> None:
    program = _program(KILN_A="1", SAME="s")
    overlay, unset = supervise.env_overlay(program.env, {"HOME": "/home/other", "SAME": "s", "CUDA_HOME": "/c"})
    assert overlay == {"HOME": "/root", "KILN_A": "1"}
    assert unset == ["CUDA_HOME"]
    assert supervise.command_line(program, unset).startswith("/bin/sh -c 'unset CUDA_HOME; echo $$ > ")


@pytest.mark.parametrize("value", ['"both"', "line\nbreak", "a ;comment"])
def test_values_supervisord_cannot_read_back_are_refused_not_mangled(value: str) -> None:
    with pytest.raises(supervise.SupervisorError):
        supervise.config_text(supervise.Paths.of(STATE), [_program(KILN_X=value)], directory=Path("/repo"),
                              base_env={})


def test_the_socket_moves_out_of_a_state_dir_too_deep_for_a_unix_socket() -> None:
    deep = Path("/x" * 60)
    paths = supervise.Paths.of(deep)
    assert len(str(paths.socket)) <= 107 and paths.socket.parent != deep
    assert paths.config == deep / "supervisord.conf"
    assert supervise.Paths.of(deep).socket == paths.socket  # the same state dir always finds the same socket


# supervisord's own lines (the "success" one cut at 120 columns; only spawned/exited lines count).
LOG = """\
2026-01-01 10:00:00,000 INFO supervisord started with pid 100
2026-01-01 10:00:00,010 INFO spawned: 'gateway' with pid 101
2026-01-01 10:00:00,020 INFO spawned: 'worker-0' with pid 102
2026-01-01 10:00:00,030 INFO spawned: 'worker-10' with pid 103
2026-01-01 10:00:01,000 INFO success: worker-0 entered RUNNING state, process has stayed up for > than 1 seconds
2026-01-01 10:00:05,000 WARN exited: worker-0 (terminated by SIGKILL; not expected)
2026-01-01 10:00:06,000 INFO spawned: 'worker-0' with pid 104
2026-01-01 10:00:07,000 WARN exited: worker-0 (exit status 1; not expected)
2026-01-01 10:00:08,000 INFO spawned: 'worker-0' with pid 105
2026-01-01 10:00:09,000 INFO waiting for worker-10 to stop
2026-01-01 10:00:09,100 INFO stopped: worker-10 (exit status 0)
2026-01-01 10:00:09,200 INFO spawned: 'worker-10' with pid 106
2026-01-01 10:00:10,000 WARN exited: gateway (exit status 0; expected)
2026-01-01 10:00:10,500 INFO spawned: 'gateway' with pid 107
2026-01-01 10:00:11,000 WARN exited: worker-10 (terminated by SIGKILL; not expected)
"""


def test_restarts_are_spawns_after_an_exit_not_after_a_requested_stop() -> None:
    # worker-0: killed, then crashed: two restarts. worker-10: stopped and started on request (a changed
    # config) is no restart, and an exit not yet followed by a spawn is none either. gateway: any exit counts.
    assert supervise.count_restarts(LOG) == {"gateway": 1, "worker-0": 2, "worker-10": 0}


def test_restart_counting_ignores_other_lines_and_partial_logs() -> None:
    assert supervise.count_restarts("") == {}
    assert supervise.count_restarts("garbage\nexited: worker-1 (x)\n") == {}
    assert supervise.count_restarts(LOG.splitlines()[0] + "\n2026 INFO spawned: 'tracker' with pid 9") == {"tracker": 0}
