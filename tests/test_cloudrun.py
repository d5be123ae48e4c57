"""cloudrun/: deploy.sh --dry-run prints the right gcloud commands; the entrypoint maps Cloud Run's environment
to runner flags (stub runner), resumes on retry, shards evaluation, and never leaks HF_TOKEN; linters pass.

No gcloud or docker here: a fake `gcloud` on PATH records what deploy.sh would run. The end-to-end test with
the real runner switches on when helpers.runner exists.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.run import shards

REPO = Path(__file__).resolve().parents[1]
CLOUDRUN = REPO / "cloudrun"
DEPLOY = CLOUDRUN / "deploy.sh"
ENTRYPOINT = CLOUDRUN / "entrypoint.sh"
DOCKERFILE = CLOUDRUN / "Dockerfile"
TOKEN = "hf_FAKEsecretTOKEN0123456789"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is needed to run the cloudrun scripts")


def base_env(**extra):
    """A clean environment: no Cloud Run variables, no HF token, unless a test sets them."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLOUD_RUN_", "HF_TOKEN", "GCS_", "RUN_ID", "JOB_MODE", "ADAPTER_RUN"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------------------- deploy.sh


def deploy(*args, **env):
    return subprocess.run([BASH, str(DEPLOY), *args], check=False, env=base_env(**env), capture_output=True, text=True,
                          timeout=60)


def commands(stdout):
    """The printed commands, as argv lists (comments dropped; `printf ... | gcloud ...` -> the gcloud part)."""
    out = []
    for line in stdout.splitlines():
        if not line or line.startswith("#"):
            continue
        if " | " in line:
            line = line.split(" | ", 1)[1]
        out.append(shlex.split(line))
    return out


def flags(argv):
    """--key=value flags of one command as a dict; bare --flag -> True."""
    result = {}
    for word in argv:
        if word.startswith("--"):
            key, _, value = word[2:].partition("=")
            result[key] = value if _ else True
    return result


def find(cmds, *prefix):
    hits = [c for c in cmds if c[:len(prefix)] == list(prefix)]
    assert len(hits) == 1, f"expected one {' '.join(prefix)} command, got {len(hits)}"
    return hits[0]


# Flags each gcloud subcommand accepts, from the gcloud reference (cloud.google.com/sdk/gcloud/reference/...,
# read 2026-12-01 through the docs search; GA commands): a command of cloudrun/ or its README using a flag
# outside its row is an error a user would hit. `run jobs execute` has no GPU, CPU or memory flag.
GLOBAL_FLAGS = {"project", "quiet", "format", "account", "billing-project", "configuration", "flags-file",
                "flatten", "help", "impersonate-service-account", "log-http", "trace-token", "verbosity"}
ACCEPTED_FLAGS = {
    ("config", "get-value"): set(),
    ("services", "enable"): {"async"},
    ("artifacts", "repositories", "create"): {"repository-format", "location", "description", "labels", "async",
                                              "kms-key", "mode"},
    ("artifacts", "repositories", "describe"): {"location"},
    ("artifacts", "repositories", "delete"): {"location", "async"},
    ("storage", "buckets", "create"): {"location", "uniform-bucket-level-access", "enable-hierarchical-namespace",
                                       "default-storage-class", "public-access-prevention", "soft-delete-duration"},
    ("storage", "buckets", "describe"): {"raw"},
    ("storage", "buckets", "add-iam-policy-binding"): {"member", "role", "condition", "condition-from-file"},
    ("storage", "rsync"): {"recursive", "delete-unmatched-destination-objects", "exclude", "checksums-only"},
    ("storage", "cp"): {"recursive", "no-clobber", "continue-on-error"},
    ("storage", "rm"): {"recursive", "continue-on-error"},
    ("storage", "cat"): set(),
    ("iam", "service-accounts", "create"): {"display-name", "description"},
    ("iam", "service-accounts", "describe"): set(),
    ("iam", "service-accounts", "delete"): set(),
    ("secrets", "create"): {"replication-policy", "data-file", "locations", "labels"},
    ("secrets", "describe"): set(),
    ("secrets", "delete"): {"etag"},
    ("secrets", "versions", "add"): {"data-file"},
    ("secrets", "add-iam-policy-binding"): {"member", "role", "condition", "condition-from-file"},
    ("builds", "submit"): {"config", "substitutions", "tag", "region", "async", "timeout", "machine-type"},
    ("auth", "configure-docker"): set(),
    ("run", "jobs", "deploy"): {
        "binary-authorization", "breakglass", "container", "gpu-type", "gpu-zonal-redundancy",
        "no-gpu-zonal-redundancy", "key", "labels", "max-retries", "parallelism", "region", "remove-containers",
        "service-account", "set-cloudsql-instances", "task-timeout", "tasks", "vpc-connector", "vpc-egress",
        "add-volume", "clear-volumes", "remove-volume", "add-volume-mount", "args", "clear-volume-mounts",
        "command", "cpu", "depends-on", "gpu", "memory", "remove-volume-mount", "startup-probe", "clear-env-vars",
        "env-vars-file", "set-env-vars", "remove-env-vars", "update-env-vars", "clear-secrets", "set-secrets",
        "remove-secrets", "update-secrets", "image", "source", "async", "execute-now", "wait", "clear-network",
        "network", "subnet", "clear-network-tags", "network-tags"},
    ("run", "jobs", "execute"): {"container", "region", "task-timeout", "tasks", "args", "update-env-vars", "async",
                                 "wait"},
    ("run", "jobs", "describe"): {"region"},
    ("run", "jobs", "delete"): {"region", "async"},
    ("run", "jobs", "executions", "list"): {"job", "region", "limit", "filter", "sort-by", "page-size", "uri"},
    ("run", "jobs", "executions", "describe"): {"region"},
    ("run", "deploy"): {
        "namespace", "allow-unauthenticated", "no-allow-unauthenticated", "async", "breakglass",
        "clear-vpc-connector", "concurrency", "container", "cpu-boost", "no-cpu-boost", "cpu-throttling",
        "no-cpu-throttling", "default-url", "no-default-url", "description", "execution-environment", "gpu-type",
        "gpu-zonal-redundancy", "no-gpu-zonal-redundancy", "ingress", "invoker-iam-check", "max",
        "max-instances", "min", "min-instances", "region", "regions", "remove-containers", "revision-suffix",
        "scaling", "service-account", "session-affinity", "tag", "timeout", "no-traffic", "vpc-connector",
        "vpc-egress", "add-volume", "clear-volumes", "remove-volume", "add-volume-mount", "args", "command",
        "cpu", "depends-on", "gpu", "memory", "port", "image", "source", "labels", "set-env-vars",
        "update-env-vars", "set-secrets", "update-secrets", "startup-probe", "liveness-probe"},
    ("run", "services", "describe"): {"region"},
    ("run", "services", "delete"): {"region", "async"},
    ("logging", "read"): {"limit", "freshness", "order", "bucket", "location", "view", "resource-names"},
    ("monitoring", "policies", "create"): {
        "notification-channels", "aggregation", "condition-display-name", "condition-filter", "duration", "if",
        "trigger-count", "trigger-percent", "combiner", "display-name", "no-enabled", "user-labels",
        "documentation-format", "documentation", "documentation-from-file", "policy", "policy-from-file"},
    ("beta", "monitoring", "channels", "create"): {"display-name", "type", "channel-labels", "description",
                                                   "enabled", "user-labels"},
    ("beta", "monitoring", "channels", "list"): {"filter", "limit", "sort-by", "page-size"},
}


