# Shared by the example scripts (sourced, not run): the command arrays, the skip-if-done runner and
# the features every experiment starts from.
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# cli, model_args (with --pretrained), tune_args from PROMPTCLI, MODEL_ARGS, PRETRAINED, TUNE_ARGS.
read -r -a cli <<<"${PROMPTCLI:-promptcli}"
read -r -a model_args <<<"${MODEL_ARGS:-}"
read -r -a tune_args <<<"${TUNE_ARGS:-}"
if [[ -n "${PRETRAINED:-}" ]]; then model_args+=(--pretrained "$PRETRAINED"); fi

ran=0 # commands run by this invocation (reports are redrawn only when something changed)

# run OUTPUT COMMAND...: run COMMAND unless OUTPUT (the last file it writes) exists.
run() {
    local output=$1
    shift
    if [[ -e "$output" ]]; then
        echo "skip: $output exists"
        return
    fi
    echo "run: $*"
    "$@"
    ran=$((ran + 1))
}

# check_words NAME PATTERN EXAMPLE WORDS...: every word matches PATTERN (checked before any work), else exit 2.
check_words() {
    local name=$1 pattern=$2 example=$3 word
    shift 3
    for word in "$@"; do
        if [[ ! "$word" =~ $pattern ]]; then
            echo "Error: $name: '$word' is not a valid value — e.g. $name=\"$example\"" >&2
            exit 2
        fi
    done
}

# image_features [TRAIN EXTRACT FLAGS...]: the demo's images unless TRAIN_DIR and TEST_DIR are set;
# then $train_h5 and $test_h5 (MODEL on DEVICE) and the zero-shot eval $zero_shot, all under $OUT.
image_features() {
    if [[ -n "$TRAIN_DIR" && -z "$TEST_DIR" ]] || [[ -z "$TRAIN_DIR" && -n "$TEST_DIR" ]]; then
        # one of them alone would pair the user's images with the demo's: a meaningless accuracy
        echo "Error: set both TRAIN_DIR and TEST_DIR (or neither, for the demo images)" >&2
        exit 2
    fi
    if [[ -z "$TRAIN_DIR" ]]; then
        run "$OUT/images" "${cli[@]}" demo-images "$OUT/images" -q
        TRAIN_DIR=$OUT/images/train
        TEST_DIR=$OUT/images/test
    fi
    train_h5=$OUT/features/train.h5
    test_h5=$OUT/features/test.h5
    zero_shot=$OUT/results/zero-shot.json
    run "$train_h5" "${cli[@]}" extract "$TRAIN_DIR" -o "$train_h5" --model "$MODEL" "${model_args[@]}" \
        --device "$DEVICE" "$@" --resume -q
    run "$test_h5" "${cli[@]}" extract "$TEST_DIR" -o "$test_h5" --model "$MODEL" "${model_args[@]}" \
        --device "$DEVICE" --resume -q
    run "$zero_shot" "${cli[@]}" eval "$test_h5" --zero-shot --device "$DEVICE" -o "$zero_shot" -q
}
