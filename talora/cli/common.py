"""What every entry point shares: storage and actor-layout flags, and one error path that never
leaks a credential.

Every job script and every ``talora`` verb ends through :func:`run_main`, with one line on stderr
naming the thing and what was expected, and an exit code by kind:

    0  done
    1  failed (anything else; the redacted traceback is printed above the line)
    2  bad input: a flag, file, field or name that is wrong; nothing was started
    3  storage unavailable: the endpoint did not answer after retries; rerun the same command
       once it answers (what was committed is kept, what was not is redone)
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable


from talora.batch.pipeline import ActorLayout
from talora.io.storage import StorageOptions, StorageUnavailable, redact


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object storage (standard AWS_* variables and profiles work unchanged)")
    g.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--s3-profile", default=None, help="AWS profile name")
    g.add_argument("--s3-anon", action="store_true", help="unsigned requests (public buckets)")
    g.add_argument("--s3-access-key-id", default=None, help="prefer env vars or roles; never printed")
    g.add_argument("--s3-secret-access-key", default=None, help="prefer env vars or roles; never printed")


def storage_from_args(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=args.s3_endpoint_url, profile=args.s3_profile, anon=args.s3_anon,
                          access_key_id=args.s3_access_key_id, secret_access_key=args.s3_secret_access_key)


def add_layout_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("actors (each unset one is chosen from the resources Ray reports)")
    g.add_argument("--num-actors", type=int, default=None, help="model actors (default: one per GPU share, "
                   "else one per core for a CPU preset and one per 4 cores for the real SAMs)")
    g.add_argument("--cpus-per-actor", type=float, default=None, help="default 0.75 per thread")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="default 1 where Ray has GPUs; a fraction shares a GPU (0.5: two actors per GPU); 0: CPU only")
    g.add_argument("--threads-per-actor", type=int, default=None, help="torch threads of each actor")


def layout_from_args(args: argparse.Namespace):
    return ActorLayout(args.num_actors, args.cpus_per_actor, args.gpus_per_actor, args.threads_per_actor)


EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3


def run_main(name: str, job: Callable[[], int], storage: StorageOptions) -> int:
    """Runs `job`; a failure prints one redacted line (a redacted traceback first for unexpected ones)
    and returns its exit code by kind (see the module docstring)."""
    try:
        return job()
    except StorageUnavailable as e:  # checked first: it is an OSError, like the bad-input kinds below
        print(f"{name}: error: {redact(str(e), storage)}; nothing uncommitted was kept: rerun the same command "
              "when it answers again", file=sys.stderr)
        return EXIT_STORAGE
    except (ValueError, FileNotFoundError, KeyError, PermissionError) as e:
        print(f"{name}: error: {redact(str(e), storage)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:
        print(redact(traceback.format_exc(), storage), file=sys.stderr)
        print(f"{name}: failed", file=sys.stderr)
        return EXIT_FAILED
