#!/usr/bin/env bash
# Build the image, create/update the Cloud Run jobs that fine-tune Gemma 4 on an NVIDIA RTX PRO 6000, follow
# them, serve the merged model with vLLM, and tear it all down.
#
# Usage: cloudrun/deploy.sh [--dry-run] [COMMAND ...] [-- RUNNER_ARGS ...]
#   setup       enable the APIs; create (or keep, when they exist) the Artifact Registry repository, the model
#               bucket, the output bucket (hierarchical namespace), the job's service account and the HF token
#               secret; grant read on the model bucket, object read/write on the output bucket, access to the
#               secret (retried: a new service account takes a while to be visible to IAM). Safe to rerun.
#   copy-model  copy a local model folder (MODEL_SRC) into gs://$MODEL_BUCKET/$MODEL_DIR/
#   build       build and push the image (Cloud Build; BUILDER=docker: local docker build + push)
#   deploy      create or update both jobs: training ($JOB_NAME) and sharded evaluation ($EVAL_JOB_NAME)
#   execute     run the training job (RUNNER_ARGS after -- replace the job's arguments for this execution)
#   eval        run the evaluation job over $EVAL_TASKS tasks on the adapter of ADAPTER_RUN
#   status      the job's latest executions (and EXECUTION's details when set)
#   logs        the job's recent logs (EXECUTION: only that execution's)
#   alert       an alerting policy that notifies ALERT_CHANNEL when an execution of either job fails
#   serve       deploy $SERVICE_NAME: vLLM on the GPU serving the merged model in gs://$BUCKET/$MERGED_DIR
#   teardown    delete the jobs, the service, the image repository, the secret and the service account;
#               the buckets only with DELETE_BUCKETS=1 (they hold the model and every run)
#   all         setup copy-model build deploy execute, in that order
# With no COMMAND: build deploy. --dry-run prints every command instead of running it (a command that only
# checks whether something exists is printed too, and taken as "absent").
#
# Configuration (environment variables; defaults in brackets):
#   PROJECT_ID [gcloud's configured project]   REGION [europe-west4]
#   BUCKET [$PROJECT_ID-gemma4-finetune] (runs)   MODEL_BUCKET [$PROJECT_ID-gemma4-models] (read-only in jobs)
#   AR_REPO [gemma4-finetune]  IMAGE_NAME [gemma4-finetune]  IMAGE_TAG [latest]  IMAGE [derived from those]
#   JOB_NAME [gemma4-finetuning-job]   EVAL_JOB_NAME [gemma4-eval-shards-job]   SERVICE_NAME [gemma4-serve]
#   GPU_TYPE [nvidia-rtx-pro-6000]  CPU [30]  MEMORY [120Gi]  (the seed's; the GPU's minimum is 20 and 80Gi)
#   MAX_RETRIES [3] (0-10)  TASK_TIMEOUT [12h] (GPU tasks: 1h, 12h in the long-running preview)
#   EVAL_TASKS [4]  EVAL_PARALLELISM [EVAL_TASKS]  EVAL_TASK_TIMEOUT [1h]
#   GCS_MOUNT [/mnt/gcs] (model bucket)  RUNS_MOUNT [/mnt/runs] (output bucket)  MODEL_DIR [gemma-4-31b-it]
#   RENAME_DIR_LIMIT [200]  (gcsfuse mount option of the output bucket: directory renames on a flat bucket)
#   MODEL_COPY [auto]  (1: copy the weights to local memory with gcloud storage cp before loading; 0: read them
#                      through the mount; auto: copy when MEMORY leaves HOST_GIB beside MODEL_GIB)
#   MODEL_GIB [58] (31B bf16 weights)  HOST_GIB [40]   MODEL_SRC (copy-model)
#   HF_SECRET [hf-token]  (Secret Manager secret exposed as HF_TOKEN; empty: no secret)
#   SERVICE_ACCOUNT [gemma4-finetune-job@$PROJECT_ID.iam.gserviceaccount.com]  (empty: the default one)
#   TRAIN_ARGS [the seed's job: 31B, Oxford-IIIT Pet, 4-bit, the settings helpers.teaching.memory fits in 96 GB]
#   EVAL_ARGS [the same model and data]   ADAPTER_RUN (eval: the training execution's id)   EXECUTION
#   ALERT_CHANNEL (alert: a notification channel's resource name)
#   MERGED_DIR (serve: the merged model's folder in the output bucket)  VLLM_IMAGE [vllm/vllm-openai:latest]
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
    setup|copy-model|build|deploy|execute|eval|status|logs|alert|serve|teardown|all) commands+=("$1") ;;
    *) echo "deploy.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
