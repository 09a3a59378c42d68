"""Random silentcipher weights in the real layout of sony/silentcipher's 44.1 kHz model.

The folder holds `hparams.yaml`, `enc_c.ckpt`, `dec_c.ckpt` and `dec_m_{i}.ckpt` exactly as in
`44_1_khz/73999_iteration` on the Hub; only the weights are random, so embedding runs the real
code path but nothing decodes. The hparams values are those of the released model: SR, N_FFT,
HOP_LENGTH, message_band_size, message_dim, message_len, message_sdr, n_messages and the
normalization flags are quoted from the Hub's hparams.yaml; enc_n_layers / dec_c_n_layers are
the values consistent with the released checkpoints' tensor shapes; model_type is informational.
(The real file also carries training-only keys, e.g. learning rate and augmentation flags, that
inference never reads.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

HPARAMS = {
    "model_type": "44.1k",
    "SR": 44100,
    "N_FFT": 4096,
    "HOP_LENGTH": 2048,
    "message_band_size": 1024,
    "message_dim": 5,
    "message_len": 21,
    "message_sdr": 47,
    "n_messages": 1,
    "enc_n_layers": 3,
    "dec_c_n_layers": 4,
    "ensure_negative_message": True,
    "ensure_constrained_message": False,
    "frame_level_normalization": False,
    "utterance_level_normalization": True,
    "no_normalization": False,
}

MODEL_SUBDIR = "44_1_khz/73999_iteration"


def make_random_watermark_dir(path: str | Path, seed: int = 0, snapshot_layout: bool = False) -> Path:
    """Write random silentcipher weights under `path` and return the model folder.

    With `snapshot_layout`, the files go to `path/44_1_khz/73999_iteration` (a Hub snapshot root);
    otherwise straight into `path`. The returned folder is the one holding hparams.yaml."""
    import torch
    import yaml

    from csm.watermark import _import_silentcipher

    _import_silentcipher()  # the pydub/ffmpeg warning stays silenced
    from silentcipher.model import CarrierDecoder, Encoder, MsgDecoder

    root = Path(path)
    folder = root / MODEL_SUBDIR if snapshot_layout else root
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hparams.yaml").write_text(yaml.safe_dump(HPARAMS, sort_keys=False), encoding="utf-8")

    hp = argparse.Namespace(**HPARAMS)
    torch.manual_seed(seed)
    # The same constructor arguments as silentcipher.server.Model.
    enc_c = Encoder(
        n_layers=hp.enc_n_layers,
        message_dim=hp.message_dim,
        out_dim=32,
        message_band_size=hp.message_band_size,
        n_fft=hp.N_FFT,
    )
    dec_c = CarrierDecoder(
        config=hp, conv_dim=32 * 3, n_layers=hp.dec_c_n_layers, message_band_size=hp.message_band_size
    )
    torch.save(enc_c.state_dict(), folder / "enc_c.ckpt")
    torch.save(dec_c.state_dict(), folder / "dec_c.ckpt")
    for i in range(hp.n_messages):
        dec_m = MsgDecoder(message_dim=hp.message_dim, message_band_size=hp.message_band_size)
        torch.save(dec_m.state_dict(), folder / f"dec_m_{i}.ckpt")
    return folder
