"""Result rows: their fields, the environment they were measured in, and their markdown.

A row is a flat dict (it goes to JSON as it is): one implementation on one device, dtype and
batch size, of one task (`task`: "infer", generation, or "train", fine-tuning steps; rows
written before the training task have no `task` and are inference rows). Figures a row could not
measure are None, with the reason in `error` or `notes`.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROW_FIELDS = (
    "task", "impl", "backend", "label", "device", "dtype", "batch", "model", "params_per_frame", "bytes_per_frame",
    "frames_per_s_per_stream", "frames_per_s_aggregate", "ms_per_frame", "frames_timed", "setup_s",
    "rtf_with_mimi", "ttfa_ms", "ttfa_max_ms", "arrival_ms", "prompt_tokens", "first_chunk_frames", "mimi_decoder",
    "peak_memory_gb", "peak_memory_kind", "copy_bandwidth_gb_s", "bound_frames_per_s", "bound_ratio",
    "codes_match_first_row", "versions", "date", "command", "error", "notes",
)
# the figures every successful row has, all positive
MEASURED = ("frames_per_s_per_stream", "frames_per_s_aggregate", "ms_per_frame", "rtf_with_mimi", "ttfa_ms",
            "peak_memory_gb", "copy_bandwidth_gb_s", "bound_frames_per_s", "bound_ratio")

TRAIN_ROW_FIELDS = (
    "task", "impl", "backend", "label", "device", "dtype", "batch", "clip_seconds", "model", "method", "lora_rank",
    "decoder_fraction", "trainable_params", "positions_per_example", "trained_frames_per_step",
    "decoder_frames_per_step", "warmup_steps", "steps_timed", "setup_s", "steps_per_s", "ms_per_step",
    "audio_s_per_s", "peak_memory_gb", "peak_memory_kind", "mlx_peak_memory_gb", "loss", "versions", "date", "command",
    "error", "notes",
)
# the figures every successful training row has, all positive
TRAIN_MEASURED = ("trainable_params", "steps_per_s", "ms_per_step", "audio_s_per_s", "peak_memory_gb", "loss")
# the ratios a training section states: (numerator, denominator) implementations, on audio seconds per second
TRAIN_RATIOS = (("csm-lora", "transformers-peft"), ("csm-full", "transformers-full"))


def task(row: dict) -> str:
    return row.get("task") or "infer"


def first_line(exc: BaseException) -> str:
    """An exception as a row's `error`: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "mlx"):
        module = sys.modules.get(name)
        if name == "mlx" and module is not None:
            module = sys.modules.get("mlx.core")
        found[name] = getattr(module, "__version__", None) if module else None
    return found


def today() -> str:
    return datetime.date.today().isoformat()


def cpu_name() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


TABLE_COLUMNS = (
    ("implementation", lambda r: r["label"]),
    ("dtype", lambda r: r["dtype"]),
    ("batch", lambda r: r["batch"]),
    ("frames/s per stream", lambda r: _fmt(r["frames_per_s_per_stream"])),
    ("frames/s total", lambda r: _fmt(r["frames_per_s_aggregate"])),
    ("RTF with Mimi", lambda r: _fmt(r["rtf_with_mimi"], 3)),
    ("first audio ms", lambda r: _fmt(r["ttfa_ms"], 0)),
    ("peak GB", lambda r: _fmt(r["peak_memory_gb"], 2)),
    ("of bound", lambda r: "–" if r["bound_ratio"] is None else f"{r['bound_ratio']:.1%}"),
    ("setup s", lambda r: _fmt(r["setup_s"])),
    ("notes", lambda r: r["error"] or r["notes"] or ""),
)


TRAIN_TABLE_COLUMNS = (
    ("implementation", lambda r: r["label"]),
    ("dtype", lambda r: r["dtype"]),
    ("batch", lambda r: f"{r['batch']} x {r['clip_seconds']:g} s"),
    ("trainable M", lambda r: _fmt(None if r["trainable_params"] is None else r["trainable_params"] / 1e6, 2)),
    ("decoder frames/step", lambda r: _fmt(r["decoder_frames_per_step"])),
    ("steps/s", lambda r: _fmt(r["steps_per_s"], 3)),
    ("audio s/s", lambda r: _fmt(r["audio_s_per_s"], 2)),
    ("ms/step", lambda r: _fmt(r["ms_per_step"], 0)),
    ("peak GB", lambda r: _fmt(r["peak_memory_gb"], 2)),
    ("MLX peak GB", lambda r: _fmt(r.get("mlx_peak_memory_gb"), 2)),
    ("setup s", lambda r: _fmt(r["setup_s"])),
    ("loss", lambda r: _fmt(r["loss"], 3)),
    ("notes", lambda r: r["error"] or r["notes"] or ""),
)


