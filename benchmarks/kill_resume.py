"""Faults in a run folder: kills at random moments of training, checkpoints damaged afterwards, a bucket mount,
and processes racing for one stale lock. Each is followed by the same command, whose outcome is checked.

From the repository root:

    python -m benchmarks.kill_resume                       # 8 trials, the tiny offline default, ~1.5 min each on 2 cores
    python -m benchmarks.kill_resume --trials 20 --seed 3 --max-steps 12 --save-steps 3
    python -m benchmarks.kill_resume --damage random       # after the kills, damage the newest complete checkpoint
    python -m benchmarks.kill_resume --gcsfuse             # run folders on a simulated Cloud Storage FUSE mount
    python -m benchmarks.kill_resume --race-lock 20        # 8 processes race for one stale run.lock, 20 rounds

What it checks: that a run killed as a machine failure or an out-of-memory kill would (no handler runs) finishes
with the same command, resuming only from a checkpoint that was whole, and with the adapter an uninterrupted run
trains. ``tests/test_kill_resume.py`` and ``tests/test_run_faults.py`` use the functions below at fixed points;
this script draws them at random.

``--damage``: after the last kill, the newest complete checkpoint loses files or bytes as a user or a full disk
might do it (``DAMAGES``). The rerun must say it is damaged and resume from the complete checkpoint before it;
with none before it, it must stop before the model loads, and the trial then reruns with ``--fresh``.

A trial: a fresh run folder; ``python -m helpers.runner --notebook 04_training ...`` is started and, at a kill
point drawn at random, SIGKILLed together with its notebook kernel. The same command is then rerun, possibly
killed again (``--kills``), and finally run to the end. A trial passes when the final run resumed from the newest
checkpoint that was complete (marked ``COMPLETE``) at the last kill, never from an unmarked one; its optimizer
steps are exactly 1..max_steps, each once (as an uninterrupted run's); the adapter and ``train_result.json`` exist;
no unmarked checkpoint and no ``adapter.tmp`` is left behind.

Checkpoints are ``RUN_DIR/checkpoint-N``, written in place by transformers and marked complete by
``helpers.training.CompleteCheckpoints`` once every file is there; the adapter is saved into ``RUN_DIR/adapter.tmp``
and then published to ``RUN_DIR/adapter`` (``helpers.run.folder.publish_adapter``, the marker last). Kill points:
- ``timed``: a random moment between the first training step and the end of training (calibrated on an
  uninterrupted reference run, which also gives the adapter the resumed runs are compared with);
- ``writing``: as soon as a new ``checkpoint-N`` folder appears, while transformers writes its files;
- ``held``: checkpoint N fully written but not yet marked (a test hook, loaded through ``sitecustomize`` on
  ``PYTHONPATH``, holds the marker's write; no project code is changed for it);
- ``after``: just after checkpoint N is marked (0-0.3 s later);
- ``adapter``: the trained adapter saved into ``adapter.tmp`` but not yet published (the hook holds it there).
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers.run.folder import (
    ADAPTER,
    ADAPTER_STAGING,
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    PROMPT_FILE,
    TRAIN_RESULT,
    acquire_lock,
    checkpoint_folders,
    checkpoint_step,
    is_complete,
)

REPO = Path(__file__).resolve().parents[1]
KILL_KINDS = ("timed", "writing", "held", "after", "adapter")
HOLD_MARKER = "KILL_TEST_HOLD_SAVE"  # path of the marker file the hook writes when it holds a write
HOLD_STEP = "KILL_TEST_HOLD_STEP"  # hold only the COMPLETE marker of checkpoint-N (every checkpoint's when unset)
HOLD_ADAPTER = "KILL_TEST_HOLD_ADAPTER"  # set: hold the adapter in adapter.tmp, before it is published
# Cloud Storage FUSE's semantics under this folder (a flat bucket mounted without rename-dir-limit, as in
# gcsfuse's docs/semantics.md): renaming a directory fails, and file locks are refused.
GCSFUSE_ROOT = "KILL_TEST_GCSFUSE_ROOT"
HOLD_COPY = "KILL_TEST_HOLD_COPY"  # marker path: hold the adapter's copy into place after its first file

# Loaded by every Python process of the run (the runner and the notebook kernel) when its folder is on
# PYTHONPATH. Inactive unless one of the variables above is set.
SITECUSTOMIZE = f'''
import os
if os.environ.get("{HOLD_MARKER}"):
    import pathlib, time
    _write_text = pathlib.Path.write_text

    def _held(path):
        """The write to hold: checkpoint-N's completion marker, or the adapter's prompt file in its staging
        folder (written by publish_adapter once the weights are saved there, before the folder is moved)."""
        if os.environ.get("{HOLD_ADAPTER}"):
            return path.name == "{PROMPT_FILE}" and path.parent.name == "{ADAPTER_STAGING}"
        step = os.environ.get("{HOLD_STEP}")
        folder = path.parent.name
        return (path.name == "{COMPLETE_MARKER}" and folder.startswith("{CHECKPOINT_PREFIX}")
                and (not step or folder == "{CHECKPOINT_PREFIX}" + step))

    def _held_write_text(self, *args, **kwargs):
        if _held(self):
            with open(os.environ["{HOLD_MARKER}"], "w") as fh:
                fh.write(str(self))
            time.sleep(3600)  # until the test kills us
        return _write_text(self, *args, **kwargs)

    pathlib.Path.write_text = _held_write_text

if os.environ.get("{GCSFUSE_ROOT}"):
    import errno, fcntl, shutil, time
    _bucket = os.path.realpath(os.environ["{GCSFUSE_ROOT}"])

    def _on_bucket(path):
        return os.path.realpath(os.fspath(path)).startswith(_bucket + os.sep)

    def _refusing_directories(rename):
        def refused(src, dst, *args, **kwargs):
            if os.path.isdir(src) and (_on_bucket(src) or _on_bucket(dst)):
                raise OSError(errno.ENOTSUP, "directory rename refused (simulated gcsfuse, flat bucket)", os.fspath(src))
            return rename(src, dst, *args, **kwargs)
        return refused

    def _refusing_locks(lock):
        def refused(fd, *args, **kwargs):
            number = fd if isinstance(fd, int) else fd.fileno()
            if _on_bucket(os.readlink(f"/proc/self/fd/{{number}}")):
                raise OSError(errno.ENOLCK, "no file locking (simulated gcsfuse)")
            return lock(fd, *args, **kwargs)
        return refused

    os.replace, os.rename = _refusing_directories(os.replace), _refusing_directories(os.rename)
    fcntl.flock, fcntl.lockf = _refusing_locks(fcntl.flock), _refusing_locks(fcntl.lockf)

    if os.environ.get("{HOLD_COPY}"):
        _copyfile = shutil.copyfile
        _held_folder = os.sep + "{ADAPTER}" + os.sep

        def _held_copyfile(src, dst, *args, **kwargs):
            result = _copyfile(src, dst, *args, **kwargs)
            target = os.fspath(dst)
            if _held_folder in target:
                with open(os.environ["{HOLD_COPY}"], "w") as fh:
                    fh.write(target)
                time.sleep(3600)  # one file copied into place, the rest not: until the test kills us
            return result

        shutil.copyfile = _held_copyfile
'''


def runner_command(out: Path, train_size=24, max_steps=6, save_steps=2, batch_size=6) -> list[str]:
    return [sys.executable, "-m", "helpers.runner", "--output-dir", str(out), "--notebook", "04_training",
            "-p", "train_size", str(train_size), "-p", "eval_size", "12", "-p", "max_steps", str(max_steps),
            "-p", "save_steps", str(save_steps), "-p", "batch_size", str(batch_size)]


# Damage done to a complete checkpoint after a kill: what the marker must catch.
DAMAGES = {
    "optimizer": "optimizer.pt and scheduler.pt deleted",
    "weights": "adapter_model.safetensors truncated to half",
    "state": "trainer_state.json deleted",
}


def damage_checkpoint(folder: Path, how: str) -> None:
    """Damage a checkpoint as ``DAMAGES[how]`` says."""
    if how == "optimizer":
        for name in ("optimizer.pt", "scheduler.pt"):
            (folder / name).unlink()
    elif how == "weights":
        weights = folder / "adapter_model.safetensors"
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    else:
        (folder / "trainer_state.json").unlink()


def run_env(hook_dir: Path, hold_marker: Path | None = None, hold_step: int | None = None,
            gcsfuse_root: Path | None = None, hold_copy: Path | None = None, hold_adapter: bool = False) -> dict:
    """The environment for a run: offline, the hook's folder on PYTHONPATH, a hold switched on or off.

    ``hold_marker``: the hook writes this file and waits when it holds checkpoint-``hold_step``'s completion marker
    (every checkpoint's when None), or with ``hold_adapter`` the adapter in ``adapter.tmp`` before it is published.
    ``gcsfuse_root``: Cloud Storage FUSE's semantics under that folder (``hold_copy``: hold the adapter's copy
    into place, which replaces the refused directory rename there, after its first file)."""
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    variables = (HOLD_MARKER, HOLD_STEP, HOLD_ADAPTER, GCSFUSE_ROOT, HOLD_COPY)
    env = {k: v for k, v in os.environ.items() if k not in variables}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if hold_marker is not None:
        env[HOLD_MARKER] = str(hold_marker)
        if hold_adapter:
            env[HOLD_ADAPTER] = "1"
    if gcsfuse_root is not None:
        env[GCSFUSE_ROOT] = str(gcsfuse_root)
        if hold_copy is not None:
            env[HOLD_COPY] = str(hold_copy)
    if hold_step is not None:
        env[HOLD_STEP] = str(hold_step)
    return env


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the runner and every descendant at once (the notebook kernel runs in a session of its own,
    so killing the runner's process group would leave it training)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in reversed(family):  # the kernel first: it is the one writing checkpoints
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the run folder's checkpoints that carry the completion marker (written last: resume trusts it)."""
    return [checkpoint_step(p) for p in checkpoint_folders(out) if is_complete(p)]


