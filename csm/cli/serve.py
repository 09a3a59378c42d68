"""`csm serve`: the OpenAI-compatible speech server (csm.server) on one model.

    csm serve --model unsloth/csm-1b --port 8000 --api-key "$KEY" --voice-map alloy=Ada

SIGTERM or Ctrl-C stops taking connections and lets in-flight streams finish.
"""

from __future__ import annotations

import click

from csm.errors import CsmError
from csm.hub import DEFAULT_MODEL
from csm.sentences import DEFAULT_TURN_CHARS


@click.command(name="serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Local folder/file or Hub repo id.")
@click.option("--adapter", type=click.Path(), help="LoRA adapter folder to merge into the model at load.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="CSM_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1 routes (default: an open server).")
@click.option("--max-batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Streams generated together in the one running batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests that may wait for a slot; more are answered 429 with Retry-After.")
@click.option("--backend", "-b", default="auto", show_default=True, help="auto, torch or mlx.")
@click.option("--device", help="cuda, cpu or mps; gpu or cpu with MLX (default: best available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Default: bfloat16 on GPUs, float32 on CPU.")
@click.option("--voice-map", multiple=True, metavar="NAME=VOICE",
              help="An OpenAI voice name spoken as a voice profile or speaker id, e.g. alloy=Ada or echo=1 "
                   "(repeatable). Unmapped OpenAI names speak as speaker 0.")
@click.option("--model-name", default="csm-1b", show_default=True,
              help="The model id /v1/models lists (OpenAI's tts-1, tts-1-hd and gpt-4o-mini-tts are accepted too).")
@click.option("--max-audio-length-ms", default=30_000, show_default=True, type=click.FloatRange(min=80),
              help="The longest audio of one turn (long input is spoken in turns).")
@click.option("--turn-chars", default=DEFAULT_TURN_CHARS, show_default=True, type=click.IntRange(min=8),
              help="Long input is split at sentence ends into turns of at most this many characters.")
@click.option("--max-body-mb", default=16.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Larger request bodies (context audio) are refused with 413.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0),
              help="Seconds in-flight streams get after SIGTERM (default: as long as they take).")
@click.option("--watermark-model", help="Folder with the silentcipher weights (default: $CSM_WATERMARK_MODEL or "
                                        "the Hub).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def command(model, adapter, host, port, api_key, max_batch_size, max_queue, backend, device, dtype, voice_map,
            model_name, max_audio_length_ms, turn_chars, max_body_mb, shutdown_timeout, watermark_model, log_level):
    """Serve CSM behind OpenAI's speech API (POST /v1/audio/speech) to many clients at once."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CsmError("csm serve needs the serve extra: pip install 'csm-speech[serve]'") from None
    import csm
    from csm.server import ServerSettings, check_voice_map, parse_voice_map, serve

    settings = ServerSettings(model_id=model_name, api_key=api_key, voice_map=parse_voice_map(voice_map),
                              max_audio_length_ms=max_audio_length_ms, turn_chars=turn_chars,
                              max_body_bytes=int(max_body_mb * 2**20))
    check_voice_map(settings)  # a typo in a profile's name fails before the model loads
    generator = csm.load(model, backend=backend, device=device, dtype=dtype, adapter=adapter,
                         watermark_model=watermark_model)
    serve(generator, settings, host=host, port=port, max_batch_size=max_batch_size, max_queue=max_queue,
          shutdown_timeout_s=shutdown_timeout, log_level=log_level)
