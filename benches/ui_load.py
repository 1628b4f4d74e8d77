"""`studio bench ui-load`: the web UI under load, through the Gradio API as a page uses it.

The server runs as its own process (`python app.py`'s `main`), sampled for RSS every 0.2 s. Phases:

1. load: `--requests` simultaneous generations (distinct seeds), twice. Every request must come back with its own
   seed's image; the largest queue length and place the clients were told are recorded, with the server's RSS
   after each round (stable memory: round 2 ends where round 1 did) and its peak.
2. cancel: a long generation is cancelled once it runs (what the page's Stop button sends); a short request sent at
   the same moment must finish in about its own time, which it can only do if the cancelled work stopped (one
   generation runs at a time). A request cancelled while it waits never runs.
3. queue limit: a server started with `--queue-size` small gets more simultaneous requests than fit; the ones past
   the limit are refused with Gradio's message, the others all finish.
4. uploads: a file over the server's `--max-upload` is refused (HTTP 413) before it reaches the disk; a small one is
   taken.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from studio.models import DEFAULT_MODEL


@dataclass
class Server:
    url: str
    pid: int
    stop: Callable[[], None]
    rss: list[int] = field(default_factory=list)  # samples, bytes

    def status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_server(queue_size: int, max_upload_mb: float) -> Server:
    """`python app.py --queue-size N --max-upload MB` on a free port, once it answers."""
    port = free_port()
    code = "import sys; from studio.ui import main; main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", str(port), "--queue-size", str(queue_size),
                             "--max-upload", str(max_upload_mb)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            time.sleep(0.5)

    def stop() -> None:
        proc.terminate()
        proc.wait(30)

    return Server(url, proc.pid, stop)


def _sampler(server: Server, done: threading.Event) -> threading.Thread:
    def sample() -> None:
        while not done.is_set():
            try:
                server.rss.append(server.status("VmRSS"))
            except (OSError, StopIteration):
                return
            done.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


LONG_STEPS = 100  # the Generate tab's most
RUNNING = ("PROCESSING", "ITERATING", "PROGRESS")  # gradio_client's status codes of a request being worked on
LABELS = {  # Generate tab field -> the start of its component's label (the API names them param_0, ...)
    "model": "Model", "prompt": "Prompt", "negative": "Negative prompt", "seed": "Seed", "steps": "Steps",
    "guidance": "Guidance (", "guidance_rescale": "Guidance rescale", "scheduler": "Sampler", "size": "Size",
    "num_images": "Images",
}


class Generate:
    """Submits Generate-tab requests by field name."""

    def __init__(self, client: Any, **defaults: Any) -> None:
        params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
        self.client, self.defaults = client, defaults
        self.names = {field: next(p["parameter_name"] for p in params if p["label"].startswith(label))
                      for field, label in LABELS.items()}

    def submit(self, **fields: Any) -> Any:
        values = {**self.defaults, **fields}
        return self.client.submit(**{self.names[k]: v for k, v in values.items()}, api_name="/generate")


def _watch(jobs: list[Any], until: Callable[[], bool]) -> dict[str, int]:
    """Poll the jobs' status while `until()` is False: the largest queue length and place the clients saw."""
    seen = {"max_queue_size": 0, "max_rank": 0}
    while not until():
        for job in jobs:
            status = job.status()
            seen["max_queue_size"] = max(seen["max_queue_size"], status.queue_size or 0)
            seen["max_rank"] = max(seen["max_rank"], (status.rank or 0) + 1)  # rank 0: next in line
        time.sleep(0.1)
    return seen