def unmarked_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoint folders without the marker (being written, or left so by a kill)."""
    return [checkpoint_step(p) for p in checkpoint_folders(out) if not is_complete(p)]


def files_under(folder: Path, root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.is_file())


def snapshot(out: Path) -> dict:
    """What the run folder holds right after a kill: the complete checkpoints, the files of unmarked ones
    (``checkpoint-N/...``), the adapter's staging folder's files (None when there is none), and whether the
    adapter and the training record are there."""
    staging = out / ADAPTER_STAGING
    return {"complete": complete_checkpoints(out),
            "unmarked": [name for step in unmarked_checkpoints(out)
                         for name in files_under(out / f"{CHECKPOINT_PREFIX}{step}", out)],
            "adapter_staging": files_under(staging, out) if staging.exists() else None,
            "adapter": is_complete(out / ADAPTER), "train_result": (out / TRAIN_RESULT).exists()}


def wait_for(proc: subprocess.Popen, condition, timeout: float, poll: float = 0.005) -> bool:
    """Poll ``condition()`` until it is true (True), or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return bool(condition())
        time.sleep(poll)
    return False


def verify(out: Path, max_steps: int, expected_resume: int | None) -> list[str]:
    """Problems with a finished run (empty when it is right). ``expected_resume``: the checkpoint step the final
    run must have resumed from (None: it must have started from scratch)."""
    problems = []
    result_file = out / TRAIN_RESULT
    if not result_file.exists():
        return [f"no {TRAIN_RESULT}"]
    train = json.loads(result_file.read_text())["train"]
    resumed = train["resumed_from"]
    got = int(Path(resumed).name.split("-")[1]) if resumed else None
    if got != expected_resume:
        problems.append(f"resumed from {resumed}, expected checkpoint-{expected_resume}")
    if train["global_step"] != max_steps:
        problems.append(f"global_step {train['global_step']} != max_steps {max_steps}")
    steps = [step for step, _ in train["loss_history"]]
    if steps != list(range(1, max_steps + 1)):  # logged every step: each step once, none beyond
        problems.append(f"logged steps {steps} are not 1..{max_steps} once each")
    state_file = out / f"{CHECKPOINT_PREFIX}{max_steps}" / "trainer_state.json"
    if not state_file.exists() or json.loads(state_file.read_text())["global_step"] != max_steps:
        problems.append(f"{CHECKPOINT_PREFIX}{max_steps} missing or not at step {max_steps}")
    for name in ("adapter_config.json", "adapter_model.safetensors", PROMPT_FILE, COMPLETE_MARKER):
        if not (out / ADAPTER / name).exists():
            problems.append(f"no {ADAPTER}/{name}")
    for step in unmarked_checkpoints(out):
        problems.append(f"{CHECKPOINT_PREFIX}{step} left without {COMPLETE_MARKER}")
    if (out / ADAPTER_STAGING).exists():
        problems.append(f"{ADAPTER_STAGING} left behind")
    return problems


