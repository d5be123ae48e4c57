#!/usr/bin/env bash
# Cloud Run job entrypoint: maps Cloud Run's environment to `python -m helpers.runner` flags.
#
#   JOB_MODE=train (default)  one task; output in $RUNS_DIR/$CLOUD_RUN_EXECUTION. A retry
#                             (CLOUD_RUN_TASK_ATTEMPT > 0) belongs to the same execution, so it gets the
#                             same folder, and the runner resumes from the last checkpoint there.
#   JOB_MODE=eval-shard       --tasks N; task CLOUD_RUN_TASK_INDEX evaluates its shard of the test split
#                             (runner -p shard_index/shard_count, notebook 05) into <eval dir>/task-NNNNN/,
#                             and whichever task finds all N shard files present merges them into
#                             <eval dir>/metrics.json (helpers.run.shards).
#   JOB_MODE=merge            merge the shard files under $EVAL_DIR again (e.g. after fixing one task).
#   JOB_MODE=export           merge the adapter of the finished run ADAPTER_RUN into its bf16 base:
#                             <run>/merged, with export.json (python -m helpers.export). MERGE_AFTER_TRAINING=1
#                             does the same at the end of a training task.
#
# Arguments ("--args" of the job or of `jobs execute`) are passed through to the runner, e.g.
#   --model-id /mnt/gcs/gemma-4-31b-it/ --train-size 4000
#
# Environment (all optional):
#   GCS_MOUNT       where the model bucket is mounted (default /mnt/gcs); must exist unless REQUIRE_MOUNT=0
#   RUNS_DIR        where run folders go (default $GCS_MOUNT/runs; deploy.sh: /mnt/runs, the output bucket's
#                   mount, which must then exist too)
#   MODEL_BUCKET, MODEL_COPY_DIR   both set: a --model-id under $GCS_MOUNT is first copied from
#                   gs://$MODEL_BUCKET/... to $MODEL_COPY_DIR with `gcloud storage cp` (concurrent; Google's GPU
#                   best practices call it the fastest way to load a large model) and the runner gets the copy.
#                   The copy lives in the container's in-memory file system: it needs MEMORY beside training.
#   GCLOUD_CMD      the gcloud command for that copy (default gcloud; tests point it at a fake)
#   RUN_ID          run folder name (default $CLOUD_RUN_EXECUTION; outside Cloud Run a timestamp)
#   ADAPTER_RUN     eval-shard and export (required): the training run folder whose adapter/ is used (its
#                   execution id under RUNS_DIR, or absolute); eval results go to $ADAPTER_RUN/eval-$RUN_ID
#   EVAL_NOTEBOOK   eval-shard: the runner's --notebook value (default 05_evaluation)
#   EVAL_DIR, EXPECT_SHARDS   merge mode: the eval folder and the number of shards
#   RUNNER_CMD      the runner command (default "python -m helpers.runner"; tests point it at a stub)
#   MERGE_CMD       the merge command (default "python -m helpers.run.shards")
#   EXPORT_CMD      the export command (default "python -m helpers.export")
#   MERGE_AFTER_TRAINING   1: train mode merges the adapter into its base once the runner has finished
#   MERGE_CHECK_ROWS       held-out rows on which the merged model is compared with the adapter (default 100)
#   HF_TOKEN        read by huggingface_hub from the environment (Secret Manager); never printed and
#                   never passed as an argument: this script refuses arguments that carry it.
set -euo pipefail