def load_round(gen: Generate, server: Server, n: int, first_seed: int, timeout: float) -> dict[str, Any]:
    """`n` simultaneous requests; each must come back with its own seed's image."""
    start = time.perf_counter()
    jobs = [gen.submit(seed=first_seed + i) for i in range(n)]
    seen = _watch(jobs, lambda: all(j.done() for j in jobs) or time.perf_counter() - start > timeout)
    answered, wrong = 0, []
    for i, job in enumerate(jobs):
        try:
            images, text = job.result(timeout=1)[:2]  # the gallery and the parameters; the rest is page state
        except Exception as err:  # noqa: BLE001 - counted as lost
            wrong.append(f"request {i}: {type(err).__name__}: {err}"[:200])
            continue
        if len(images) == 1 and re.search(rf"Seed: {first_seed + i}\b", text):
            answered += 1
        else:
            wrong.append(f"request {i}: {len(images)} image(s), parameters {text[-60:]!r}")
    return {"requests": n, "answered": answered, "lost_or_wrong": wrong, **seen,
            "seconds": round(time.perf_counter() - start, 2),
            "server_rss_mb_after": round(server.status("VmRSS") / 2**20, 1)}


def cancel_phase(gen: Generate, server: Server, size: str, into_s: float = 1.5) -> dict[str, Any]:
    """Cancel a running long request (100 steps at `size`) and a waiting one; a short request sent at once must finish
    in about its own time, which it can only do if the cancelled work stopped (one generation runs at a time)."""
    def timed(**fields: Any) -> float:
        began = time.perf_counter()
        gen.submit(**fields).result(timeout=900)
        return time.perf_counter() - began

    per_step = max((timed(seed=4, size=size, steps=3) - timed(seed=5, size=size, steps=1)) / 2, 1e-3)
    alone = timed(seed=6)
    long_job = gen.submit(seed=999, size=size, steps=LONG_STEPS)
    waiting = gen.submit(seed=998, size=size, steps=LONG_STEPS)
    deadline = time.time() + 5  # the client's status can lag (one stream for every job): then cancel by the clock
    while long_job.status().code.name not in RUNNING and not long_job.done() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(into_s)
    running_at_cancel = not long_job.done()
    cpu_before = server.cpu_seconds()
    waiting.cancel()
    long_job.cancel()
    cancelled_at = time.perf_counter()
    gen.submit(seed=997).result(timeout=600)
    short_s = time.perf_counter() - cancelled_at
    try:
        long_job.result(timeout=5)
        long_outcome = "finished"  # the cancel came too late, or did not stop it
    except Exception:  # noqa: BLE001 - a cancelled request has no result
        long_outcome = long_job.status().code.name.lower()
    time.sleep(0.3)
    cpu_idle = server.cpu_seconds()
    time.sleep(0.7)
    return {
        "long_request": f"{LONG_STEPS} steps at {size}",
        "long_request_would_need_s": round(per_step * LONG_STEPS, 1),
        "cancelled_after_s": into_s,
        "running_when_cancelled": running_at_cancel,
        "long_request_outcome": long_outcome,
        "waiting_request_ran": waiting.status().code.name not in ("CANCELLED", "IN_QUEUE", "JOINING_QUEUE"),
        "short_request_alone_s": round(alone, 2),
        "short_request_done_after_cancel_s": round(short_s, 2),
        "server_cpu_s_from_cancel_to_0.3s_after_short": round(cpu_idle - cpu_before, 2),
        "server_cpu_s_in_the_0.7s_after": round(server.cpu_seconds() - cpu_idle, 2),
    }


def cancel_stopped(cancel: dict[str, Any]) -> bool:
    """The cancelled work stopped: the short request sent with the cancel took about its own time (it would have
    waited for the rest of the long one otherwise) and the server idled after it (a generation still running would
    keep a core busy). Timings only, no per-step estimate: a difference of two short requests' times, which the
    bench reports, can come out near zero on busy cores."""
    return (cancel["short_request_done_after_cancel_s"] < 2 * cancel["short_request_alone_s"] + 0.5
            and cancel["server_cpu_s_in_the_0.7s_after"] < 0.35)


def limit_phase(gen: Generate, queue_size: int, n: int) -> dict[str, Any]:
    """`n` simultaneous requests to a server whose queue holds `queue_size`: the rest are refused, none is lost."""
    jobs = [gen.submit(seed=500 + i) for i in range(n)]
    finished, refused, messages = 0, 0, set()
    for job in jobs:
        try:
            job.result(timeout=600)
            finished += 1
        except Exception as err:  # noqa: BLE001 - a refusal is what is measured
            refused += 1
            messages.add(f"{type(err).__name__}: {err}"[:200])
    return {"queue_size": queue_size, "sent": n, "finished": finished, "refused": refused,
            "messages": sorted(messages)}