def adapter_difference(a: Path, b: Path) -> float | None:
    """Largest absolute difference between two saved adapters' tensors (None when either is missing)."""
    from safetensors.torch import load_file

    fa, fb = a / ADAPTER / "adapter_model.safetensors", b / ADAPTER / "adapter_model.safetensors"
    if not (fa.exists() and fb.exists()):
        return None
    ta, tb = load_file(fa), load_file(fb)
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


# ------------------------------------------------------------------------------------------- the script


def reference_run(root: Path, args) -> dict:
    """An uninterrupted run: its timings calibrate the timed kills; its adapter is the comparison."""
    out, hook = args.runs / "reference", root / "hook"
    hook.mkdir(exist_ok=True)
    proc = start(runner_command(out, args.train_size, args.max_steps, args.save_steps, args.batch_size),
                 run_env(hook, gcsfuse_root=args.bucket), root / "reference.log")
    t0, seen = time.monotonic(), {}
    while proc.poll() is None:
        for step in complete_checkpoints(out):
            seen.setdefault(step, time.monotonic() - t0)
        time.sleep(0.01)
    end = time.monotonic() - t0
    problems = verify(out, args.max_steps, None) if proc.returncode == 0 else [f"exit {proc.returncode}"]
    if problems:
        sys.exit(f"the uninterrupted reference run failed: {problems}; see {root / 'reference.log'}")
    steps = sorted(seen)
    per_step = (seen[steps[-1]] - seen[steps[0]]) / max(1, steps[-1] - steps[0]) if len(steps) > 1 else 1.0
    return {"out": out, "train_start": max(0.0, seen[steps[0]] - steps[0] * per_step),
            "train_end": seen[steps[-1]], "total": end, "checkpoint_times": seen}