def unaccepted_flags(argv):
    """The flags of one gcloud command (argv without 'gcloud') that its subcommand does not accept."""
    path = next((key for key in sorted(ACCEPTED_FLAGS, key=len, reverse=True) if tuple(argv[:len(key)]) == key), None)
    assert path is not None, f"gcloud {' '.join(argv[:4])}: a subcommand missing from ACCEPTED_FLAGS (add it from the reference)"
    used = {w[2:].split("=", 1)[0] for w in argv[len(path):] if w.startswith("--")}
    return sorted(used - ACCEPTED_FLAGS[path] - GLOBAL_FLAGS)


# A `gcloud` that records each call's argv (and standard input, for secrets) as JSON lines, and keeps state like
# the real one: `X describe NAME` succeeds only once `X create NAME` has run; the first FAKE_BINDING_FAILURES
# add-iam-policy-binding calls fail (a service account that has not propagated yet).
FAKE_GCLOUD = r"""
import json, os, sys
argv = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
stdin = sys.stdin.read() if "--data-file=-" in argv else None
with open(log, "a") as fh:
    fh.write(json.dumps({"argv": argv, "stdin": stdin}) + "\n")
state = log + ".state"
created = set(open(state).read().splitlines()) if os.path.exists(state) else set()
words = [w for w in argv if not w.startswith("--")]
verb = next((w for w in ("create", "describe", "add-iam-policy-binding") if w in words), None)
if verb:
    i = words.index(verb)
    key = " ".join(words[:i]) + " " + (words[i + 1] if i + 1 < len(words) else "")
    if verb == "create":
        with open(state, "a") as fh:
            fh.write(key.replace("service-accounts ", "service-accounts@") + "\n")
    elif verb == "describe":
        probe = key if "service-accounts" not in key else "iam service-accounts@" + words[i + 1].split("@")[0]
        sys.exit(0 if probe in created else 1)
    else:
        failures = state + ".bindings"
        count = int(open(failures).read()) if os.path.exists(failures) else 0
        open(failures, "w").write(str(count + 1))
        if count < int(os.environ.get("FAKE_BINDING_FAILURES", "0")):
            print("ERROR: Service account does not exist.", file=sys.stderr)
            sys.exit(1)
"""


@pytest.fixture()
def fake_gcloud(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud-calls.jsonl"
    script = bindir / "gcloud"
    script.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    script.chmod(0o755)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log), "log": log,
            "gcloud": str(script)}


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def gcloud_env(fake, **extra):
    return {"PATH": fake["PATH"], "FAKE_GCLOUD_LOG": fake["FAKE_GCLOUD_LOG"], "RETRY_DELAY": "0", **extra}


ALL_COMMANDS = ["setup", "copy-model", "build", "deploy", "execute", "eval", "status", "logs", "alert", "serve",
                "teardown"]


def test_every_gcloud_command_uses_only_flags_its_subcommand_accepts():
    r = deploy("--dry-run", *ALL_COMMANDS, "--", "--model-id", "/mnt/gcs/m/", PROJECT_ID="p", EXECUTION="e-1",
               DELETE_BUCKETS="1")
    assert r.returncode == 0, r.stderr
    gcloud_cmds = [c[1:] for c in commands(r.stdout) if c[0] == "gcloud"]
    assert len(gcloud_cmds) > 25
    assert {tuple(c[:3]) for c in gcloud_cmds} >= {("run", "jobs", "deploy"), ("run", "jobs", "execute"),
                                                   ("run", "deploy", "gemma4-serve")}
    assert {" ".join(c): unaccepted_flags(c) for c in gcloud_cmds if unaccepted_flags(c)} == {}


def readme_gcloud_commands():
    """Every `gcloud ...` command in cloudrun/README.md's code blocks (continuation lines joined)."""
    text = (CLOUDRUN / "README.md").read_text()
    found = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():  # a command, or one shown after "# =" or a pipe
            for match in re.finditer(r"(?:^|[=|#] )\s*gcloud (.+?)(?=\s+# |$)", line.strip()):
                found.append(shlex.split(match[1].replace("<", "").replace(">", "")))
    return found


def test_the_readme_gcloud_commands_use_only_accepted_flags():
    cmds = readme_gcloud_commands()
    assert len(cmds) >= 10
    assert not [c for c in cmds if c[0] in ("beta", "alpha") and c[1] == "run"]  # GA gcloud has the GPU flags
    assert {" ".join(c): unaccepted_flags(c) for c in cmds if unaccepted_flags(c)} == {}


def test_the_flag_check_catches_a_gpu_flag_on_jobs_execute():
    assert unaccepted_flags(["run", "jobs", "execute", "j", "--gpu=1", "--gpu-type=nvidia-rtx-pro-6000"]) == \
        ["gpu", "gpu-type"]
    assert unaccepted_flags(["run", "jobs", "deploy", "j", "--gpu=1", "--gpu-type=nvidia-rtx-pro-6000"]) == []


