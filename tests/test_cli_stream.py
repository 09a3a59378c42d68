"""csm-generate --stream: the same samples as a whole-clip run, time to first audio in the summary,
gapless playback through sounddevice's OutputStream (a fake one here: CI has no audio device), and
one clear line when there is no PortAudio or no output device."""

import sys
import threading
import time
import types

import numpy as np
import pytest
import soundfile as sf

from csm.cli.playback import ChunkPlayer
from test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def base_args(tiny_model_dir, watermark_dir):
    return ["--model", tiny_model_dir, "--watermark-model", watermark_dir, "--device", "cpu",
            "--max-audio-length-ms", 800, "--seed", 3]


def read(path):
    return sf.read(str(path), dtype="float32")[0]


def test_streamed_wav_has_the_samples_of_a_whole_clip_run(tmp_path, base_args, cli_main):
    args = ["--text", "Hello there.", *base_args, "--no-watermark"]
    err = cli_main([*args, "--stream", "--first-chunk-frames", 3, "--chunk-frames", 4, "-o", "streamed.wav"])
    assert "10 frames" in err and "RTF" in err and "first audio after" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".streamed.wav")]  # written atomically
    err = cli_main([*args, "-o", "whole.wav"])
    assert "first audio after" not in err
    streamed, whole = read(tmp_path / "streamed.wav"), read(tmp_path / "whole.wav")
    assert streamed.shape == whole.shape == (10 * 1920,)
    assert np.abs(streamed - whole).max() <= 1 / 32768  # 16-bit WAV: at most one step apart


def test_streamed_and_watermarked_by_default(tmp_path, base_args, cli_main):
    err = cli_main(["--text", "Hello there.", *base_args, "--stream", "-o", "marked.wav"])
    assert "warning" not in err
    assert sf.info(str(tmp_path / "marked.wav")).frames == 10 * 1920


@pytest.mark.parametrize("extra, fragments", [
    (["--chunk-frames", 0, "--stream"], ["--chunk-frames", "x>=1"]),
    (["--first-chunk-frames", 2], ["--first-chunk-frames sets the chunks of --stream", "add --stream"]),
])
def test_bad_chunk_flags(tmp_path, base_args, extra, fragments):
    assert_one_line_error(run_cli(["--text", "hi", *base_args, *extra], tmp_path), *fragments)


@pytest.mark.parametrize("module_source, fragment", [
    ("raise OSError('PortAudio library not found')", "PortAudio library not found"),  # what sounddevice does
    ("class PortAudioError(Exception):\n    pass\n\n"
     "def OutputStream(**kwargs):\n    raise PortAudioError('Error querying device -1')\n", "no usable output device"),
])
def test_stream_play_without_portaudio_or_device(tmp_path, base_args, module_source, fragment):
    fake = tmp_path / "fake_modules"
    fake.mkdir()
    (fake / "sounddevice.py").write_text(module_source)
    r = run_cli(["--text", "hi", *base_args, "--stream", "--play", "--no-watermark"], tmp_path,
                env={"PYTHONPATH": f"{fake}:{':'.join(sys.path)}"})
    assert_one_line_error(r, "cannot play audio", fragment)
    assert "loaded" not in r.stderr  # the device is checked before the model loads


# --- playback ------------------------------------------------------------------------------------


class FakeOutputStream:
    """An output device in a thread: pulls `blocksize` samples from the callback at real-time pace."""

    instances = []

    def __init__(self, samplerate, channels, dtype, blocksize, callback):
        assert channels == 1 and dtype == "float32"
        self.samplerate, self.blocksize, self.callback = samplerate, blocksize, callback
        self.blocks, self.closed = [], False
        self._stop, self._thread = threading.Event(), None
        FakeOutputStream.instances.append(self)

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            out = np.full((self.blocksize, 1), np.nan, dtype=np.float32)
            self.callback(out, self.blocksize, None, None)
            self.blocks.append(out[:, 0].copy())
            time.sleep(self.blocksize / self.samplerate)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    abort = stop

    def close(self):
        self.closed = True

    @property
    def played(self):
        return np.concatenate(self.blocks)


@pytest.fixture
def fake_sounddevice(monkeypatch):
    FakeOutputStream.instances.clear()
    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(OutputStream=FakeOutputStream))
    return FakeOutputStream.instances


def test_stream_play_feeds_every_sample_in_order(tmp_path, base_args, fake_sounddevice, cli_main):
    cli_main(["--text", "Hello there.", *base_args, "--no-watermark", "--stream", "--play", "--first-chunk-frames", 1,
              "--chunk-frames", 2, "-o", "out.wav"])
    # (whether playback ran dry depends on this machine's speed: the underrun count is tested with a
    # device the test pulls itself, below; here every sample must arrive, in order, without a gap)
    (device,) = fake_sounddevice
    played, written = device.played, read(tmp_path / "out.wav")
    assert len(written) == 10 * 1920 and np.abs(written).max() > 0
    # all samples, in order, no gap; the device's last block is padded with silence
    np.testing.assert_allclose(played[: len(written)], written, atol=1 / 32768, rtol=0)
    assert not np.any(played[len(written):]) and len(played) - len(written) < 2 * device.blocksize
    assert device.closed


class ManualOutputStream(FakeOutputStream):
    """A device whose pulls the test makes itself, one block at a time."""

    def start(self):
        self.started = True

    def pull(self):
        out = np.full((self.blocksize, 1), np.nan, dtype=np.float32)
        self.callback(out, self.blocksize, None, None)
        return out[:, 0]

    def stop(self):
        pass


def test_player_starts_when_the_buffer_outlasts_the_wait_and_counts_underruns(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(OutputStream=ManualOutputStream))
    player = ChunkPlayer(sample_rate=10, blocksize=4)
    device = ManualOutputStream.instances[-1]
    player.feed(np.arange(1, 4, dtype=np.float32), next_chunk_in=0.5)  # 0.3 s buffered < 0.5 s wait
    assert not player.started
    player.feed(np.arange(4, 7, dtype=np.float32), next_chunk_in=0.5)  # 0.6 s buffered
    assert player.started
    np.testing.assert_array_equal(device.pull(), [1, 2, 3, 4])  # across the chunk boundary
    np.testing.assert_array_equal(device.pull(), [5, 6, 0, 0])  # ran dry: silence, counted
    assert player.underruns == 1
    player.feed(np.array([7.0], dtype=np.float32))
    player.end()
    np.testing.assert_array_equal(device.pull(), [7, 0, 0, 0])  # the end: silence, but no underrun
    player.wait()  # returns: the end has been played
    assert device.closed and player.underruns == 1
