"""``tuneline``: run the retrain flow, check data, fetch a release.

    tuneline run --preset demo [--set sft.max_steps=10 ...]   run the flow here
    tuneline data check SPEC [SPEC ...]                       validate datasets, no training
    tuneline fetch ROOT MODEL [RELEASE_ID|LATEST] DEST        download a release, verify checksums
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print_summary(result: dict) -> None:
    base, tuned = result["base"], result["tuned"]
    width = max(len(k) for k in base) + 2
    print("\n" + "metric".ljust(width) + f"{'base':>12}{'tuned':>12}{'delta':>12}")
    for key in base:
        if key in tuned:
            print(key.ljust(width) + f"{base[key]:>12.4f}{tuned[key]:>12.4f}{tuned[key] - base[key]:>+12.4f}")
    gate = result["gate"]
    print(f"\nquality gate: {'passed' if gate['passed'] else 'FAILED — ' + '; '.join(gate['reasons'])}")
    print(f"release: {result['release_uri']}")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.params import load_params
    from flows.retrain import retrain

    params = load_params(args.preset, args.set)
    result = retrain(params)
    _print_summary(result)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    import tempfile

    from tasks.data import DataConfig, DataError, prepare

    config = DataConfig(datasets=args.specs, system_prompt=args.system, model_name=args.name, model_author=args.author)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = prepare(config, Path(tmp))
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from tasks.release import ReleaseError, fetch_release
    from tasks.store import Store

    try:
        manifest = fetch_release(Store(args.root), args.model, args.release_id, Path(args.dest))
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"fetched {manifest['model_name']}/{manifest['release_id']}: {len(manifest['files'])} files, checksums verified")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the retrain flow here")
    run.add_argument("--preset", default=None, help="YAML preset: a path or a name in flows/presets (demo)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter, e.g. sft.max_steps=10")
    run.set_defaults(func=cmd_run)
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="load, validate and report datasets without training")
    check.add_argument("specs", nargs="+", help="SOURCE[#N] specs")
    check.add_argument("--system", default="You are a helpful, witty, and culturally aware assistant.")
    check.add_argument("--name", default="Tuneline Assistant")
    check.add_argument("--author", default="the Tuneline team")
    check.set_defaults(func=cmd_data_check)
    fetch = sub.add_parser("fetch", help="download a release and verify every checksum")
    fetch.add_argument("root", help="artifact root: a folder or s3://bucket/prefix")
    fetch.add_argument("model", help="released model name")
    fetch.add_argument("release_id", nargs="?", default="LATEST")
    fetch.add_argument("dest", nargs="?", default="./release")
    fetch.set_defaults(func=cmd_fetch)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
