#!/usr/bin/env bash
# Build the image and create/update the Cloud Run jobs that fine-tune Gemma 4 on an NVIDIA RTX PRO 6000.
#
# Usage: cloudrun/deploy.sh [--dry-run] [COMMAND ...] [-- RUNNER_ARGS ...]
#   setup       enable the APIs; create the Artifact Registry repository, the bucket, the job's service
#               account (with access to the bucket and the secret) and the HF token secret
#   copy-model  copy a local model folder (MODEL_SRC) into gs://$BUCKET/$MODEL_DIR/
#   build       build and push the image (Cloud Build; BUILDER=docker: local docker build + push)
#   deploy      create or update both jobs: training ($JOB_NAME) and sharded evaluation ($EVAL_JOB_NAME)
#   execute     run the training job; RUNNER_ARGS (after --) replace TRAIN_ARGS
#   eval        run the evaluation job over $EVAL_TASKS tasks on the adapter of ADAPTER_RUN
#   all         setup copy-model build deploy execute eval, in that order
# With no COMMAND: build deploy. --dry-run prints every command instead of running it.
#
# Configuration (environment variables; defaults in brackets):
#   PROJECT_ID [gcloud's configured project]   REGION [europe-west4]   BUCKET [$PROJECT_ID-gemma4-finetune]
#   AR_REPO [gemma4-finetune]  IMAGE_NAME [gemma4-finetune]  IMAGE_TAG [latest]  IMAGE [derived from those]
#   JOB_NAME [gemma4-finetuning-job]   EVAL_JOB_NAME [gemma4-eval-shards-job]
#   GPU_TYPE [nvidia-rtx-pro-6000]  CPU [20]  MEMORY [80Gi]  (the documented minimum for this GPU)
#   MAX_RETRIES [3]  TASK_TIMEOUT [12h]  EVAL_TASKS [4]  EVAL_PARALLELISM [EVAL_TASKS]  EVAL_TASK_TIMEOUT [1h]
#   GCS_MOUNT [/mnt/gcs]  GCS_MOUNT_OPTIONS [none]  MODEL_DIR [gemma-4-31b-it]  MODEL_SRC (copy-model)
#   HF_SECRET [hf-token]  (Secret Manager secret exposed as HF_TOKEN; empty: no secret)
#   SERVICE_ACCOUNT [gemma4-finetune-job@$PROJECT_ID.iam.gserviceaccount.com]  (empty: the default one)
#   TRAIN_ARGS ["--model-id $GCS_MOUNT/$MODEL_DIR/ --train-size 4000"]
#   EVAL_ARGS ["--model-id $GCS_MOUNT/$MODEL_DIR/"]   ADAPTER_RUN (eval: the training execution's id)
#   BUILDER [cloudbuild]  GCLOUD [gcloud]  DOCKER [docker]
# Flags were checked against Google's gcloud reference and Cloud Run GPU pages: see cloudrun/README.md.
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
    setup|copy-model|build|deploy|execute|eval|all) commands+=("$1") ;;
    *) echo "deploy.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