def test_dry_run_training_job_has_gpu_flags_mounts_secret_region_retries_timeout():
    r = deploy("--dry-run", PROJECT_ID="my-proj")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    job = find(cmds, "gcloud", "run", "jobs", "deploy", "gemma4-finetuning-job")
    f = flags(job)
    assert f["gpu"] == "1" and f["gpu-type"] == "nvidia-rtx-pro-6000"
    assert f["no-gpu-zonal-redundancy"] is True
    assert int(f["cpu"]) >= 20 and f["memory"] == "120Gi"
    assert f["region"] == "europe-west4"
    assert f["max-retries"] == "3" and f["task-timeout"] == "12h" and f["tasks"] == "1"
    volumes = [w.split("=", 1)[1] for w in job if w.startswith("--add-volume=")]
    mounts = [w.split("=", 1)[1] for w in job if w.startswith("--add-volume-mount=")]
    # the model read-only; the runs with gcsfuse's rename-dir-limit (directory renames on a flat bucket)
    assert volumes == ["name=models,type=cloud-storage,bucket=my-proj-gemma4-models,readonly=true",
                       "name=runs,type=cloud-storage,bucket=my-proj-gemma4-finetune,mount-options=rename-dir-limit=200"]
    assert mounts == ["volume=models,mount-path=/mnt/gcs", "volume=runs,mount-path=/mnt/runs"]
    assert f["set-secrets"] == "HF_TOKEN=hf-token:latest"
    assert f["image"] == "europe-west4-docker.pkg.dev/my-proj/gemma4-finetune/gemma4-finetune:latest"
    assert f["set-env-vars"] == ("JOB_MODE=train,GCS_MOUNT=/mnt/gcs,RUNS_DIR=/mnt/runs,"
                                 "MODEL_BUCKET=my-proj-gemma4-models,MODEL_COPY_DIR=/tmp/models")
    assert f["args"].startswith("--model-id,/mnt/gcs/gemma-4-31b-it/,--train-size,4000,")
    assert f["service-account"] == "gemma4-finetune-job@my-proj.iam.gserviceaccount.com"
    build = find(cmds, "gcloud", "builds", "submit")
    assert flags(build)["config"].endswith("cloudrun/cloudbuild.yaml")
    assert flags(build)["substitutions"] == f"_IMAGE={f['image']}"


def runner_parameters(args_list):
    """--args of a job (comma list) -> (model id, train size, {RunConfig field: value}) as the runner reads them."""
    from helpers.run.command_line import parse_value
    from helpers.runner import build_parser

    args = build_parser().parse_args(args_list.split(","))
    return args.model_id, args.train_size, {name: parse_value(value) for name, value in args.parameter}


