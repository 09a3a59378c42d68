"""`csm chat`: a conversation spoken turn by turn, each turn with the ones before it as context.

    csm chat                                   # type lines; each is spoken by the current speaker
    csm chat --record                          # your own turns come from the microphone
    csm chat --mode test -d out/               # the built-in two-speaker example
    csm chat --mode batch --input convs.json   # conversations from a file (csm.cli.chat_files)

Every bad input is one `error:` line and exit 2, checked before the model loads where it can be.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from csm.audio import MODEL_SAMPLE_RATE
from csm.cli.chat_files import (
    Script,
    check_free,
    example_script,
    make_folder,
    planned_files,
    read_scripts,
    turn_file,
    write_transcript,
)
from csm.cli.common import entry_point
from csm.errors import CsmError
from csm.hub import DEFAULT_MODEL
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_TOPK, Sampling

HELP = ("type a line to speak it as the current speaker; '1: text' speaks (and switches to) speaker 1; "
        "/speaker N switches; /reset forgets the conversation; /save writes it; /quit ends")
# "1: text" or "1:" alone; "10:30 works" is text (no space after the colon)
_PREFIX = re.compile(r"^(\d+)\s*:(?:\s+(.*))?$")


def run(opts: dict) -> None:
    mode = opts["mode"]
    _check_mode_flags(opts)
    sampling = Sampling(DEFAULT_TEMPERATURE if opts["temperature"] is None else opts["temperature"],
                        DEFAULT_TOPK if opts["top_k"] is None else opts["top_k"],
                        DEFAULT_TOP_P if opts["top_p"] is None else opts["top_p"],
                        opts["max_audio_length_ms"], opts["seed"])  # bad values fail before the model loads
    out = Path(opts["output_dir"])
    if out.exists() and not out.is_dir():
        raise CsmError(f"--output-dir {out} is a file: give a folder")
    plans: list[tuple[Script, Path]] = []
    if mode == "batch":
        plans = [(script, out / script.name) for script in read_scripts(Path(opts["input"]))]
    elif mode == "test":
        plans = [(example_script(), out)]
    check_free([f for script, folder in plans for f in planned_files(script, folder)], opts["force"])
    playing = False
    if mode == "interactive":
        from csm.cli.playback import has_output_device, require_input_device

        if opts["record"]:
            require_input_device()
        playing = not opts["no_play"] and has_output_device()
        if not playing:
            check_free(_session_files(out), opts["force"])
    watermark_key = _watermark_key(opts)
    voices = _voices(opts["voice"])

    gen, conversation = _load(opts, voices)
    gen.prepare_audio(watermark=watermark_key is not None, watermark_key=watermark_key)
    for voice in voices:  # a voice for another model fails now, not at its first turn
        gen.voice_turn(voice, "-", voice.speaker_id, [], sampling.max_audio_length_ms, None, None, None, None)
    speak = _Speaker(gen, conversation, opts, watermark_key)
    if mode == "interactive":
        Session(speak, out, playing, opts).run()
        return
    for script, _ in plans:
        _check_budget(gen, script, sampling)
    for script, folder in plans:
        _run_script(speak, script, folder, opts["force"])


def _check_mode_flags(opts: dict) -> None:
    mode = opts["mode"]
    if mode == "batch" and not opts["input"]:
        raise CsmError("--mode batch reads its conversations from --input FILE.json")
    if mode != "batch" and opts["input"]:
        raise CsmError("--input is the conversations of --mode batch: add --mode batch or drop it")
    if mode != "interactive":
        for flag in ("record", "no_play"):
            if opts[flag]:
                raise CsmError(f"--{flag.replace('_', '-')} is for --mode interactive (the other modes write files)")


def _session_files(out: Path) -> list[Path]:
    """The files of an earlier interactive session in `out`, which a new one would overwrite."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if re.fullmatch(r"turn-\d+\.wav|transcript\.(json|txt)", p.name))


