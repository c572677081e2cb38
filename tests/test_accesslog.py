"""balrs.accesslog: the three line formats (and what hostile bytes become in them), the sink on real
files, pipes and devices, the event-log rate limit on a fake clock, and request ids.

Nothing here sleeps for a fixed time: tests wait for the thing itself (a line in a file, a counter)
with a deadline, and the rate limit runs on a clock that only moves when the test says so.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import select
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balrs import accesslog
from balrs.accesslog import (
    RECORD_FIELDS,
    LogSink,
    RateLimitFilter,
    RequestIds,
    make_formatter,
    valid_request_id,
)

# The bsuite's pattern for nginx's combined format (cases_ops.py).
COMBINED = re.compile(r'^(\S+) - (\S+) \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+|-) "([^"]*)" "([^"]*)"$')
COMMON = re.compile(r'^(\S+) - (\S+) \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+|-)$')
CLF_TIME = re.compile(r"\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}$")
ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$")
# What a json line carries: the contract's fields, then those the simulate tool reads.
JSON_FIELDS = {
    "time", "client", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms", "pool", "backend",
    "route", "retries", "request_id", "end",
    "ts", "host", "user_agent", "referer", "protocol", "connect_ms", "upstream_ms",
}
# 2026-12-03 13:05:01.250 UTC
WALL = 1796303101.25


class Rec:
    """A finished exchange as the formatter sees it (the proxy's Exchange has these attributes)."""

    __slots__ = RECORD_FIELDS  # the formatter may read nothing else
    req = None  # not an exchange (EXCHANGE_FIELDS): the formatter reads RECORD_FIELDS only

    def __init__(self, **over: Any) -> None:
        values: dict[str, Any] = dict(
            client="127.0.0.1", method=b"GET", target=b"/echo?mark=c1", minor=1, host=b"lb.test:8080",
            user_agent=b"suite-ua/1.0", referer=b"http://ref.test/p", status=200, bytes_in=77, bytes_out=123,
            t_start=1000.0, t_connected=1000.0005, t_response=1000.002, t_done=1000.0025, wall_start=WALL,
            pool="default", backend="d1", route="apiroute", retries=0, request_id=b"3f9a1c2e7b0d4e51-1a",
            end="ok",
        )
        values.update(over)
        for name in RECORD_FIELDS:
            setattr(self, name, values.pop(name))
        assert not values, values


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs in UTC unless it sets another zone (time.tzset re-reads TZ)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def wait_for(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``pred`` until it is true or ``timeout`` passes (a short poll, a generous deadline)."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= end:
            return value
        time.sleep(0.01)


def file_lines(path: Path) -> List[bytes]:
    try:
        return path.read_bytes().splitlines()
    except OSError:
        return []


def nginx_escaped(value: bytes) -> str:
    """The reference: nginx's log escaping, one octet at a time."""
    return "".join(chr(c) if 0x20 <= c < 0x7F and c not in b'"\\' else "\\x%02X" % c for c in value)


# ---------------------------------------------------------------------------------------------- combined


def test_combined_is_nginx_combined() -> None:
    line = make_formatter("combined")(Rec())
    assert line == (b'127.0.0.1 - - [03/Dec/2026:13:05:01 +0000] "GET /echo?mark=c1 HTTP/1.1" 200 123 '
                    b'"http://ref.test/p" "suite-ua/1.0"\n')
    m = COMBINED.match(line.decode()[:-1])
    assert m and m.groups() == ("127.0.0.1", "-", "03/Dec/2026:13:05:01 +0000", "GET /echo?mark=c1 HTTP/1.1",
                                "200", "123", "http://ref.test/p", "suite-ua/1.0")
    assert CLF_TIME.match(m.group(3))


def test_combined_missing_values_are_dashes() -> None:
    fmt = make_formatter("combined")
    line = fmt(Rec(referer=None, user_agent=b"", bytes_out=0, status=0, minor=0)).decode()
    m = COMBINED.match(line[:-1])
    assert m, line
    assert m.group(4) == "GET /echo?mark=c1 HTTP/1.0"
    assert (m.group(5), m.group(6), m.group(7), m.group(8)) == ("000", "0", "-", "-")


def test_no_request_line_is_a_dash() -> None:
    for fmt, pattern in (("combined", COMBINED), ("common", COMMON)):
        line = make_formatter(fmt)(Rec(method=b"-", target=b"-", minor=-1, status=400, bytes_out=0)).decode()
        m = pattern.match(line[:-1])
        assert m and m.group(4) == "-" and m.group(5) == "400", line


def test_common_is_ncsa() -> None:
    fmt = make_formatter("common")
    assert fmt(Rec()) == b'127.0.0.1 - - [03/Dec/2026:13:05:01 +0000] "GET /echo?mark=c1 HTTP/1.1" 200 123\n'
    assert fmt(Rec(bytes_out=0)).endswith(b'" 200 -\n')  # %b: '-' for no bytes


@pytest.mark.parametrize("zone, shown", [("UTC", "+0000"), ("IST-5:30", "+0530"), ("EST+5", "-0500")])
def test_clf_time_is_local_with_its_offset(monkeypatch: pytest.MonkeyPatch, zone: str, shown: str) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    when = COMBINED.match(make_formatter("combined")(Rec()).decode()[:-1])
    assert when is not None
    expected = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(WALL))
    assert when.group(3) == "%s %s" % (expected, shown)


def test_time_follows_each_record_across_seconds() -> None:
    fmt = make_formatter("combined")
    # out of order, across a second boundary, and back: the per-second cache must not stick
    for wall in (WALL, WALL + 0.7499, WALL + 0.75, WALL - 1, WALL + 3600 * 24, WALL):
        m = COMBINED.match(fmt(Rec(wall_start=wall)).decode()[:-1])
        assert m and m.group(3) == time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(wall))


