"""cloudrun/: deploy.sh --dry-run prints the right gcloud commands (beta track where preview features need it, a
secret only where one exists); the entrypoint maps Cloud Run's environment to runner flags (stub runner), checks
that it can write, resumes on retry, shards evaluation, merges the adapter, and never leaks HF_TOKEN; the weight
staging script resumes; linters pass.

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
# read 2026-12-01 and 2026-12-08 through the docs search; `beta run jobs deploy` and `beta run deploy` also
# against gcloud 528's --help): a command of cloudrun/ or its README using a flag outside its row is an error a
# user would hit. `run jobs execute` has no GPU, CPU or memory flag.
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
    ("builds", "submit"): {"config", "substitutions", "tag", "region", "async", "timeout", "machine-type",
                           "disk-size", "service-account", "no-source", "ignore-file"},
    ("builds", "list"): {"filter", "limit", "ongoing", "page-size", "region", "sort-by", "uri"},
    ("builds", "get-default-service-account"): {"region"},
    ("projects", "add-iam-policy-binding"): {"member", "role", "condition", "condition-from-file"},
    ("secrets", "versions", "access"): {"secret", "location", "out-file"},
    ("run", "services", "describe"): {"region"},
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


# The beta reference lists the same flags for these two (the deploys that need the beta track: the RTX PRO 6000
# for jobs and the 12 h timeout are Preview, and gcloud 528 has --add-volume's mount-options key on beta only).
ACCEPTED_FLAGS[("beta", "run", "jobs", "deploy")] = ACCEPTED_FLAGS[("run", "jobs", "deploy")]
ACCEPTED_FLAGS[("beta", "run", "deploy")] = ACCEPTED_FLAGS[("run", "deploy")]
BETA_COMMANDS = {("run", "jobs", "deploy"), ("run", "deploy")}  # every deploy of a job or the service


def unaccepted_flags(argv):
    """The flags of one gcloud command (argv without 'gcloud') that its subcommand does not accept."""
    path = next((key for key in sorted(ACCEPTED_FLAGS, key=len, reverse=True) if tuple(argv[:len(key)]) == key), None)
    assert path is not None, f"gcloud {' '.join(argv[:4])}: a subcommand missing from ACCEPTED_FLAGS (add it from the reference)"
    used = {w[2:].split("=", 1)[0] for w in argv[len(path):] if w.startswith("--")}
    return sorted(used - ACCEPTED_FLAGS[path] - GLOBAL_FLAGS)


# A `gcloud` that records each call's argv (and standard input, for secrets) as JSON lines, and keeps state like
# the real one: `X describe NAME` succeeds only once `X create NAME` has run; the first FAKE_BINDING_FAILURES
# add-iam-policy-binding calls fail (a service account that has not propagated yet); `builds
# get-default-service-account` answers with a Compute Engine default account, as in a project made since 2024.
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
if words[:2] == ["builds", "get-default-service-account"]:
    print("123456789-compute@developer.gserviceaccount.com")
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


ALL_COMMANDS = ["setup", "stage", "copy-model", "build", "deploy", "execute", "merge", "eval", "status", "logs",
                "alert", "serve", "teardown"]
BUILD_SA = "123456789-compute@developer.gserviceaccount.com"  # what the fake's get-default-service-account says


def deploys(cmds):
    """The `gcloud beta run ... deploy` commands."""
    return [c for c in cmds if c[:3] == ["gcloud", "beta", "run"] and "deploy" in c[3:5]]


def test_every_gcloud_command_uses_only_flags_its_subcommand_accepts():
    r = deploy("--dry-run", *ALL_COMMANDS, "--", "--model-id", "/mnt/gcs/m/", PROJECT_ID="p", EXECUTION="e-1",
               DELETE_BUCKETS="1")
    assert r.returncode == 0, r.stderr
    gcloud_cmds = [c[1:] for c in commands(r.stdout) if c[0] == "gcloud"]
    assert len(gcloud_cmds) > 30
    assert {tuple(c[:4]) for c in gcloud_cmds} >= {
        ("beta", "run", "jobs", "deploy"), ("run", "jobs", "execute", "gemma4-finetuning-job"),
        ("beta", "run", "deploy", "gemma4-serve"), ("builds", "submit", "cloudrun", "--config=cloudrun/stage.yaml")}
    assert {" ".join(c): unaccepted_flags(c) for c in gcloud_cmds if unaccepted_flags(c)} == {}
    # every job and service deploy on the beta track, and nothing else
    assert {tuple(c[1:4]) for c in gcloud_cmds if c[0] == "beta"} == {("run", "jobs", "deploy"),
                                                                     ("run", "deploy", "gemma4-serve")}
    assert not [c for c in gcloud_cmds if tuple(c[:3]) in BETA_COMMANDS or tuple(c[:2]) in BETA_COMMANDS]


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
    assert len(cmds) >= 12
    assert not [c for c in cmds if tuple(c[:3]) in BETA_COMMANDS or tuple(c[:2]) in BETA_COMMANDS]  # beta there
    assert {" ".join(c): unaccepted_flags(c) for c in cmds if unaccepted_flags(c)} == {}


def test_the_readme_shows_the_commands_deploy_sh_prints():
    """The training job, the stage build and the service in cloudrun/README.md are deploy.sh's, word for word."""
    def words(argv):  # --project aside: the README leaves it out where gcloud's configured project serves
        return sorted(w for w in argv if not w.startswith("--project="))

    shown = {tuple(c[:5]): words(c) for c in readme_gcloud_commands()}
    r = deploy("--dry-run", "stage", "deploy", "serve", PROJECT_ID="my-project", ADAPTER_RUN="gemma4-finetuning-job-x7k2p")
    printed = {tuple(c[1:6]): words(c[1:]) for c in commands(r.stdout) if c[0] == "gcloud"}
    for key in [("beta", "run", "jobs", "deploy", "gemma4-finetuning-job"),
                ("beta", "run", "deploy", "gemma4-serve", "--image=vllm/vllm-openai:v0.32.0"),
                ("builds", "submit", "cloudrun", "--config=cloudrun/stage.yaml", "--machine-type=e2-highcpu-8")]:
        assert shown[key] == printed[key], key