def _watermark_key(opts: dict):
    """The watermark key to use, or None with --no-watermark (warned about)."""
    from csm.watermark import PUBLIC_KEY, parse_key, resolve_watermark_dir

    if opts["no_watermark"]:
        click.echo("warning: --no-watermark: these clips will not be marked as AI-generated", err=True)
        return None
    resolve_watermark_dir(opts["watermark_model"])  # fail now, not after loading the model
    return parse_key(opts["watermark_key"]) if opts["watermark_key"] else PUBLIC_KEY


def _voices(names) -> list:
    if not names:
        return []
    from csm.voices import VoiceStore

    store = VoiceStore()
    return [store.get(name) for name in names]


def _load(opts: dict, voices: list):
    import csm

    # a voice that names its model decides what loads (csm.load checks the flags agree with it)
    own = next((v for v in voices if v.model or v.adapter), None)
    conversation = csm.Conversation(voices=voices)  # one voice per speaker, checked before the load
    gen = csm.load(opts["model"], backend=opts["backend"], device=opts["device"], dtype=opts["dtype"],
                   adapter=opts["adapter"], mimi=opts["mimi"], tokenizer=opts["tokenizer"],
                   watermark_model=opts["watermark_model"], voice=own)
    model = opts["model"] or (own.model if own else None) or DEFAULT_MODEL
    click.echo(f"loaded {model} on {gen.backend}/{gen.device}", err=True)
    return gen, conversation


def _check_budget(gen, script: Script, sampling: Sampling) -> None:
    """Every turn to generate must fit the model with no context at all: checked for the whole
    batch before the first turn is generated."""
    for i in script.to_generate:
        turn = script.turns[i]
        if gen.context_room(turn.text, turn.speaker, sampling.max_frames) <= 0:
            raise CsmError(f"conversation {script.name!r}, turn {i + 1}: its text is too long for the model's "
                           f"{gen.config.backbone.max_seq_len} positions with up to {sampling.max_frames} frames of "
                           "audio; split the turn or lower --max-audio-length-ms")


class _Speaker:
    """Speaks the conversation's next turn with the command's options, a progress bar on stderr."""

    def __init__(self, gen, conversation, opts: dict, watermark_key):
        self.gen, self.conversation, self.opts, self.watermark_key = gen, conversation, opts, watermark_key

    def __call__(self, speaker: int, text: str):
        from tqdm import tqdm

        total = Sampling(max_audio_length_ms=self.opts["max_audio_length_ms"]).max_frames
        with tqdm(total=total, unit="frame", desc=f"speaker {speaker}", file=sys.stderr, leave=False) as bar:
            return self.conversation.speak(
                self.gen, text, speaker, max_audio_length_ms=self.opts["max_audio_length_ms"],
                temperature=self.opts["temperature"], topk=self.opts["top_k"], top_p=self.opts["top_p"],
                seed=self.opts["seed"], watermark=self.watermark_key is not None, watermark_key=self.watermark_key,
                on_frame=lambda n: bar.update(n - bar.n))


def _run_script(speak: _Speaker, script: Script, folder: Path, force: bool) -> None:
    from csm.audio import write_wav

    speak.conversation.reset()
    make_folder(folder)
    written = []
    for i, item in enumerate(script.turns):
        if item.audio_file is not None:
            speak.conversation.add(item.speaker, item.text, item.audio)
            written.append((item.speaker, item.text, str(item.audio_file.resolve())))
            continue
        turn = speak(item.speaker, item.text)
        write_wav(folder / turn_file(i), turn.audio, MODEL_SAMPLE_RATE, force=force)
        written.append((item.speaker, item.text, turn_file(i)))
        click.echo(f"wrote {folder / turn_file(i)} ({len(turn.audio) / MODEL_SAMPLE_RATE:.2f} s)", err=True)
    write_transcript(folder, script.name, written, force)
    click.echo(f"wrote {folder} ({len(script.to_generate)} turns generated)", err=True)


