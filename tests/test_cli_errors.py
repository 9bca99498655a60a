"""rcm.cli_errors turns a failing CLI into one sentence and a non-zero status."""
import pytest

from rcm.cli_errors import UserError, one_line, run_cli


def _fails(error):
    def main():
        raise error
    return main


def test_user_error_is_its_message_only(capsys, monkeypatch):
    monkeypatch.delenv("RCM_DEBUG", raising=False)
    status = run_cli(_fails(UserError("data.shards: file x.tar does not exist")), "rcm.train")
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("rcm.train: error: data.shards: file x.tar does not exist")
    assert "Traceback" not in err and err.count("\n") == 1


def test_other_errors_keep_their_type_and_debug_shows_traceback(capsys, monkeypatch):
    monkeypatch.setenv("RCM_DEBUG", "1")
    assert run_cli(_fails(ValueError("bad\nvalue")), "prog") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "prog: error: ValueError: bad value" in err


def test_key_error_names_the_key():
    assert one_line(KeyError("ema")) == "KeyError: missing key 'ema'"


def test_exit_status_passes_through():
    assert run_cli(lambda: 3, "prog") == 3
    assert run_cli(lambda: None, "prog") == 0
    with pytest.raises(SystemExit):
        run_cli(_fails(SystemExit(2)), "prog")
