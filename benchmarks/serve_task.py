"""The serving task (`python -m benchmarks --task serve`): a bounded load test of `csm serve`.

The real app (`csm.server`) serves a random checkpoint of the preset (csm layout, a byte-level
tokenizer, random Mimi and, unless --watermark-model names real ones, random silentcipher weights
from tests/fakes: the watermark runs on every chunk as in production) on uvicorn at 127.0.0.1 in
this process. `--clients` threads send `--requests` requests in all, each as soon as its client's
previous one has ended (streamed pcm, a different seed each, sampled as csm samples by default),
and the run stops when the last one ends.

Per request: the time to its first audio byte (TTFA) and the audio it got. Reported: requests/s
and aggregate frames/s (audio received, 80 ms a frame) over the wall time from the first request
to the last end, and TTFA p50/p95 (queueing included: with more clients than slots, requests wait).

    python -m benchmarks --task serve --preset small --device cpu --threads 1 --requests 64 --clients 16
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import models, report, train_inputs

SERVE_ROW_FIELDS = (
    "task", "impl", "label", "device", "dtype", "model", "batch", "clients", "requests", "completed", "audio_ms",
    "wall_s", "requests_per_s", "ttfa_p50_ms", "ttfa_p95_ms", "frames_per_s_aggregate", "audio_s_per_s",
    "versions", "date", "command", "error", "notes",
)
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."
SAMPLES_PER_FRAME = 1920


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving (--task serve)")
    g.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    g.add_argument("--clients", type=int, default=16, help="clients sending them at once (default 16)")
    g.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size (default 16)")
    g.add_argument("--audio-ms", type=float, default=2000, help="each request's longest audio (default 2000)")
    g.add_argument("--watermark-model", help="real silentcipher weights (default: random ones, from tests/fakes)")


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.model:
        p.error("--task serve runs on random weights: give --preset or --dims, not --model")
    if min(a.requests, a.clients, a.max_batch_size) < 1 or a.audio_ms < 80:
        p.error("--requests, --clients and --max-batch-size must be at least 1, --audio-ms at least 80")
    a.preset = a.preset or "small"


def write_model(folder: Path, source: models.ModelSource) -> Path:
    """A complete random model folder: weights, tokenizer and a random Mimi as kyutai names it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from csm_torch.mimi import MIMI_FILE
    from fakes.mimi import save_kyutai_mimi_file

    train_inputs.write_checkpoint(folder, source)
    save_kyutai_mimi_file(folder / MIMI_FILE, seed=source.seed)
    return folder


def random_watermark(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fakes.watermark import make_random_watermark_dir

    return make_random_watermark_dir(folder)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(a: argparse.Namespace, source: models.ModelSource, device: str, device_name: str, command: str,
        log=lambda line: None) -> list[dict]:
    import uvicorn

    import csm
    from csm.server import ServerSettings, create_app

    row = dict.fromkeys(SERVE_ROW_FIELDS)
    row |= {"task": "serve", "impl": "csm-serve", "label": "csm serve (torch)", "device": device_name,
            "dtype": "float32", "model": source.label, "batch": a.max_batch_size, "clients": a.clients,
            "requests": a.requests, "audio_ms": a.audio_ms, "date": report.today(), "command": command}
    with tempfile.TemporaryDirectory() as tmp:
        log(f"writing the random checkpoint ({source.label}) ...")
        folder = write_model(Path(tmp) / "model", source)
        watermark = a.watermark_model or str(random_watermark(Path(tmp) / "silentcipher"))
        gen = csm.load(folder, backend="torch", device=device, dtype="float32", watermark_model=watermark)
        gen.prepare_audio()
        engine = gen.engine(max_batch_size=a.max_batch_size, max_queue=a.requests)
        settings = ServerSettings(max_audio_length_ms=a.audio_ms)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            results = _load(f"http://127.0.0.1:{port}", a, log)
        finally:
            server.should_exit = True
            thread.join(60)
            engine.close()
        row["versions"] = report.versions()
    done = [r for r in results if r.get("error") is None]
    row["completed"] = len(done)
    if not done:
        row["error"] = results[0]["error"] if results else "no request ran"
        return [row]
    wall = max(r["end"] for r in done) - min(r["start"] for r in results)
    frames = sum(r["bytes"] // 2 for r in done) / SAMPLES_PER_FRAME
    row["wall_s"] = wall
    row["requests_per_s"] = len(done) / wall
    row["ttfa_p50_ms"] = percentile([r["ttfa"] for r in done], 0.5) * 1000
    row["ttfa_p95_ms"] = percentile([r["ttfa"] for r in done], 0.95) * 1000
    row["frames_per_s_aggregate"] = frames / wall
    row["audio_s_per_s"] = frames * 0.08 / wall
    failed = len(results) - len(done)
    row["notes"] = (f"{a.requests} requests from {a.clients} clients, up to {a.audio_ms:g} ms each, watermarked"
                    + (f"; {failed} failed: {next(r['error'] for r in results if r.get('error'))}" if failed else ""))
    return [row]


def _load(url: str, a: argparse.Namespace, log) -> list[dict]:
    """Every client sends its share of the requests one after another; the results in order."""
    import httpx

    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(a.requests))

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": "tts-1", "input": TEXT, "voice": str(i % 4), "response_format": "pcm", "seed": i}
                result = {"start": time.perf_counter(), "bytes": 0, "ttfa": None, "error": None}
                try:
                    with http.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
                        if response.status_code != 200:
                            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:200]!r}")
                        for part in response.iter_raw():
                            if part and result["ttfa"] is None:
                                result["ttfa"] = time.perf_counter() - result["start"]
                            result["bytes"] += len(part)
                except Exception as exc:  # one failed request is reported, the run goes on
                    result["error"] = report.first_line(exc)
                result["end"] = time.perf_counter()
                with lock:
                    results.append(result)
                    if len(results) % max(1, a.requests // 8) == 0:
                        log(f"  {len(results)}/{a.requests} requests done")

    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def markdown_section(rows: list[dict]) -> str:
    first = rows[0]
    libs = ", ".join(f"{k} {v}" for k, v in (first["versions"] or {}).items() if v)
    commands = [f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)]
    lines = [f"## Serving: {first['device']} — {libs}, {first['date']}", "", *commands, "",
             f"Model: {first['model']}. `csm serve`'s app on uvicorn in-process; streamed pcm; TTFA = time to the "
             "first audio byte at the client, queueing included.", "",
             "| clients | requests | max batch | audio per request | requests/s | TTFA p50 ms | TTFA p95 ms | "
             "frames/s total | audio s/s | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, digits=1, r=r):
            return "–" if r[key] is None else f"{r[key]:,.{digits}f}"
        lines.append(f"| {r['clients']} | {r['completed']}/{r['requests']} | {r['batch']} | ≤{r['audio_ms']:g} ms | "
                     f"{f('requests_per_s', 2)} | {f('ttfa_p50_ms', 0)} | {f('ttfa_p95_ms', 0)} | "
                     f"{f('frames_per_s_aggregate')} | {f('audio_s_per_s', 2)} | {r['error'] or r['notes']} |")
    return "\n".join(lines + [""])