class Session:
    """The interactive loop: lines from stdin (a prompt when it is a terminal), commands, turns."""

    def __init__(self, speak: _Speaker, out: Path, playing: bool, opts: dict):
        self.speak, self.out, self.playing, self.opts = speak, out, playing, opts
        self.speaker = opts["speaker"]
        self.files: dict[int, str] = {}  # id(turn) -> its WAV in `out`, once written
        self.next_file = 0  # never reset: /reset starts a new conversation, not new file names
        self.interactive = sys.stdin.isatty()

    @property
    def conversation(self):
        return self.speak.conversation

    def run(self) -> None:
        if self.playing:
            where = "playing each turn"
        else:
            why = "" if self.opts["no_play"] else " (no audio output: install csm-speech[audio] and PortAudio to play)"
            where = f"writing each turn into {self.out}/{why}"
        click.echo(f"chat: {where}; {HELP}", err=True)
        try:
            self._loop()
        except KeyboardInterrupt:
            if not self.playing and self.conversation.turns:
                self._save()  # the turns written so far get their transcript
            raise
        if not self.playing and self.conversation.turns:
            self._save()

    def _loop(self) -> None:
        while (line := self._read_line(f"[{self.speaker}] ")) is not None:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self._command(line) == "quit":
                    break
                continue
            match = _PREFIX.match(line)
            if match:
                self.speaker, line = int(match[1]), (match[2] or "").strip()
                if not line:
                    continue
            try:
                self._turn(line)
            except CsmError as exc:  # one bad turn (too long, ...) does not end the conversation
                click.echo(f"error: {exc}", err=True)

    def _read_line(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = sys.stdin.readline()
        return line or None

    def _command(self, line: str) -> str | None:
        name, _, arg = line[1:].partition(" ")
        if name in ("quit", "exit", "q"):
            return "quit"
        if name == "reset":
            self.conversation.reset()
            click.echo("conversation cleared", err=True)
        elif name == "speaker" and arg.strip().isdigit():
            self.speaker = int(arg)
        elif name == "save":
            try:
                self._save()
            except CsmError as exc:
                click.echo(f"error: {exc}", err=True)
        elif name == "help":
            click.echo(HELP, err=True)
        else:
            click.echo(f"unknown command {line!r}: {HELP}", err=True)
        return None

    def _turn(self, text: str) -> None:
        if self.opts["record"] and self.speaker == self.opts["record_speaker"]:
            from csm.cli.playback import record

            click.echo("recording: say it, then press Enter", err=True)
            audio = record(MODEL_SAMPLE_RATE, lambda: self._read_line(""))
            if not len(audio):
                raise CsmError("nothing was recorded: check the microphone")
            turn = self.conversation.add(self.speaker, text, audio)
        else:
            turn = self.speak(self.speaker, text)
            if self.playing:
                from csm.cli.playback import play

                click.echo(f"[{turn.speaker}] {len(turn.audio) / MODEL_SAMPLE_RATE:.2f} s", err=True)
                play(turn.audio, MODEL_SAMPLE_RATE)
        if not self.playing:
            self._write(turn)

    def _write(self, turn) -> None:
        from csm.audio import write_wav

        name = turn_file(self.next_file)
        make_folder(self.out)
        # names never repeat in a session; one from before it was refused at the start or the first /save
        write_wav(self.out / name, turn.audio, MODEL_SAMPLE_RATE, force=self.opts["force"])
        self.next_file += 1
        self.files[id(turn)] = name
        click.echo(f"wrote {self.out / name} ({len(turn.audio) / MODEL_SAMPLE_RATE:.2f} s)", err=True)

    def _save(self) -> None:
        """Every turn of the conversation as a WAV (those not written yet) and the transcript."""
        if not self.files:  # the first save of a session that played its turns: nothing of ours there yet
            check_free(_session_files(self.out), self.opts["force"])
        for turn in self.conversation.turns:
            if id(turn) not in self.files:
                self._write(turn)
        turns = [(t.speaker, t.text, self.files[id(t)]) for t in self.conversation.turns]
        write_transcript(self.out, "chat", turns, force=True)  # the session's own, rewritten as it grows
        click.echo(f"saved {len(turns)} turns and the transcript in {self.out}", err=True)


def _options():
    return [
        click.option("--mode", type=click.Choice(["interactive", "test", "batch"]), default="interactive",
                     show_default=True, help="interactive: type the turns; test: the built-in example; "
                                             "batch: the conversations in --input."),
        click.option("--input", "-i", type=click.Path(),
                     help='--mode batch: JSON list of {"name", "turns": [{"speaker", "text", "audio"}]}.'),
        click.option("--output-dir", "-d", default="chat", show_default=True,
                     help="Where the WAVs (turn-NN.wav) and transcripts go."),
        click.option("--force", is_flag=True, help="Overwrite files already in --output-dir."),
        click.option("--speaker", "-s", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Interactive: the first speaker."),
        click.option("--no-play", is_flag=True, help="Interactive: write each turn as a WAV instead of playing it."),
        click.option("--record", is_flag=True,
                     help="Interactive: record --record-speaker's turns from the microphone (Enter stops)."),
        click.option("--record-speaker", type=click.IntRange(min=0), default=0, show_default=True,
                     help="--record: the speaker id whose turns are yours."),
        click.option("--voice", "-v", metavar="NAME|ID", multiple=True,
                     help="A voice profile (csm-voice) for its speaker id; repeat for several speakers."),
        click.option("--model", "-m", help=f"Local folder/file or Hub repo id [default: {DEFAULT_MODEL}]."),
        click.option("--adapter", type=click.Path(), help="LoRA adapter folder to merge into the model at load."),
        click.option("--mimi",
                     help="Mimi weights (tokenizer-e351c8d8-checkpoint125.safetensors) if not in the model folder."),
        click.option("--tokenizer", help="tokenizer.json, a folder or Hub id if not in the model folder."),
        click.option("--backend", "-b", default="auto", show_default=True, help="auto, torch or mlx."),
        click.option("--device", help="cuda, cpu or mps; gpu or cpu with MLX (default: best available)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Default: bfloat16 on GPUs, float32 on CPU."),
        click.option("--temperature", type=float, help=f"[default: the voice's, else {DEFAULT_TEMPERATURE}]"),
        click.option("--top-k", "--topk", "top_k", type=int, help=f"[default: the voice's, else {DEFAULT_TOPK}]"),
        click.option("--top-p", "top_p", type=float, help=f"[default: the voice's, else {DEFAULT_TOP_P}]"),
        click.option("--max-audio-length-ms", type=float, default=DEFAULT_MAX_AUDIO_LENGTH_MS, show_default=True,
                     help="The longest a turn may be."),
        click.option("--seed", type=int, help="Seed for reproducible sampling (turn i gets seed + i)."),
        click.option("--watermark-key", help="Your own 5-byte key, e.g. 1,2,3,4,5 (default: Sesame's public key)."),
        click.option("--watermark-model",
                     help="Folder with the silentcipher weights (default: $CSM_WATERMARK_MODEL or the Hub)."),
        click.option("--no-watermark", is_flag=True, help="Do not watermark (not recommended)."),
    ]


def _make_command() -> click.Command:
    def command(**opts):
        """Speak a conversation turn by turn, each turn with the ones before it as context."""
        run(opts)

    for option in reversed(_options()):
        command = option(command)
    return click.command(name="csm-chat", context_settings={"help_option_names": ["-h", "--help"]})(command)


command = _make_command()
main = entry_point(command)

if __name__ == "__main__":
    main()
