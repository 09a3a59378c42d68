"""Result rows: their fields, the environment they were measured in, and their markdown.

A row is a flat dict (it goes to JSON as it is): one implementation on one device, dtype and
batch size. Figures a row could not measure are None, with the reason in `error` or `notes`.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROW_FIELDS = (
    "impl", "backend", "label", "device", "dtype", "batch", "model", "params_per_frame", "bytes_per_frame",
    "frames_per_s_per_stream", "frames_per_s_aggregate", "ms_per_frame", "frames_timed", "setup_s",
    "rtf_with_mimi", "ttfa_ms", "ttfa_max_ms", "arrival_ms", "prompt_tokens", "first_chunk_frames", "mimi_decoder",
    "peak_memory_gb", "peak_memory_kind", "copy_bandwidth_gb_s", "bound_frames_per_s", "bound_ratio",
    "codes_match_first_row", "versions", "date", "command", "error", "notes",
)
# the figures every successful row has, all positive
MEASURED = ("frames_per_s_per_stream", "frames_per_s_aggregate", "ms_per_frame", "rtf_with_mimi", "ttfa_ms",
            "peak_memory_gb", "copy_bandwidth_gb_s", "bound_frames_per_s", "bound_ratio")


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


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = (str(cell(row)).replace("|", "\\|").replace("\n", " ") for _, cell in TABLE_COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_section(rows: list[dict]) -> str:
    """A RESULTS.md section: where and how it was measured, then the table."""
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


def append_results(path: Path, rows: list[dict]) -> None:
    """Add a section at the end of RESULTS.md; what is there stays."""
    text = path.read_text() if path.exists() else "# Measured results\n"
    path.write_text(text.rstrip("\n") + "\n\n" + markdown_section(rows))
