@echo off
rem One command, one experiment (the Windows twin of run_experiment.sh, the same steps): installs
rem what is missing, speaks a small conversational corpus with espeak-ng (no download), prepares it,
rem trains the `tiny` CSM preset from scratch with csm-train (100 optimizer steps by default) and
rem speaks the `csm chat --mode test` demo with the result.
rem
rem   run_experiment.bat                 everything lands in experiment\ in this repository
rem
rem Re-running it reuses the base folder (the downloaded tokenizer and Mimi) and the prepared
rem data's cached Mimi codes, speaks the dialogues again, and replaces the run and the demo. It
rem writes only inside its own folder. The settings are run_experiment.sh's environment variables
rem (CSM_EXPERIMENT_DIR, CSM_EXPERIMENT_BASE, CSM_EXPERIMENT_STEPS, ...): see that file.
setlocal EnableExtensions

set "HERE=%~dp0"
if "%HERE:~-1%"=="\" set "HERE=%HERE:~0,-1%"
if not defined CSM_EXPERIMENT_DIR set "CSM_EXPERIMENT_DIR=%HERE%\experiment"
if not defined CSM_EXPERIMENT_STEPS set "CSM_EXPERIMENT_STEPS=100"
if not defined CSM_EXPERIMENT_SAVE_EVERY set "CSM_EXPERIMENT_SAVE_EVERY=50"
if not defined CSM_EXPERIMENT_BATCH_SIZE set "CSM_EXPERIMENT_BATCH_SIZE=4"
if not defined CSM_EXPERIMENT_LEARNING_RATE set "CSM_EXPERIMENT_LEARNING_RATE=1e-3"
if not defined CSM_EXPERIMENT_DIALOGUES set "CSM_EXPERIMENT_DIALOGUES=10"
if not defined CSM_EXPERIMENT_DEMO_MS set "CSM_EXPERIMENT_DEMO_MS=10000"

if not exist "%CSM_EXPERIMENT_DIR%" mkdir "%CSM_EXPERIMENT_DIR%"
rem absolute paths: the steps run in this repository's folder
for %%d in ("%CSM_EXPERIMENT_DIR%") do set "DIR=%%~fd"
set "OWN_BASE=no"
if defined CSM_EXPERIMENT_BASE (
    for %%d in ("%CSM_EXPERIMENT_BASE%") do set "BASE=%%~fd"
) else (
    set "BASE=%DIR%\base"
    set "OWN_BASE=yes"
)
set "WATERMARK_ARGS="
if defined CSM_EXPERIMENT_WATERMARK_MODEL (
    for %%d in ("%CSM_EXPERIMENT_WATERMARK_MODEL%") do set "WATERMARK_ARGS=--watermark-model "%%~fd""
)
set "EVAL_ARGS="
if defined CSM_EXPERIMENT_EVAL_CONVERSATIONS set "EVAL_ARGS=--eval-conversations %CSM_EXPERIMENT_EVAL_CONVERSATIONS%"
set "DATA=%DIR%\dialogues"
set "PREPARED=%DIR%\prepared"
set "RUN=%DIR%\run"
set "DEMO=%DIR%\demo"
set "CONFIG=%DIR%\config.json"
cd /d "%HERE%"

if defined CSM_EXPERIMENT_PYTHON goto installed
set "STEP=installing uv"
where uv >nul 2>&1
if errorlevel 1 (
    echo == installing uv ^(python -m pip install --user uv^)
    python -m pip install --user uv
    if errorlevel 1 goto fail
    rem pip's user scripts folder, where uv.exe lands
    for /f "delims=" %%p in ('python -c "import os, sysconfig; print(sysconfig.get_path('scripts', os.name + '_user'))"') do set "PATH=%%p;%PATH%"
)
set "STEP=installing espeak-ng"
where espeak-ng >nul 2>&1
if errorlevel 1 if not exist "%ProgramFiles%\eSpeak NG\espeak-ng.exe" (
    echo error: espeak-ng not found, which speaks the dialogues: install it with the espeak-ng .msi from
    echo https://github.com/espeak-ng/espeak-ng/releases, then run this again
    exit /b 2
)
set "STEP=installing csm-speech with its train and eval extras (uv sync)"
rem --inexact: a developer's other extras stay installed
echo == installing csm-speech[train,eval] into %HERE%\.venv
uv sync --quiet --inexact --extra train --extra eval
if errorlevel 1 goto fail
:installed

