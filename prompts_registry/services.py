"""Writes of the prompt registry: syncing prompt files and activating versions."""

import functools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from django.db import IntegrityError, transaction

from prompts_registry.loading import (
    PromptFile,
    PromptFileError,
    PromptFolder,
    load_prompt_folder,
)
from prompts_registry.models import Prompt, PromptActivation, PromptVersion
from prompts_registry.signals import prompt_activated

logger = logging.getLogger(__name__)


@dataclass
class SyncReport:
    """Result of a sync: new, unchanged and invalid files, and rows without files."""

    created: list[PromptFile] = field(default_factory=list)
    unchanged: list[PromptFile] = field(default_factory=list)
    # (prompt name, version) of prompts synced for the first time.
    activated: list[tuple[str, int]] = field(default_factory=list)
    # Invalid files, and files whose content differs from their synced version.
    errors: list[PromptFileError] = field(default_factory=list)
    # Prompts and versions in the database whose folder or file is gone.
    missing_prompts: list[str] = field(default_factory=list)
    missing_versions: list[tuple[str, int]] = field(default_factory=list)
    written: bool = False

    @property
    def in_sync(self) -> bool:
        """Whether the database already contains every file exactly as it is."""
        return not self.created and not self.errors


class PromptSyncFailed(Exception):
    """Raised when a sync finds invalid or changed files. Nothing is written."""

    def __init__(self, report: SyncReport):
        super().__init__(f"Prompt sync failed with {len(report.errors)} errors.")
        self.report = report


def prompts_sync(*, root: Path, dry_run: bool = False) -> SyncReport:
    """Create a PromptVersion for each new ``<name>/v<N>.yaml`` below ``root``.

    All or nothing: when any file is invalid, or differs from the version
    already synced from it, this raises PromptSyncFailed and writes nothing.
    The first sync of a prompt activates its highest version. Later syncs never
    move the active version. Prompts and versions without a file are reported,
    never deleted. With ``dry_run`` nothing is written, and the report lists
    what a sync would write.
    """
    folder = load_prompt_folder(root)
    try:
        return _sync_folder(folder, root, dry_run=dry_run)
    except IntegrityError:
        if transaction.get_connection().in_atomic_block:
            # Inside a caller's transaction the failed write has broken it, so
            # a retry here could not run; the caller decides.
            raise
        # Another sync_prompts (a second replica starting, say) inserted the
        # same rows between this run's read and its write. Its rows are
        # committed now, so planning again compares against them.
        # NOTE: no test runs two syncs at once, so this retry is unexercised.
        logger.warning("Prompt sync collided with a concurrent sync, retrying once")
        return _sync_folder(folder, root, dry_run=dry_run)


def _sync_folder(folder: PromptFolder, root: Path, *, dry_run: bool) -> SyncReport:
    with transaction.atomic():
        report = _plan(folder, root)
        if report.errors:
            raise PromptSyncFailed(report)
        if not dry_run:
            _write(report)
    return report


def _plan(folder: PromptFolder, root: Path) -> SyncReport:
    report = SyncReport(errors=list(folder.errors))
    synced = {
        (row.prompt.name, row.version): row
        for row in PromptVersion.objects.select_related("prompt").only(
            "version", "content_hash", "created_at", "prompt__name"
        )
    }
    active_by_name = dict(Prompt.objects.values_list("name", "active_version_id"))

    highest: dict[str, int] = defaultdict(int)
    for name, version in [*synced, *folder.versions]:
        highest[name] = max(highest[name], version)

    for file in folder.files:
        row = synced.get((file.name, file.version))
        if row is None:
            report.created.append(file)
        elif row.content_hash == file.content_hash:
            report.unchanged.append(file)
        else:
            message = (
                f"differs from version {file.version} as synced on "
                f"{row.created_at:%Y-%m-%d}, and a synced version never changes: "
                "restore the file and put the change in a new file "
                f"{file.name}/v{highest[file.name] + 1}.yaml."
            )
            report.errors.append(PromptFileError(str(root / file.source_path), message))

    new_names = {file.name for file in report.created}
    for name in sorted(new_names):
        if active_by_name.get(name) is None:
            report.activated.append((name, highest[name]))

    report.missing_prompts = sorted(set(active_by_name) - folder.prompt_names)
    report.missing_versions = sorted(
        key
        for key in synced
        if key[0] in folder.prompt_names and key not in folder.versions
    )
    return report


def _write(report: SyncReport) -> None:
    files_by_name: dict[str, list[PromptFile]] = defaultdict(list)
    for file in report.created:
        files_by_name[file.name].append(file)

    prompts = {}
    for name, files in files_by_name.items():
        prompt, _ = Prompt.objects.get_or_create(name=name)
        prompts[name] = prompt
        for file in files:
            PromptVersion.objects.create(
                prompt=prompt,
                version=file.version,
                description=file.description,
                template=file.template,
                system=file.system or "",
                model=file.model or "",
                parameters=file.parameters,
                variables=file.variables,
                content_hash=file.content_hash,
                source_path=file.source_path,
            )

    for name, version in report.activated:
        prompt = prompts[name]
        prompt_activate(
            prompt=prompt,
            version=prompt.versions.get(version=version),
            user=None,
            source=PromptActivation.Source.SYNC,
        )
    report.written = True


def prompt_activate(
    *,
    prompt: Prompt,
    version: PromptVersion,
    user=None,
    source: str = PromptActivation.Source.ADMIN,
) -> PromptActivation | None:
    """Make ``version`` the active version of ``prompt`` and record the change.

    The change and its history row are written in one transaction, and
    ``prompt_activated`` is sent after it commits. Returns None and writes
    nothing when the version is already active.
    """
    if version.prompt_id != prompt.pk:
        raise ValueError(f"{version} is not a version of the prompt {prompt.name!r}.")
    if user is not None and not user.is_authenticated:
        user = None

    with transaction.atomic():
        # The row lock orders concurrent activations, so every history row
        # names the version that was really active before it.
        locked = Prompt.objects.select_for_update().get(pk=prompt.pk)
        previous = locked.active_version
        if previous is not None and previous.pk == version.pk:
            return None

        locked.active_version = version
        locked.description = version.description
        locked.save(update_fields=["active_version", "description", "updated_at"])
        activation = PromptActivation.objects.create(
            prompt=locked,
            version=version,
            previous_version=previous,
            changed_by=user,
            source=source,
        )
        transaction.on_commit(
            functools.partial(
                _send_prompt_activated,
                prompt_name=locked.name,
                version=version.version,
                previous_version=previous.version if previous else None,
                changed_by=user.get_username() if user else None,
            )
        )

    prompt.active_version = version
    prompt.description = locked.description
    prompt.updated_at = locked.updated_at
    return activation


def _send_prompt_activated(**kwargs) -> None:
    logger.info(
        "Prompt %s is now at version %s (previous version %s, changed by %s)",
        kwargs["prompt_name"],
        kwargs["version"],
        kwargs["previous_version"],
        kwargs["changed_by"] or "sync_prompts",
    )
    # The change is committed already, so a failing receiver (an unreachable
    # channel layer, say) must not turn the request that made it into an
    # error. send_robust logs each receiver's exception.
    prompt_activated.send_robust(sender=Prompt, **kwargs)