def one_kill(kind: str, out: Path, hook: Path, log: Path, args, rng: random.Random, reference: dict) -> str:
    """Start the run, kill it at a point of ``kind``; returns a description of the moment of the kill."""
    saves = list(range(args.save_steps, args.max_steps + 1, args.save_steps))
    command = runner_command(out, args.train_size, args.max_steps, args.save_steps, args.batch_size)
    done = set(complete_checkpoints(out))
    pending = [s for s in saves if s not in done] or saves
    if kind == "held":
        step = rng.choice(pending)
        marker = hook / f"held-{time.monotonic_ns()}"
        proc = start(command, run_env(hook, marker, step, gcsfuse_root=args.bucket), log)
        ok = wait_for(proc, marker.exists, args.timeout)
        what = f"checkpoint-{step} written, its marker held"
    elif kind == "adapter":
        marker = hook / f"held-{time.monotonic_ns()}"
        proc = start(command, run_env(hook, marker, hold_adapter=True, gcsfuse_root=args.bucket), log)
        ok = wait_for(proc, marker.exists, args.timeout)
        what = f"adapter held in {ADAPTER_STAGING}"
    elif kind == "writing":
        existing = max((checkpoint_step(p) for p in checkpoint_folders(out)), default=0)
        proc = start(command, run_env(hook, gcsfuse_root=args.bucket), log)
        ok = wait_for(proc, lambda: any(step > existing for step in unmarked_checkpoints(out)), args.timeout,
                      poll=0.001)
        what = "as a new checkpoint folder appeared"
    elif kind == "after":
        step = rng.choice(pending)
        proc = start(command, run_env(hook, gcsfuse_root=args.bucket), log)
        ok = wait_for(proc, lambda: step in complete_checkpoints(out), args.timeout, poll=0.002)
        delay = rng.uniform(0, 0.3)
        time.sleep(delay)
        what = f"{delay:.2f} s after checkpoint-{step}"
    else:  # timed, relative to the reference run's training window (the rerun's start-up is similar)
        at = rng.uniform(reference["train_start"], reference["train_end"])
        proc = start(command, run_env(hook, gcsfuse_root=args.bucket), log)
        ok = wait_for(proc, lambda: False, at) or proc.poll() is None
        what = f"t={at:.1f} s"
    if proc.poll() is not None:
        return f"{what}: run ended first (exit {proc.returncode})"
    if not ok:
        kill_tree(proc)
        return f"{what}: never reached; killed at timeout"
    kill_tree(proc)
    return what