set "STEP=writing the config (from the CSM_EXPERIMENT_* settings)"
echo == writing the csm-train config %CONFIG%
call :csm -m csm.training.experiment config "%CONFIG%" --base "%BASE%" --data "%PREPARED%" --output-dir "%RUN%" --steps %CSM_EXPERIMENT_STEPS% --save-every %CSM_EXPERIMENT_SAVE_EVERY% --batch-size %CSM_EXPERIMENT_BATCH_SIZE% --learning-rate %CSM_EXPERIMENT_LEARNING_RATE% %EVAL_ARGS%
if errorlevel 1 goto fail

set "STEP=speaking the dialogues (csm-finetune make-dialogues)"
echo == 1/5 speaking %CSM_EXPERIMENT_DIALOGUES% dialogues with espeak-ng into %DATA%
call :csm -m csm.training make-dialogues --output-dir "%DATA%" --count %CSM_EXPERIMENT_DIALOGUES% --force
if errorlevel 1 goto fail

set "STEP=getting the tokenizer and Mimi (Hugging Face Hub)"
rem (no parenthesised block around a path: a folder name with a parenthesis would end it)
if not "%OWN_BASE%"=="yes" goto given_base
if exist "%BASE%\config.json" goto given_base
echo == 2/5 getting unsloth/csm-1b's tokenizer and kyutai's Mimi codec into %BASE%
call :csm -m csm.training.experiment base "%BASE%"
if errorlevel 1 goto fail
goto prepare
:given_base
echo == 2/5 taking the tokenizer and Mimi from %BASE%
:prepare

set "STEP=preparing the data (csm-finetune prepare)"
echo == 3/5 preparing %DATA%\dialogues.jsonl (Mimi codes, cached) into %PREPARED%
call :csm -m csm.training prepare --data "%DATA%\dialogues.jsonl" --output-dir "%PREPARED%" --model-path "%BASE%" --validation-split 0.2
if errorlevel 1 goto fail

set "STEP=training (csm-train)"
echo == 4/5 training the tiny preset for %CSM_EXPERIMENT_STEPS% steps into %RUN%
call :csm -m csm.train --config "%CONFIG%" --force
if errorlevel 1 goto fail

set "STEP=speaking the demo (csm chat --mode test)"
echo == 5/5 speaking the demo conversation with the trained model into %DEMO%
call :csm -m csm.cli.chat --mode test --model "%RUN%" --output-dir "%DEMO%" --force --seed 0 --max-audio-length-ms %CSM_EXPERIMENT_DEMO_MS% %WATERMARK_ARGS%
if errorlevel 1 goto fail

echo.
echo == done. Where everything is:
echo data:              %DATA%\dialogues.jsonl
echo prepared data:     %PREPARED%
echo config:            %CONFIG%
echo run folder:        %RUN%
echo checkpoints:       %RUN%\checkpoints
for %%f in ("%RUN%\checkpoints\*.pt") do echo   checkpoint:      %%~ff
echo metrics:           %RUN%\metrics.jsonl
echo TensorBoard logs:  %RUN%\logs   (tensorboard --logdir "%RUN%\logs")
for %%f in ("%RUN%\evaluation\*") do echo evaluation:        %%~ff
for %%f in ("%DEMO%\*.wav") do echo demo:              %%~ff
echo demo transcript:   %DEMO%\transcript.txt
exit /b 0

rem python -m csm.training is csm-finetune, csm.train is csm-train, csm.cli.chat is csm chat, and
rem csm.training.experiment writes the config and gets the tokenizer and Mimi
:csm
if defined CSM_EXPERIMENT_PYTHON (
    "%CSM_EXPERIMENT_PYTHON%" %*
) else (
    uv run --quiet --extra train --extra eval python %*
)
exit /b %errorlevel%

:fail
echo error: run_experiment.bat failed while %STEP% (see the messages above) 1>&2
exit /b 1