log() { printf '[entrypoint] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

GCS_MOUNT="${GCS_MOUNT:-/mnt/gcs}"
RUNS_DIR="${RUNS_DIR:-${GCS_MOUNT}/runs}"
JOB_MODE="${JOB_MODE:-train}"
RUNNER_CMD="${RUNNER_CMD:-python -m helpers.runner}"
MERGE_CMD="${MERGE_CMD:-python -m helpers.run.shards}"
EXPORT_CMD="${EXPORT_CMD:-python -m helpers.export}"
MERGE_AFTER_TRAINING="${MERGE_AFTER_TRAINING:-0}"
MERGE_CHECK_ROWS="${MERGE_CHECK_ROWS:-100}"
GCLOUD_CMD="${GCLOUD_CMD:-gcloud}"
MODEL_BUCKET="${MODEL_BUCKET:-}"
MODEL_COPY_DIR="${MODEL_COPY_DIR:-}"
COMPLETE_MARKER="COMPLETE"  # helpers.run.folder.COMPLETE_MARKER: written last into a whole adapter folder
EVAL_NOTEBOOK="${EVAL_NOTEBOOK:-05_evaluation}"
REQUIRE_MOUNT="${REQUIRE_MOUNT:-1}"
attempt="${CLOUD_RUN_TASK_ATTEMPT:-0}"
task_index="${CLOUD_RUN_TASK_INDEX:-0}"
task_count="${CLOUD_RUN_TASK_COUNT:-1}"
read -r -a runner <<< "${RUNNER_CMD}"
read -r -a merger <<< "${MERGE_CMD}"
read -r -a exporter <<< "${EXPORT_CMD}"
HF_TOKEN="${HF_TOKEN:-}"

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_uint "${attempt}" || die "CLOUD_RUN_TASK_ATTEMPT must be a non-negative integer"
if ! { is_uint "${task_index}" && is_uint "${task_count}" && (( task_count >= 1 && task_index < task_count )); }; then
  die "bad task: CLOUD_RUN_TASK_INDEX=${task_index}, CLOUD_RUN_TASK_COUNT=${task_count}"
fi

# A secret given as an argument would be written into the executed notebook (papermill records its
# parameters) and into logs. Refuse without printing the offending argument.
for arg in "$@"; do
  lower="${arg,,}"
  if [[ "${lower}" == *hf_token* || "${lower}" == *hf-token* || "${lower}" == *hugging_face_hub_token* ]] \
     || [[ ${#HF_TOKEN} -ge 8 && "${arg}" == *"${HF_TOKEN}"* ]]; then
    die "refusing an argument that names or carries the Hugging Face token: give HF_TOKEN through the environment (Secret Manager, --set-secrets), never as a runner argument"
  fi
done
if [[ -n "${HF_TOKEN:-}" ]]; then log "HF_TOKEN: set in the environment (not shown)"; else log "HF_TOKEN: not set"; fi

if [[ "${REQUIRE_MOUNT}" == "1" ]]; then
  for mount in "${GCS_MOUNT}" "${RUNS_DIR}"; do
    # RUNS_DIR inside GCS_MOUNT is created on demand; elsewhere it is a mount of its own. Without it the run
    # folder would land in the container's memory and vanish with the task.
    [[ "${mount}" == "${GCS_MOUNT}"/* || -d "${mount}" ]] || die "bucket mount ${mount} not found: mount the bucket there (--add-volume type=cloud-storage + --add-volume-mount, as cloudrun/deploy.sh does), set GCS_MOUNT / RUNS_DIR, or REQUIRE_MOUNT=0"
  done
fi

# A first write to the output mount, before any model loads: a mount this user cannot write (gcsfuse owns its
# files as its own process's uid unless the mount's uid/gid options say otherwise) or a service account
# without object write access fails here in seconds, not after the weights have loaded.
check_writable() {  # $1: a folder that must take new files
  local probe="$1/.write-check-$$-${RANDOM}"
  if mkdir -p "$1" 2>/dev/null && { printf 'ok\n' > "${probe}"; } 2>/dev/null; then
    rm -f "${probe}"
    return 0
  fi
  die "cannot write to $1 as uid $(id -u): the output bucket must be mounted so that this user can write (cloudrun/deploy.sh mounts it with mount-options uid=$(id -u);gid=$(id -g)) and the job's service account needs roles/storage.objectUser on the bucket"
}
check_writable "${RUNS_DIR}"

run_id="${RUN_ID:-${CLOUD_RUN_EXECUTION:-}}"
if [[ -z "${run_id}" ]]; then
  run_id="local-$(date -u +%Y%m%dT%H%M%SZ)"
  log "neither RUN_ID nor CLOUD_RUN_EXECUTION is set: new run ${run_id} (set RUN_ID to resume a run)"
fi
[[ "${run_id}" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "run id must be letters, digits, '.', '_' or '-'"

has_output_dir=0
for arg in "$@"; do
  [[ "${arg}" == "--output-dir" || "${arg}" == --output-dir=* ]] && has_output_dir=1
done

# Runs the command with SIGTERM/SIGINT forwarded (Cloud Run stops a task with a signal); returns its status.
child=0
forward() { (( child > 0 )) && kill -TERM "${child}" 2>/dev/null; }
run_forwarding() {
  log "running: $(printf '%q ' "$@")"
  trap forward TERM INT
  "$@" &
  child=$!
  local rc=0
  wait "${child}" || rc=$?
  # a signal interrupts the first wait; wait again for the child to finish its own shutdown
  if kill -0 "${child}" 2>/dev/null; then wait "${child}" || rc=$?; fi
  trap - TERM INT
  child=0
  return "${rc}"
}

note_attempt() {  # one line per attempt in the run folder: when it started and which attempt it was
  mkdir -p "$1"
  printf '%s attempt=%s task=%s/%s mode=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "${attempt}" "${task_index}" "${task_count}" "${JOB_MODE}" >> "$1/attempts.log"
}

abs_under() {  # $1 absolute, or relative to $2
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$2" "$1"; fi
}

# A copy that a bucket mount can hold: files first, the completion marker last (no directory rename, which
# gcsfuse refuses on a flat bucket; no lock). A folder without the marker is copied again.
copy_complete_folder() {  # $1 source folder (marked complete), $2 target folder
  rm -rf "$2"
  mkdir -p "$2"
  (cd "$1" && find . -type f ! -name "${COMPLETE_MARKER}" -print0) | while IFS= read -r -d '' file; do
    mkdir -p "$2/$(dirname "${file}")"
    cp "$1/${file}" "$2/${file}"
  done
  cp "$1/${COMPLETE_MARKER}" "$2/${COMPLETE_MARKER}"
}

# Prints the runner arguments, one per line, with a --model-id under the model mount replaced by a local
# copy made with `gcloud storage cp` (when MODEL_BUCKET and MODEL_COPY_DIR are set).
model_args() {
  local arg expect_model=0
  for arg in "$@"; do
    if (( expect_model )); then arg="$(local_model "${arg}")" || return 1; expect_model=0
    elif [[ "${arg}" == --model-id ]]; then expect_model=1
    elif [[ "${arg}" == --model-id=* ]]; then arg="--model-id=$(local_model "${arg#--model-id=}")" || return 1
    fi
    printf '%s\n' "${arg}"
  done
}

local_model() {  # $1: the --model-id value; prints the path the runner should load
  local path="${1%/}" relative
  if [[ -z "${MODEL_BUCKET}" || -z "${MODEL_COPY_DIR}" || "${path}" != "${GCS_MOUNT}"/* ]]; then
    printf '%s' "$1"; return
  fi
  relative="${path#"${GCS_MOUNT}"/}"
  log "copying gs://${MODEL_BUCKET}/${relative} to ${MODEL_COPY_DIR} (concurrent download: faster than reading the weights through the mount)"
  mkdir -p "${MODEL_COPY_DIR}"
  "${GCLOUD_CMD}" storage cp --recursive "gs://${MODEL_BUCKET}/${relative}" "${MODEL_COPY_DIR}/" >&2 \
    || die "copying the model from gs://${MODEL_BUCKET}/${relative} failed (MODEL_BUCKET, MODEL_COPY_DIR)"
  [[ -f "${MODEL_COPY_DIR}/${relative##*/}/config.json" ]] \
    || die "the copy of gs://${MODEL_BUCKET}/${relative} has no config.json: not a model folder"
  printf '%s' "${MODEL_COPY_DIR}/${relative##*/}"
}

# The merge reads the base model through the mount, at the path the run's manifest recorded: where that path
# is the in-memory copy (MODEL_COPY_DIR), the copy gives way to a link to the mount: loading the bf16 base
# (onto the GPU when it fits, else into host memory) needs the host memory that the copy holds.
base_from_mount() {  # $@: the job's runner arguments (their --model-id names the model)
  local arg expect=0 path relative
  [[ -n "${MODEL_COPY_DIR}" ]] || return 0
  for arg in "$@"; do
    if (( expect )); then path="${arg%/}"; expect=0
    elif [[ "${arg}" == --model-id ]]; then expect=1
    elif [[ "${arg}" == --model-id=* ]]; then path="${arg#--model-id=}"; path="${path%/}"
    fi
  done
  [[ -n "${path:-}" && "${path}" == "${GCS_MOUNT}"/* ]] || return 0
  relative="${path#"${GCS_MOUNT}"/}"
  mkdir -p "${MODEL_COPY_DIR}"
  rm -rf "${MODEL_COPY_DIR:?}/${relative##*/}"
  ln -s "${path}" "${MODEL_COPY_DIR}/${relative##*/}"
  log "merge: the base model is read through the mount (${MODEL_COPY_DIR}/${relative##*/} -> ${path})"
}

# Writes <run>/merged: the adapter merged into its bf16 base, and export.json (after the weights) with the
# agreement with the adapter on MERGE_CHECK_ROWS held-out rows. A folder without export.json is what a killed
# merge left: it is removed and merged again (helpers.export refuses to write into it).
export_merged() {  # $1: the run folder; the rest: the job's runner arguments
  local run_dir="$1" merged="$1/merged"
  shift
  if [[ -f "${merged}/export.json" ]]; then
    log "${merged} is already merged (export.json): kept"
    return 0
  fi
  rm -rf "${merged}"
  base_from_mount "$@"
  run_forwarding "${exporter[@]}" --run "${run_dir}" --merged "${merged}" --check-size "${MERGE_CHECK_ROWS}"
}

# Sets the array runner_args from "$@" (model_args runs in a subshell: its failure must stop the task here).
set_runner_args() {
  local listed
  listed="$(model_args "$@")" || exit 2
  runner_args=()
  if [[ -n "${listed}" ]]; then mapfile -t runner_args <<< "${listed}"; fi
}

case "${JOB_MODE}" in
  train)
    (( task_count == 1 )) || die "training runs as one task (got CLOUD_RUN_TASK_COUNT=${task_count}); parallel tasks are for JOB_MODE=eval-shard"
    out="${RUNS_DIR}/${run_id}"
    if [[ "${MERGE_AFTER_TRAINING}" == "1" ]] && (( has_output_dir )); then
      die "MERGE_AFTER_TRAINING merges the run folder the entrypoint chooses: drop --output-dir"
    fi
    if (( has_output_dir )); then
      log "--output-dir given in the arguments: using it instead of ${out}"
    else
      set -- --output-dir "${out}" "$@"
    fi
    if (( attempt > 0 )); then
      log "attempt ${attempt} of execution ${run_id}: same run folder, the runner resumes from its last checkpoint"
    else
      log "attempt 0 of execution ${run_id}"
    fi
    (( has_output_dir )) || note_attempt "${out}"
    set_runner_args "$@"
    run_forwarding "${runner[@]}" "${runner_args[@]}"
    [[ "${MERGE_AFTER_TRAINING}" != "1" ]] || export_merged "${out}" "$@"
    ;;

  eval-shard)
    (( has_output_dir )) && die "eval-shard mode chooses the output folders itself; drop --output-dir"
    [[ -n "${ADAPTER_RUN:-}" ]] || die "eval-shard mode needs ADAPTER_RUN: the training run whose adapter/ is evaluated (its folder name under ${RUNS_DIR}, i.e. the training execution id, or an absolute path)"
    adapter_run="$(abs_under "${ADAPTER_RUN}" "${RUNS_DIR}")"
    [[ -f "${adapter_run}/adapter/${COMPLETE_MARKER}" ]] || die "no complete adapter/ in ${adapter_run} (ADAPTER_RUN): the training run has not finished"
    eval_dir="${adapter_run}/eval-${run_id}"
    task_dir="${eval_dir}/task-$(printf '%05d' "${task_index}")"
    log "task ${task_index} of ${task_count}, attempt ${attempt}: shard output in ${task_dir}"
    note_attempt "${task_dir}"
    # Notebook 05 evaluates output_dir/adapter and writes its results beside it: each task gets its own
    # folder (a bucket mount has no file locking; the last writer of a shared file wins) with its own
    # copy of the adapter, marked complete last so that a killed copy is never taken for whole.
    if [[ ! -f "${task_dir}/adapter/${COMPLETE_MARKER}" ]]; then
      copy_complete_folder "${adapter_run}/adapter" "${task_dir}/adapter"
    fi
    if [[ -f "${adapter_run}/train_result.json" ]]; then cp "${adapter_run}/train_result.json" "${task_dir}/"; fi
    set_runner_args "$@"
    run_forwarding "${runner[@]}" --output-dir "${task_dir}" --notebook "${EVAL_NOTEBOOK}" \
      -p shard_index "${task_index}" -p shard_count "${task_count}" "${runner_args[@]}"
    if (( task_count == 1 )); then
      log "one task: the results are ${task_dir}/metrics.json"
    # The last task to finish finds every shard file and merges; a merge problem does not fail this
    # task (its shard is done and a retry would not fix it): rerun with JOB_MODE=merge instead.
    elif ! run_forwarding "${merger[@]}" merge "${eval_dir}" --out "${eval_dir}/metrics.json" \
         --expect "${task_count}" --if-complete; then
      log "warning: merging shards failed; fix the shard and rerun with JOB_MODE=merge EVAL_DIR=${eval_dir} EXPECT_SHARDS=${task_count}"
    fi
    ;;

  merge)
    [[ -n "${EVAL_DIR:-}" ]] || die "merge mode needs EVAL_DIR (absolute, or relative to RUNS_DIR)"
    eval_dir="$(abs_under "${EVAL_DIR}" "${RUNS_DIR}")"
    expect=()
    if [[ -n "${EXPECT_SHARDS:-}" ]]; then expect=(--expect "${EXPECT_SHARDS}"); fi
    run_forwarding "${merger[@]}" merge "${eval_dir}" --out "${eval_dir}/metrics.json" "${expect[@]}"
    ;;

  export)
    (( task_count == 1 )) || die "export runs as one task (got CLOUD_RUN_TASK_COUNT=${task_count})"
    [[ -n "${ADAPTER_RUN:-}" ]] || die "export mode needs ADAPTER_RUN: the training run whose adapter/ is merged (its folder name under ${RUNS_DIR}, i.e. the training execution id, or an absolute path)"
    adapter_run="$(abs_under "${ADAPTER_RUN}" "${RUNS_DIR}")"
    [[ -f "${adapter_run}/adapter/${COMPLETE_MARKER}" ]] || die "no complete adapter/ in ${adapter_run} (ADAPTER_RUN): the training run has not finished"
    note_attempt "${adapter_run}"
    export_merged "${adapter_run}" "$@"
    ;;

  *)
    die "JOB_MODE must be train, eval-shard, merge or export (got '${JOB_MODE}')"
    ;;
esac
