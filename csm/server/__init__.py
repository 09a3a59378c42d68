"""An OpenAI-compatible speech server for CSM (`csm serve`; the `serve` extra).

    POST /v1/audio/speech   OpenAI's speech API (+ csm's extras: speaker, context, sampling, seed)
    GET  /v1/audio/voices   OpenAI's voice names and the voice profiles
    GET  /v1/models         the model, under its name and OpenAI's
    GET  /health, /ready    liveness, and readiness (503 while shutting down)

Every request joins one running batch (`csm.Engine`), so many clients share the model. A server
keeps no state but the voice store ($CSM_HOME/voices), so replicas behind a load balancer that
share that folder serve the same voices.
"""

from __future__ import annotations

from csm.server.app import create_app
from csm.server.settings import ServerSettings, parse_voice_map

__all__ = ["create_app", "ServerSettings", "parse_voice_map", "check_voice_map", "serve"]


def serve(generator, settings: ServerSettings | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 16, max_queue: int = 64, shutdown_timeout_s: float | None = None,
          log_level: str = "info") -> None:
    """Serve `generator` until SIGINT/SIGTERM; then stop taking connections and let in-flight
    streams finish (at most `shutdown_timeout_s` seconds, None: as long as they take)."""
    import uvicorn

    settings = settings or ServerSettings()
    check_voice_map(settings)
    generator.prepare_audio()  # Mimi and the watermark load now: readiness means ready
    with generator.engine(max_batch_size=max_batch_size, max_queue=max_queue) as engine:
        holder: dict = {}
        app = create_app(engine, settings, shutting_down=lambda: bool(holder) and holder["server"].should_exit)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=shutdown_timeout_s)
        holder["server"] = uvicorn.Server(config)
        holder["server"].run()


def check_voice_map(settings: ServerSettings) -> None:
    """Every profile the voice map names exists (a typo fails at start, not on a request)."""
    from csm.errors import CsmError
    from csm.voices import VoiceStore

    names = [t for t in settings.voice_map.values() if isinstance(t, str)]
    if not names:
        return
    store = VoiceStore()
    profiles = store.list()
    known = {v.name for v in profiles} | {v.id for v in profiles}
    for name in names:
        if name not in known:
            raise CsmError(f"--voice-map names voice {name!r}, which is not in {store.file}; known: "
                           f"{', '.join(v.name for v in profiles) or 'none (create one with csm voice create)'}")