def upload_phase(server: Server, limit_mb: float) -> dict[str, Any]:
    """A file over the server's upload limit is refused before it is stored; one well under it is taken."""

    def post(size: int) -> tuple[int, str]:
        boundary = "studio-bench"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        body = head + os.urandom(size) + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{server.url}gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, ""
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")[:200]

    over, message = post(int(limit_mb * 2**20) * 2)
    under, _ = post(int(limit_mb * 2**20) // 4)
    return {"limit_mb": limit_mb, "over_limit_status": over, "over_limit_message": message,
            "under_limit_status": under}


def run(
    model: str,
    requests: int,
    steps: int,
    size: str,
    long_size: str,
    limit: int,
    *,
    rounds: int = 2,
    cancel_after_s: float = 1.5,
    start: Callable[[int, float], Server] = start_process_server,
    timeout: float = 1800,
) -> dict[str, Any]:
    from gradio_client import Client

    report: dict[str, Any] = {"model": model, "requests": requests, "steps": steps, "size": size or "native",
                              "cpu_threads": len(os.sched_getaffinity(0))}
    defaults = {"model": model, "prompt": "a large red star on the left on a white background", "negative": "",
                "seed": 0, "steps": steps, "guidance": "", "guidance_rescale": "", "scheduler": "", "size": size,
                "num_images": 1}
    server = start(64, 2048.0)
    done = threading.Event()
    _sampler(server, done)
    try:
        gen = Generate(Client(server.url, verbose=False), **defaults)
        began = time.perf_counter()
        gen.submit(seed=0).result(timeout=600)  # loads the pipeline
        report["warm_up_s"] = round(time.perf_counter() - began, 2)
        report["server_rss_mb_after_warm_up"] = round(server.status("VmRSS") / 2**20, 1)
        report["rounds"] = [load_round(gen, server, requests, 1000 * (r + 1), timeout) for r in range(rounds)]
        report["cancel"] = cancel_phase(gen, server, long_size, cancel_after_s)
        report["server_peak_rss_mb"] = round(server.status("VmHWM") / 2**20, 1)
        report["server_rss_mb_sampled_max"] = round(max(server.rss, default=0) / 2**20, 1)
        done_rounds = report["rounds"]
        report["rss_growth_first_to_last_round_mb"] = round(done_rounds[-1]["server_rss_mb_after"]
                                                            - done_rounds[0]["server_rss_mb_after"], 1)
    finally:
        done.set()
        server.stop()
    small = start(limit, 1.0)
    try:
        gen = Generate(Client(small.url, verbose=False), **defaults)
        report["queue_limit"] = limit_phase(gen, limit, 2 * limit + 2)
        report["uploads"] = upload_phase(small, 1.0)
    finally:
        small.stop()
    cancel, queue, uploads = report["cancel"], report["queue_limit"], report["uploads"]
    report["ok"] = bool(
        all(r["answered"] == requests and not r["lost_or_wrong"] for r in report["rounds"])
        and cancel["running_when_cancelled"] and cancel["long_request_outcome"] == "cancelled"
        and cancel_stopped(cancel)
        and queue["refused"] > 0 and queue["finished"] + queue["refused"] == queue["sent"]
        and uploads["over_limit_status"] == 413 and uploads["under_limit_status"] == 200
    )
    return report


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("ui-load", help="the web UI under 20 simultaneous requests: queue, cancel, limits")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=20, help="simultaneous generation requests per round")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="", help="WxH, default the model's native size")
    parser.add_argument("--long-size", default="384x384", help="size of the 100-step request that is cancelled")
    parser.add_argument("--queue-size", type=int, default=4, help="the small server's queue limit")
    parser.add_argument("--rounds", type=int, default=2, help="load rounds (memory must not grow between them)")

    def main(args: argparse.Namespace) -> int:
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        report = run(args.model, args.requests, args.steps, args.size, args.long_size, args.queue_size,
                     rounds=args.rounds)
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1

    parser.set_defaults(func=main)
