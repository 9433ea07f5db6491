from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from prompts_registry.services import PromptSyncFailed, SyncReport, prompts_sync


class Command(BaseCommand):
    help = (
        "Create a prompt version in the database for each new "
        "<prompts folder>/<name>/v<N>.yaml. All or nothing: any invalid or "
        "changed file fails the run and nothing is written."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--path",
            type=Path,
            default=None,
            help="Folder of prompt folders (default: settings.PROMPTS_DIR).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Validate the files and report what a sync would write, writing "
            "nothing.",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="Write nothing, and exit with status 1 when a file is new, "
            "changed or invalid. For deploy pipelines.",
        )

    def handle(self, *args, path, dry_run, check, **options):
        root = path or Path(settings.PROMPTS_DIR)
        try:
            report = prompts_sync(root=root, dry_run=dry_run or check)
        except PromptSyncFailed as failure:
            self._print_report(failure.report, root)
            errors = _plural(len(failure.report.errors), "error")
            raise CommandError(
                f"Prompt sync failed with {errors}, listed above, and wrote "
                "nothing. Fix the files and run sync_prompts again."
            ) from None

        self._print_report(report, root)
        if check and not report.in_sync:
            raise CommandError(
                f"Prompt files in {root} are not synced "
                f"({_plural(len(report.created), 'new version')}): run sync_prompts."
            )

    def _print_report(self, report: SyncReport, root: Path) -> None:
        created_verb = "Created" if report.written else "Would create"
        activated_verb = "Activated" if report.written else "Would activate"
        for file in report.created:
            self.stdout.write(f"{created_verb} {file.name} v{file.version}")
        for name, version in report.activated:
            self.stdout.write(f"{activated_verb} {name} v{version} (first sync)")
        for name in report.missing_prompts:
            self.stdout.write(
                self.style.WARNING(
                    f"Prompt {name} is in the database but has no folder in {root}; "
                    "it is kept."
                )
            )
        for name, version in report.missing_versions:
            self.stdout.write(
                self.style.WARNING(
                    f"{name} v{version} is in the database but has no file "
                    f"{name}/v{version}.yaml; it is kept."
                )
            )
        for error in report.errors:
            self.stderr.write(str(error))

        created = "created" if report.written else "to create"
        summary = (
            f"{len(report.created)} {created}, {len(report.unchanged)} unchanged, "
            f"{_plural(len(report.errors), 'error')}"
        )
        if not report.written:
            summary += " (nothing written)"
        style = self.style.ERROR if report.errors else self.style.SUCCESS
        self.stdout.write(style(f"Prompt versions in {root}: {summary}."))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