def expected_resume(out: Path) -> int | None:
    """The checkpoint step the rerun must end up resumed from: the newest complete one, or, when the killed run
    had already written its training record (a kill just after the last checkpoint), the one that record names:
    the rerun finds the run finished and keeps it."""
    if (out / TRAIN_RESULT).exists():
        recorded = json.loads((out / TRAIN_RESULT).read_text())["train"]["resumed_from"]
        return checkpoint_step(recorded) if recorded else None
    return max(complete_checkpoints(out), default=None)


def damage_newest(out: Path, how: str, moments: list[str]) -> tuple[int | None, bool]:
    """Damage the newest complete checkpoint (when the run left one and has no adapter yet); returns (the step
    the rerun must resume from, whether the rerun must stop because no whole checkpoint is left)."""
    complete = complete_checkpoints(out)
    if not complete or (out / TRAIN_RESULT).exists():
        moments.append(f"damage: nothing to damage (complete {complete}, training record: "
                       f"{(out / TRAIN_RESULT).exists()})")
        return expected_resume(out), False
    damage_checkpoint(out / f"{CHECKPOINT_PREFIX}{complete[-1]}", how)
    moments.append(f"damage: checkpoint-{complete[-1]}: {DAMAGES[how]}")
    return (complete[-2], False) if len(complete) > 1 else (None, True)


def trial(index: int, root: Path, args, rng: random.Random, reference: dict) -> dict:
    out, hook, log = args.runs / f"trial-{index:02d}", root / "hook", root / f"trial-{index:02d}.log"
    kinds = [rng.choice(args.kinds) for _ in range(args.kills)]
    moments = []
    for kind in kinds:
        what = one_kill(kind, out, hook, log, args, rng, reference)
        snap = snapshot(out)
        unmarked = f", unmarked: {len(snap['unmarked'])} files" if snap["unmarked"] else ""
        staged = f", {ADAPTER_STAGING}: {len(snap['adapter_staging'])} files" if snap["adapter_staging"] else ""
        moments.append(f"{kind}: {what} -> complete {snap['complete']}{unmarked}{staged}")
    expected, refused = expected_resume(out), False
    if args.damage:
        expected, refused = damage_newest(out, rng.choice(list(DAMAGES)) if args.damage == "random" else args.damage,
                                          moments)
    command = runner_command(out, args.train_size, args.max_steps, args.save_steps, args.batch_size)
    problems = []
    if refused:  # no whole checkpoint left: refused before the model loads, then started over with --fresh
        stopped = subprocess.run(command, env=run_env(hook, gcsfuse_root=args.bucket), cwd=REPO, capture_output=True,
                                 text=True, timeout=args.timeout, check=False)
        if stopped.returncode == 0 or "every complete checkpoint" not in stopped.stderr:
            problems.append(f"not refused with every checkpoint damaged (exit {stopped.returncode})")
        command = [*command, "--fresh"]
    final = subprocess.run(command, env=run_env(hook, gcsfuse_root=args.bucket), cwd=REPO, capture_output=True,
                           text=True, timeout=args.timeout, check=False)
    problems += [f"rerun exit {final.returncode}: {final.stderr[-300:]}"] if final.returncode else []
    problems += verify(out, args.max_steps, expected) if not problems else []
    if args.damage and moments[-1].startswith("damage: checkpoint") and not refused and "is damaged" not in final.stdout:
        problems.append("the rerun did not say the checkpoint was damaged")
    train = json.loads((out / TRAIN_RESULT).read_text())["train"] if (out / TRAIN_RESULT).exists() else {}
    return {"trial": index, "kills": moments, "resumed_from": Path(train["resumed_from"]).name
            if train.get("resumed_from") else None, "global_step": train.get("global_step"),
            "adapter_max_diff": adapter_difference(out, reference["out"]), "problems": problems}


def _race_for_lock(run_dir: str, barrier, holders, no_flock: bool) -> None:
    """One racer: wait for the others, try to take ``run.lock``, and when it wins, hold it while they look."""
    if no_flock:  # as on a bucket mounted with gcsfuse: file locks are refused
        import fcntl

        def refused(*args, **kwargs):
            raise OSError(errno.ENOLCK, "no file locking (simulated gcsfuse)")

        fcntl.flock = refused
    barrier.wait()
    try:
        acquire_lock(run_dir)
    except Exception:  # noqa: BLE001 - a live holder's refusal: this racer lost
        return
    holders.put(os.getpid())
    time.sleep(0.3)