(( ${#commands[@]} )) || commands=(build deploy)
if [[ " ${commands[*]} " == *" all "* ]]; then commands=(setup copy-model build deploy execute eval); fi

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
AR_REPO="${AR_REPO:-gemma4-finetune}"
IMAGE_NAME="${IMAGE_NAME:-gemma4-finetune}"
IMAGE_TAG="${IMAGE_TAG:-latest}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT_ID}/${AR_REPO}/${IMAGE_NAME}:${IMAGE_TAG}}"
JOB_NAME="${JOB_NAME:-gemma4-finetuning-job}"
EVAL_JOB_NAME="${EVAL_JOB_NAME:-gemma4-eval-shards-job}"
GPU_TYPE="${GPU_TYPE:-nvidia-rtx-pro-6000}"
CPU="${CPU:-20}"
MEMORY="${MEMORY:-80Gi}"
MAX_RETRIES="${MAX_RETRIES:-3}"
TASK_TIMEOUT="${TASK_TIMEOUT:-12h}"
EVAL_TASKS="${EVAL_TASKS:-4}"
EVAL_PARALLELISM="${EVAL_PARALLELISM:-${EVAL_TASKS}}"
EVAL_TASK_TIMEOUT="${EVAL_TASK_TIMEOUT:-1h}"
GCS_MOUNT="${GCS_MOUNT:-/mnt/gcs}"
GCS_MOUNT_OPTIONS="${GCS_MOUNT_OPTIONS:-}"
MODEL_DIR="${MODEL_DIR:-gemma-4-31b-it}"
HF_SECRET="${HF_SECRET-hf-token}"
SERVICE_ACCOUNT_NAME="${SERVICE_ACCOUNT_NAME:-gemma4-finetune-job}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT-${SERVICE_ACCOUNT_NAME}@${PROJECT_ID}.iam.gserviceaccount.com}"
TRAIN_ARGS="${TRAIN_ARGS:---model-id ${GCS_MOUNT}/${MODEL_DIR}/ --train-size 4000}"
EVAL_ARGS="${EVAL_ARGS:---model-id ${GCS_MOUNT}/${MODEL_DIR}/}"
BUILDER="${BUILDER:-cloudbuild}"
VOLUME="gcs"

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
for n in MAX_RETRIES EVAL_TASKS EVAL_PARALLELISM; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || fail "${n} must be a whole number, got '${!n}'"
done

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
note() { echo "# $*"; }

as_list() {  # words -> gcloud list (comma separated); refuses commas inside a word
  local IFS=,
  local w
  for w in "$@"; do [[ "${w}" != *,* ]] || fail "argument '${w}' contains a comma, which gcloud list flags split on"; done
  echo "$*"
}

train_args() {
  if (( ${#runner_args[@]} )); then printf '%s\n' "${runner_args[@]}"; else
    local words
    read -r -a words <<< "${TRAIN_ARGS}"
    printf '%s\n' "${words[@]}"
  fi
}

volume_spec="name=${VOLUME},type=cloud-storage,bucket=${BUCKET}"
[[ -z "${GCS_MOUNT_OPTIONS}" ]] || volume_spec+=",mount-options=${GCS_MOUNT_OPTIONS}"

# Flags shared by both jobs: the GPU, its CPU/memory, the bucket mount, the secret, the identity.
job_flags() {
  local flags=(
    --region="${REGION}"
    --image="${IMAGE}"
    --gpu=1
    --gpu-type="${GPU_TYPE}"
    --no-gpu-zonal-redundancy
    --cpu="${CPU}"
    --memory="${MEMORY}"
    --max-retries="${MAX_RETRIES}"
    --add-volume="${volume_spec}"
    --add-volume-mount="volume=${VOLUME},mount-path=${GCS_MOUNT}"
    --labels=app=gemma4-finetune
  )
  [[ -z "${HF_SECRET}" ]] || flags+=(--set-secrets="HF_TOKEN=${HF_SECRET}:latest")
  [[ -z "${SERVICE_ACCOUNT}" ]] || flags+=(--service-account="${SERVICE_ACCOUNT}")
  printf '%s\n' "${flags[@]}"
}

do_setup() {
  note "setup: APIs, image repository, bucket, service account, HF token secret"
  run "${GCLOUD}" services enable run.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com \
    secretmanager.googleapis.com storage.googleapis.com --project="${PROJECT_ID}"
  run "${GCLOUD}" artifacts repositories create "${AR_REPO}" --repository-format=docker \
    --location="${REGION}" --project="${PROJECT_ID}"
  run "${GCLOUD}" storage buckets create "gs://${BUCKET}" --location="${REGION}" \
    --uniform-bucket-level-access --project="${PROJECT_ID}"
  if [[ -n "${SERVICE_ACCOUNT}" ]]; then
    run "${GCLOUD}" iam service-accounts create "${SERVICE_ACCOUNT_NAME}" \
      --display-name="Gemma 4 fine-tuning job" --project="${PROJECT_ID}"
    run "${GCLOUD}" storage buckets add-iam-policy-binding "gs://${BUCKET}" \
      --member="serviceAccount:${SERVICE_ACCOUNT}" --role=roles/storage.admin
  fi
  if [[ -n "${HF_SECRET}" ]]; then
    # The token goes to gcloud on standard input: it is never on a command line, printed or logged.
    local secret_cmd=("${GCLOUD}" secrets create "${HF_SECRET}" --replication-policy=automatic --data-file=- --project="${PROJECT_ID}")
    # shellcheck disable=SC2016  # the text $HF_TOKEN is printed on purpose, never its value
    printf 'printf %%s "$HF_TOKEN" | %s\n' "$(show "${secret_cmd[@]}")"
    if (( ! dry_run )); then
      if [[ -n "${HF_TOKEN:-}" ]]; then printf '%s' "${HF_TOKEN}" | "${secret_cmd[@]}"; else
        warn "HF_TOKEN is not set here: create the secret yourself (only needed for models or data from the hub)"
      fi
    fi
    [[ -z "${SERVICE_ACCOUNT}" ]] || run "${GCLOUD}" secrets add-iam-policy-binding "${HF_SECRET}" \
      --member="serviceAccount:${SERVICE_ACCOUNT}" --role=roles/secretmanager.secretAccessor --project="${PROJECT_ID}"
  fi
}

do_copy_model() {
  note "copy-model: a local copy of the model (e.g. hf download google/gemma-4-31b-it --local-dir DIR) into the bucket"
  local src="${MODEL_SRC:-}"
  if [[ -z "${src}" ]]; then
    (( dry_run )) || fail "copy-model needs MODEL_SRC=<local model folder>"
    src="MODEL_SRC"
  elif (( ! dry_run )) && [[ ! -f "${src}/config.json" ]]; then
    fail "MODEL_SRC=${src} has no config.json: not a model folder"
  fi
  run "${GCLOUD}" storage rsync --recursive "${src}" "gs://${BUCKET}/${MODEL_DIR}"
}

do_build() {
  note "build: ${IMAGE}"
  if [[ "${BUILDER}" == "docker" ]]; then
    run "${GCLOUD}" auth configure-docker "${REGION}-docker.pkg.dev" --quiet
    run env DOCKER_BUILDKIT=1 "${DOCKER}" build -f cloudrun/Dockerfile -t "${IMAGE}" .
    run "${DOCKER}" push "${IMAGE}"
  elif [[ "${BUILDER}" == "cloudbuild" ]]; then
    run "${GCLOUD}" builds submit . --config=cloudrun/cloudbuild.yaml \
      --substitutions="_IMAGE=${IMAGE}" --project="${PROJECT_ID}"
  else
    fail "BUILDER must be cloudbuild or docker, got '${BUILDER}'"
  fi
}

do_deploy() {
  local common args list
  mapfile -t common < <(job_flags)
  mapfile -t args < <(train_args)
  list="$(as_list "${args[@]}")"
  note "deploy: training job (one task; retries resume from the last checkpoint in the run folder)"
  run "${GCLOUD}" beta run jobs deploy "${JOB_NAME}" "${common[@]}" \
    --tasks=1 --task-timeout="${TASK_TIMEOUT}" \
    --set-env-vars="JOB_MODE=train,GCS_MOUNT=${GCS_MOUNT}" \
    --args="${list}" --project="${PROJECT_ID}"
  read -r -a args <<< "${EVAL_ARGS}"
  list="$(as_list "${args[@]}")"
  note "deploy: sharded evaluation job (${EVAL_TASKS} tasks, each evaluates one shard of the test split)"
  run "${GCLOUD}" beta run jobs deploy "${EVAL_JOB_NAME}" "${common[@]}" \
    --tasks="${EVAL_TASKS}" --parallelism="${EVAL_PARALLELISM}" --task-timeout="${EVAL_TASK_TIMEOUT}" \
    --set-env-vars="JOB_MODE=eval-shard,GCS_MOUNT=${GCS_MOUNT}" \
    --args="${list}" --project="${PROJECT_ID}"
}

do_execute() {
  local args list
  mapfile -t args < <(train_args)
  list="$(as_list "${args[@]}")"
  note "execute: training; results in gs://${BUCKET}/runs/<execution id>/"
  # GPU, CPU and memory belong to the job (deploy); `jobs execute` only overrides args, env, tasks, timeout.
  run "${GCLOUD}" beta run jobs execute "${JOB_NAME}" --region="${REGION}" \
    --args="${list}" --async --project="${PROJECT_ID}"
}

do_eval() {
  local adapter_run="${ADAPTER_RUN:-}" args list
  if [[ -z "${adapter_run}" ]]; then
    (( dry_run )) || fail "eval needs ADAPTER_RUN=<the training execution id, i.e. its folder under runs/>"
    adapter_run="TRAINING_EXECUTION_ID"
  fi
  read -r -a args <<< "${EVAL_ARGS}"
  (( ! ${#runner_args[@]} )) || args=("${runner_args[@]}")
  list="$(as_list "${args[@]}")"
  note "eval: ${EVAL_TASKS} shards of the test split; merged into gs://${BUCKET}/runs/${adapter_run}/eval-<execution id>/metrics.json"
  run "${GCLOUD}" beta run jobs execute "${EVAL_JOB_NAME}" --region="${REGION}" --tasks="${EVAL_TASKS}" \
    --update-env-vars="ADAPTER_RUN=${adapter_run}" --args="${list}" --async --project="${PROJECT_ID}"
}

for c in "${commands[@]}"; do
  case "${c}" in
    setup) do_setup ;;
    copy-model) do_copy_model ;;
    build) do_build ;;
    deploy) do_deploy ;;
    execute) do_execute ;;
    eval) do_eval ;;
    *) fail "unknown command ${c}" ;;
  esac
done
