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

from helpers import shards

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


@pytest.fixture()
def fake_gcloud(tmp_path):
    """A `gcloud` that records each call's argv (and standard input, for secrets) as JSON lines."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud-calls.jsonl"
    script = bindir / "gcloud"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "stdin = sys.stdin.read() if '--data-file=-' in sys.argv else None\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps({'argv': sys.argv[1:], 'stdin': stdin}) + '\\n')\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "log": log}


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_dry_run_training_job_has_gpu_flags_mount_secret_region_retries_timeout():
    r = deploy("--dry-run", PROJECT_ID="my-proj")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    job = find(cmds, "gcloud", "beta", "run", "jobs", "deploy", "gemma4-finetuning-job")
    f = flags(job)
    assert f["gpu"] == "1" and f["gpu-type"] == "nvidia-rtx-pro-6000"
    assert f["no-gpu-zonal-redundancy"] is True
    assert int(f["cpu"]) >= 20 and f["memory"] == "80Gi"  # the documented minimum for this GPU
    assert f["region"] == "europe-west4"
    assert f["max-retries"] == "3" and f["task-timeout"] == "12h" and f["tasks"] == "1"
    assert f["add-volume"] == "name=gcs,type=cloud-storage,bucket=my-proj-gemma4-finetune"
    assert f["add-volume-mount"] == "volume=gcs,mount-path=/mnt/gcs"
    assert f["set-secrets"] == "HF_TOKEN=hf-token:latest"
    assert f["image"] == "europe-west4-docker.pkg.dev/my-proj/gemma4-finetune/gemma4-finetune:latest"
    assert f["set-env-vars"] == "JOB_MODE=train,GCS_MOUNT=/mnt/gcs"
    assert f["args"] == "--model-id,/mnt/gcs/gemma-4-31b-it/,--train-size,4000"
    assert f["service-account"] == "gemma4-finetune-job@my-proj.iam.gserviceaccount.com"
    build = find(cmds, "gcloud", "builds", "submit")
    assert flags(build)["config"].endswith("cloudrun/cloudbuild.yaml")
    assert flags(build)["substitutions"] == f"_IMAGE={f['image']}"


def test_dry_run_eval_job_shards_over_tasks():
    r = deploy("--dry-run", "deploy", PROJECT_ID="p", EVAL_TASKS="6", EVAL_PARALLELISM="2")
    assert r.returncode == 0, r.stderr
    f = flags(find(commands(r.stdout), "gcloud", "beta", "run", "jobs", "deploy", "gemma4-eval-shards-job"))
    assert f["tasks"] == "6" and f["parallelism"] == "2"
    assert f["set-env-vars"] == "JOB_MODE=eval-shard,GCS_MOUNT=/mnt/gcs"
    assert f["gpu-type"] == "nvidia-rtx-pro-6000" and f["no-gpu-zonal-redundancy"] is True
    assert f["add-volume-mount"] == "volume=gcs,mount-path=/mnt/gcs"


def test_dry_run_all_prints_every_step_and_runs_nothing(fake_gcloud):
    r = deploy("--dry-run", "all", PROJECT_ID="p", HF_TOKEN=TOKEN, PATH=fake_gcloud["PATH"])
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    for prefix in [("gcloud", "services", "enable"), ("gcloud", "artifacts", "repositories", "create"),
                   ("gcloud", "storage", "buckets", "create"), ("gcloud", "secrets", "create", "hf-token"),
                   ("gcloud", "storage", "rsync"), ("gcloud", "builds", "submit"),
                   ("gcloud", "beta", "run", "jobs", "execute", "gemma4-finetuning-job"),
                   ("gcloud", "beta", "run", "jobs", "execute", "gemma4-eval-shards-job")]:
        find(cmds, *prefix)
    execute = flags(find(cmds, "gcloud", "beta", "run", "jobs", "execute", "gemma4-finetuning-job"))
    # the issue's command, less --gpu/--gpu-type: `jobs execute` has no such flags (they belong to the job)
    assert execute["region"] == "europe-west4"
    assert execute["args"] == "--model-id,/mnt/gcs/gemma-4-31b-it/,--train-size,4000"
    assert "gpu" not in execute and "gpu-type" not in execute
    ev = flags(find(cmds, "gcloud", "beta", "run", "jobs", "execute", "gemma4-eval-shards-job"))
    assert ev["tasks"] == "4" and ev["update-env-vars"].startswith("ADAPTER_RUN=")
    assert calls(fake_gcloud["log"]) == []  # dry run: nothing executed
    assert TOKEN not in r.stdout + r.stderr


def test_without_dry_run_it_runs_exactly_what_it_prints(fake_gcloud):
    r = deploy("setup", "deploy", "execute", PROJECT_ID="p", HF_TOKEN=TOKEN, PATH=fake_gcloud["PATH"])
    assert r.returncode == 0, r.stderr
    recorded = calls(fake_gcloud["log"])
    assert [["gcloud", *c["argv"]] for c in recorded] == commands(r.stdout)
    # the token reached Secret Manager on standard input only, never a command line or the output
    secret = [c for c in recorded if c["argv"][:2] == ["secrets", "create"]]
    assert secret and secret[0]["stdin"] == TOKEN
    assert all(TOKEN not in " ".join(c["argv"]) for c in recorded)
    assert TOKEN not in r.stdout + r.stderr


def test_overrides_and_runner_args(fake_gcloud):
    r = deploy("--dry-run", "deploy", "execute", "--", "--model-id", "/mnt/gcs/m/", "-p", "max_steps", "10",
               PROJECT_ID="p", REGION="us-central1", CPU="30", MEMORY="120Gi", MAX_RETRIES="5",
               TASK_TIMEOUT="1h", HF_SECRET="", SERVICE_ACCOUNT="", IMAGE_TAG="v1")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    job = flags(find(cmds, "gcloud", "beta", "run", "jobs", "deploy", "gemma4-finetuning-job"))
    assert (job["region"], job["cpu"], job["memory"], job["max-retries"], job["task-timeout"]) == \
        ("us-central1", "30", "120Gi", "5", "1h")
    assert "set-secrets" not in job and "service-account" not in job
    assert job["image"].endswith(":v1") and job["image"].startswith("us-central1-docker.pkg.dev/p/")
    assert job["args"] == "--model-id,/mnt/gcs/m/,-p,max_steps,10"
    assert flags(find(cmds, "gcloud", "beta", "run", "jobs", "execute", "gemma4-finetuning-job"))["args"] == \
        "--model-id,/mnt/gcs/m/,-p,max_steps,10"


@pytest.mark.parametrize("env, message", [
    ({"CPU": "8"}, "at least 20 CPU"),
    ({"MEMORY": "64Gi"}, "at least 80Gi"),
    ({"GPU_TYPE": "nvidia-h100"}, "GPU_TYPE must be"),
    ({"MAX_RETRIES": "many"}, "MAX_RETRIES must be"),
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


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    base = re.search(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu", text)
    assert base and (int(base[1]), int(base[2])) >= (12, 8)  # Blackwell needs CUDA >= 12.8
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128" in text
    copy_reqs = lines.index("COPY requirements.txt ./")
    copy_code = lines.index("COPY helpers/ helpers/")
    install = next(i for i, ln in enumerate(lines) if "pip install -r" in ln)
    assert copy_reqs < install < copy_code  # dependencies before code
    assert lines[-1] == 'ENTRYPOINT ["/app/cloudrun/entrypoint.sh"]'
    assert "USER 1000:1000" in lines
    assert not re.search(r"^\s*(ENV|ARG)\b.*(HF_TOKEN|SECRET|PASSWORD)", text, re.MULTILINE)  # no secrets baked in
    assert (CLOUDRUN / "Dockerfile.dockerignore").exists()
    assert "cloudrun/Dockerfile" in (CLOUDRUN / "cloudbuild.yaml").read_text()


def test_dockerfile_requirement_filters_match_requirements_txt():
    """The Dockerfile's grep patterns pick torch/torchvision for the CUDA index and keep the runtime pins."""
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
    from helpers import shards
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
                           "MERGE_CMD": f"{sys.executable} -m helpers.shards", "STUB_LOG": log,
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
    run = gcs / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "train_result.json").write_text('{"train": {"global_step": 6}}')
    return run


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
    assert merged["n_shards"] == 3 and merged["n_examples"] == len(labels)
    assert merged["metrics"]["finetuned"] == shards.compute_metrics(labels, preds, sorted(set(labels)))
    assert merged["summary"]["finetuned_accuracy"] == merged["metrics"]["finetuned"]["accuracy"]
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
    assert r.returncode == 2 and "no adapter/" in r.stderr
    for index in (0, 1):
        r = cloud["run"](env={**env, "ADAPTER_RUN": str(train_run), "CLOUD_RUN_TASK_INDEX": str(index)})
        assert r.returncode == 0, r.stderr
    metrics = train_run / "eval-ev" / "metrics.json"
    metrics.unlink()
    r = cloud["run"](env={"JOB_MODE": "merge", "EVAL_DIR": "tr/eval-ev", "EXPECT_SHARDS": "2"})
    assert r.returncode == 0, r.stderr
    assert json.loads(metrics.read_text())["n_examples"] == 20