def test_default_job_is_the_seeds_pet_job_and_fits_the_gpu_by_the_planner():
    from helpers.run.config import RunConfig
    from helpers.teaching.memory import fits

    r = deploy("--dry-run", "deploy", PROJECT_ID="p")
    job = flags(find(commands(r.stdout), "gcloud", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    model_id, train_size, params = runner_parameters(job["args"])
    assert (model_id, train_size) == ("/mnt/gcs/gemma-4-31b-it/", 4000)  # the seed's flags
    config = RunConfig.from_params({**params, "model_id": model_id, "train_size": train_size})  # valid values
    assert (config.dataset, config.quantization) == ("timm/oxford-iiit-pet", "4bit")
    assert fits("31B", 96, quantization=config.quantization, lora_r=config.lora_r, micro_batch=config.batch_size,
                gradient_checkpointing=config.gradient_checkpointing, optimizer=config.optimizer,
                quantize_towers=config.quantize_towers)
    assert config.batch_size * config.gradient_accumulation == 16  # the seed's global batch
    ev = flags(find(commands(r.stdout), "gcloud", "run", "jobs", "deploy", "gemma4-eval-shards-job"))
    eval_model, _, eval_params = runner_parameters(ev["args"])
    assert eval_model == model_id and all(eval_params[k] == params[k] for k in ("dataset", "quantization"))


def test_train_size_above_the_split_uses_every_row_and_says_so(capsys):
    from helpers.data import load_examples

    train = load_examples("digits", "train", size=5000)
    assert len(train) == 1347  # the whole digits training split, as Pet's 3,680 for the seed's 4000
    assert "5000 examples asked for, the split has 1347 usable rows: using all of them" in capsys.readouterr().out
    load_examples("digits", "train", size=100)
    assert "asked for" not in capsys.readouterr().out


def test_weights_are_read_through_the_mount_when_memory_leaves_no_room_for_a_copy():
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", MEMORY="80Gi", CPU="20")
    job = flags(find(commands(r.stdout), "gcloud", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    assert "MODEL_COPY_DIR" not in job["set-env-vars"] and "MODEL_COPY=0" in r.stdout
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", MEMORY="80Gi", CPU="20", MODEL_COPY="1")
    job = flags(find(commands(r.stdout), "gcloud", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    assert "MODEL_COPY_DIR=/tmp/models" in job["set-env-vars"]


def test_dry_run_eval_job_shards_over_tasks():
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", EVAL_TASKS="6", EVAL_PARALLELISM="2")
    assert r.returncode == 0, r.stderr
    f = flags(find(commands(r.stdout), "gcloud", "run", "jobs", "deploy", "gemma4-eval-shards-job"))
    assert f["tasks"] == "6" and f["parallelism"] == "2"
    assert f["set-env-vars"].startswith("JOB_MODE=eval-shard,GCS_MOUNT=/mnt/gcs,RUNS_DIR=/mnt/runs")
    assert f["gpu-type"] == "nvidia-rtx-pro-6000" and f["no-gpu-zonal-redundancy"] is True


def test_dry_run_all_prints_every_step_and_runs_nothing(fake_gcloud):
    r = deploy("--dry-run", "all", "eval", PROJECT_ID="p", HF_TOKEN=TOKEN, **gcloud_env(fake_gcloud))
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    for prefix in [("gcloud", "services", "enable"), ("gcloud", "artifacts", "repositories", "create"),
                   ("gcloud", "storage", "buckets", "create", "gs://p-gemma4-models"),
                   ("gcloud", "storage", "buckets", "create", "gs://p-gemma4-finetune"),
                   ("gcloud", "secrets", "create", "hf-token"), ("gcloud", "storage", "rsync"),
                   ("gcloud", "builds", "submit"), ("gcloud", "run", "jobs", "execute", "gemma4-finetuning-job"),
                   ("gcloud", "run", "jobs", "execute", "gemma4-eval-shards-job")]:
        find(cmds, *prefix)
    runs = flags(find(cmds, "gcloud", "storage", "buckets", "create", "gs://p-gemma4-finetune"))
    assert runs["enable-hierarchical-namespace"] is True and runs["uniform-bucket-level-access"] is True
    execute = flags(find(cmds, "gcloud", "run", "jobs", "execute", "gemma4-finetuning-job"))
    assert execute["region"] == "europe-west4" and "args" not in execute  # the job's own arguments
    ev = flags(find(cmds, "gcloud", "run", "jobs", "execute", "gemma4-eval-shards-job"))
    assert ev["tasks"] == "4" and ev["update-env-vars"].startswith("ADAPTER_RUN=")
    assert calls(fake_gcloud["log"]) == []  # dry run: nothing executed
    assert TOKEN not in r.stdout + r.stderr


def test_setup_least_privilege_roles():
    r = deploy("--dry-run", "setup", PROJECT_ID="p")
    bindings = {c[4]: flags(c)["role"] for c in commands(r.stdout)
                if c[:4] == ["gcloud", "storage", "buckets", "add-iam-policy-binding"]}
    assert bindings == {"gs://p-gemma4-models": "roles/storage.objectViewer",
                        "gs://p-gemma4-finetune": "roles/storage.objectUser"}
    assert "roles/storage.admin" not in r.stdout


def test_without_dry_run_it_runs_exactly_what_it_prints(fake_gcloud):
    r = deploy("setup", "deploy", "execute", PROJECT_ID="p", HF_TOKEN=TOKEN, **gcloud_env(fake_gcloud))
    assert r.returncode == 0, r.stderr
    recorded = calls(fake_gcloud["log"])
    assert [["gcloud", *c["argv"]] for c in recorded] == commands(r.stdout)
    # the token reached Secret Manager on standard input only, never a command line or the output
    secret = [c for c in recorded if c["argv"][:2] == ["secrets", "create"]]
    assert secret and secret[0]["stdin"] == TOKEN
    assert all(TOKEN not in " ".join(c["argv"]) for c in recorded)
    assert TOKEN not in r.stdout + r.stderr


def test_setup_twice_creates_once_and_retries_bindings_that_race_a_new_service_account(fake_gcloud):
    env = gcloud_env(fake_gcloud, FAKE_BINDING_FAILURES="2")
    first = deploy("setup", PROJECT_ID="p", HF_TOKEN=TOKEN, **env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("retrying") == 2  # two refused bindings, then it went through
    second = deploy("setup", PROJECT_ID="p", HF_TOKEN=TOKEN, **env)
    assert second.returncode == 0, second.stderr
    created = [c["argv"] for c in calls(fake_gcloud["log"]) if "create" in c["argv"]]
    assert sorted(" ".join(a[:3]) for a in created) == sorted(
        ["artifacts repositories create", "storage buckets create", "storage buckets create",
         "iam service-accounts create", "secrets create hf-token"])  # each once, over both runs
    assert "secret hf-token exists: kept" in second.stdout


def test_bindings_give_up_after_five_attempts(fake_gcloud):
    r = deploy("setup", PROJECT_ID="p", HF_SECRET="", **gcloud_env(fake_gcloud, FAKE_BINDING_FAILURES="99"))
    assert r.returncode == 2 and "gave up after 5 attempts" in r.stderr


def test_overrides_and_runner_args(fake_gcloud):
    r = deploy("--dry-run", "deploy", "execute", "--", "--model-id", "/mnt/gcs/m/", "-p", "max_steps", "10",
               PROJECT_ID="p", REGION="us-central1", CPU="20", MEMORY="80Gi", MAX_RETRIES="10",
               TASK_TIMEOUT="1h", HF_SECRET="", SERVICE_ACCOUNT="", IMAGE_TAG="v1")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    job = flags(find(cmds, "gcloud", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    assert (job["region"], job["cpu"], job["memory"], job["max-retries"], job["task-timeout"]) == \
        ("us-central1", "20", "80Gi", "10", "1h")
    assert "set-secrets" not in job and "service-account" not in job
    assert job["image"].endswith(":v1") and job["image"].startswith("us-central1-docker.pkg.dev/p/")
    assert job["args"] == "--model-id,/mnt/gcs/m/,-p,max_steps,10"
    assert flags(find(cmds, "gcloud", "run", "jobs", "execute", "gemma4-finetuning-job"))["args"] == \
        "--model-id,/mnt/gcs/m/,-p,max_steps,10"


def test_serving_deploys_vllm_on_the_gpu_from_the_merged_folder():
    r = deploy("--dry-run", "serve", PROJECT_ID="p", MERGED_DIR="merged/exec-7")
    assert r.returncode == 0, r.stderr
    svc = find(commands(r.stdout), "gcloud", "run", "deploy", "gemma4-serve")
    f = flags(svc)
    assert (f["gpu"], f["gpu-type"], f["no-cpu-throttling"], f["max-instances"]) == \
        ("1", "nvidia-rtx-pro-6000", True, "1")
    assert f["image"].startswith("vllm/vllm-openai:") and f["command"] == "vllm"
    assert f["args"].split(",")[:2] == ["serve", "/mnt/runs/merged/exec-7"]
    assert f["add-volume"] == "name=runs,type=cloud-storage,bucket=p-gemma4-finetune,readonly=true"
    assert f["no-allow-unauthenticated"] is True
    assert deploy("serve", PROJECT_ID="p", PATH="/nonexistent").returncode == 2  # no MERGED_DIR: refused


def test_status_logs_alert_teardown():
    r = deploy("--dry-run", "status", "logs", "alert", "teardown", PROJECT_ID="p", EXECUTION="gemma4-finetuning-job-x7",
               ALERT_CHANNEL="projects/p/notificationChannels/9")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    find(cmds, "gcloud", "run", "jobs", "executions", "describe", "gemma4-finetuning-job-x7")
    logs = find(cmds, "gcloud", "logging", "read")
    assert 'labels."run.googleapis.com/execution_name"="gemma4-finetuning-job-x7"' in logs[3]
    alert = flags(find(cmds, "gcloud", "monitoring", "policies", "create"))
    assert 'metric.labels.result="failed"' in alert["condition-filter"]
    assert alert["notification-channels"] == "projects/p/notificationChannels/9"
    for deleted in (("run", "jobs", "delete", "gemma4-finetuning-job"), ("run", "services", "delete", "gemma4-serve"),
                    ("artifacts", "repositories", "delete"), ("secrets", "delete"), ("iam", "service-accounts", "delete")):
        find(cmds, "gcloud", *deleted)
    assert not [c for c in cmds if c[:3] == ["gcloud", "storage", "rm"]]  # buckets only with DELETE_BUCKETS=1


@pytest.mark.parametrize("env, message", [
    ({"CPU": "8"}, "at least 20 CPU"),
    ({"MEMORY": "64Gi"}, "at least 80Gi"),
    ({"GPU_TYPE": "nvidia-h100"}, "GPU_TYPE must be"),
    ({"MAX_RETRIES": "many"}, "MAX_RETRIES must be"),
    ({"MAX_RETRIES": "11"}, "MAX_RETRIES must be between 0 and 10"),
    ({"TASK_TIMEOUT": "12 hours"}, "TASK_TIMEOUT must look like"),
    ({"MODEL_COPY": "yes"}, "MODEL_COPY must be"),
    ({"TRAIN_ARGS": "--model-id a,b"}, "contains a comma"),
])
def test_refuses_bad_configuration(env, message):
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", **env)
    assert r.returncode != 0 and message in r.stderr


def test_warns_when_the_gpu_is_not_listed_for_the_region():
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", REGION="europe-west1")
    assert r.returncode == 0 and "not listed for europe-west1" in r.stderr


def test_docker_builder_alternative():
    r = deploy("--dry-run", "build", PROJECT_ID="p", BUILDER="docker")
    cmds = commands(r.stdout)
    build = find(cmds, "env", "DOCKER_BUILDKIT=1", "docker", "build")
    assert build[build.index("-f") + 1].endswith("cloudrun/Dockerfile")
    find(cmds, "docker", "push")


# ------------------------------------------------------------------------------------ linters, image


def tool(name):
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not installed (pip install -r requirements.txt brings it: {name}-py)")
    return found


@pytest.mark.parametrize("script", ["entrypoint.sh", "deploy.sh"])
def test_shellcheck(script):
    r = subprocess.run([tool("shellcheck"), "-x", str(CLOUDRUN / script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint():
    r = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# Facts about images and indexes the Dockerfile relies on (checked 2026-12-01 against the images and PyTorch's
# package indexes; cloudrun/README.md): the users with uid >= 1000 each base image already has, and the torch builds an index has.
BASE_IMAGE_USERS = {  # image prefix -> {uid: user}
    "nvidia/cuda:": {1000: "ubuntu"},  # the CUDA images are Ubuntu 24.04 / 22.04 based
    "ubuntu:24.04": {1000: "ubuntu"},
    "python:3.12-slim": {},  # Debian: root and system users (uid < 1000) only
}
TORCH_BUILDS = {  # index -> {torch version: CUDA build}
    "https://pypi.org/simple": {"2.14.1": "cu130"},
    "https://download.pytorch.org/whl/cu130": {"2.14.1": "cu130"},
    "https://download.pytorch.org/whl/cu128": {},  # no builds after 2.11
}


def dockerfile_arg(text, name):
    return re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)[1]


def test_dockerfile_torch_comes_from_an_index_that_has_the_pinned_build():
    text = DOCKERFILE.read_text()
    pin = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE)[1]
    index = dockerfile_arg(text, "TORCH_INDEX_URL")
    assert pin in TORCH_BUILDS[index], f"{index} has no torch {pin}"
    assert TORCH_BUILDS[index][pin] == "cu130"  # Cloud Run's driver 580 runs CUDA 13.0; sm_120 is in the build
    assert "--index-url \"${TORCH_INDEX_URL}\"" in text


def test_dockerfile_user_does_not_collide_with_the_base_image_users():
    text = DOCKERFILE.read_text()
    base = dockerfile_arg(text, "PYTHON_IMAGE")
    users = next(v for k, v in BASE_IMAGE_USERS.items() if base.startswith(k))
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", text)[1])
    assert uid not in users, f"uid {uid} is already {users[uid]} in {base}"
    assert f"USER {uid}:{uid}" in text.splitlines()


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    copy_reqs = lines.index("COPY requirements.txt ./")
    copy_code = lines.index("COPY helpers/ helpers/")
    install = next(i for i, ln in enumerate(lines) if "pip install -r" in ln)
    assert copy_reqs < install < copy_code  # dependencies before code
    assert lines[-1] == 'ENTRYPOINT ["/app/cloudrun/entrypoint.sh"]'
    for variable in ("HOME=/home/app", "JUPYTER_RUNTIME_DIR=/tmp/jupyter/runtime", "IPYTHONDIR=/tmp/ipython"):
        assert variable in text  # writable for the non-root user: papermill's kernel writes there
    assert "chown -R app:app" in text and "/tmp/jupyter" in text.split("chown -R app:app", 1)[1].splitlines()[0]
    assert "google-cloud-cli" in text  # gcloud storage cp for the weights
    assert not re.search(r"^\s*(ENV|ARG)\b.*(HF_TOKEN|SECRET|PASSWORD)", text, re.MULTILINE)  # no secrets baked in
    assert (CLOUDRUN / "Dockerfile.dockerignore").exists()
    assert "cloudrun/Dockerfile" in (CLOUDRUN / "cloudbuild.yaml").read_text()


def test_dockerfile_requirement_filters_match_requirements_txt():
    """The Dockerfile's grep patterns pick torch/torchvision for the torch index and keep the runtime pins."""
    text = DOCKERFILE.read_text()
    torch_re = re.search(r"grep -E '([^']+)' requirements\.txt \| xargs pip install", text)[1]
    drop_re = re.search(r"grep -vE '([^']+)' requirements\.txt", text)[1]
    reqs = (REPO / "requirements.txt").read_text().splitlines()
    assert sorted(r.split("==")[0] for r in reqs if re.search(torch_re, r)) == ["torch", "torchvision"]
    kept = {r.split("==")[0] for r in reqs if r and not r.startswith("#") and not re.search(drop_re, r)}
    assert {"torch", "torchvision", "transformers", "peft", "bitsandbytes", "papermill", "ipykernel"} <= kept
    assert not kept & {"pytest", "ruff", "jupyterlab", "-e ."}


# ------------------------------------------------------------------------------------- entrypoint


STUB = r'''
import json, os, signal, sys, time
argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps({"argv": argv, "hf_token_in_env": bool(os.environ.get("HF_TOKEN"))}) + "\n")
out = argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else None
if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "argv.json"), "w") as fh:
        json.dump(argv, fh)
if os.environ.get("STUB_SLEEP"):
    def on_term(*_):
        open(os.environ["STUB_LOG"] + ".term", "w").write("SIGTERM")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    open(os.environ["STUB_LOG"] + ".ready", "w").write("ready")
    time.sleep(float(os.environ["STUB_SLEEP"]))
if os.environ.get("STUB_SHARD"):
    from helpers.run import shards
    params = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "-p"}
    index, count = int(params["shard_index"]), int(params["shard_count"])
    labels, preds = json.loads(os.environ["STUB_SHARD"])
    idx = shards.shard_indices(len(labels), index, count)
    shards.write_shard_metrics(os.path.join(out, shards.SHARD_METRICS_FILE), idx, [labels[i] for i in idx],
                               {"finetuned": [preds[i] for i in idx]}, sorted(set(labels)),
                               shard_index=index, shard_count=count, n_total=len(labels))
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
'''


@pytest.fixture()
def cloud(tmp_path):
    """A temporary folder standing in for the /mnt/gcs bucket mount, and a stub runner that records argv."""
    gcs = tmp_path / "gcs"
    gcs.mkdir()
    stub = tmp_path / "stub_runner.py"
    stub.write_text(STUB)
    log = tmp_path / "runner-calls.jsonl"

    def run(*args, env=None, wait=True, **kw):
        full = base_env(**{"GCS_MOUNT": gcs, "RUNNER_CMD": f"{sys.executable} {stub}",
                           "MERGE_CMD": f"{sys.executable} -m helpers.run.shards", "STUB_LOG": log,
                           "PYTHONPATH": REPO, **(env or {})})
        cmd = [BASH, str(ENTRYPOINT), *map(str, args)]
        if not wait:
            return subprocess.Popen(cmd, env=full, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, **kw)
        return subprocess.run(cmd, check=False, env=full, cwd=REPO, capture_output=True, text=True, timeout=120)

    def runner_calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return {"gcs": gcs, "run": run, "calls": runner_calls, "log": log}


def all_text_under(root):
    return "".join(p.read_text(errors="replace") for p in Path(root).rglob("*") if p.is_file())


ISSUE_ARGS = ["--model-id", "/mnt/gcs/gemma-4-31b-it/", "--train-size", "4000"]


def test_train_maps_cloud_run_env_to_runner_flags(cloud):
    env = {"CLOUD_RUN_EXECUTION": "gemma4-finetuning-job-x7k2p", "CLOUD_RUN_TASK_ATTEMPT": "0",
           "CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "1"}
    r = cloud["run"](*ISSUE_ARGS, env=env)
    assert r.returncode == 0, r.stderr
    run_dir = cloud["gcs"] / "runs" / "gemma4-finetuning-job-x7k2p"
    assert cloud["calls"]()[0]["argv"] == ["--output-dir", str(run_dir), *ISSUE_ARGS]
    assert "attempt=0" in (run_dir / "attempts.log").read_text()


def test_retry_reuses_the_same_run_folder_and_a_new_execution_gets_a_new_one(cloud):
    env = {"CLOUD_RUN_EXECUTION": "job-exec-1", "CLOUD_RUN_TASK_ATTEMPT": "0"}
    assert cloud["run"](*ISSUE_ARGS, env=env).returncode == 0
    r = cloud["run"](*ISSUE_ARGS, env={**env, "CLOUD_RUN_TASK_ATTEMPT": "1"})
    assert r.returncode == 0 and "resumes from its last checkpoint" in r.stderr
    assert cloud["run"](*ISSUE_ARGS, env={**env, "CLOUD_RUN_EXECUTION": "job-exec-2"}).returncode == 0
    dirs = [c["argv"][1] for c in cloud["calls"]()]
    assert dirs[0] == dirs[1] == str(cloud["gcs"] / "runs" / "job-exec-1")
    assert dirs[2] == str(cloud["gcs"] / "runs" / "job-exec-2")
    attempts = (cloud["gcs"] / "runs" / "job-exec-1" / "attempts.log").read_text().splitlines()
    assert [re.search(r"attempt=(\d+)", a)[1] for a in attempts] == ["0", "1"]


def test_hf_token_stays_in_the_environment(cloud):
    r = cloud["run"](*ISSUE_ARGS, env={"CLOUD_RUN_EXECUTION": "e1", "HF_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    assert cloud["calls"]()[0]["hf_token_in_env"] is True  # the runner (huggingface_hub) can read it
    assert "HF_TOKEN: set" in r.stderr
    assert TOKEN not in r.stdout + r.stderr
    assert TOKEN not in all_text_under(cloud["gcs"]) + cloud["log"].read_text()


@pytest.mark.parametrize("bad", [["-p", "hf_token", "abc"], ["--model-id", TOKEN], [f"--hf-token={TOKEN}"]])
def test_refuses_arguments_carrying_the_token(cloud, bad):
    r = cloud["run"](*bad, env={"CLOUD_RUN_EXECUTION": "e1", "HF_TOKEN": TOKEN})
    assert r.returncode == 2 and "refusing" in r.stderr
    assert TOKEN not in r.stdout + r.stderr
    assert cloud["calls"]() == []


def test_missing_mount_is_a_clear_error(cloud, tmp_path):
    r = cloud["run"](env={"CLOUD_RUN_EXECUTION": "e1", "GCS_MOUNT": tmp_path / "nope"})
    assert r.returncode == 2 and "bucket mount" in r.stderr and cloud["calls"]() == []


def test_runner_failure_is_the_task_failure(cloud):
    r = cloud["run"](env={"CLOUD_RUN_EXECUTION": "e1", "STUB_EXIT": "3"})
    assert r.returncode == 3


def test_output_dir_given_explicitly_is_respected(cloud, tmp_path):
    r = cloud["run"]("--output-dir", tmp_path / "mine", env={"CLOUD_RUN_EXECUTION": "e1"})
    assert r.returncode == 0
    assert cloud["calls"]()[0]["argv"] == ["--output-dir", str(tmp_path / "mine")]


@pytest.mark.parametrize("env, message", [
    ({"CLOUD_RUN_TASK_COUNT": "2", "CLOUD_RUN_TASK_INDEX": "1"}, "training runs as one task"),
    ({"CLOUD_RUN_TASK_ATTEMPT": "x"}, "CLOUD_RUN_TASK_ATTEMPT"),
    ({"CLOUD_RUN_TASK_INDEX": "4", "CLOUD_RUN_TASK_COUNT": "4"}, "bad task"),
    ({"JOB_MODE": "sweep"}, "JOB_MODE must be"),
    ({"RUN_ID": "../escape"}, "run id"),
])
def test_bad_environment_is_refused(cloud, env, message):
    r = cloud["run"](env={"CLOUD_RUN_EXECUTION": "e1", **env})
    assert r.returncode == 2 and message in r.stderr and cloud["calls"]() == []


def test_sigterm_is_forwarded_to_the_runner(cloud):
    proc = cloud["run"](env={"CLOUD_RUN_EXECUTION": "e1", "STUB_SLEEP": "60"}, wait=False)
    ready = Path(str(cloud["log"]) + ".ready")
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert Path(str(cloud["log"]) + ".term").read_text() == "SIGTERM"


def synthetic_predictions(n=50):
    labels = [f"class_{(i * 7) % 5}" for i in range(n)]
    preds = [lab if i % 3 else f"class_{i % 5}" for i, lab in enumerate(labels)]
    preds[4] = None
    return labels, preds


def make_training_run(gcs, name="train-exec-9"):
    from helpers.run.folder import COMPLETE_MARKER

    run = gcs / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / COMPLETE_MARKER).write_text("complete\n")
    (run / "train_result.json").write_text('{"train": {"global_step": 6}}')
    return run


def test_eval_refuses_an_adapter_without_its_completion_marker_and_recopies_a_half_copied_one(cloud):
    train_run = make_training_run(cloud["gcs"], "tr")
    env = {"JOB_MODE": "eval-shard", "CLOUD_RUN_EXECUTION": "ev", "ADAPTER_RUN": "tr"}
    (train_run / "adapter" / "COMPLETE").unlink()
    r = cloud["run"](env=env)
    assert r.returncode == 2 and "no complete adapter/" in r.stderr and cloud["calls"]() == []
    (train_run / "adapter" / "COMPLETE").write_text("complete\n")
    half = train_run / "eval-ev" / "task-00000" / "adapter"
    half.mkdir(parents=True)
    (half / "stale.bin").write_text("from a killed copy")  # no marker: copied again
    assert cloud["run"](env=env).returncode == 0
    assert sorted(p.name for p in half.iterdir()) == ["COMPLETE", "adapter_config.json"]


def test_the_model_is_copied_to_local_memory_with_gcloud_storage_cp(cloud, fake_gcloud, tmp_path):
    """MODEL_BUCKET + MODEL_COPY_DIR: the --model-id under the mount becomes a local copy (the fake gcloud
    'copies' by creating the folder with a config.json)."""
    local = tmp_path / "models"
    copying = fake_gcloud["log"].parent / "bin" / "gcloud"
    copying.write_text(copying.read_text() + "\nif argv[:2] == ['storage', 'cp']:\n"
                       "    dest = os.path.join(argv[-1], argv[-2].rstrip('/').rsplit('/', 1)[-1])\n"
                       "    os.makedirs(dest, exist_ok=True)\n"
                       "    open(os.path.join(dest, 'config.json'), 'w').write('{}')\n")
    env = {"CLOUD_RUN_EXECUTION": "e1", "MODEL_BUCKET": "models-b", "MODEL_COPY_DIR": local,
           "GCLOUD_CMD": fake_gcloud["gcloud"], "FAKE_GCLOUD_LOG": fake_gcloud["FAKE_GCLOUD_LOG"]}
    r = cloud["run"]("--model-id", f"{cloud['gcs']}/gemma-4-31b-it/", "-p", "lora_r", "64", env=env)
    assert r.returncode == 0, r.stderr
    copy = calls(fake_gcloud["log"])[0]["argv"]
    assert copy == ["storage", "cp", "--recursive", "gs://models-b/gemma-4-31b-it", f"{local}/"]
    assert unaccepted_flags(copy) == []
    assert cloud["calls"]()[0]["argv"][2:] == ["--model-id", f"{local}/gemma-4-31b-it", "-p", "lora_r", "64"]
    # a failed copy fails the task before the runner starts
    r = cloud["run"]("--model-id", f"{cloud['gcs']}/missing/", env={**env, "GCLOUD_CMD": "false"})
    assert r.returncode == 2 and "copying the model" in r.stderr and len(cloud["calls"]()) == 1


def test_a_runs_dir_outside_the_model_mount_must_be_mounted(cloud, tmp_path):
    r = cloud["run"](env={"CLOUD_RUN_EXECUTION": "e1", "RUNS_DIR": tmp_path / "not-mounted"})
    assert r.returncode == 2 and "bucket mount" in r.stderr and cloud["calls"]() == []
    (tmp_path / "runs-mount").mkdir()
    assert cloud["run"](env={"CLOUD_RUN_EXECUTION": "e1", "RUNS_DIR": tmp_path / "runs-mount"}).returncode == 0


def test_eval_shards_merge_into_the_unsharded_metrics(cloud):
    labels, preds = synthetic_predictions()
    train_run = make_training_run(cloud["gcs"])
    env = {"JOB_MODE": "eval-shard", "CLOUD_RUN_EXECUTION": "eval-exec-1", "CLOUD_RUN_TASK_COUNT": "3",
           "ADAPTER_RUN": "train-exec-9", "STUB_SHARD": json.dumps([labels, preds])}
    eval_dir = train_run / "eval-eval-exec-1"
    for index in (2, 0, 1):  # tasks finish in any order; the last one merges
        assert not (eval_dir / "metrics.json").exists()
        r = cloud["run"]("--model-id", "/mnt/gcs/gemma-4-31b-it/",
                         env={**env, "CLOUD_RUN_TASK_INDEX": str(index)})
        assert r.returncode == 0, r.stderr
        task_dir = eval_dir / f"task-{index:05d}"
        assert (task_dir / "adapter" / "adapter_config.json").exists()  # notebook 05 reads output_dir/adapter
        assert (task_dir / "train_result.json").exists()
    merged = json.loads((eval_dir / "metrics.json").read_text())
    assert merged["shard"]["count"] == 3 and merged["summary"]["n_eval"] == len(labels)
    assert merged["metrics"]["finetuned"]["constrained"] == shards.compute_metrics(labels, preds, sorted(set(labels)))
    assert merged["summary"]["finetuned_accuracy"] == merged["metrics"]["finetuned"]["constrained"]["accuracy"]
    argv = cloud["calls"]()[0]["argv"]
    assert argv == ["--output-dir", str(eval_dir / "task-00002"), "--notebook", "05_evaluation",
                    "-p", "shard_index", "2", "-p", "shard_count", "3", "--model-id", "/mnt/gcs/gemma-4-31b-it/"]
    # a retried task reuses its folder and its staged adapter
    r = cloud["run"](env={**env, "CLOUD_RUN_TASK_INDEX": "1", "CLOUD_RUN_TASK_ATTEMPT": "1"})
    assert r.returncode == 0 and cloud["calls"]()[-1]["argv"][1] == str(eval_dir / "task-00001")


def test_eval_needs_a_training_run_and_merge_mode_remerges(cloud):
    labels, preds = synthetic_predictions(20)
    train_run = make_training_run(cloud["gcs"], "tr")
    env = {"JOB_MODE": "eval-shard", "CLOUD_RUN_EXECUTION": "ev", "CLOUD_RUN_TASK_COUNT": "2",
           "STUB_SHARD": json.dumps([labels, preds])}
    r = cloud["run"](env={**env, "CLOUD_RUN_TASK_INDEX": "0"})
    assert r.returncode == 2 and "needs ADAPTER_RUN" in r.stderr
    r = cloud["run"](env={**env, "CLOUD_RUN_TASK_INDEX": "0", "ADAPTER_RUN": "no-such-run"})
    assert r.returncode == 2 and "no complete adapter/" in r.stderr
    for index in (0, 1):
        r = cloud["run"](env={**env, "ADAPTER_RUN": str(train_run), "CLOUD_RUN_TASK_INDEX": str(index)})
        assert r.returncode == 0, r.stderr
    metrics = train_run / "eval-ev" / "metrics.json"
    metrics.unlink()
    r = cloud["run"](env={"JOB_MODE": "merge", "EVAL_DIR": "tr/eval-ev", "EXPECT_SHARDS": "2"})
    assert r.returncode == 0, r.stderr
    assert json.loads(metrics.read_text())["summary"]["n_eval"] == 20


# ------------------------------------------------------------------- end to end with the real runner


def load_kill_resume():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "benchmarks" / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_entrypoint_end_to_end_killed_then_resumed_then_sharded(tmp_path):
    """The offline default through the real runner: attempt 0 is killed after its first checkpoint, attempt 1
    (same execution) resumes in the same run folder and finishes; then two evaluation tasks on its adapter
    merge into exactly the unsharded evaluation's metrics; HF_TOKEN appears in no output file."""
    pytest.importorskip("helpers.runner", reason="helpers.runner has not landed yet")
    kill_resume = load_kill_resume()
    gcs, hook = tmp_path / "gcs", tmp_path / "hook"
    gcs.mkdir()
    hook.mkdir()
    # the bucket mount's semantics (directory renames and locks refused), in the runner and its kernel
    simulated = kill_resume.run_env(hook, gcsfuse_root=gcs)
    env = base_env(GCS_MOUNT=gcs, CLOUD_RUN_EXECUTION="e2e-exec", CLOUD_RUN_TASK_ATTEMPT="0",
                   RUNNER_CMD=f"{sys.executable} -m helpers.runner", HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([simulated["PYTHONPATH"], str(REPO)]),
                   KILL_TEST_GCSFUSE_ROOT=simulated["KILL_TEST_GCSFUSE_ROOT"])
    args = ["-p", "train_size", "32", "-p", "eval_size", "16", "-p", "max_steps", "6", "-p", "save_steps", "2"]
    run_dir = gcs / "runs" / "e2e-exec"
    first = subprocess.Popen([BASH, str(ENTRYPOINT), *args], env=env, cwd=REPO, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        if any(run_dir.rglob("checkpoint-*/COMPLETE")):
            break
        time.sleep(0.1)
    if first.poll() is not None:
        pytest.fail(f"attempt 0 ended before it could be killed after a checkpoint:\n{first.communicate()[0]}")
    os.killpg(first.pid, signal.SIGKILL)  # what a maintenance event or an OOM does to a GPU task
    first.communicate()
    assert not (run_dir / "metrics.json").exists()
    checkpoints_before = sorted(p.parent.name for p in run_dir.rglob("checkpoint-*/COMPLETE"))

    second = subprocess.run([BASH, str(ENTRYPOINT), *args], check=False, env={**env, "CLOUD_RUN_TASK_ATTEMPT": "1"},
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    train = json.loads((run_dir / "train_result.json").read_text())["train"]
    assert checkpoints_before, "attempt 0 left no complete checkpoint"
    assert train["resumed_from"] and Path(train["resumed_from"]).name in checkpoints_before, out[-3000:]
    assert train["global_step"] == 6
    assert (run_dir / "metrics.json").exists() and (run_dir / "05_evaluation.ipynb").exists()
    assert len((run_dir / "attempts.log").read_text().splitlines()) == 2
    assert TOKEN not in all_text_under(gcs)
