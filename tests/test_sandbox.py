"""Model-written code is hostile: each attack scores 0, returns within its limit, and leaves the host
as it was."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from esft.sandbox import run_untrusted

GOOD = "def transform(grid):\n    return [row[::-1] for row in grid]\n"


def run(code: str, **kw):
    t = time.perf_counter()
    result = run_untrusted(code, "transform", [[[1, 2], [3, 4]]], timeout_s=3, cpu_s=2, memory_mb=256, **kw)
    return result, time.perf_counter() - t


def test_honest_code_runs():
    result, _ = run(GOOD)
    assert result.ok and result.value == [[2, 1], [4, 3]]


def test_infinite_loop_is_stopped():
    result, seconds = run("def transform(g):\n    while True:\n        pass\n")
    assert not result.ok and seconds < 6


def test_fork_bomb_is_refused(tmp_path):
    code = (
        "import os\n"
        "def transform(g):\n"
        "    while True:\n"
        "        os.fork()\n"
    )  # fmt: skip
    result, seconds = run(code)
    assert not result.ok and seconds < 6
    assert "os.fork" in result.error
    code2 = "def transform(g):\n    import subprocess\n    subprocess.run(['sh', '-c', ':(){ :|:& };:'])\n"
    result, seconds = run(code2)
    assert not result.ok and seconds < 6


def test_huge_allocation_fails_cleanly():
    result, seconds = run("def transform(g):\n    x = bytearray(10 * 1024**3)\n    return g\n")
    assert not result.ok and "MemoryError" in result.error and seconds < 6


def test_reading_secrets_is_refused(tmp_path):
    secret = tmp_path / ".ssh" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    for path in [str(secret), str(secret.parent), "/etc/passwd", os.path.expanduser("~/.ssh/id_rsa")]:
        code = f"import os\ndef transform(g):\n    return [open({path!r}).read(), os.listdir({path!r})]\n"
        result, _ = run(code)
        assert not result.ok, path
        assert result.value is None


def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    code = f"def transform(g):\n    open({str(target)!r}, 'w').write('x')\n    return g\n"
    result, _ = run(code)
    assert not result.ok and not target.exists()
    result, _ = run("import os\ndef transform(g):\n    open('scratch.txt', 'w').write('ok')\n    return g\n")
    assert result.ok  # its own temp dir is writable


def test_network_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)
    port = server.getsockname()[1]
    connected = []

    def accept():
        try:
            conn, _ = server.accept()
            connected.append(conn)
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    attempts = [
        f"import socket\ndef transform(g):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return g\n",
        f"def transform(g):\n    import _socket\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n    return g\n",
        f"import urllib.request\ndef transform(g):\n    urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)\n    return g\n",
    ]
    for code in attempts:
        result, seconds = run(code)
        assert not result.ok and seconds < 6
    thread.join()
    server.close()
    assert not connected


@pytest.mark.parametrize(
    "code",
    [
        "import ctypes\ndef transform(g):\n    ctypes.CDLL(None).system(b'touch /tmp/esft-pwned')\n",
        "def transform(g):\n    __import__('os').system('touch /tmp/esft-pwned')\n",
        "import os\ndef transform(g):\n    os.kill(1, 9)\n",
        "def transform(g):\n    print('noise' * 1000)\n    return 'not a grid'\n",
        "this is not python",
        "def other(g):\n    return g\n",
        "def transform(g):\n    return transform(g)\n",
    ],
)
def test_other_escapes_fail_closed(code):
    result, seconds = run(code)
    assert seconds < 6
    assert not os.path.exists("/tmp/esft-pwned")
    if result.ok:  # the print case returns a value, which is just a wrong answer
        assert result.value == "not a grid"