def test_the_flag_check_catches_a_gpu_flag_on_jobs_execute():
    assert unaccepted_flags(["run", "jobs", "execute", "j", "--gpu=1", "--gpu-type=nvidia-rtx-pro-6000"]) == \
        ["gpu", "gpu-type"]
    assert unaccepted_flags(["beta", "run", "jobs", "deploy", "j", "--gpu=1", "--gpu-type=nvidia-rtx-pro-6000"]) == []


def dockerfile_uid():
    return int(re.search(r"^USER (\d+):\1$", DOCKERFILE.read_text(), re.MULTILINE)[1])


def test_dry_run_training_job_has_gpu_flags_mounts_region_retries_timeout_and_no_absent_secret():
    r = deploy("--dry-run", PROJECT_ID="my-proj")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    job = find(cmds, "gcloud", "beta", "run", "jobs", "deploy", "gemma4-finetuning-job")
    f = flags(job)
    assert f["gpu"] == "1" and f["gpu-type"] == "nvidia-rtx-pro-6000"
    assert f["no-gpu-zonal-redundancy"] is True
    assert int(f["cpu"]) >= 20 and f["memory"] == "120Gi"
    assert f["region"] == "europe-west4"
    assert f["max-retries"] == "3" and f["task-timeout"] == "12h" and f["tasks"] == "1"
    volumes = [w.split("=", 1)[1] for w in job if w.startswith("--add-volume=")]
    mounts = [w.split("=", 1)[1] for w in job if w.startswith("--add-volume-mount=")]
    # the model read-only; the runs with gcsfuse's rename-dir-limit (directory renames on a flat bucket); both
    # owned by the image's user, so that it can write (gcsfuse's --uid/--gid; ';' separates gcsfuse flags)
    uid = dockerfile_uid()
    assert volumes == [f"name=models,type=cloud-storage,bucket=my-proj-gemma4-models,readonly=true,mount-options=uid={uid};gid={uid}",
                       f"name=runs,type=cloud-storage,bucket=my-proj-gemma4-finetune,mount-options=uid={uid};gid={uid};rename-dir-limit=200"]
    assert mounts == ["volume=models,mount-path=/mnt/gcs", "volume=runs,mount-path=/mnt/runs"]
    assert "set-secrets" not in f  # a dry run takes the secret as absent, and says so
    assert "no secret hf-token (a dry run takes it as absent)" in r.stdout
    find(cmds, "gcloud", "secrets", "describe", "hf-token")  # checked at deploy time
    assert "gcloud beta run: the API takes preview features only from the beta track" in r.stdout
    assert "the nvidia-rtx-pro-6000 for jobs" in r.stdout and "a GPU task timeout of 12h" in r.stdout
    assert f["image"] == "europe-west4-docker.pkg.dev/my-proj/gemma4-finetune/gemma4-finetune:latest"
    assert f["set-env-vars"] == ("JOB_MODE=train,GCS_MOUNT=/mnt/gcs,RUNS_DIR=/mnt/runs,"
                                 "MODEL_BUCKET=my-proj-gemma4-models,MODEL_COPY_DIR=/tmp/models,"
                                 "MERGE_AFTER_TRAINING=1,MERGE_CHECK_ROWS=100")
    assert f["args"].startswith("--model-id,/mnt/gcs/gemma-4-31b-it/,--train-size,4000,")
    assert f["service-account"] == "gemma4-finetune-job@my-proj.iam.gserviceaccount.com"
    build = find(cmds, "gcloud", "builds", "submit", ".")
    assert flags(build)["config"].endswith("cloudrun/cloudbuild.yaml")
    assert flags(build)["substitutions"] == f"_IMAGE={f['image']},_CACHE_IMAGE={f['image']}"


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
    job = flags(find(commands(r.stdout), "gcloud", "beta", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    model_id, train_size, params = runner_parameters(job["args"])
    assert (model_id, train_size) == ("/mnt/gcs/gemma-4-31b-it/", 4000)  # the seed's flags
    config = RunConfig.from_params({**params, "model_id": model_id, "train_size": train_size})  # valid values
    assert (config.dataset, config.quantization) == ("timm/oxford-iiit-pet", "4bit")
    assert fits("31B", 96, quantization=config.quantization, lora_r=config.lora_r, micro_batch=config.batch_size,
                gradient_checkpointing=config.gradient_checkpointing, optimizer=config.optimizer,
                quantize_towers=config.quantize_towers)
    assert config.batch_size * config.gradient_accumulation == 16  # the seed's global batch
    ev = flags(find(commands(r.stdout), "gcloud", "beta", "run", "jobs", "deploy", "gemma4-eval-shards-job"))
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
    job = flags(find(commands(r.stdout), "gcloud", "beta", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    assert "MODEL_COPY_DIR" not in job["set-env-vars"] and "MODEL_COPY=0" in r.stdout
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", MEMORY="80Gi", CPU="20", MODEL_COPY="1")
    job = flags(find(commands(r.stdout), "gcloud", "beta", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    assert "MODEL_COPY_DIR=/tmp/models" in job["set-env-vars"]


def test_dry_run_eval_job_shards_over_tasks():
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", EVAL_TASKS="6", EVAL_PARALLELISM="2")
    assert r.returncode == 0, r.stderr
    f = flags(find(commands(r.stdout), "gcloud", "beta", "run", "jobs", "deploy", "gemma4-eval-shards-job"))
    assert f["tasks"] == "6" and f["parallelism"] == "2"
    assert f["set-env-vars"] == "JOB_MODE=eval-shard,GCS_MOUNT=/mnt/gcs,RUNS_DIR=/mnt/runs,MODEL_BUCKET=p-gemma4-models,MODEL_COPY_DIR=/tmp/models"
    assert f["gpu-type"] == "nvidia-rtx-pro-6000" and f["no-gpu-zonal-redundancy"] is True


def test_dry_run_all_prints_every_step_and_runs_nothing(fake_gcloud):
    r = deploy("--dry-run", "all", "eval", "merge", "serve", PROJECT_ID="p", HF_TOKEN=TOKEN, **gcloud_env(fake_gcloud))
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    for prefix in [("gcloud", "services", "enable"), ("gcloud", "artifacts", "repositories", "create"),
                   ("gcloud", "storage", "buckets", "create", "gs://p-gemma4-models"),
                   ("gcloud", "storage", "buckets", "create", "gs://p-gemma4-finetune"),
                   ("gcloud", "secrets", "create", "hf-token"), ("gcloud", "builds", "get-default-service-account"),
                   ("gcloud", "builds", "submit", "cloudrun"), ("gcloud", "builds", "submit", "."),
                   ("gcloud", "run", "jobs", "execute", "gemma4-eval-shards-job"),
                   ("gcloud", "beta", "run", "deploy", "gemma4-serve")]:
        find(cmds, *prefix)
    assert not [c for c in cmds if c[:3] == ["gcloud", "storage", "rsync"]]  # `all` stages in the cloud
    runs = flags(find(cmds, "gcloud", "storage", "buckets", "create", "gs://p-gemma4-finetune"))
    assert runs["enable-hierarchical-namespace"] is True and runs["uniform-bucket-level-access"] is True
    train, merge = [c for c in cmds if c[:5] == ["gcloud", "run", "jobs", "execute", "gemma4-finetuning-job"]]
    assert flags(train)["region"] == "europe-west4" and "args" not in flags(train)  # the job's own arguments
    assert flags(merge)["update-env-vars"] == "JOB_MODE=export,ADAPTER_RUN=TRAINING_EXECUTION_ID,MERGE_CHECK_ROWS=100"
    ev = flags(find(cmds, "gcloud", "run", "jobs", "execute", "gemma4-eval-shards-job"))
    assert ev["tasks"] == "4" and ev["update-env-vars"].startswith("ADAPTER_RUN=")
    assert calls(fake_gcloud["log"]) == []  # dry run: nothing executed
    assert TOKEN not in r.stdout + r.stderr


def test_setup_least_privilege_roles():
    r = deploy("--dry-run", "setup", PROJECT_ID="p")
    bindings = {(c[4], flags(c)["member"]): flags(c)["role"] for c in commands(r.stdout)
                if c[:4] == ["gcloud", "storage", "buckets", "add-iam-policy-binding"]}
    job, build = "serviceAccount:gemma4-finetune-job@p.iam.gserviceaccount.com", "serviceAccount:CLOUD_BUILD_SERVICE_ACCOUNT"
    assert bindings == {("gs://p-gemma4-models", job): "roles/storage.objectViewer",
                        ("gs://p-gemma4-finetune", job): "roles/storage.objectUser",
                        ("gs://p-gemma4-models", build): "roles/storage.objectUser"}  # stage writes the weights
    assert "roles/storage.admin" not in r.stdout


def test_setup_grants_cloud_builds_default_account_what_builds_need(fake_gcloud):
    """New projects' default build account (the Compute Engine one) may lack Artifact Registry, logging and source
    access: setup asks which account builds run as and grants it the Cloud Build Service Account role."""
    r = deploy("setup", PROJECT_ID="p", HF_TOKEN=TOKEN, **gcloud_env(fake_gcloud))
    assert r.returncode == 0, r.stderr
    recorded = [c["argv"] for c in calls(fake_gcloud["log"])]
    member = f"--member=serviceAccount:{BUILD_SA}"
    project = [a for a in recorded if a[:2] == ["projects", "add-iam-policy-binding"]]
    assert project == [["projects", "add-iam-policy-binding", "p", "--role=roles/cloudbuild.builds.builder",
                        "--condition=None", member]]
    assert ["secrets", "add-iam-policy-binding", "hf-token", "--role=roles/secretmanager.secretAccessor",
            "--project=p", member] in recorded  # stage reads the token
    assert f"Cloud Build runs as {BUILD_SA}" in r.stdout


def test_without_dry_run_it_runs_exactly_what_it_prints(fake_gcloud):
    r = deploy("setup", "stage", "deploy", "execute", PROJECT_ID="p", HF_TOKEN=TOKEN, **gcloud_env(fake_gcloud))
    assert r.returncode == 0, r.stderr
    recorded = calls(fake_gcloud["log"])
    assert [["gcloud", *c["argv"]] for c in recorded] == commands(r.stdout)
    # the token reached Secret Manager on standard input only, never a command line or the output
    secret = [c for c in recorded if c["argv"][:2] == ["secrets", "create"]]
    assert secret and secret[0]["stdin"] == TOKEN
    assert all(TOKEN not in " ".join(c["argv"]) for c in recorded)
    assert TOKEN not in r.stdout + r.stderr


def test_the_token_is_optional_end_to_end(fake_gcloud):
    """No HF_TOKEN at setup: no secret is created, and no job, stage or service refers to one; once a token is
    stored, deploy and stage find the secret and pass it."""
    env = gcloud_env(fake_gcloud)
    r = deploy("setup", "stage", "deploy", "serve", PROJECT_ID="p", ADAPTER_RUN="e1", **env)
    assert r.returncode == 0, r.stderr
    assert "HF_TOKEN is not set: no secret" in r.stdout and "no secret hf-token:" in r.stdout
    recorded = [c["argv"] for c in calls(fake_gcloud["log"])]
    assert not [a for a in recorded if a[0] == "secrets" and a[1] in ("create", "add-iam-policy-binding")]
    assert not [a for a in recorded if any(w.startswith("--set-secrets") or "_HF_SECRET" in w for w in a)]
    r = deploy("setup", "stage", "deploy", PROJECT_ID="p", HF_TOKEN=TOKEN, **env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    for job in deploys(cmds):
        assert flags(job)["set-secrets"] == "HF_TOKEN=hf-token:latest"
    stage = flags(find(cmds, "gcloud", "builds", "submit", "cloudrun"))
    assert stage["substitutions"].endswith(",_HF_SECRET=hf-token")


def test_a_hub_model_without_a_token_is_warned_about():
    r = deploy("--dry-run", "deploy", "--", "--model-id", "google/gemma-4-E4B-it", PROJECT_ID="p")
    assert r.returncode == 0 and "comes from the hub: without a token a gated model is refused" in r.stderr
    r = deploy("--dry-run", "deploy", PROJECT_ID="p")
    assert "comes from the hub" not in r.stderr  # the default job reads the bucket


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
    # both runs ask for the same six bindings (three for the job's account, three for Cloud Build's): adding a
    # binding that is there changes nothing
    bindings = [" ".join(c["argv"]) for c in calls(fake_gcloud["log"]) if "add-iam-policy-binding" in c["argv"]]
    assert len(set(bindings)) == 6 and len(bindings) == 2 * 6 + 2  # + the two refused attempts


def test_bindings_give_up_after_five_attempts(fake_gcloud):
    r = deploy("setup", PROJECT_ID="p", HF_SECRET="", **gcloud_env(fake_gcloud, FAKE_BINDING_FAILURES="99"))
    assert r.returncode == 2 and "gave up after 5 attempts" in r.stderr


def test_overrides_and_runner_args(fake_gcloud):
    r = deploy("--dry-run", "deploy", "execute", "--", "--model-id", "/mnt/gcs/m/", "-p", "max_steps", "10",
               PROJECT_ID="p", REGION="us-central1", CPU="20", MEMORY="80Gi", MAX_RETRIES="10",
               TASK_TIMEOUT="1h", HF_SECRET="", SERVICE_ACCOUNT="", IMAGE_TAG="v1", MERGE="0")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    job = flags(find(cmds, "gcloud", "beta", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    assert (job["region"], job["cpu"], job["memory"], job["max-retries"], job["task-timeout"]) == \
        ("us-central1", "20", "80Gi", "10", "1h")
    assert "set-secrets" not in job and "service-account" not in job and "MERGE" not in job["set-env-vars"]
    assert not [c for c in cmds if c[:3] == ["gcloud", "secrets", "describe"]]  # HF_SECRET= : never looked up
    assert "a GPU task timeout" not in r.stdout  # 1 h is not the preview
    assert job["image"].endswith(":v1") and job["image"].startswith("us-central1-docker.pkg.dev/p/")
    assert job["args"] == "--model-id,/mnt/gcs/m/,-p,max_steps,10"
    assert flags(find(cmds, "gcloud", "run", "jobs", "execute", "gemma4-finetuning-job"))["args"] == \
        "--model-id,/mnt/gcs/m/,-p,max_steps,10"


def test_stage_copies_the_hub_model_on_a_cloud_build_worker():
    import yaml

    r = deploy("--dry-run", "stage", PROJECT_ID="p", HF_MODEL="google/gemma-4-E4B-it", MODEL_DIR="gemma-4-e4b-it")
    assert r.returncode == 0, r.stderr
    stage = find(commands(r.stdout), "gcloud", "builds", "submit", "cloudrun")
    f = flags(stage)
    assert (f["config"], f["machine-type"]) == ("cloudrun/stage.yaml", "e2-highcpu-8")
    assert f["substitutions"] == "_HF_MODEL=google/gemma-4-E4B-it,_HF_REVISION=main,_DEST=gs://p-gemma4-models/gemma-4-e4b-it"
    assert "rerun to resume" in r.stdout
    config = yaml.safe_load((CLOUDRUN / "stage.yaml").read_text())
    used = set(re.findall(r"\$\{(_[A-Z_]+)\}", (CLOUDRUN / "stage.yaml").read_text()))
    given = {kv.split("=")[0] for kv in (f["substitutions"] + ",_HF_SECRET=x").split(",")}
    assert used == given and set(config["substitutions"]) <= used  # every substitution given or defaulted
    token, copy = config["steps"]
    assert "HF_TOKEN_PATH=/workspace/.hf_token" in copy["env"] and "stage_weights.py" in copy["args"][1]
    access = shlex.split(re.search(r"gcloud (secrets versions access[^>]*)>", token["args"][1])[1])
    assert unaccepted_flags(access) == []
    assert deploy("--dry-run", "stage", PROJECT_ID="p", STAGE_MACHINE="n2-standard-8").returncode == 2


def load_stage_weights():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_weights", CLOUDRUN / "stage_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_staging_resumes_and_copies_config_json_last(tmp_path):
    stage = load_stage_weights()
    hub = {"config.json": 2, "model-00001-of-00002.safetensors": 5, "model-00002-of-00002.safetensors": 7,
           "tokenizer.json": 3}
    bucket = {}

    def download(name):
        path = tmp_path / name
        path.write_bytes(b"x" * hub[name])
        return path

    def upload(path, name, stop_at=None):
        if name == stop_at:  # the worker stops mid-upload: an unfinished upload leaves no object
            raise KeyboardInterrupt
        bucket[name] = path.stat().st_size

    copied = []
    with pytest.raises(KeyboardInterrupt):
        stage.copy_all(hub, {}, download, lambda p, n: upload(p, n, "model-00002-of-00002.safetensors"), copied.append)
    assert bucket == {"model-00001-of-00002.safetensors": 5}  # and no config.json: not taken for a whole folder
    bucket["tokenizer.json"] = 1  # another revision's file: copied again
    names = stage.copy_all(hub, dict(bucket), download, upload, copied.append)
    assert names == ["model-00002-of-00002.safetensors", "tokenizer.json", "config.json"]  # the rest, config last
    assert bucket == hub and not list(tmp_path.iterdir())  # each file left the disk once uploaded
    assert stage.copy_all(hub, dict(bucket), download, upload, copied.append) == []  # nothing left to do
    assert stage.split_gs("gs://b/some/folder/") == ("b", "some/folder")
    with pytest.raises(ValueError):
        stage.split_gs("gs://bucket-only")


def test_build_reuses_the_last_image_as_layer_cache():
    import yaml

    steps = yaml.safe_load((CLOUDRUN / "cloudbuild.yaml").read_text())["steps"]
    args = steps[-1]["args"]
    assert args[args.index("--cache-from") + 1] == "${_CACHE_IMAGE}"
    assert args[args.index("--build-arg") + 1] == "BUILDKIT_INLINE_CACHE=1"  # the image carries its cache
    r = deploy("--dry-run", "build", PROJECT_ID="p", CACHE_IMAGE="r/x:previous")
    assert flags(find(commands(r.stdout), "gcloud", "builds", "submit", "."))["substitutions"].endswith(
        ",_CACHE_IMAGE=r/x:previous")


def test_serving_starts_vllm_from_the_merged_folder_within_the_probe_window():
    r = deploy("--dry-run", "serve", PROJECT_ID="p", ADAPTER_RUN="exec-7")
    assert r.returncode == 0, r.stderr
    svc = find(commands(r.stdout), "gcloud", "beta", "run", "deploy", "gemma4-serve")
    f = flags(svc)
    assert (f["gpu"], f["gpu-type"], f["no-cpu-throttling"], f["max-instances"]) == \
        ("1", "nvidia-rtx-pro-6000", True, "1")
    image, tag = f["image"].split(":")
    assert image == "vllm/vllm-openai" and tuple(map(int, tag.lstrip("v").split("."))) >= (0, 19, 0)  # Gemma 4
    assert f["command"] == "vllm" and "add-volume" not in f  # the streamer reads gs:// itself
    args = f["args"].split(",")
    assert args[:3] == ["serve", "gs://p-gemma4-finetune/runs/exec-7/merged", "--load-format=runai_streamer"]
    assert "--chat-template-content-format=openai" in args and "--quantization=fp8" not in args
    probe = dict(kv.split("=") for kv in f["startup-probe"].split(","))
    assert (probe["httpGet.path"], probe["httpGet.port"]) == ("/health", "8000")
    delay, period, failures = (int(probe[k]) for k in ("initialDelaySeconds", "periodSeconds", "failureThreshold"))
    assert delay <= 240 and period <= 240 and failures * period <= 1800  # Cloud Run's limits (GPU)
    assert delay + failures * period == 2040 and "allows 2040 s" in r.stdout
    assert f["no-allow-unauthenticated"] is True
    assert deploy("serve", PROJECT_ID="p", PATH="/nonexistent").returncode == 2  # no ADAPTER_RUN: refused
    r = deploy("--dry-run", "serve", PROJECT_ID="p", MERGED_DIR="merged/x", SERVE_LOAD="mount", SERVE_FP8="1")
    f = flags(find(commands(r.stdout), "gcloud", "beta", "run", "deploy", "gemma4-serve"))
    assert f["args"].split(",")[:4] == ["serve", "/mnt/runs/merged/x", "--quantization=fp8", "--kv-cache-dtype=fp8"]
    assert f["add-volume"] == "name=runs,type=cloud-storage,bucket=p-gemma4-finetune,readonly=true"


def test_status_logs_alert_teardown():
    r = deploy("--dry-run", "status", "logs", "alert", "teardown", PROJECT_ID="p", EXECUTION="gemma4-finetuning-job-x7",
               ALERT_CHANNEL="projects/p/notificationChannels/9")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    find(cmds, "gcloud", "run", "jobs", "executions", "describe", "gemma4-finetuning-job-x7")
    find(cmds, "gcloud", "builds", "list")
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
    ({"STARTUP_DELAY": "300"}, "at most 240"),
    ({"STARTUP_FAILURES": "61"}, "at most 1800 s"),
    ({"SERVE_LOAD": "disk"}, "SERVE_LOAD must be"),
    ({"MERGE": "yes"}, "MERGE and SERVE_FP8 must be 0 or 1"),
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
    assert build[build.index("--cache-from") + 1] == build[build.index("-t") + 1]  # the last push is the cache
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


def test_a_first_write_to_the_output_mount_is_checked_before_anything_loads(cloud):
    """A mount this user cannot write (gcsfuse owns files as its own uid unless told otherwise) fails in seconds
    with a message that names the fix, before the weights are copied or loaded."""
    r = cloud["run"]("--model-id", "/mnt/gcs/m/", env={"CLOUD_RUN_EXECUTION": "e1", "RUNS_DIR": "/proc/self"})
    assert r.returncode == 2 and cloud["calls"]() == []
    assert "cannot write to /proc/self as uid" in r.stderr and "mount-options uid=" in r.stderr
    assert "roles/storage.objectUser" in r.stderr
    r = cloud["run"](env={"CLOUD_RUN_EXECUTION": "e2"})  # a writable mount: no trace of the check is left
    assert r.returncode == 0 and not list((cloud["gcs"] / "runs").glob(".write-check-*"))


EXPORT_STUB = r"""
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["EXPORT_LOG"], "a") as fh:
    fh.write(json.dumps(argv) + "\n")
merged = argv[argv.index("--merged") + 1]
if os.path.isdir(merged) and os.listdir(merged):
    sys.exit(9)  # helpers.export refuses a non-empty folder without export.json
os.makedirs(merged, exist_ok=True)
open(os.path.join(merged, "model.safetensors"), "w").write("weights")
if os.environ.get("EXPORT_KILLED"):
    sys.exit(137)  # killed before export.json
open(os.path.join(merged, "export.json"), "w").write(json.dumps({"check": {"agreement": 1.0}}))
"""


@pytest.fixture()
def exporter(cloud, tmp_path):
    """A stub `python -m helpers.export` that records its arguments and writes a merged folder."""
    stub = tmp_path / "export_stub.py"
    stub.write_text(EXPORT_STUB)
    log = tmp_path / "export-calls.jsonl"

    def export_calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return {"env": {"EXPORT_CMD": f"{sys.executable} {stub}", "EXPORT_LOG": log}, "calls": export_calls}


def test_training_merges_the_adapter_in_the_same_task_when_asked(cloud, exporter):
    env = {"CLOUD_RUN_EXECUTION": "e1", "MERGE_AFTER_TRAINING": "1", **exporter["env"]}
    r = cloud["run"](*ISSUE_ARGS, env=env)
    assert r.returncode == 0, r.stderr
    run_dir = cloud["gcs"] / "runs" / "e1"
    assert exporter["calls"]() == [["--run", str(run_dir), "--merged", str(run_dir / "merged"), "--check-size", "100"]]
    assert json.loads((run_dir / "merged" / "export.json").read_text())["check"]["agreement"] == 1.0
    r = cloud["run"](env={**env, "CLOUD_RUN_EXECUTION": "e2", "STUB_EXIT": "3"})  # training failed: no merge
    assert r.returncode == 3 and len(exporter["calls"]()) == 1
    r = cloud["run"](*ISSUE_ARGS, env={"CLOUD_RUN_EXECUTION": "e3", **exporter["env"]})  # not asked: no merge
    assert r.returncode == 0 and len(exporter["calls"]()) == 1


def test_export_mode_merges_a_finished_run_and_redoes_a_killed_merge(cloud, exporter, tmp_path):
    run_dir = make_training_run(cloud["gcs"], "tr")
    copy_dir = tmp_path / "models"
    (copy_dir / "gemma-4-31b-it").mkdir(parents=True)
    (copy_dir / "gemma-4-31b-it" / "model.safetensors").write_text("the in-memory copy")
    (cloud["gcs"] / "gemma-4-31b-it").mkdir()
    args = ["--model-id", f"{cloud['gcs']}/gemma-4-31b-it/", "-p", "lora_r", "64"]  # the job's own arguments
    env = {"JOB_MODE": "export", "ADAPTER_RUN": "tr", "CLOUD_RUN_EXECUTION": "x1", "MODEL_BUCKET": "models-b",
           "MODEL_COPY_DIR": copy_dir, "MERGE_CHECK_ROWS": "20", **exporter["env"]}
    r = cloud["run"](*args, env={**env, "EXPORT_KILLED": "1"})
    assert r.returncode == 137 and not (run_dir / "merged" / "export.json").exists()
    r = cloud["run"](*args, env=env)  # the half-written folder is removed, then merged again
    assert r.returncode == 0, r.stderr
    assert exporter["calls"]()[-1] == ["--run", str(run_dir), "--merged", str(run_dir / "merged"), "--check-size", "20"]
    assert (run_dir / "merged" / "export.json").exists()
    # the base is read through the mount at the path the manifest recorded: the copy gave way to a link
    link = copy_dir / "gemma-4-31b-it"
    assert link.is_symlink() and link.resolve() == (cloud["gcs"] / "gemma-4-31b-it").resolve()
    assert cloud["calls"]() == []  # the runner never ran, and no copy was made
    r = cloud["run"](*args, env=env)
    assert r.returncode == 0 and "already merged" in r.stderr and len(exporter["calls"]()) == 2
    r = cloud["run"](*args, env={**env, "ADAPTER_RUN": "other"})
    assert r.returncode == 2 and "no complete adapter/" in r.stderr
    r = cloud["run"](*args, env={k: v for k, v in env.items() if k != "ADAPTER_RUN"})
    assert r.returncode == 2 and "export mode needs ADAPTER_RUN" in r.stderr


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
