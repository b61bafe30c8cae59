"""The `environment-provider` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import keys
from .collection import InvalidTestCollectionError
from .errors import EnvironmentProviderError
from .etcd import Database, StorageRequestError, StorageUnavailableError
from .keys import InvalidIdError
from .settings import Settings, SettingsError
from .validation import InvalidDocumentError, parse_json

PROGRAM = "environment-provider"
USER_ERRORS = (
    EnvironmentProviderError,
    InvalidIdError,
    InvalidDocumentError,
    InvalidTestCollectionError,
    StorageUnavailableError,
    StorageRequestError,
    SettingsError,
)


class UsageError(Exception):
    """A command-line value is wrong; the message names the value and how to fix it."""


def read_json_argument(value: str, what: str) -> Any:
    """Parse `value` as the path of a JSON file when such a file exists, else as inline JSON."""
    path = Path(value)
    if not value.strip().startswith(("{", "[")) and path.is_file():
        return parse_json(path.read_bytes(), f"{what} {value}")
    try:
        return parse_json(value, what)
    except InvalidDocumentError as error:
        if value.strip().startswith(("{", "[")):
            raise
        raise UsageError(f"{what} {value!r} is neither an existing file nor valid JSON ({error})") from None


def parse_timeouts(values: list[str]) -> dict[str, float]:
    timeouts = {}
    for value in values:
        kind, separator, seconds = value.partition("=")
        if not separator:
            raise UsageError(f"--timeout {value!r} must look like KIND=SECONDS, for example iut=600")
        try:
            timeouts[kind] = float(seconds)
        except ValueError:
            raise UsageError(f"--timeout {value!r}: {seconds!r} is not a number of seconds") from None
    return timeouts


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


class Commands:
    """One method per subcommand; each returns the exit status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._database: Database | None = None

    @property
    def database(self) -> Database:
        if self._database is None:
            self._database = Database(self.settings)
        return self._database

    @property
    def app(self) -> Any:
        from .celery_app import app

        return app

    def register(self, args: argparse.Namespace) -> int:
        from .registry import read_definitions, register_definitions

        definitions, errors = read_definitions(args.paths)
        for error in errors:
            print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        if errors:
            print(f"{PROGRAM}: nothing registered; fix the files above and try again", file=sys.stderr)
            return 1
        if not definitions:
            print(f"{PROGRAM}: error: no *.json provider definitions found in {' '.join(args.paths)}", file=sys.stderr)
            return 1
        register_definitions(self.database, [(item.kind, item.name, item.definition) for item in definitions])
        for item in definitions:
            print(f"registered {item.kind.key} provider {item.name!r} from {item.path}")
        return 0

    def providers(self, args: argparse.Namespace) -> int:
        from .registry import list_providers

        kind = keys.kind_by_key(args.kind) if args.kind else None
        listing = list_providers(self.database, kind)
        if args.json:
            print_json(listing)
            return 0
        for kind_key, providers in listing.items():
            print(f"{kind_key}:")
            if not providers:
                print("  (none)")
            for name, definition in providers.items():
                inner = next(iter(definition.values()))
                print(f"  {name}  (type {inner.get('type', 'jsontas')})")
        return 0

    def configure(self, args: argparse.Namespace) -> int:
        from .registry import configure_testrun

        tercc = read_json_argument(args.tercc, "--tercc")
        testrun_id = args.testrun
        if testrun_id is None:
            testrun_id = (tercc.get("meta") or {}).get("id") if isinstance(tercc, dict) else None
            if testrun_id is None:
                raise UsageError("--testrun is missing and the TERCC has no meta.id to use instead")
        dataset = read_json_argument(args.dataset, "--dataset") if args.dataset else {}
        config = {}
        if args.config:
            config = read_json_argument(args.config, "--config")
        for name, value in (("identity", args.identity), ("artifact_id", args.artifact_id), ("context", args.context)):
            if value is not None and isinstance(config, dict):
                config[name] = value
        configuration = configure_testrun(
            self.database,
            self.settings,
            testrun_id,
            tercc,
            args.iut,
            args.execution_space,
            args.log_area,
            dataset=dataset,
            config=config,
            timeouts=parse_timeouts(args.timeout),
        )
        if not configuration.config.get("identity"):
            print(
                f"{PROGRAM}: warning: no --identity given; rulesets that read $identity get nothing "
                "(give the artifact's package URL, e.g. pkg:docker/acme/router@2.4.1)",
                file=sys.stderr,
            )
        if args.json:
            print_json(configuration.as_json())
        else:
            print(f"configured testrun {configuration.testrun_id}")
        return 0

    def checkout(self, args: argparse.Namespace) -> int:
        from .client import enqueue_checkout, wait_for_result

        task_id = enqueue_checkout(self.app, self.database, self.settings, args.testrun, args.suite_runner_id)
        if not args.wait:
            print_json({"task_id": task_id, "testrun_id": args.testrun}) if args.json else print(task_id)
            return 0

        display = ProgressDisplay(sys.stderr, enabled=not args.json)
        if not args.json:
            print(f"task {task_id} enqueued for testrun {args.testrun}; waiting", file=sys.stderr)
        try:
            status = wait_for_result(self.app, self.database, self.settings, task_id, args.testrun, args.wait_timeout, display.show)
        finally:
            display.close()
        result = status["result"] or {}
        if args.json:
            print_json(result)
        else:
            print_summary(result, task_id)
        return 0 if status["status"] == "SUCCESS" and not result.get("error") else 1

    def status(self, args: argparse.Namespace) -> int:
        from .client import task_status

        testrun_id = self.database.get(keys.task_testrun(keys.validate_uuid(args.task_id, "task id")))
        if testrun_id is None:
            raise UsageError(f"task {args.task_id} is not known: no checkout was enqueued or started with that id")
        status = task_status(self.app, self.settings, args.task_id)
        status["testrun_id"] = testrun_id
        result = status["result"]
        if isinstance(result, dict) and result.get("error"):
            # A failed checkout returns an error result rather than raising; report it as the failure it is.
            status["status"] = "FAILURE"
        if args.json:
            print_json(status)
        else:
            print(f"task {args.task_id}: {status['status']} (testrun {testrun_id})")
            if result:
                print_summary(result, args.task_id)
        return 1 if status["status"] == "FAILURE" else 0

    def release(self, args: argparse.Namespace) -> int:
        from .release import release_environment, release_task, release_testrun

        if args.environment:
            report = release_environment(self.database, self.settings, args.environment)
        elif args.task:
            report = release_task(self.database, self.settings, args.task)
        else:
            report = release_testrun(self.database, self.settings, args.testrun)
        if args.json:
            print_json(report.as_json())
        elif report.not_found:
            print(f"{PROGRAM}: error: nothing to release: {report.not_found}", file=sys.stderr)
        else:
            print(f"released {plural(len(report.released), 'environment')}")
            for failure in report.failures:
                print(f"{PROGRAM}: error: {failure}", file=sys.stderr)
            if report.failures:
                print(f"{PROGRAM}: the release is incomplete; the keys of the items above are kept, run the release again", file=sys.stderr)
        return 0 if report.complete and not report.not_found else 1

    def worker(self, args: argparse.Namespace) -> int:
        options = list(args.celery_options)
        if options[:1] == ["--"]:
            options = options[1:]
        if not any(option in ("-l", "--loglevel") or option.startswith("--loglevel=") for option in options):
            options += ["--loglevel", "INFO"]  # progress lines are logged at INFO
        command = [sys.executable, "-m", "celery", "-A", "environment_provider.celery_app", "worker", *options]
        os.execv(sys.executable, command)
        return 0  # not reached

    def beat(self, args: argparse.Namespace) -> int:
        options = list(args.celery_options)
        if options[:1] == ["--"]:
            options = options[1:]
        command = [sys.executable, "-m", "celery", "-A", "environment_provider.celery_app", "beat", *options]
        os.execv(sys.executable, command)
        return 0  # not reached

    def sweep(self, args: argparse.Namespace) -> int:
        from .release import sweep

        margin = args.margin if args.margin is not None else 3 * self.settings.sweep_interval
        released = sweep(self.database, self.settings, margin)
        print_json({"released": released}) if args.json else print(f"released {len(released)} expiring testruns")
        return 0

    def local(self, args: argparse.Namespace) -> int:
        from .local import LocalStack

        stack = LocalStack(etcd_members=args.etcd_members, redis_append_only=args.append_only)
        stack.start()
        try:
            print("local stack running; in another shell run:")
            for name, value in stack.environment().items():
                print(f"  export {name}={value}")
            print(f"data in {stack.directory}; press Ctrl-C to stop", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            stack.stop()
            print("local stack stopped")
        return 0

    def api(self, args: argparse.Namespace) -> int:
        import uvicorn

        from .api.app import GRACEFUL_SHUTDOWN_SECONDS, create_app

        uvicorn.run(
            create_app(self.settings),
            host=args.host,
            port=args.port,
            log_level="info",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        return 0

    def demo(self, args: argparse.Namespace) -> int:
        from .demo import run_demo

        return run_demo(Path(args.providers), Path(args.examples))


class ProgressDisplay:
    """Shows checkout progress: each event on its own line, and on a terminal a status line below them.

    The status line counts the sub-suites ready so far and repeats what the
    checkout is waiting for, if anything.
    """

    def __init__(self, stream: Any, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.live = enabled and stream.isatty()
        self.ready = 0
        self.waiting = ""

    def show(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        data = event.get("data", {})
        message = data.get("message", "")
        if message.startswith("sub-suite "):
            self.ready += 1
        if message.startswith("waiting for"):
            self.waiting = message
        elif message:
            self.waiting = ""
        if self.live:
            self.stream.write("\r\033[K")
        if event.get("event") == "message":
            self.stream.write(f"  [{data.get('level', 'info')}] {message}\n")
        elif event.get("event") == "finished":
            self.stream.write(f"  [{data.get('status')}] {self.ready} sub-suites ready\n")
        if self.live and event.get("event") != "finished":
            status = f"  {self.ready} sub-suites ready"
            self.stream.write(status + (f"; {self.waiting}" if self.waiting else ""))
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_summary(result: dict[str, Any], task_id: str) -> None:
    """Print a task result for people: one line per sub-suite, or the error."""
    if result.get("error"):
        print(f"checkout failed: {result['error']}")
        if result.get("details"):
            print(f"  details: {result['details']}")
        return
    print(f"checkout of task {task_id} succeeded:")
    for suite in result.get("suites", []):
        print(f"  test suite {suite['suite_name']!r}: {len(suite['sub_suites'])} sub-suites")
        for sub_suite in suite["sub_suites"]:
            executor = sub_suite["executor"].get("instructions", {}).get("image") or sub_suite["executor"].get("provider_id")
            print(
                f"    {sub_suite['name']}: environment {sub_suite['sub_suite_id']}, {plural(len(sub_suite['recipes']), 'recipe')}, "
                f"IUT from {sub_suite['iut'].get('provider_id')!r} ({sub_suite['iut'].get('identity', '')}), "
                f"execution space {executor}, log area {sub_suite['log_area'].get('livelogs') or sub_suite['log_area'].get('provider_id')}"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Check out and release ETOS test environments (IUTs, execution spaces, log areas) through Celery and etcd.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    register = commands.add_parser("register", help="validate and store provider definitions from files or folders")
    register.add_argument("paths", nargs="+", metavar="PATH", help="a JSON definition, or a folder searched for *.json")

    providers = commands.add_parser("providers", help="list registered providers")
    providers.add_argument("--kind", choices=list(keys.KINDS_BY_KEY), help="only this kind")
    providers.add_argument("--json", action="store_true", help="print the definitions as JSON")

    configure = commands.add_parser("configure", help="configure a testrun: TERCC, providers, dataset, timeouts")
    configure.add_argument("--testrun", help="testrun id (a UUID); default: the TERCC's meta.id")
    configure.add_argument("--tercc", required=True, help="the TERCC event: a JSON file or inline JSON")
    configure.add_argument("--iut", required=True, metavar="NAME", help="registered IUT provider id")
    configure.add_argument("--execution-space", required=True, metavar="NAME", help="registered execution space provider id")
    configure.add_argument("--log-area", required=True, metavar="NAME", help="registered log area provider id")
    configure.add_argument("--dataset", metavar="FILE_OR_JSON", help="dataset: an object, or a list with one object per test suite")
    configure.add_argument("--identity", metavar="PURL", help="artifact identity as a package URL, e.g. pkg:docker/acme/router@2.4.1")
    configure.add_argument("--artifact-id", help="Eiffel artifact id of the IUT")
    configure.add_argument("--context", help="Eiffel context id used by log areas")
    configure.add_argument("--config", metavar="FILE_OR_JSON", help="config object (identity, artifact_id, context)")
    configure.add_argument(
        "--timeout", action="append", default=[], metavar="KIND=SECONDS",
        help="timeout in seconds for iut, execution-space, log-area or total; repeatable",
    )  # fmt: skip
    configure.add_argument("--json", action="store_true", help="print the stored configuration as JSON")

    checkout = commands.add_parser("checkout", help="enqueue the checkout of a configured testrun")
    checkout.add_argument("--testrun", required=True, help="testrun id")
    checkout.add_argument(
        "--suite-runner-id", action="append", default=[], metavar="ID",
        help="test suite started id, one per test suite in order; generated when missing",
    )  # fmt: skip
    checkout.add_argument("--wait", action="store_true", help="show progress and print the result")
    checkout.add_argument("--wait-timeout", type=float, default=3600, metavar="SECONDS", help="give up waiting after this long (default 3600)")
    checkout.add_argument("--json", action="store_true", help="print only JSON on stdout")

    status = commands.add_parser("status", help="show a checkout task's state and result")
    status.add_argument("task_id", metavar="TASK_ID")
    status.add_argument("--json", action="store_true")

    release = commands.add_parser("release", help="check in one environment, or a whole testrun")
    which = release.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", metavar="ID", help="release the testrun of this checkout task")
    which.add_argument("--testrun", metavar="ID", help="release every environment of this testrun")
    which.add_argument("--environment", metavar="ID", help="release one sub-suite environment")
    release.add_argument("--json", action="store_true")

    worker = commands.add_parser("worker", help="run a Celery worker; other options go to 'celery worker'")
    worker.add_argument("celery_options", nargs=argparse.REMAINDER, help="options for celery worker, e.g. --concurrency 4")

    beat = commands.add_parser("beat", help="run Celery beat, which schedules the sweep of expiring testruns")
    beat.add_argument("celery_options", nargs=argparse.REMAINDER, help="options for celery beat")

    sweep = commands.add_parser("sweep", help="release testruns whose lease is about to expire, once")
    sweep.add_argument("--margin", type=float, metavar="SECONDS", help="release when fewer seconds are left (default 3 sweep intervals)")
    sweep.add_argument("--json", action="store_true")

    local = commands.add_parser("local", help="run etcd and Redis on free 127.0.0.1 ports until Ctrl-C")
    local.add_argument("--etcd-members", type=int, default=1, help="etcd cluster size (default 1)")
    local.add_argument("--append-only", action="store_true", help="turn on Redis append-only persistence")

    api = commands.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")

    demo = commands.add_parser("demo", help="run the example testrun end to end on a temporary local stack")
    demo.add_argument("--providers", default="providers", help="folder of provider definitions (default providers)")
    demo.add_argument("--examples", default="examples", help="folder with tercc.json and dataset.json (default examples)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    for index, token in enumerate(argv):
        if not token.startswith("-"):
            if token in ("worker", "beat") and "-h" not in argv[index + 1 :] and "--help" not in argv[index + 1 :]:
                # Everything after `worker` or `beat` belongs to celery, options included.
                argv, passthrough = argv[: index + 1], argv[index + 1 :]
            break
    args = parser.parse_args(argv)
    if passthrough:
        args.celery_options = passthrough
    logging.basicConfig(
        # Without -v only errors are logged: the commands print their own one-line outcome.
        level=logging.DEBUG if args.verbose else logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_environment()
        return getattr(Commands(settings), args.command)(args)
    except USER_ERRORS as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
