#!/usr/bin/env bash
# One command, one experiment: installs what is missing, speaks a small conversational corpus with
# espeak-ng (no download), prepares it, trains the `tiny` CSM preset from scratch with csm-train
# (100 optimizer steps by default) and speaks the `csm chat --mode test` demo with the result.
#
#   ./run_experiment.sh                 # everything lands in ./experiment/
#
# Re-running it reuses the base folder (the downloaded tokenizer and Mimi) and the prepared data's
# cached Mimi codes, speaks the dialogues again (a few seconds), and replaces the run and the demo.
# It writes only inside its own folder.
#
# Settings (environment variables; the defaults in brackets):
#   CSM_EXPERIMENT_DIR              the experiment's folder [experiment, in this repository]
#   CSM_EXPERIMENT_BASE             a CSM model folder whose tokenizer and Mimi the new model takes
#                                   [made once in <dir>/base from unsloth/csm-1b's tokenizer.json and
#                                   kyutai's Mimi file: about 400 MB from the Hugging Face Hub]
#   CSM_EXPERIMENT_STEPS            optimizer steps [100]
#   CSM_EXPERIMENT_SAVE_EVERY       a model_epoch*_step*.pt snapshot (and a validation) every N steps [50]
#   CSM_EXPERIMENT_BATCH_SIZE       examples per step [4]
#   CSM_EXPERIMENT_LEARNING_RATE    peak learning rate [1e-3]
#   CSM_EXPERIMENT_DIALOGUES        how many of the 10 built-in dialogues to speak [10]
#   CSM_EXPERIMENT_EVAL_CONVERSATIONS  held-out conversations csm-train speaks and measures after training
#                                   (0: none) [csm-train's default]
#   CSM_EXPERIMENT_DEMO_MS          the longest a demo turn may be, in ms [10000]
#   CSM_EXPERIMENT_WATERMARK_MODEL  a folder of silentcipher weights for the demo [the Hub's sony/silentcipher]
#   CSM_EXPERIMENT_PYTHON           run `$CSM_EXPERIMENT_PYTHON -m ...` in an environment that already has
#                                   csm-speech[train,eval], and install nothing [uv run --extra train --extra eval]
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${CSM_EXPERIMENT_DIR:-$here/experiment}"
base="${CSM_EXPERIMENT_BASE:-}"
steps="${CSM_EXPERIMENT_STEPS:-100}"
save_every="${CSM_EXPERIMENT_SAVE_EVERY:-50}"
batch_size="${CSM_EXPERIMENT_BATCH_SIZE:-4}"
learning_rate="${CSM_EXPERIMENT_LEARNING_RATE:-1e-3}"
dialogues="${CSM_EXPERIMENT_DIALOGUES:-10}"
demo_ms="${CSM_EXPERIMENT_DEMO_MS:-10000}"
eval_conversations="${CSM_EXPERIMENT_EVAL_CONVERSATIONS:-}"
watermark="${CSM_EXPERIMENT_WATERMARK_MODEL:-}"
python="${CSM_EXPERIMENT_PYTHON:-}"

step="checking the settings"
trap 'echo "error: run_experiment.sh failed while $step (see the messages above)" >&2' ERR

# python -m csm.training is csm-finetune, csm.train is csm-train, csm.cli.chat is csm chat, and
# csm.training.experiment writes the config and gets the tokenizer and Mimi
csm_python() {
    if [[ -n "$python" ]]; then
        "$python" "$@"
    else
        (cd "$here" && uv run --quiet --extra train --extra eval python "$@")
    fi
}

if [[ -z "$python" ]]; then
    step="installing uv"
    export PATH="$HOME/.local/bin:$PATH"
    if ! command -v uv >/dev/null 2>&1; then
        echo "== installing uv (python3 -m pip install --user uv)"
        python3 -m pip install --user uv
    fi
    step="installing espeak-ng"
    if ! command -v espeak-ng >/dev/null 2>&1; then
        echo "== installing espeak-ng, which speaks the dialogues"
        if command -v apt-get >/dev/null 2>&1; then
            if [[ "$(id -u)" == 0 ]]; then apt-get install -y espeak-ng; else sudo apt-get install -y espeak-ng; fi
        elif command -v brew >/dev/null 2>&1; then
            brew install espeak-ng
        else
            echo "error: install espeak-ng with your system's package manager (it speaks the dialogues), then" \
                 "run this again" >&2
            exit 2
        fi
    fi
    step="installing csm-speech with its train and eval extras (uv sync)"
    echo "== installing csm-speech[train,eval] into $here/.venv"
    (cd "$here" && uv sync --quiet --inexact --extra train --extra eval)  # --inexact: keep other extras