(( ${#commands[@]} )) || commands=(build deploy)
expanded=()
for c in "${commands[@]}"; do
  if [[ "${c}" == all ]]; then expanded+=(setup copy-model build deploy execute); else expanded+=("${c}"); fi
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
MODEL_DIR="${MODEL_DIR:-gemma-4-31b-it}"
MODEL_COPY="${MODEL_COPY:-auto}"
MODEL_GIB="${MODEL_GIB:-58}"
HOST_GIB="${HOST_GIB:-40}"
MODEL_COPY_DIR="/tmp/models"  # the container's own file system: in memory on Cloud Run
HF_SECRET="${HF_SECRET-hf-token}"
SERVICE_ACCOUNT_NAME="${SERVICE_ACCOUNT_NAME:-gemma4-finetune-job}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT-${SERVICE_ACCOUNT_NAME}@${PROJECT_ID}.iam.gserviceaccount.com}"
# The seed's job (GoogleCloudPlatform/devrel-demos ai-ml/finetune_gemma: the 31B, Oxford-IIIT Pet, NF4, LoRA
# r=64, 3 epochs at 5e-5, a global batch of 16) with the micro-batch helpers.teaching.memory.plan fits in 96 GB:
# 4 x 4 without activation checkpointing (79 GB predicted; tests/test_cloudrun.py asks the planner).
DATA_ARGS="-p dataset timm/oxford-iiit-pet -p quantization 4bit -p eval_size 200"
TRAIN_ARGS="${TRAIN_ARGS:---model-id ${GCS_MOUNT}/${MODEL_DIR}/ --train-size 4000 ${DATA_ARGS} -p lora_r 64 -p lora_alpha 64 -p batch_size 4 -p gradient_accumulation 4 -p learning_rate 5e-5 -p epochs 3 -p save_steps 50}"
EVAL_ARGS="${EVAL_ARGS:---model-id ${GCS_MOUNT}/${MODEL_DIR}/ ${DATA_ARGS}}"
VLLM_IMAGE="${VLLM_IMAGE:-vllm/vllm-openai:latest}"
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
for n in MAX_RETRIES EVAL_TASKS EVAL_PARALLELISM RENAME_DIR_LIMIT MODEL_GIB HOST_GIB RETRY_DELAY; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || fail "${n} must be a whole number, got '${!n}'"
done
(( MAX_RETRIES <= 10 )) || fail "MAX_RETRIES must be between 0 and 10 (Cloud Run's limit), got ${MAX_RETRIES}"
[[ "${TASK_TIMEOUT}" =~ ^[0-9]+[smh]$ ]] || fail "TASK_TIMEOUT must look like 1h, 90m or 3600s, got '${TASK_TIMEOUT}'"
case "${MODEL_COPY}" in
  1|0) ;;
  auto) if (( $(mem_gib "${MEMORY}") >= MODEL_GIB + HOST_GIB )); then MODEL_COPY=1; else MODEL_COPY=0; fi ;;
  *) fail "MODEL_COPY must be auto, 1 or 0, got '${MODEL_COPY}'" ;;
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

# The model bucket read-only at GCS_MOUNT; the output bucket read-write at RUNS_MOUNT, with gcsfuse's
# rename-dir-limit so that directory renames work on a flat bucket too (the checkpoint writes do not depend
# on it: helpers.run.folder copies and marks where a rename is refused).
volume_flags() {
  printf '%s\n' \
    "--add-volume=name=models,type=cloud-storage,bucket=${MODEL_BUCKET},readonly=true" \
    "--add-volume-mount=volume=models,mount-path=${GCS_MOUNT}" \
    "--add-volume=name=runs,type=cloud-storage,bucket=${BUCKET},mount-options=rename-dir-limit=${RENAME_DIR_LIMIT}" \
    "--add-volume-mount=volume=runs,mount-path=${RUNS_MOUNT}"
}

