"""The benchmark harness end to end on a tiny random model on the CPU (seconds): every row has
every field, the figures are positive, the markdown renders, RESULTS.md keeps what it had."""

import json

import pytest

from benchmarks import cli, report
from benchmarks.bandwidth import params_per_frame
from csm.config import PRESETS

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# a 16 MB bandwidth copy, not the CPU default of 256 MB: 11 copies each on torch and MLX took ~7 s
QUICK = ["--preset", "tiny", "--device", "cpu", "--frames", "4", "--warmup-frames", "2", "--prompt-tokens", "12",
         "--copy-mb", "16"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One run of three implementations: csm torch, transformers' reference, csm MLX."""
    out = tmp_path_factory.mktemp("bench")
    impls = (["transformers-eager", "csm-torch-eager"] + (["csm-mlx"] if cli.mlx_installed() else [])
             + ["csm-torch-engine"])
    results = out / "RESULTS.md"
    results.write_text("# Measured results\n\nan earlier row\n")
    argv = QUICK + ["--impl", *impls, "--batch", "1", "2", "--streams", "1", "3", "--json", str(out / "rows.json"),
                    "--append-results", str(results)]
    assert cli.main(argv) == 0
    return json.loads((out / "rows.json").read_text()), results.read_text(), impls


def test_every_row_has_every_field_and_positive_figures(quick_run):
    rows, _, impls = quick_run
    batch_one = [r for r in rows if r["batch"] == 1 and not r["impl"].endswith("-engine")]
    assert [r["impl"] for r in batch_one] == [i for i in impls if not i.endswith("-engine")]
    for row in batch_one:
        assert set(row) == set(report.ROW_FIELDS), row["impl"]
        assert row["error"] is None, row["error"]
        for field in report.MEASURED:
            assert row[field] > 0, (row["impl"], field)
        assert row["mimi_decoder"] == "streaming", row["impl"]
        assert row["versions"]["torch"] and row["date"] and row["command"].startswith("python -m benchmarks")


def test_the_reference_runs_on_the_same_weights(quick_run):
    """float32 on the CPU: csm's greedy codes (fused weights, and MLX's) equal transformers' frame for frame."""
    rows, _, impls = quick_run
    assert rows[0]["impl"] == "transformers-eager"
    matches = [r["codes_match_first_row"] for r in rows if r["batch"] == 1 and not r["impl"].endswith("-engine")]
    assert matches == [1.0] * (len(impls) - 1)


def test_batched_rows_run_on_both_backends(quick_run):
    rows, _, impls = quick_run
    batched = [r for r in rows if r["batch"] == 2 and not r["impl"].endswith("-engine")]
    assert [r["impl"] for r in batched] == [i for i in impls if i.startswith("csm-") and not i.endswith("-engine")]
    for row in batched:
        assert row["error"] is None, row["error"]
        assert row["frames_per_s_aggregate"] == pytest.approx(2 * row["frames_per_s_per_stream"])


def test_engine_rows_have_streams_arriving_and_their_first_audio(quick_run):
    rows, _, _ = quick_run
    engine_rows = [r for r in rows if r["impl"] == "csm-torch-engine"]
    assert [r["batch"] for r in engine_rows] == [1, 3]
    for row in engine_rows:
        assert row["error"] is None, row["error"]
        assert row["frames_per_s_aggregate"] > 0 and row["arrival_ms"] > 0
        assert 0 < row["ttfa_ms"] <= row["ttfa_max_ms"]
        assert "first audio: median" in row["notes"]


def test_markdown_table_and_results_section(quick_run, capsys):
    rows, results, _ = quick_run
    table = report.markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert len({line.count("|") for line in table}) == 1  # every line has every column
    assert results.startswith("# Measured results\n\nan earlier row\n")
    assert "csm torch, eager" in results and rows[0]["command"] in results


def test_bytes_per_frame_of_csm_1b():
    """The backbone with its codebook-0 head once (977 M params) and, for codebooks 1..31, the
    decoder with its projection and one head slice (115 M) 31 times: 4.55 G read per frame."""
    assert params_per_frame(PRESETS["csm-1b"]) == pytest.approx(4.55e9, rel=2e-3)


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", "x", "--dims", "1x64x4x2x128,1x64x4x2x128"])
    assert exc.value.code == 2
    assert cli.main(["--dims", "1x64", "--device", "cpu"]) == 2
    assert "--dims" in capsys.readouterr().err


# --- the training task ------------------------------------------------------------------------

TRAIN_QUICK = ["--task", "train", "--preset", "tiny", "--device", "cpu", "--batch", "2", "--clip-seconds", "0.5",
               "--warmup-steps", "1", "--steps", "1"]


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """One optimizer step of every fine-tuning implementation on the tiny model, after one warm-up step."""
    out = tmp_path_factory.mktemp("train")
    results = out / "RESULTS.md"
    results.write_text("# Measured results\n\nan earlier row\n")
    assert cli.main(TRAIN_QUICK + ["--json", str(out / "rows.json"), "--append-results", str(results)]) == 0
    return json.loads((out / "rows.json").read_text()), results.read_text()


def test_train_rows_have_every_field_and_positive_figures(train_run):
    rows, _ = train_run
    assert [r["impl"] for r in rows] == ["csm-lora", "csm-full", "csm-mlx-lora", "csm-mlx-qlora4", "csm-mlx-full",
                                         "transformers-peft", "transformers-full"]
    for row in rows:
        # MLX rows also give MLX's own peak (the Apple GPU's memory is not the process's)
        assert (row["mlx_peak_memory_gb"] is not None and row["mlx_peak_memory_gb"] > 0) is \
            (row["backend"] == "csm-mlx"), row["impl"]
        assert set(row) == set(report.TRAIN_ROW_FIELDS), row["impl"]
        assert row["error"] is None, row["error"]
        assert row["task"] == "train" and row["dtype"] == "float32" and row["batch"] == 2
        for field in report.TRAIN_MEASURED:
            assert row[field] > 0, (row["impl"], field)
        assert row["audio_s_per_s"] == pytest.approx(row["steps_per_s"] * row["trained_frames_per_step"] * 0.08)
        assert row["command"].startswith("python -m benchmarks --task train")


def test_train_rows_train_the_same_parameters_on_the_same_frames(train_run):
    """Same LoRA targets and rank (and the same full set) on both libraries; transformers' depth
    decoder trains on every frame, csm's on its 1/16 share plus the EOS frames."""
    rows = {r["impl"]: r for r in train_run[0]}
    assert rows["csm-lora"]["trainable_params"] == rows["transformers-peft"]["trainable_params"]
    assert rows["csm-full"]["trainable_params"] == rows["transformers-full"]["trainable_params"]
    # MLX trains exactly torch's parameters, a 4-bit base changing none of them
    assert rows["csm-lora"]["trainable_params"] == rows["csm-mlx-lora"]["trainable_params"] \
        == rows["csm-mlx-qlora4"]["trainable_params"]
    assert rows["csm-full"]["trainable_params"] == rows["csm-mlx-full"]["trainable_params"]
    assert rows["csm-mlx-qlora4"]["mlx_peak_memory_gb"] < rows["csm-mlx-lora"]["mlx_peak_memory_gb"]
    assert rows["csm-lora"]["trainable_params"] < rows["csm-full"]["trainable_params"]
    frames = {r["trained_frames_per_step"] for r in rows.values()}
    assert len(frames) == 1 and frames.pop() == 2 * (round(0.5 / 0.08) + 1)  # each clip's frames and its EOS
    assert rows["transformers-peft"]["decoder_frames_per_step"] == rows["csm-lora"]["trained_frames_per_step"]
    assert rows["csm-lora"]["decoder_frames_per_step"] < rows["csm-lora"]["trained_frames_per_step"]


def test_train_section_has_its_table_and_ratios(train_run):
    rows, results = train_run
    assert results.startswith("# Measured results\n\nan earlier row\n")
    section = report.markdown_section(rows)
    assert rows[0]["command"] in section and "## Training steps:" in section
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and len({line.count("|") for line in table}) == 1
    assert "audio s/s" in table[0] and "trainable M" in table[0] and "peak GB" in table[0]
    assert "csm-lora (decoder fraction 0.0625) / transformers-peft audio s/s" in section
    assert "csm-full (decoder fraction 0.0625) / transformers-full audio s/s" in section
    assert section in results


def test_tasks_refuse_each_others_implementations(capsys):
    for argv in (["--impl", "csm-lora"], TRAIN_QUICK + ["--impl", "csm-torch-eager"]):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(argv)
        assert exc.value.code == 2
    assert "--task train" in capsys.readouterr().err


def test_serve_task_arguments(capsys):
    a = cli.parse_args(["--task", "serve", "--device", "cpu", "--requests", "8", "--clients", "4"])
    assert (a.preset, a.requests, a.clients, a.max_batch_size) == ("small", 8, 4, 16)
    for argv in (["--task", "serve", "--model", "x"], ["--task", "serve", "--clients", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(argv)
        assert exc.value.code == 2
    assert "--task serve runs on random weights" in capsys.readouterr().err