fi

step="finding the folders"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"  # absolute: the steps run in this repository's folder
own_base=no
if [[ -z "$base" ]]; then
    base="$dir/base"
    own_base=yes
elif [[ -d "$base" ]]; then
    base="$(cd "$base" && pwd)"
else
    echo "error: CSM_EXPERIMENT_BASE $base is not a folder: give a CSM model folder (config.json, weights," \
         "tokenizer.json and Mimi)" >&2
    exit 2
fi
if [[ -n "$watermark" ]]; then
    if [[ ! -d "$watermark" ]]; then
        echo "error: CSM_EXPERIMENT_WATERMARK_MODEL $watermark is not a folder of silentcipher weights" >&2
        exit 2
    fi
    watermark="$(cd "$watermark" && pwd)"
fi
data="$dir/dialogues"
prepared="$dir/prepared"
run="$dir/run"
demo="$dir/demo"

step="writing the config (from the CSM_EXPERIMENT_* settings)"
config="$dir/config.json"
eval_args=()
if [[ -n "$eval_conversations" ]]; then eval_args=(--eval-conversations "$eval_conversations"); fi
echo "== writing the csm-train config $config"
csm_python -m csm.training.experiment config "$config" --base "$base" --data "$prepared" \
    --output-dir "$run" --steps "$steps" --save-every "$save_every" --batch-size "$batch_size" \
    --learning-rate "$learning_rate" ${eval_args[@]+"${eval_args[@]}"}

step="speaking the dialogues (csm-finetune make-dialogues)"
echo "== 1/5 speaking $dialogues dialogues with espeak-ng into $data"
csm_python -m csm.training make-dialogues --output-dir "$data" --count "$dialogues" --force

if [[ "$own_base" == yes && ! -f "$base/config.json" ]]; then
    # Preparing and the new model need only a tokenizer and Mimi, not csm-1b's 6 GB of weights:
    # a tiny model folder holding unsloth/csm-1b's tokenizer and kyutai's Mimi file stands in.
    step="getting the tokenizer and Mimi (Hugging Face Hub)"
    echo "== 2/5 getting unsloth/csm-1b's tokenizer and kyutai's Mimi codec into $base"
    csm_python -m csm.training.experiment base "$base"
else
    echo "== 2/5 taking the tokenizer and Mimi from $base"
fi

step="preparing the data (csm-finetune prepare)"
echo "== 3/5 preparing $data/dialogues.jsonl (Mimi codes, cached) into $prepared"
csm_python -m csm.training prepare --data "$data/dialogues.jsonl" --output-dir "$prepared" --model-path "$base" \
    --validation-split 0.2

step="training (csm-train)"
echo "== 4/5 training the tiny preset for $steps steps into $run"
csm_python -m csm.train --config "$config" --force

step="speaking the demo (csm chat --mode test)"
echo "== 5/5 speaking the demo conversation with the trained model into $demo"
watermark_args=()
if [[ -n "$watermark" ]]; then watermark_args=(--watermark-model "$watermark"); fi
csm_python -m csm.cli.chat --mode test --model "$run" --output-dir "$demo" --force --seed 0 \
    --max-audio-length-ms "$demo_ms" ${watermark_args[@]+"${watermark_args[@]}"}

step="listing the outputs"
shopt -s nullglob
echo
echo "== done. Where everything is:"
echo "data:              $data/dialogues.jsonl"
echo "prepared data:     $prepared"
echo "config:            $config"
echo "run folder:        $run"
echo "checkpoints:       $run/checkpoints"
for f in "$run"/checkpoints/*.pt; do echo "  checkpoint:      $f"; done
echo "metrics:           $run/metrics.jsonl"
echo "TensorBoard logs:  $run/logs   (tensorboard --logdir $run/logs)"
for f in "$run"/evaluation/*; do echo "evaluation:        $f"; done
for f in "$demo"/*.wav; do echo "demo:              $f"; done
echo "demo transcript:   $demo/transcript.txt"