HOSTILE = [
    b'x" 200 1 "forged',
    b"a\r\n127.0.0.2 - - [01/Jan/2026:00:00:00 +0000] \"GET / HTTP/1.1\" 200 1 \"-\" \"-\"",
    b"\x1b[31mred\x1b[0m",
    b"back\\slash",
    b"nul\x00byte",
    b"tab\there",
    b"\xff\xfe not utf-8",
    "caf\u00e9 \u2028 line separator".encode(),
    b"\x7f",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_combined_escapes_hostile_bytes(value: bytes) -> None:
    fmt = make_formatter("combined")
    line = fmt(Rec(target=b"/p?" + value, user_agent=value, referer=value, method=value))
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and b"\r" not in line
    assert all(0x20 <= c < 0x7F for c in line[:-1]), line  # nothing raw: no control, no high octet
    m = COMBINED.match(line.decode("ascii")[:-1])
    assert m, line
    assert m.group(4) == "%s /p?%s HTTP/1.1" % (nginx_escaped(value), nginx_escaped(value))
    assert m.group(7) == m.group(8) == nginx_escaped(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_combined_never_forgeable(target: bytes, agent: bytes) -> None:
    line = make_formatter("combined")(Rec(target=target, user_agent=agent))
    m = COMBINED.match(line.decode("ascii")[:-1])
    assert m and line.count(b"\n") == 1
    assert m.group(4) == "GET %s HTTP/1.1" % nginx_escaped(target)
    assert m.group(8) == (nginx_escaped(agent) if agent else "-")


def test_client_address_stays_one_field() -> None:
    m = COMBINED.match(make_formatter("combined")(Rec(client="::1 evil\n")).decode()[:-1])
    assert m and m.group(1) == "::1\\x20evil\\x0A"
    m = COMBINED.match(make_formatter("combined")(Rec(client="")).decode()[:-1])
    assert m and m.group(1) == "-"


# ---------------------------------------------------------------------------------------------- json


def json_line(**over: Any) -> dict[str, Any]:
    line = make_formatter("json")(Rec(**over))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert all(c < 0x80 for c in line), line  # ASCII only: no raw U+2028 or NEL for a str.splitlines()
    out = json.loads(line)
    assert isinstance(out, dict)
    return out


def test_json_carries_every_field() -> None:
    d = json_line()
    assert set(d) == JSON_FIELDS
    assert d == {
        "time": "2026-12-03T13:05:01.250+00:00", "ts": 1796303101.25, "client": "127.0.0.1", "method": "GET",
        "protocol": "HTTP/1.1", "host": "lb.test:8080", "user_agent": "suite-ua/1.0", "path": "/echo?mark=c1",
        "status": 200, "bytes_in": 77, "bytes_out": 123, "duration_ms": 2.5, "connect_ms": 0.5,
        "upstream_ms": 1.5, "pool": "default", "backend": "d1", "route": "apiroute", "retries": 0, "end": "ok",
        "request_id": "3f9a1c2e7b0d4e51-1a", "referer": "http://ref.test/p",
    }


def test_json_time_and_ts_agree() -> None:
    for wall in (WALL, WALL + 0.9996, 1.0e9 + 0.001, time.time()):
        d = json_line(wall_start=wall)
        assert ISO_TIME.match(d["time"]), d["time"]
        assert datetime.datetime.fromisoformat(d["time"]).timestamp() == pytest.approx(d["ts"], abs=1e-6)
        assert d["ts"] == pytest.approx(wall, abs=0.001) and d["ts"] <= wall  # milliseconds, like nginx $msec


def test_json_time_of_each_line_with_one_formatter() -> None:
    """The formatter keeps the last line's time part: lines out of order, in one millisecond, across a
    second and back each show their own time."""
    fmt = make_formatter("json")
    for wall in (WALL, WALL + 0.0004, WALL + 0.001, WALL - 0.2, WALL + 1.0, WALL + 0.0001, WALL + 86400.0, WALL):
        d = json.loads(fmt(Rec(wall_start=wall)))
        expected = datetime.datetime.fromtimestamp(wall, datetime.timezone.utc)
        assert d["time"] == expected.strftime("%Y-%m-%dT%H:%M:%S.") + "%03d+00:00" % (int(wall * 1000) % 1000)
        assert d["ts"] == pytest.approx(wall, abs=0.001) and d["ts"] <= wall


def test_json_time_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    d = json_line()
    assert d["time"] == "2026-12-03T18:35:01.250+05:30"
    assert datetime.datetime.fromisoformat(d["time"]).timestamp() == pytest.approx(WALL)


def test_json_durations_rounded_to_microseconds() -> None:
    d = json_line(t_start=100.0, t_connected=100.0001234, t_response=100.0101239, t_done=100.0123456)
    assert (d["duration_ms"], d["connect_ms"], d["upstream_ms"]) == (12.346, 0.123, 10.0)


def test_json_times_that_did_not_happen_are_null() -> None:
    d = json_line(t_connected=0.0, t_response=0.0, backend=None, route=None, status=502, end="backend-error")
    assert d["connect_ms"] is None and d["upstream_ms"] is None and d["duration_ms"] == 2.5
    assert d["backend"] is None and d["route"] is None and d["status"] == 502
    d = json_line(t_response=0.0)
    assert d["connect_ms"] == 0.5 and d["upstream_ms"] is None
    d = json_line(t_done=0.0)
    assert d["duration_ms"] == 0.0


def test_json_absent_values_are_null() -> None:
    for over in ({"referer": None}, {"request_id": None}, {"referer": None, "request_id": None},
                 {"host": None, "user_agent": None}):
        d = json_line(**over)
        assert set(d) == JSON_FIELDS
        for key in over:
            assert d[key] is None, (key, d)
        assert d["path"] == "/echo?mark=c1" and d["status"] == 200


def test_json_protocols() -> None:
    assert json_line(minor=0)["protocol"] == "HTTP/1.0"
    assert json_line(minor=-1, method=b"-", target=b"-")["protocol"] is None
    assert json_line(minor=9)["protocol"] == "HTTP/1.9"


def test_json_request_id_as_text() -> None:
    assert json_line(request_id="abc-1")["request_id"] == "abc-1"
    assert json_line(request_id='a"b')["request_id"] == 'a"b'


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_json_escapes_hostile_bytes(value: bytes) -> None:
    shown = value.decode("utf-8", "backslashreplace")
    d = json_line(target=b"/p?" + value, user_agent=value, referer=value, host=value, method=value,
                  request_id=value)
    assert d["path"] == "/p?" + shown
    assert d["user_agent"] == d["referer"] == d["host"] == d["method"] == d["request_id"] == shown


def test_json_escapes_odd_names() -> None:
    d = json_line(client='1.2.3.4"\n', pool='p"\\', backend="b\u00e9", route='r":nan', end="ok\n",
                  t_connected=0.0)
    assert (d["client"], d["pool"], d["backend"], d["route"], d["end"]) == ('1.2.3.4"\n', 'p"\\', "b\u00e9",
                                                                             'r":nan', "ok\n")
    assert d["connect_ms"] is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.one_of(st.none(), st.binary(max_size=40)), st.binary(max_size=20))
def test_json_round_trips_any_octets(target: bytes, referer: Optional[bytes], agent: bytes) -> None:
    d = json_line(target=target, referer=referer, user_agent=agent)
    assert d["path"] == target.decode("utf-8", "backslashreplace")
    assert d["referer"] == (None if referer is None else referer.decode("utf-8", "backslashreplace"))
    assert d["user_agent"] == agent.decode("utf-8", "backslashreplace")
    assert set(d) == JSON_FIELDS


def test_caches_stay_right_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog, "NAME_CACHE_SIZE", 3)
    fmt_json, fmt_combined = make_formatter("json"), make_formatter("combined")
    for i in range(20):
        client, agent, backend = "10.0.0.%d" % i, b"ua/%d" % (i % 7), "b%d" % (i % 5)
        d = json.loads(fmt_json(Rec(client=client, user_agent=agent, backend=backend, retries=i % 2)))
        assert (d["client"], d["user_agent"], d["backend"], d["retries"]) == (client, agent.decode(), backend,
                                                                              i % 2)
        m = COMBINED.match(fmt_combined(Rec(client=client, user_agent=agent)).decode()[:-1])
        assert m and (m.group(1), m.group(8)) == (client, agent.decode())


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="xml"):
        make_formatter("xml")
    assert set(accesslog.FORMATS) == {"common", "combined", "json"}