job_env() {  # $1: JOB_MODE
  local env="JOB_MODE=$1,GCS_MOUNT=${GCS_MOUNT},RUNS_DIR=${RUNS_MOUNT}"
  # Google's GPU best practices: a concurrent download (gcloud storage cp) loads a large model fastest;
  # the copy sits in the instance's memory, hence the MEMORY condition of MODEL_COPY=auto.
  (( MODEL_COPY )) && env+=",MODEL_BUCKET=${MODEL_BUCKET},MODEL_COPY_DIR=${MODEL_COPY_DIR}"
  echo "${env}"
}

gpu_flags() {  # the GPU and its CPU/memory, shared by the jobs and the service
  printf '%s\n' --region="${REGION}" --gpu=1 --gpu-type="${GPU_TYPE}" --no-gpu-zonal-redundancy \
    --cpu="${CPU}" --memory="${MEMORY}" --labels=app=gemma4-finetune
  [[ -z "${SERVICE_ACCOUNT}" ]] || echo "--service-account=${SERVICE_ACCOUNT}"
}

job_flags() {  # everything both jobs share
  gpu_flags
  printf '%s\n' --image="${IMAGE}" --max-retries="${MAX_RETRIES}"
  volume_flags
  [[ -z "${HF_SECRET}" ]] || echo "--set-secrets=HF_TOKEN=${HF_SECRET}:latest"
}

# --- commands ---------------------------------------------------------------------------------------
grant() {  # $@: the add-iam-policy-binding command without --member
  run_retrying "$@" --member="serviceAccount:${SERVICE_ACCOUNT}"
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
    grant "${GCLOUD}" storage buckets add-iam-policy-binding "gs://${MODEL_BUCKET}" \
      --role=roles/storage.objectViewer --project="${PROJECT_ID}"
    grant "${GCLOUD}" storage buckets add-iam-policy-binding "gs://${BUCKET}" \
      --role=roles/storage.objectUser --project="${PROJECT_ID}"
  fi
  [[ -z "${HF_SECRET}" ]] || setup_secret
}

setup_secret() {
  # The token goes to gcloud on standard input: it is never on a command line, printed or logged.
  local secret_cmd=("${GCLOUD}" secrets create "${HF_SECRET}" --replication-policy=automatic --data-file=- --project="${PROJECT_ID}")
  if exists "${GCLOUD}" secrets describe "${HF_SECRET}" --project="${PROJECT_ID}"; then
    note "secret ${HF_SECRET} exists: kept (a new token: printf %s \"\$HF_TOKEN\" | gcloud secrets versions add ${HF_SECRET} --data-file=-)"
  elif [[ -n "${HF_TOKEN:-}" ]] || (( dry_run )); then
    # shellcheck disable=SC2016  # the text $HF_TOKEN is printed on purpose, never its value
    printf 'printf %%s "$HF_TOKEN" | %s\n' "$(show "${secret_cmd[@]}")"
    (( dry_run )) || printf '%s' "${HF_TOKEN}" | "${secret_cmd[@]}"
  else
    warn "HF_TOKEN is not set here: no secret created (only needed for models or data from the hub; or HF_SECRET= to leave it out)"
    return 0
  fi
  [[ -z "${SERVICE_ACCOUNT}" ]] || grant "${GCLOUD}" secrets add-iam-policy-binding "${HF_SECRET}" \
    --role=roles/secretmanager.secretAccessor --project="${PROJECT_ID}"
}

do_copy_model() {
  note "copy-model: a local copy of the model (e.g. hf download google/gemma-4-31B-it --local-dir DIR) into the model bucket"
  local src="${MODEL_SRC:-}"
  if [[ -z "${src}" ]]; then
    (( dry_run )) || fail "copy-model needs MODEL_SRC=<local model folder>"
    src="MODEL_SRC"
  elif (( ! dry_run )) && [[ ! -f "${src}/config.json" ]]; then
    fail "MODEL_SRC=${src} has no config.json: not a model folder"
  fi
  run "${GCLOUD}" storage rsync --recursive "${src}" "gs://${MODEL_BUCKET}/${MODEL_DIR}" --project="${PROJECT_ID}"
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
  (( MODEL_COPY )) || note "MODEL_COPY=0: the weights are read through the bucket mount (MEMORY=${MEMORY} leaves no room for a copy)"
  list="$(as_list "${args[@]}")" || exit 2
  note "deploy: training job (one task; retries resume from the last complete checkpoint in the run folder)"
  run "${GCLOUD}" run jobs deploy "${JOB_NAME}" "${common[@]}" \
    --tasks=1 --task-timeout="${TASK_TIMEOUT}" --set-env-vars="$(job_env train)" \
    --args="${list}" --project="${PROJECT_ID}"
  mapfile -t args < <(words "${EVAL_ARGS}")
  list="$(as_list "${args[@]}")" || exit 2
  note "deploy: sharded evaluation job (${EVAL_TASKS} tasks, each evaluates one shard of the test split)"
  run "${GCLOUD}" run jobs deploy "${EVAL_JOB_NAME}" "${common[@]}" \
    --tasks="${EVAL_TASKS}" --parallelism="${EVAL_PARALLELISM}" --task-timeout="${EVAL_TASK_TIMEOUT}" \
    --set-env-vars="$(job_env eval-shard)" --args="${list}" --project="${PROJECT_ID}"
}