# ------------------------------------------------------------------- end to end with the real runner


@pytest.mark.slow
def test_entrypoint_end_to_end_killed_then_resumed_then_sharded(tmp_path):
    """The offline default through the real runner: attempt 0 is killed after its first checkpoint, attempt 1
    (same execution) resumes in the same run folder and finishes; then two evaluation tasks on its adapter
    merge into exactly the unsharded evaluation's metrics; HF_TOKEN appears in no output file."""
    pytest.importorskip("helpers.runner", reason="helpers.runner has not landed yet")
    gcs = tmp_path / "gcs"
    gcs.mkdir()
    env = base_env(GCS_MOUNT=gcs, CLOUD_RUN_EXECUTION="e2e-exec", CLOUD_RUN_TASK_ATTEMPT="0",
                   RUNNER_CMD=f"{sys.executable} -m helpers.runner", HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    args = ["-p", "train_size", "32", "-p", "eval_size", "16", "-p", "max_steps", "6", "-p", "save_steps", "2"]
    run_dir = gcs / "runs" / "e2e-exec"
    first = subprocess.Popen([BASH, str(ENTRYPOINT), *args], env=env, cwd=REPO, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        if any(run_dir.rglob("checkpoint-*/trainer_state.json")):
            break
        time.sleep(0.1)
    if first.poll() is not None:
        pytest.fail(f"attempt 0 ended before it could be killed after a checkpoint:\n{first.communicate()[0]}")
    time.sleep(0.5)  # let the checkpoint's last files land
    os.killpg(first.pid, signal.SIGKILL)  # what a maintenance event or an OOM does to a GPU task
    first.communicate()
    assert not (run_dir / "metrics.json").exists()
    checkpoints_before = sorted(p.parent.name for p in run_dir.rglob("checkpoint-*/trainer_state.json"))

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