# ---------------------------------------------------------------------------------------------- the sink


@pytest.fixture
def sinks() -> Iterator[List[LogSink]]:
    """Sinks a test makes are closed after it, whatever happened."""
    made: List[LogSink] = []
    yield made
    for sink in made:
        sink.close(timeout=0)


def test_sink_appends_lines_to_a_file(tmp_path: Path, sinks: List[LogSink]) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"old line\n")
    sink = LogSink(str(path))
    sinks.append(sink)
    lines = [b"line %d\n" % i for i in range(1000)]
    for line in lines:
        sink.write(line)
    assert sink.flush(5.0)
    assert path.read_bytes() == b"old line\n" + b"".join(lines)
    assert sink.dropped == 0 and sink.buffered == 0


def test_sink_creates_the_file_0644(tmp_path: Path, sinks: List[LogSink]) -> None:
    path = tmp_path / "new.log"
    old = os.umask(0o022)
    try:
        sink = LogSink(str(path))
    finally:
        os.umask(old)
    sinks.append(sink)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_sink_cannot_open_is_an_error_at_once(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        LogSink(str(tmp_path / "missing-dir" / "access.log"))


def test_fifo_without_reader_fails_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        LogSink(str(fifo))  # not a hang on the loop thread
    assert info.value.errno == errno.ENXIO


def test_reopen_after_rename(tmp_path: Path, sinks: List[LogSink]) -> None:
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    sink = LogSink(str(path))
    sinks.append(sink)
    sink.write(b"before\n")
    assert sink.flush(5.0)
    os.rename(path, rotated)  # logrotate, then SIGUSR1
    sink.write(b"queued before the reopen\n")
    sink.reopen()
    sink.write(b"after\n")
    assert wait_for(lambda: file_lines(path) == [b"after"]), file_lines(path)
    assert file_lines(rotated) == [b"before", b"queued before the reopen"]
    sink.reopen()  # twice in a row, without lines in between
    sink.reopen()
    sink.write(b"again\n")
    assert sink.flush(5.0)
    assert file_lines(path) == [b"after", b"again"] and sink.dropped == 0


def test_lines_racing_the_writer_land_once_in_order_across_reopens(tmp_path: Path, sinks: List[LogSink]) -> None:
    """The loop appends while the writer takes batches off the front of the same buffer, and reopens
    come in between: every line lands whole, once, in order, in the file that was current when it was
    written."""
    path = tmp_path / "access.log"
    sink = LogSink(str(path))
    sinks.append(sink)
    expected: List[List[bytes]] = [[]]
    for i in range(20000):
        line = b"line %d %s\n" % (i, b"x" * (i % 97))
        sink.write(line)
        expected[-1].append(line.rstrip(b"\n"))
        if i % 3000 == 2999:
            assert wait_for(path.exists)  # logrotate renames again only after the last reopen happened
            os.rename(path, tmp_path / ("access.log.%d" % len(expected)))
            sink.reopen()
            expected.append([])
    assert sink.flush(10.0) and sink.dropped == 0 and sink.buffered == 0
    for n, lines in enumerate(expected[:-1], 1):
        assert file_lines(tmp_path / ("access.log.%d" % n)) == lines
    assert file_lines(path) == expected[-1]


def test_reopen_before_any_line(tmp_path: Path, sinks: List[LogSink]) -> None:
    path = tmp_path / "access.log"
    sink = LogSink(str(path))
    sinks.append(sink)
    os.rename(path, tmp_path / "gone.log")
    sink.reopen()
    sink.write(b"one\n")
    assert wait_for(lambda: file_lines(path) == [b"one"])


def test_reopen_failure_keeps_the_old_file(tmp_path: Path, sinks: List[LogSink],
                                           caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    sink = LogSink(str(path))
    sinks.append(sink)
    moved = tmp_path / "moved"
    os.rename(directory, moved)  # the path's directory is gone: reopening fails
    with caplog.at_level(logging.ERROR, logger="balrs"):
        sink.reopen()
        sink.write(b"still here\n")
        assert sink.flush(5.0)
    assert file_lines(moved / "access.log") == [b"still here"]
    assert any("cannot reopen" in r.getMessage() for r in caplog.records)


def test_stderr_and_stdout(capfd: pytest.CaptureFixture[str], sinks: List[LogSink]) -> None:
    err, out = LogSink("stderr"), LogSink("stdout")
    sinks += [err, out]
    err.write(b"to stderr\n")
    out.write(b"to stdout\n")
    assert err.flush(5.0) and out.flush(5.0)
    err.reopen()  # nothing to reopen
    captured = capfd.readouterr()
    assert "to stderr\n" in captured.err and "to stdout\n" in captured.out
    err.close()
    os.fstat(2)  # the sink does not close the process's stderr


def test_full_destination_drops_and_counts(tmp_path: Path, sinks: List[LogSink]) -> None:
    # A FIFO that is full and whose reader does not read: the writer thread blocks on its first write,
    # the sink's buffer fills, and from then on write() drops lines instead of waiting.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    filler = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    stuffed = 0
    try:
        while True:
            stuffed += os.write(filler, b"F" * 4096)
    except BlockingIOError:
        pass
    os.close(filler)
    try:
        sink = LogSink(str(fifo), max_buffer=8192)
        sinks.append(sink)
        line = b"x" * 99 + b"\n"
        started = time.monotonic()
        for _ in range(3000):
            sink.write(line)
        assert time.monotonic() - started < 2.0  # no write waited for the destination
        # At most the buffer (82 lines) and the batch the writer is blocked on (40) were kept.
        assert sink.dropped >= 3000 - 82 - 41, sink.dropped
        assert sink.buffered <= 8192
        assert not sink.flush(0.1)  # bounded: the destination is stuck
        # Now read everything: what was not dropped arrives whole, in order, after the filler.
        got = bytearray()
        sent = [3000]

        def drained() -> bool:
            while True:
                try:
                    chunk = os.read(reader, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                got.extend(chunk)
            return sink.buffered == 0 and len(got) == stuffed + (sent[0] - sink.dropped) * len(line)

        assert wait_for(drained, 10.0), (len(got), stuffed, sink.dropped)
        assert bytes(got) == b"F" * stuffed + line * (3000 - sink.dropped)
        dropped = sink.dropped
        sink.write(line)  # room again
        sent[0] += 1
        assert wait_for(drained) and sink.dropped == dropped
    finally:
        os.close(reader)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_errors_are_counted_never_raised(sinks: List[LogSink], caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink("/dev/full")  # every write fails with ENOSPC
    sinks.append(sink)
    with caplog.at_level(logging.WARNING, logger="balrs"):
        for i in range(50):
            sink.write(b"line %d\n" % i)
        assert sink.flush(5.0)
    assert sink.dropped == 50
    warnings = [r for r in caplog.records if "dropping lines" in r.getMessage()]
    assert len(warnings) == 1 and os.strerror(errno.ENOSPC) in warnings[0].getMessage()


def test_broken_pipe_is_counted(tmp_path: Path, sinks: List[LogSink]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sink = LogSink(str(fifo))
    sinks.append(sink)
    os.close(reader)  # EPIPE from now on (Python ignores SIGPIPE)
    for _ in range(10):
        sink.write(b"lost\n")
    assert sink.flush(5.0) and sink.dropped == 10


def test_close_writes_what_is_buffered_then_drops(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    sink = LogSink(str(path))
    for i in range(100):
        sink.write(b"%d\n" % i)
    sink.close()
    assert file_lines(path) == [b"%d" % i for i in range(100)]
    sink.write(b"late\n")
    assert sink.dropped == 1 and file_lines(path)[-1] == b"99"
    sink.reopen()  # ignored once closed
    sink.close()  # twice is fine


def test_close_without_lines_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    sink = LogSink(str(path))
    sink.close()
    if before is not None:
        assert set(os.listdir("/proc/self/fd")) <= before | {str(i) for i in range(3)}


def test_close_does_not_wait_when_told_not_to(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        sink = LogSink(str(fifo), max_buffer=1 << 20)
        for _ in range(2000):
            sink.write(b"y" * 99 + b"\n")  # 200 kB: the pipe fills, the writer blocks
        assert wait_for(lambda: sink.buffered < 200000)
        started = time.monotonic()
        sink.close(timeout=0)
        assert time.monotonic() - started < 0.5
        sink.close(timeout=0)
    finally:
        os.close(reader)  # the blocked writer gets EPIPE and ends


def test_the_writer_is_woken_once_per_batch_not_per_line(tmp_path: Path, sinks: List[LogSink],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sink = LogSink(str(tmp_path / "access.log"))
    sinks.append(sink)
    kicks: List[int] = []
    kick = LogSink._kick

    def counting_kick(self: LogSink) -> None:
        kicks.append(1)
        kick(self)

    monkeypatch.setattr(LogSink, "_kick", counting_kick)  # (the class: instances have __slots__)
    for i in range(2000):
        sink.write(b"%d\n" % i)
    assert sink.flush(5.0)
    assert len(kicks) < 2000 / 10, len(kicks)


def test_no_thread_to_be_had(tmp_path: Path, sinks: List[LogSink], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "access.log"
    sink = LogSink(str(path))
    sinks.append(sink)
    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    sink.write(b"one\n")  # buffered, not raised
    sink.write(b"two\n")
    monkeypatch.setattr(threading.Thread, "start", start)
    sink.write(b"three\n")
    assert sink.flush(5.0)
    assert file_lines(path) == [b"one", b"two", b"three"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sink_and_ids_after_fork(tmp_path: Path, sinks: List[LogSink]) -> None:
    path = tmp_path / "access.log"
    sink = LogSink(str(path))
    sinks.append(sink)
    ids = RequestIds()
    parent_id = ids.next()
    sink.write(b"parent 1\n")
    assert sink.flush(5.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no writer thread was inherited, the sink must start its own
        code = 1
        try:
            os.close(r)
            sink.write(b"child\n")
            os.write(w, ids.next() + b"\n")
            code = 0 if sink.flush(5.0) and sink.dropped == 0 else 2
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child_id = f.read().strip()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    sink.write(b"parent 2\n")
    assert sink.flush(5.0)
    assert sorted(file_lines(path)) == [b"child", b"parent 1", b"parent 2"]
    assert valid_request_id(child_id) and child_id.split(b"-")[0] != parent_id.split(b"-")[0]


# ---------------------------------------------------------------------------------------------- rate limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: Any, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("balrs", level, __file__, 1, msg, args, None)


def test_rate_limit_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    limit = RateLimitFilter(per_second=2.0, burst=3, clock=clock)
    passed = [limit.filter(record("backend %s refused", "b%d" % i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    clock.now += 0.25  # half a token
    assert not limit.filter(record("backend %s refused", "b10"))
    clock.now += 0.25
    rec = record("backend %s refused", "b11")
    assert limit.filter(rec)
    assert rec.getMessage() == "backend b11 refused (8 similar messages suppressed)"
    assert not limit.filter(record("backend %s refused", "b12"))
    clock.now += 10.0  # refills up to the burst, not beyond
    recs = [record("backend %s refused", "x") for _ in range(4)]
    assert [limit.filter(r) for r in recs] == [True, True, True, False]
    assert recs[0].getMessage() == "backend x refused (1 similar messages suppressed)"
    assert recs[1].getMessage() == "backend x refused"


def test_rate_limit_keys_are_template_and_level() -> None:
    clock = FakeClock()
    limit = RateLimitFilter(per_second=1.0, burst=1, clock=clock)
    assert limit.filter(record("a %s", 1))
    assert not limit.filter(record("a %s", 2))  # same template, other arguments
    assert limit.filter(record("b %s", 1))  # another template
    assert limit.filter(record("a %s", 1, level=logging.ERROR))  # another level
    assert not limit.filter(record("a %s", 3, level=logging.ERROR))


def test_rate_limit_forgets_the_least_recent_key() -> None:
    clock = FakeClock()
    limit = RateLimitFilter(per_second=0.0, burst=1, clock=clock, max_keys=2)
    assert limit.filter(record("a")) and limit.filter(record("b"))
    assert not limit.filter(record("a"))  # a is now the most recent
    assert limit.filter(record("c"))  # evicts b
    assert not limit.filter(record("a"))
    assert limit.filter(record("b"))  # b was forgotten: a fresh burst


def test_rate_limit_in_a_logger() -> None:
    clock = FakeClock()
    seen: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    handler = Keep()
    handler.addFilter(RateLimitFilter(per_second=1.0, burst=2, clock=clock))
    logger = logging.getLogger("balrs.test_accesslog")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(5):
            logger.warning("connect to %s failed", "b%d" % i)
        clock.now += 1.0
        logger.warning("connect to %s failed", "b9")
        logger.warning("%d%% done", 100)  # the template keeps working with its arguments
        logger.error("other")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert seen == ["connect to b0 failed", "connect to b1 failed",
                    "connect to b9 failed (3 similar messages suppressed)", "100% done", "other"]


def test_rate_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RateLimitFilter(per_second=1.0, burst=0)


def test_rate_limit_non_text_messages() -> None:
    limit = RateLimitFilter(per_second=0.0, burst=1, clock=FakeClock())
    weird = logging.LogRecord("balrs", logging.INFO, __file__, 1, {"a": 1}, None, None)
    assert limit.filter(weird)
    assert not limit.filter(logging.LogRecord("balrs", logging.INFO, __file__, 1, {"a": 1}, None, None))


# ---------------------------------------------------------------------------------------------- request ids

ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


def test_valid_request_id() -> None:
    assert valid_request_id(b"a") and valid_request_id(ID_CHARS) and valid_request_id(b"x" * 128)
    assert not valid_request_id(b"") and not valid_request_id(b"x" * 129)
    for c in range(256):
        assert valid_request_id(b"ab" + bytes([c]) + b"cd") == (c in ID_CHARS), c


def test_request_ids_unique_valid_bytes() -> None:
    ids = RequestIds()
    made = [ids.next() for _ in range(100000)]
    assert len(set(made)) == len(made)
    assert all(type(i) is bytes and valid_request_id(i) for i in made[:1000] + made[-10:])
    other = RequestIds().next()
    assert other.split(b"-")[0] != made[0].split(b"-")[0]  # a new random prefix per generator
    assert re.fullmatch(rb"[0-9a-f]{16}-[0-9a-f]+", made[-1])


def test_request_id_in_the_log_matches_the_generated_one() -> None:
    rid = RequestIds().next()
    assert json_line(request_id=rid)["request_id"] == rid.decode()


# ---------------------------------------------------------------------------------------------- misc


def test_import_has_no_side_effects() -> None:
    import subprocess

    code = ("import threading, os, sys; before = threading.active_count(); import balrs.accesslog as a; "
            "assert threading.active_count() == before; assert not a._fork_hook_installed; "
            "s = a.LogSink('stderr'); assert threading.active_count() == before; "
            "s.write(b''); assert threading.active_count() == before + 1")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parent.parent))


def test_writable_helper_waits_on_any_descriptor() -> None:
    r, w = os.pipe()
    try:
        assert accesslog._writable(w, 0.0)
        os.set_blocking(w, False)
        try:
            while True:
                os.write(w, b"z" * 65536)
        except BlockingIOError:
            pass
        assert not accesslog._writable(w, 0.05)
        assert select.PIPE_BUF == accesslog.PIPE_BATCH_BYTES
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------------------- exchanges (EXCHANGE_FIELDS)
@pytest.mark.parametrize("fmt", ["json", "combined", "common"])
@pytest.mark.parametrize("head", [
    b"GET /p?q=1 HTTP/1.1\r\nHost: a.test\r\nUser-Agent:  ua/1 \r\nReferer: http://r.test/\r\n\r\n",
    b"GET / HTTP/1.0\r\nX-User-Agent: not-this\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: b\r\nreferer:http://r/\"\r\nuser-agent: \xff\"\r\nUser-Agent: second\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",  # wrk's
    b"GET /a\\b HTTP/1.1\r\nHost: h\r\nX-Referer: no\r\nReferer:\t\r\nUser-Agent:x\r\n\r\n",
    b"GET http://abs.test:81/p HTTP/1.1\r\nHost: ignored\r\n\r\n",
])
@pytest.mark.parametrize("rid", [None, b"3f9a1c2e7b0d4e51-1a"])
@pytest.mark.parametrize("times", [(1000.001, 1000.002, 1000.003), (1000.001, 0.0, 1000.003),
                                   (0.0, 0.0, 1000.003), (1000.001, 1000.002, 0.0)])
def test_an_exchange_logs_what_its_record_fields_say(fmt: str, head: bytes, rid: Optional[bytes],
                                                     times: Any) -> None:
    """The exchange fast path (fields read from the parsed head and the outcome objects) writes the
    very line the RECORD_FIELDS of the same exchange give."""
    from balrs.http.heads import parse_request_head
    from balrs.proxy.exchange import Attempts, Exchange

    class Named:  # what Backend, Pool and Route show the log (hashable, like them)
        def __init__(self, name: str, pool: str = "") -> None:
            self.name, self.pool = name, pool

    ex = Exchange(parse_request_head(head), "10.0.0.7", 1000.0, WALL, len(head))
    ex.be = Named("d1", pool="api")  # type: ignore[assignment]
    ex.pool_ref = Named("api")  # type: ignore[assignment]
    ex.route_ref = Named("r1")  # type: ignore[assignment]
    ex.failed = Attempts()
    ex.failed.retries = 2
    ex.status, ex.bytes_out, ex.end = 201, 99, "ok"
    ex.t_connected, ex.t_response, ex.t_done = times
    ex.request_id = rid
    rec = Rec(**{name: getattr(ex, name) for name in RECORD_FIELDS})
    line = make_formatter(fmt)
    assert line(ex) == line(rec)
    ex.be = ex.route_ref = None
    ex.failed = None
    assert line(ex) == line(Rec(**{name: getattr(ex, name) for name in RECORD_FIELDS}))
