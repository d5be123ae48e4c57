"""Copy a model from the Hugging Face hub into a Cloud Storage folder, one file at a time.

    python stage_weights.py google/gemma-4-31B-it main gs://BUCKET/gemma-4-31b-it [--work-dir DIR]

cloudrun/stage.yaml runs it on a Cloud Build worker (`cloudrun/deploy.sh stage`). Resumable: a file already in
the folder with the hub's size is skipped, and a Cloud Storage object exists only once its upload has
completed (single-object uploads are atomic), so a stopped copy leaves whole files or none. config.json is
copied last: a folder that has it holds every file, which is what the job's entrypoint checks. Each file is
downloaded to the worker's disk, uploaded in parallel chunks (the transfer manager that Google's GPU best
practices name for large models), then deleted: the disk holds one file at a time.

A token, when the model is gated, comes from huggingface_hub's usual places (HF_TOKEN, HF_TOKEN_PATH).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LAST = "config.json"  # copied last: its presence marks a complete folder
CHUNKED_FROM = 64 << 20  # files from this size are uploaded in parallel chunks


def split_gs(url: str) -> tuple[str, str]:
    """gs://bucket/some/folder -> ("bucket", "some/folder")."""
    if not url.startswith("gs://") or "/" not in url[5:].strip("/"):
        raise ValueError(f"{url!r}: expected gs://BUCKET/FOLDER")
    bucket, _, prefix = url[5:].strip("/").partition("/")
    return bucket, prefix


def to_copy(hub: dict[str, int], present: dict[str, int]) -> list[str]:
    """The hub's files that the folder lacks or holds with another size, in name order, config.json last."""
    names = sorted(name for name, size in hub.items() if present.get(name) != size)
    return sorted(names, key=lambda name: name == LAST)


def copy_all(hub: dict[str, int], present: dict[str, int], download, upload, log=print) -> list[str]:
    """Copies what ``to_copy`` names: ``download(name) -> local Path``, ``upload(path, name)``; each local file
    is deleted once uploaded. Returns the names copied."""
    names = to_copy(hub, present)
    log(f"{len(hub)} files on the hub, {len(hub) - len(names)} already in the folder, {len(names)} to copy "
        f"({sum(hub[n] for n in names) / 1e9:.1f} GB)")
    for name in names:
        path = Path(download(name))
        upload(path, name)
        path.unlink()
        log(f"copied {name} ({hub[name] / 1e9:.2f} GB)")
    return names


def hub_files(api, repo: str, revision: str) -> dict[str, int]:
    """{path: size} of every file of the repository at ``revision``."""
    from huggingface_hub.hf_api import RepoFile

    return {entry.path: entry.size for entry in api.list_repo_tree(repo, recursive=True, revision=revision)
            if isinstance(entry, RepoFile)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="a model on the hub, e.g. google/gemma-4-31B-it")
    parser.add_argument("revision", help="a branch, tag or commit of it, e.g. main")
    parser.add_argument("dest", help="gs://BUCKET/FOLDER")
    parser.add_argument("--work-dir", default="download", help="where each file waits between download and upload")
    args = parser.parse_args(argv)
    from google.cloud import storage
    from google.cloud.storage import transfer_manager
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    bucket_name, prefix = split_gs(args.dest)
    bucket = storage.Client().bucket(bucket_name)
    try:
        hub = hub_files(HfApi(), args.repo, args.revision)
    except GatedRepoError:
        print(f"error: {args.repo} is gated: accept its terms on huggingface.co with your account, store a token "
              "(HF_TOKEN=hf_... cloudrun/deploy.sh setup) and stage again", file=sys.stderr)
        return 2
    except RepositoryNotFoundError:
        print(f"error: {args.repo}@{args.revision} not found on the hub (or private: a token is needed)", file=sys.stderr)
        return 2
    present = {blob.name[len(prefix) + 1:]: blob.size for blob in bucket.list_blobs(prefix=prefix + "/")}

    def download(name):
        return hf_hub_download(args.repo, name, revision=args.revision, local_dir=args.work_dir)

    def upload(path, name):
        blob = bucket.blob(f"{prefix}/{name}")
        if path.stat().st_size >= CHUNKED_FROM:
            transfer_manager.upload_chunks_concurrently(str(path), blob, max_workers=8)
        else:
            blob.upload_from_filename(str(path))

    copy_all(hub, present, download, upload)
    print(f"{args.dest}: complete ({sum(hub.values()) / 1e9:.1f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