def markdown_table(rows: list[dict]) -> str:
    columns = TRAIN_TABLE_COLUMNS if rows and task(rows[0]) == "train" else TABLE_COLUMNS
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = (str(cell(row)).replace("|", "\\|").replace("\n", " ") for _, cell in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_section(rows: list[dict]) -> str:
    """A RESULTS.md section: where and how it was measured, then the table (one part per task
    when the rows mix them)."""
    if task(rows[0]) == "serve":
        from benchmarks.serve_task import markdown_section as serve_section

        return serve_section(rows)
    parts = [[r for r in rows if task(r) == t] for t in ("infer", "train")]
    if all(parts):
        return "\n".join(markdown_section(part) for part in parts)
    if task(rows[0]) == "train":
        return train_section(rows)
    first = rows[0]
    v = first["versions"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    devices = " / ".join(dict.fromkeys(r["device"] for r in rows))
    # one bound per device: MLX measures its own copy rate (on a CPU build far below torch's)
    bounds = {r["device"]: r for r in rows if r["copy_bandwidth_gb_s"] and r["batch"] == 1}
    commands = [f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)]
    lines = [
        f"## {devices} — {libs}, {first['date']}",
        "",
        *commands,
        "",
        f"Model: {first['model']}; {first['params_per_frame'] / 1e9:.2f} G params read per frame; "
        f"prompt {first['prompt_tokens']} tokens, greedy; first audio after {first['first_chunk_frames']} frames, "
        "no watermark.",
    ]
    for device, bound in bounds.items():
        where = f" on {device}" if len(bounds) > 1 else ""
        lines.append(f"Copy bandwidth measured{where}: {bound['copy_bandwidth_gb_s']:,.0f} GB/s "
                     f"(bound {bound['bound_frames_per_s']:,.1f} frames/s at batch 1 in {bound['dtype']}).")
    return "\n".join(lines + ["", markdown_table(rows), ""])


def train_section(rows: list[dict]) -> str:
    """The training task's section: where, the commands, what was trained, the table, the ratios."""
    first = rows[0]
    libs = ", ".join(f"{k} {val}" for k, val in first["versions"].items() if val)
    devices = " / ".join(dict.fromkeys(r["device"] for r in rows))
    commands = [f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)]
    measured = [r for r in rows if not r["error"]] or rows
    batch = measured[0]
    lines = [
        f"## Training steps: {devices} — {libs}, {first['date']}",
        "",
        *commands,
        "",
        f"Model: {first['model']}. One fixed batch (its size in the table) of clips of {batch['clip_seconds']:g} s "
        f"of random Mimi codes after a short text: {batch['positions_per_example']} positions and "
        f"{batch['trained_frames_per_step'] // batch['batch']} trained frames (EOS included) per clip; "
        f"{batch['warmup_steps']} warm-up steps, then {batch['steps_timed']} optimizer steps timed. "
        f"Audio s/s = trained frames x 80 ms per second. Peak memory: {batch['peak_memory_kind']}"
        + ("; MLX peak: mx.get_peak_memory() over the steps (every MLX array, weights included)."
           if any(r.get("mlx_peak_memory_gb") is not None for r in rows) else "."),
        "",
        markdown_table(rows),
        "",
    ]
    ratios = train_ratios(rows)
    if ratios:
        lines += [*ratios, ""]
    return "\n".join(lines)


def train_ratios(rows: list[dict]) -> list[str]:
    """"ours / theirs audio s/s: N x" for each pair of TRAIN_RATIOS measured at the same dtype and
    batch (each of our rows against the first of theirs; ours named by their decoder fraction,
    which a run may change while transformers' decoder always sees every frame)."""
    def key(r: dict) -> tuple:
        return r["dtype"], r["batch"], r["clip_seconds"]

    measured = [r for r in rows if r.get("audio_s_per_s")]
    lines = []
    for ours, theirs in TRAIN_RATIOS:
        for row in (r for r in measured if r["impl"] == ours):
            other = next((r for r in measured if r["impl"] == theirs and key(r) == key(row)), None)
            if other:
                dtype, batch, clip = key(row)
                lines.append(f"{ours} (decoder fraction {row['decoder_fraction']:g}) / {theirs} audio s/s "
                             f"({dtype}, batch {batch} x {clip:g} s): "
                             f"**{row['audio_s_per_s'] / other['audio_s_per_s']:.2f}x**")
    return lines


def append_results(path: Path, rows: list[dict]) -> None:
    """Add a section at the end of RESULTS.md; what is there stays."""
    text = path.read_text() if path.exists() else "# Measured results\n"
    path.write_text(text.rstrip("\n") + "\n\n" + markdown_section(rows))
