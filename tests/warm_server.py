"""The warm interpreter of tests/warm.py: imports the modules named in argv[1] once, then reads one
JSON request a line on stdin and forks a child per request, which runs ``src.main`` as
``python -m src.main`` would. It answers on the file descriptor in argv[2]: each child's pid as it
is forked, and each child's exit code (subprocess's convention: -N for signal N) as it ends.

    python tests/warm_server.py '["torch", "src.run.experiment"]' FD
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import sys
import threading
import traceback


def child(req: dict, replies) -> None:
    """Become the run ``req`` describes; never returns."""
    try:
        os.setpgid(0, 0)  # its own group: the client stops it with whatever it started
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        # python -m puts the working folder first, then PYTHONPATH, read at start-up
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:1] = [os.getcwd(), *extra]
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(f, fd)
            os.close(f)
        replies.close()
        threads = req["env"].get("OMP_NUM_THREADS")
        if threads:  # read by OpenMP when torch loaded, here already: set it as a new process would
            import torch

            torch.set_num_threads(int(threads))
        sys.argv = [os.path.join(req["root"], "src", "main.py"), *req["argv"]]
        code = 0
        try:
            runpy.run_module("src.main", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        # what the interpreter does at exit: wait for threads, run atexit, flush
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)
    except BaseException:
        traceback.print_exc()
    os._exit(1)


def serve(preload: list[str], fd: int) -> None:
    for name in preload:
        importlib.import_module(name)
    replies = os.fdopen(fd, "w")
    replies.write(json.dumps({"ready": os.getpid()}) + "\n")
    replies.flush()
    buf = b""
    while True:
        if select.select([0], [], [], 0.05)[0]:
            data = os.read(0, 65536)
            if not data:  # the test worker is gone
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    child(req, replies)
                try:
                    os.setpgid(pid, pid)  # here too: the client may signal the group at once
                except OSError:
                    pass
                replies.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")
                replies.flush()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            replies.write(json.dumps({"exit": pid, "code": code}) + "\n")
            replies.flush()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]), int(sys.argv[2]))