override_args=()  # --args=... for `jobs execute` when RUNNER_ARGS were given after --
if (( ${#runner_args[@]} )); then
  override_list="$(as_list "${runner_args[@]}")" || exit 2
  override_args=(--args="${override_list}")
fi

do_execute() {
  note "execute: training; results in gs://${BUCKET}/runs/<execution id>/"
  # GPU, CPU and memory belong to the job (deploy); `jobs execute` only overrides args, env, tasks, timeout.
  run "${GCLOUD}" run jobs execute "${JOB_NAME}" --region="${REGION}" "${override_args[@]}" --async \
    --project="${PROJECT_ID}"
}

do_eval() {
  local adapter_run="${ADAPTER_RUN:-}"
  if [[ -z "${adapter_run}" ]]; then
    (( dry_run )) || fail "eval needs ADAPTER_RUN=<the training execution id, i.e. its folder under runs/>"
    adapter_run="TRAINING_EXECUTION_ID"
  fi
  note "eval: ${EVAL_TASKS} shards of the test split; merged into gs://${BUCKET}/runs/${adapter_run}/eval-<execution id>/metrics.json"
  run "${GCLOUD}" run jobs execute "${EVAL_JOB_NAME}" --region="${REGION}" --tasks="${EVAL_TASKS}" \
    --update-env-vars="ADAPTER_RUN=${adapter_run}" "${override_args[@]}" --async --project="${PROJECT_ID}"
}

do_status() {
  run "${GCLOUD}" run jobs executions list --job="${JOB_NAME}" --region="${REGION}" --limit=5 --project="${PROJECT_ID}"
  [[ -z "${EXECUTION:-}" ]] || run "${GCLOUD}" run jobs executions describe "${EXECUTION}" \
    --region="${REGION}" --project="${PROJECT_ID}"
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

do_serve() {
  local merged="${MERGED_DIR:-}" flags vllm_args
  if [[ -z "${merged}" ]]; then
    (( dry_run )) || fail "serve needs MERGED_DIR=<the merged model's folder in gs://${BUCKET}/> (python -m helpers.export --run RUN_DIR --merged DIR, then copy it there)"
    merged="merged/TRAINING_EXECUTION_ID"
  fi
  mapfile -t flags < <(gpu_flags)
  note "serve: vLLM's OpenAI-compatible server for gs://${BUCKET}/${merged} (private: callers need roles/run.invoker)"
  # GPU services need instance-based billing (--no-cpu-throttling); one instance caps the bill at one GPU.
  vllm_args="$(as_list serve "${RUNS_MOUNT}/${merged}" --served-model-name=gemma4-finetuned --max-model-len=4096 \
    --port=8000)" || exit 2
  run "${GCLOUD}" run deploy "${SERVICE_NAME}" --image="${VLLM_IMAGE}" "${flags[@]}" --no-cpu-throttling \
    --max-instances=1 --concurrency=32 --timeout=3600 --port=8000 --no-allow-unauthenticated \
    --add-volume="name=runs,type=cloud-storage,bucket=${BUCKET},readonly=true" \
    --add-volume-mount="volume=runs,mount-path=${RUNS_MOUNT}" \
    --command=vllm --args="${vllm_args}" --project="${PROJECT_ID}"
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
}

for c in "${commands[@]}"; do
  case "${c}" in
    setup) do_setup ;;
    copy-model) do_copy_model ;;
    build) do_build ;;
    deploy) do_deploy ;;
    execute) do_execute ;;
    eval) do_eval ;;
    status) do_status ;;
    logs) do_logs ;;
    alert) do_alert ;;
    serve) do_serve ;;
    teardown) do_teardown ;;
    *) fail "unknown command ${c}" ;;
  esac
done