def race_for_stale_lock(run_dir: Path, racers: int = 8, no_flock: bool = False) -> int:
    """How many of ``racers`` processes, started together on a folder whose ``run.lock`` is stale (its process
    has ended), end up holding the lock: exactly one is right."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has ended, as a killed runner's
    (run_dir / "run.lock").write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "started": "then"}))
    context = multiprocessing.get_context("fork")
    barrier, holders = context.Barrier(racers), context.Queue()
    procs = [context.Process(target=_race_for_lock, args=(str(run_dir), barrier, holders, no_flock))
             for _ in range(racers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    count = 0
    while not holders.empty():
        holders.get()
        count += 1
    return count


def race_rounds(root: Path, rounds: int, racers: int) -> int:
    """``rounds`` races with file locks and as many without (gcsfuse); prints a table, returns failed rounds."""
    print("\n| locking | rounds | racers | rounds with exactly one holder | with more | with none |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for no_flock, label in ((False, "flock"), (True, "guard file (no flock, as gcsfuse)")):
        counts = []
        for i in range(rounds):
            run_dir = root / f"race-{int(no_flock)}-{i:03d}"
            run_dir.mkdir(parents=True)
            counts.append(race_for_stale_lock(run_dir, racers, no_flock))
        more, none = sum(c > 1 for c in counts), sum(c == 0 for c in counts)
        failed += more + none
        print(f"| {label} | {rounds} | {racers} | {counts.count(1)} | {more} | {none} |")
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kill_resume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--kills", type=int, default=1, help="kills per trial before the final rerun")
    parser.add_argument("--kinds", nargs="+", default=list(KILL_KINDS), choices=KILL_KINDS,
                        help="kill points to draw from (described above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=24)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep", default=None, help="keep run folders here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--damage", default=None, choices=[*DAMAGES, "random"],
                        help="after the kills, damage the newest complete checkpoint so (described above)")
    parser.add_argument("--gcsfuse", action="store_true",
                        help="run folders on a simulated Cloud Storage FUSE mount (no directory rename, no locks)")
    parser.add_argument("--race-lock", type=int, default=0, metavar="ROUNDS",
                        help="only race --racers processes for one stale lock, ROUNDS times with and without flock")
    parser.add_argument("--racers", type=int, default=8)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(args.keep or tempfile.mkdtemp(prefix="kill-resume-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.race_lock:
        failed = race_rounds(root, args.race_lock, args.racers)
        print(f"\n{failed} rounds without exactly one holder")
        return 1 if failed else 0
    args.bucket = root / "bucket" if args.gcsfuse else None
    args.runs = args.bucket / "runs" if args.gcsfuse else root
    args.runs.mkdir(parents=True, exist_ok=True)
    start_time = time.monotonic()
    reference = reference_run(root, args)
    print(f"reference run: {reference['total']:.0f} s, training ~{reference['train_start']:.0f}-"
          f"{reference['train_end']:.0f} s, checkpoints at {reference['checkpoint_times']}", flush=True)
    rows = []
    for i in range(args.trials):
        row = trial(i, root, args, rng, reference)
        rows.append(row)
        status = "OK" if not row["problems"] else "FAIL: " + "; ".join(row["problems"])
        print(f"[{i:2d}] {' | '.join(row['kills'])} => resumed from {row['resumed_from']}, "
              f"step {row['global_step']}, adapter max|diff| vs uninterrupted {row['adapter_max_diff']}: {status}",
              flush=True)
    print("\n| # | kill point -> state left | resumed from | final step | adapter vs uninterrupted | outcome |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        diff = "n/a" if row["adapter_max_diff"] is None else f"{row['adapter_max_diff']:.1e}"
        print(f"| {row['trial']} | {'<br>'.join(row['kills'])} | {row['resumed_from']} | {row['global_step']} | {diff} | "
              f"{'OK' if not row['problems'] else 'FAIL: ' + '; '.join(row['problems'])} |")
    failed = sum(bool(r["problems"]) for r in rows)
    print(f"\n{len(rows)} trials, {sum(len(r['kills']) for r in rows)} kills, {failed} failed, "
          f"{time.monotonic() - start_time:.0f} s; run folders in {root}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
